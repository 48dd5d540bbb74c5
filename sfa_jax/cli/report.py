"""Outputs of a run or a comparison: accuracy-matrix heatmaps, accuracy curves and markdown tables.

Every function takes the JSON form of results (``SequenceResult.to_json()``, with ``'seed'``
added by the caller), so a ``results.json`` written earlier can be re-plotted without re-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(result: dict[str, Any], path: str) -> None:
  """Writes a PNG of the accuracy matrix ``R[i, j]`` with its values written in the cells.

  Args:
    result: a run's JSON (needs ``accuracy_matrix``, ``task_names``, ``method``).
    path: where the PNG goes.

  Example:
    >>> import os, tempfile
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'accuracy_matrix': [[0.98, 0.0], [0.7, 0.9]]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'matrix.png')
    >>> accuracy_heatmap(run, path)
    >>> os.path.getsize(path) > 0
    True
  """
  matrix = np.asarray(result['accuracy_matrix'])
  names = result['task_names']
  size = max(3.0, 0.6 * len(names) + 2)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap='viridis')
  if len(names) <= 20:
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(j, i, f'{value:.2f}', ha='center', va='center', color='white' if value < 0.6 else 'black', fontsize=8)
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel('evaluated on task j')
  ax.set_ylabel('after training on task i')
  ax.set_title(f"{result['method']}\naccuracy matrix", fontsize=9)  # two lines: a long label fits a small matrix
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def accuracy_curves(result: dict[str, Any], path: str) -> None:
  """Writes a PNG of every task's test accuracy over the run's global steps.

  Dashed vertical lines mark task boundaries; faint dotted lines mark SFA's averaging steps, where
  past tasks' accuracy jumps.

  Args:
    result: a run's JSON (needs ``curve``, ``steps_per_task``, ``averaging_steps``, ``task_names``,
      ``method``).
    path: where the PNG goes.

  Example:
    >>> import os, tempfile
    >>> points = [(4, 0, [0.98, 0.0]), (5, 1, [0.5, 0.6]), (6, 1, [0.8, 0.5]), (8, 1, [0.7, 0.9])]
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4], 'averaging_steps': [6, 8],
    ...        'curve': [{'step': s, 'task': t, 'accuracies': a} for s, t, a in points]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'curves.png')
    >>> accuracy_curves(run, path)
    >>> os.path.getsize(path) > 0
    True
  """
  fig, ax = plt.subplots(figsize=(8, 4))
  draw_curves(ax, result)
  ax.set_title(f"{result['method']}: accuracy on every task during the run")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_curves(ax: Any, result: dict[str, Any], legend: bool = True) -> None:
  """Draws :func:`accuracy_curves`'s lines on the matplotlib axes ``ax``, titled by the method.

  Args:
    ax: matplotlib axes.
    result: a run's JSON, as for :func:`accuracy_curves`.
    legend: whether to draw the task legend on ``ax``.

  Example:
    >>> fig, ax = plt.subplots()
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4], 'averaging_steps': [8],
    ...        'curve': [{'step': 4, 'task': 0, 'accuracies': [0.9, 0.0]}, {'step': 8, 'task': 1, 'accuracies': [0.7, 0.8]}]}
    >>> draw_curves(ax, run)
    >>> len(ax.get_lines())  # a task boundary, an average, two tasks
    4
    >>> plt.close(fig)
  """
  steps = [point['step'] for point in result['curve']]
  accuracies = np.asarray([point['accuracies'] for point in result['curve']])
  for step in result['averaging_steps']:
    ax.axvline(step, color='0.85', linestyle=':', linewidth=0.8)
  for boundary in np.cumsum(result['steps_per_task'])[:-1]:
    ax.axvline(boundary, color='0.4', linestyle='--', linewidth=1)
  for j, name in enumerate(result['task_names']):
    ax.plot(steps, accuracies[:, j], marker='.', markersize=3, label=name)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel('optimizer steps')
  ax.set_ylabel('test accuracy')
  ax.set_title(result['method'], fontsize=9)
  if legend:
    ax.legend(fontsize=8, loc='best', ncol=max(1, len(result['task_names']) // 10))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  array = np.asarray(values, dtype=float)
  return float(array.mean()), float(array.std())


def summarize_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Aggregates runs over seeds: one row per method, in order of first appearance.

  Each row holds the method, the number of seeds, and ``(mean, std)`` over seeds (population std)
  of: the final accuracy on each task, the average accuracy after the last task, forgetting
  (max convention), backward transfer and the training seconds.

  Args:
    runs: run JSONs, each with ``method``, ``accuracy_matrix``, ``metrics`` and ``seconds``.

  Returns:
    The rows.

  Example:
    >>> runs = [{'method': 'm', 'accuracy_matrix': [[1.0, 0.0], [0.5, 1.0]], 'seconds': {'train': 1.0},
    ...          'metrics': {'average_accuracy': 0.75, 'forgetting': 0.5, 'backward_transfer': -0.5}}]
    >>> summarize_runs(runs)[0]['average_accuracy']
    (0.75, 0.0)
  """
  by_method: dict[str, list[dict[str, Any]]] = {}
  for run in runs:
    by_method.setdefault(run['method'], []).append(run)
  rows = []
  for method, group in by_method.items():
    finals = np.asarray([run['accuracy_matrix'][-1] for run in group])
    rows.append({
        'method': method,
        'seeds': len(group),
        'final_accuracy': [_mean_std(finals[:, j]) for j in range(finals.shape[1])],
        'average_accuracy': _mean_std([run['metrics']['average_accuracy'] for run in group]),
        'forgetting': _mean_std([run['metrics']['forgetting'] for run in group]),
        'backward_transfer': _mean_std([run['metrics']['backward_transfer'] for run in group]),
        'train_seconds': _mean_std([run['seconds']['train'] for run in group]),
    })
  return rows


def markdown_table(rows: Sequence[dict[str, Any]], task_names: Sequence[str]) -> str:
  """A markdown table of :func:`summarize_runs` rows: mean ± std over seeds.

  Columns: the final accuracy on each task (for streams of up to 5 tasks), the mean accuracy over
  all tasks after the last one (in bold), forgetting, backward transfer, training seconds.

  Args:
    rows: from :func:`summarize_runs` (in the order to show).
    task_names: the stream's task names, for the per-task columns.

  Returns:
    The table, without a final newline.

  Example:
    >>> row = {'method': 'm', 'seeds': 2, 'final_accuracy': [(0.5, 0.1)], 'average_accuracy': (0.5, 0.1),
    ...        'forgetting': (0.2, 0.0), 'backward_transfer': (-0.2, 0.0), 'train_seconds': (1.0, 0.0)}
    >>> print(markdown_table([row], ['t0']).splitlines()[2])
    | m | 2 | 0.500 ± 0.100 | **0.500 ± 0.100** | 0.200 ± 0.000 | -0.200 ± 0.000 | 1.0 ± 0.0 |
  """
  show_tasks = len(task_names) <= 5
  header = ['method', 'seeds'] + ([f'acc. {name}' for name in task_names] if show_tasks else [])
  header += ['mean acc. (all tasks)', 'forgetting', 'BWT', 'train s']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * 2 + '---:|' * (len(header) - 2)]
  cell = lambda pair: f'{pair[0]:.3f} ± {pair[1]:.3f}'
  for row in rows:
    cells = [row['method'], str(row['seeds'])]
    if show_tasks:
      cells += [cell(pair) for pair in row['final_accuracy']]
    cells += [f"**{cell(row['average_accuracy'])}**", cell(row['forgetting']), cell(row['backward_transfer'])]
    cells.append('{:.1f} ± {:.1f}'.format(*row['train_seconds']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
