"""Tables: the mean ± std of runs over seeds in markdown, as computed by hand."""

import numpy as np

from sfa_jax import engine
from sfa_jax import metrics
from sfa_jax.cli import report


def _run(matrix, seed, train_seconds, method='sfa'):
  return {
      'method': method,
      'seed': seed,
      'accuracy_matrix': matrix,
      'seconds': {'train': train_seconds, 'evaluate': 0.1, 'total': train_seconds + 0.1},
      'metrics': metrics.summarize(np.asarray(matrix)),
  }


RUNS = [
    _run([[0.9, 0.1], [0.5, 0.8]], 0, 2.0),
    _run([[0.8, 0.2], [0.3, 0.9]], 1, 4.0),
    _run([[1.0, 0.0], [0.0, 1.0]], 0, 1.0, method='finetune'),
]


def test_markdown_table_shows_the_hand_computed_numbers():
  table = report.markdown_table(engine.summarize_runs(RUNS), ['even', 'odd'])
  lines = table.splitlines()
  assert lines[0] == ('| method | seeds | acc. even | acc. odd | mean acc. (all tasks) | forgetting | BWT | train s |')
  assert lines[2] == (
      '| sfa | 2 | 0.400 ± 0.100 | 0.850 ± 0.050 | **0.625 ± 0.025** | 0.450 ± 0.050 | -0.450 ± 0.050 | 3.0 ± 1.0 |'
  )
  assert lines[3].startswith('| finetune | 1 | 0.000 ± 0.000 | 1.000 ± 0.000 | **0.500 ± 0.000** | 1.000 ± 0.000 |')
  assert len(lines) == 4


def test_markdown_table_drops_per_task_columns_for_long_streams():
  names = [f't{i}' for i in range(6)]
  row = {'method': 'm', 'seeds': 1, 'final_accuracy': [(0.5, 0.0)] * 6, 'average_accuracy': (0.5, 0.0),
         'forgetting': (0.1, 0.0), 'backward_transfer': (-0.1, 0.0), 'train_seconds': (1.0, 0.0)}
  header = report.markdown_table([row], names).splitlines()[0]
  assert 'acc. t0' not in header and 'mean acc. (all tasks)' in header
