"""The README's runnable examples run as written."""

import pathlib
import re

import sfa_jax

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _block_after(heading: str) -> str:
  """The first ```python block after ``heading`` in the README."""
  text = README.read_text()
  section = text[text.index(heading):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_nnx_example_runs_and_averages():
  namespace: dict = {}
  exec(compile(_block_after('### Flax NNX'), 'README.md (Flax NNX)', 'exec'), namespace)
  state = sfa_jax.find_state(namespace['optimizer'])
  assert int(state.count) == 20 and bool(state.active) and bool(namespace['averaged'])  # step T averages


def test_the_engine_example_runs_a_user_method_with_adamw_cosine_and_a_sweep():
  namespace: dict = {}
  exec(compile(_block_after('## Your method, optimizer and loggers'), 'README.md (engine)', 'exec'), namespace)
  result, results = namespace['result'], namespace['results']
  assert len(result.accuracy_matrix) == 2 and len(results) == 4
  assert [r.method for r in results] == ['params-ema(decay=0.5)'] * 2 + ['params-ema(decay=0.9)'] * 2


def test_the_model_and_data_example_runs_an_nnx_module_adamw_cosine_and_a_user_method_on_a_stream_of_arrays():
  namespace: dict = {}
  exec(compile(_block_after('## Your method, optimizer and loggers'), 'README.md (engine)', 'exec'), namespace)
  exec(compile(_block_after('### Your model and data'), 'README.md (model and data)', 'exec'), namespace)
  finetune, sfa = namespace['finetune'], namespace['sfa']
  assert finetune.accuracy_matrix[0][0] > 0.8  # the NNX module learns task 0
  assert sfa.accuracy_matrix[1][0] > finetune.accuracy_matrix[1][0]  # and SFA keeps more of it
  assert [(r['method'], r['seed']) for r in namespace['compared']][-2:] == [('params-ema(decay=0.5)', 0), ('params-ema(decay=0.5)', 1)]
  assert [r.method for r in namespace['swept']] == ['params-ema(decay=0.5)', 'params-ema(decay=0.9)']
