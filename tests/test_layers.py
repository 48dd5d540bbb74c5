"""The package's layers: ``import sfa_jax`` loads the core alone."""

import json
import subprocess
import sys

HEAVY = ('flax', 'orbax', 'tensorflow_datasets', 'matplotlib', 'mlxtend', 'sklearn', 'tensorflow')


def test_import_sfa_jax_loads_the_core_only():
  code = 'import sys, json, sfa_jax; print(json.dumps(sorted(sys.modules)))'
  loaded = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)
  assert not [name for name in loaded if name.split('.')[0] in HEAVY]
  core = {'sfa_jax', 'sfa_jax._validation', 'sfa_jax.transforms', 'sfa_jax.anchors', 'sfa_jax.adaptive',
          'sfa_jax.fisher', 'sfa_jax.merging'}
  assert {name for name in loaded if name.startswith('sfa_jax')} == core
