"""Figures: every plot writes a PNG file, from results in their JSON form."""

import numpy as np

from sfa_jax import metrics
from sfa_jax.cli import plots
from sfa_jax.engine.lm import LMResult

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

MATRIX = [[0.9, 0.1], [0.5, 0.8]]
RUN = {
    'method': 'sfa',
    'seed': 0,
    'task_names': ['even', 'odd'],
    'accuracy_matrix': MATRIX,
    'curve': [
        {'step': 10, 'task': 0, 'accuracies': MATRIX[0]},
        {'step': 14, 'task': 1, 'accuracies': [0.2, 0.5]},
        {'step': 15, 'task': 1, 'accuracies': [0.6, 0.4]},
        {'step': 20, 'task': 1, 'accuracies': MATRIX[1]},
    ],
    'steps_per_task': [10, 10],
    'averaging_steps': [15, 20],
    'metrics': metrics.summarize(np.asarray(MATRIX)),
}


def _png(path):
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 1000


def test_a_runs_plots_are_png_files(tmp_path):
  plots.accuracy_heatmap(RUN, str(tmp_path / 'matrix.png'))
  plots.accuracy_curves(RUN, str(tmp_path / 'curves.png'))
  plots.curves_grid([RUN, RUN | {'method': 'finetune'}], str(tmp_path / 'grid.png'))
  assert _png(tmp_path / 'matrix.png') and _png(tmp_path / 'curves.png') and _png(tmp_path / 'grid.png')


def test_curves_of_a_single_task_without_averaging(tmp_path):
  run = {'method': 'finetune', 'task_names': ['all'], 'steps_per_task': [5], 'averaging_steps': [],
         'curve': [{'step': 5, 'task': 0, 'accuracies': [0.7]}]}
  plots.accuracy_curves(run, str(tmp_path / 'curves.png'))
  assert _png(tmp_path / 'curves.png')


def test_plots_of_several_runs_are_png_files(tmp_path):
  plots.average_accuracy_plot([RUN, RUN | {'seed': 1}], str(tmp_path / 'average.png'), title='two seeds')
  plots.long_stream_plot([RUN], str(tmp_path / 'long.png'), early_tasks=1, title='long')
  families = {'sfa': [{'mean': [0.5, 0.8], 'std': [0.1, 0.0]}, {'mean': [0.8, 0.4]}], 'l2': [{'mean': [0.6, 0.6]}]}
  plots.tradeoff_plot(families, str(tmp_path / 'tradeoff.png'), frontiers={'sfa': [[0.5, 0.8], [0.8, 0.4]]})
  result = LMResult('sfa', ['math', 'law'], ['initial', 'math', 'law'], [[3.0, 3.0], [1.0, 3.0], [2.0, 1.0]],
                    {'math': [0.0, 0.5, 0.4]}, [], [], {})
  plots.lm_stages_plot([result], str(tmp_path / 'lm.png'))
  assert all(_png(tmp_path / f'{name}.png') for name in ('average', 'long', 'tradeoff', 'lm'))
