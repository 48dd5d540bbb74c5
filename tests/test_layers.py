"""The package's layers: ``import sfa_jax`` loads nothing heavy; its names load the core alone."""

import json
import subprocess
import sys

HEAVY = ('flax', 'orbax', 'tensorflow_datasets', 'matplotlib', 'mlxtend', 'sklearn', 'tensorflow')
CORE = {'sfa_jax', 'sfa_jax._validation', 'sfa_jax.transforms', 'sfa_jax.anchors', 'sfa_jax.adaptive',
        'sfa_jax.fisher', 'sfa_jax.merging'}


def _loaded_after(code: str) -> list[str]:
  script = f'import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))'
  return json.loads(subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout)


def test_import_sfa_jax_loads_no_jax():
  loaded = _loaded_after('import sfa_jax')
  assert 'jax' not in loaded and {name for name in loaded if name.startswith('sfa_jax')} == {'sfa_jax'}


def test_the_public_names_load_the_core_only():
  names = 'sfa l2 ewc reanchor find_state set_hyperparams adaptive_sfa diagonal_fisher online_fisher ties interpolate'
  loaded = _loaded_after(f'import sfa_jax\nfor name in {names.split()!r}: getattr(sfa_jax, name)')
  assert not [name for name in loaded if name.split('.')[0] in HEAVY]
  assert {name for name in loaded if name.startswith('sfa_jax')} == CORE


def test_every_public_name_resolves():
  import sfa_jax

  for name in sfa_jax.__all__:
    assert getattr(sfa_jax, name) is not None
  assert set(sfa_jax.__all__) <= set(dir(sfa_jax))
