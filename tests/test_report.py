"""Reports: PNG plots are written, and the table's mean ± std match hand-computed values."""

import numpy as np
import pytest

from sfa_jax import metrics
from sfa_jax.cli import report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _run(matrix, seed, train_seconds, method='sfa'):
  curve = [
      {'step': 10, 'task': 0, 'accuracies': matrix[0]},
      {'step': 14, 'task': 1, 'accuracies': [0.2, 0.5]},
      {'step': 15, 'task': 1, 'accuracies': [0.6, 0.4]},
      {'step': 20, 'task': 1, 'accuracies': matrix[1]},
  ]
  return {
      'method': method,
      'seed': seed,
      'task_names': ['even', 'odd'],
      'accuracy_matrix': matrix,
      'curve': curve,
      'steps_per_task': [10, 10],
      'averaging_steps': [15, 20],
      'seconds': {'train': train_seconds, 'evaluate': 0.1, 'total': train_seconds + 0.1},
      'metrics': metrics.summarize(np.asarray(matrix)),
  }


RUNS = [
    _run([[0.9, 0.1], [0.5, 0.8]], 0, 2.0),
    _run([[0.8, 0.2], [0.3, 0.9]], 1, 4.0),
    _run([[1.0, 0.0], [0.0, 1.0]], 0, 1.0, method='finetune'),
]


def _png(path):
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 1000


def test_plots_are_png_files(tmp_path):
  report.accuracy_heatmap(RUNS[0], str(tmp_path / 'matrix.png'))
  report.accuracy_curves(RUNS[0], str(tmp_path / 'curves.png'))
  assert _png(tmp_path / 'matrix.png') and _png(tmp_path / 'curves.png')


def test_curves_of_a_single_task_without_averaging(tmp_path):
  run = {'method': 'finetune', 'task_names': ['all'], 'steps_per_task': [5], 'averaging_steps': [],
         'curve': [{'step': 5, 'task': 0, 'accuracies': [0.7]}]}
  report.accuracy_curves(run, str(tmp_path / 'curves.png'))
  assert _png(tmp_path / 'curves.png')


def test_summary_is_mean_and_population_std_over_seeds():
  sfa, finetune = report.summarize_runs(RUNS)
  assert (sfa['method'], sfa['seeds'], finetune['method'], finetune['seeds']) == ('sfa', 2, 'finetune', 1)
  # Final rows (0.5, 0.8) and (0.3, 0.9); forgetting 0.9-0.5 and 0.8-0.3.
  assert sfa['final_accuracy'] == [pytest.approx((0.4, 0.1)), pytest.approx((0.85, 0.05))]
  assert sfa['average_accuracy'] == pytest.approx((0.625, 0.025))
  assert sfa['forgetting'] == pytest.approx((0.45, 0.05))
  assert sfa['backward_transfer'] == pytest.approx((-0.45, 0.05))
  assert sfa['train_seconds'] == pytest.approx((3.0, 1.0))
  assert finetune['average_accuracy'] == pytest.approx((0.5, 0.0))


def test_markdown_table_shows_the_hand_computed_numbers():
  table = report.markdown_table(report.summarize_runs(RUNS), ['even', 'odd'])
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
