"""Figures of results, as PNG files: the one module that draws (and imports matplotlib).

Every function takes results in their JSON form (``SequenceResult.to_json()`` and the rows built
from it), so results written earlier can be drawn again without training: a run's accuracy matrix
(:func:`accuracy_heatmap`) and its accuracy on every task during the run (:func:`accuracy_curves`,
:func:`curves_grid`); several runs' average accuracy after each task (:func:`average_accuracy_plot`,
:func:`long_stream_plot`); trade-off points with their frontiers (:func:`tradeoff_plot`); and a
language-model sequence's losses after each stage (:func:`lm_stages_plot`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sfa_jax import metrics  # noqa: E402


def _save(fig: Any, path: str, dpi: int = 110) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def accuracy_heatmap(result: dict[str, Any], path: str) -> None:
  """Writes a PNG of the accuracy matrix ``R[i, j]`` with its values written in the cells.

  Args:
    result: a run's JSON (needs ``accuracy_matrix``, ``task_names``, ``method``).
    path: where the PNG goes.

  Example:
    >>> import os, tempfile
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'],
    ...        'accuracy_matrix': [[0.98, 0.0], [0.7, 0.9]]}
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
  _save(fig, path)


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
    >>> points = [(4, 0, [0.98, 0.0]), (5, 1, [0.5, 0.6]), (6, 1, [0.8, 0.5]),
    ...           (8, 1, [0.7, 0.9])]
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4],
    ...        'averaging_steps': [6, 8],
    ...        'curve': [{'step': s, 'task': t, 'accuracies': a} for s, t, a in points]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'curves.png')
    >>> accuracy_curves(run, path)
    >>> os.path.getsize(path) > 0
    True
  """
  fig, ax = plt.subplots(figsize=(8, 4))
  _draw_curves(ax, result)
  ax.set_title(f"{result['method']}: accuracy on every task during the run")
  _save(fig, path)


def _draw_curves(ax: Any, result: dict[str, Any], legend: bool = True) -> None:
  """Draws :func:`accuracy_curves`'s lines on the matplotlib axes ``ax``, titled by the method.

  Args:
    ax: matplotlib axes.
    result: a run's JSON, as for :func:`accuracy_curves`.
    legend: whether to draw the task legend on ``ax``.

  Example:
    >>> fig, ax = plt.subplots()
    >>> curve = [{'step': 4, 'task': 0, 'accuracies': [0.9, 0.0]},
    ...          {'step': 8, 'task': 1, 'accuracies': [0.7, 0.8]}]
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4],
    ...        'averaging_steps': [8], 'curve': curve}
    >>> _draw_curves(ax, run)
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


def curves_grid(runs: Sequence[dict[str, Any]], path: str, *, columns: int = 3) -> None:
  """Writes a PNG with one panel per run: every task's accuracy over the run (as :func:`accuracy_curves`).

  Args:
    runs: run JSONs with a ``curve`` (trained with ``eval_every > 0``), e.g. the first seed of
      each configuration.
    path: where the PNG goes.
    columns: panels per row.

  Raises:
    ValueError: on no runs.

  Example:
    >>> import os, tempfile
    >>> points = [(4, 0, [0.98, 0.0]), (6, 1, [0.8, 0.5]), (8, 1, [0.7, 0.9])]
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4],
    ...        'averaging_steps': [6, 8],
    ...        'curve': [{'step': s, 'task': t, 'accuracies': a} for s, t, a in points]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'curves.png')
    >>> curves_grid([run, run], path)
    >>> os.path.getsize(path) > 0
    True
  """
  if not runs:
    raise ValueError('runs must hold at least one run.')
  columns = min(columns, len(runs))
  rows = -(-len(runs) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False, sharey=True)
  for ax, run in zip(axes.flat, runs):
    _draw_curves(ax, run, legend=False)
  for ax in axes.flat[len(runs):]:
    ax.axis('off')
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(10, len(labels)), fontsize=8)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def average_accuracy_plot(runs: Sequence[dict[str, Any]], path: str, *, title: str = '') -> None:
  """Writes a PNG of the average accuracy over the tasks seen so far after each task, one line per configuration.

  Mean over seeds with a band of ± one std (``metrics['average_accuracy_curve']`` of each run).

  Args:
    runs: run JSONs (``GridRun.to_json()`` of :func:`sfa_jax.engine.grids.run_grid`).
    path: where the PNG goes.
    title: the plot's title.

  Example:
    >>> import os, tempfile
    >>> runs = [{'method': 'm', 'metrics': {'average_accuracy_curve': [0.9, 0.6, 0.5]}}]
    >>> path = os.path.join(tempfile.mkdtemp(), 'average.png')
    >>> average_accuracy_plot(runs, path)
    >>> os.path.getsize(path) > 0
    True
  """
  grouped: dict[str, list[list[float]]] = {}
  for run in runs:
    grouped.setdefault(run['method'], []).append(run['metrics']['average_accuracy_curve'])
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (label, curves) in enumerate(grouped.items()):
    values = np.asarray(curves)
    mean, std = values.mean(0), values.std(0)
    steps = np.arange(1, values.shape[1] + 1)
    style = '-' if i < 10 else '--'
    ax.plot(steps, mean, style, marker='.', color=f'C{i % 10}', label=label)
    ax.fill_between(steps, mean - std, mean + std, color=f'C{i % 10}', alpha=0.15)
  ax.set_ylim(0.0, 1.02)
  ax.set_xlabel('tasks trained')
  ax.set_ylabel('average accuracy on the tasks seen so far')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower left', ncol=2)
  if title:
    ax.set_title(title)
  _save(fig, path)


def long_stream_plot(runs: Sequence[dict[str, Any]], path: str, *, early_tasks: int = 10, title: str = '') -> None:
  """Writes a PNG of long runs in three panels, one line per run: the average accuracy so far; the
  accuracy of the early tasks (and of task 0, dotted) over time; the final accuracy on each task.

  Args:
    runs: run JSONs (one seed each), with ``method`` and ``accuracy_matrix``.
    path: where the PNG goes.
    early_tasks: how many of the first tasks the middle panel follows.
    title: the figure's title.

  Example:
    >>> import os, tempfile
    >>> matrix = [[0.9, 0.1, 0.1], [0.6, 0.9, 0.1], [0.5, 0.7, 0.9]]
    >>> runs = [{'method': 'm', 'accuracy_matrix': matrix}]
    >>> path = os.path.join(tempfile.mkdtemp(), 'long.png')
    >>> long_stream_plot(runs, path, early_tasks=2)
    >>> os.path.getsize(path) > 0
    True
  """
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  for i, run in enumerate(runs):
    matrix = np.asarray(run['accuracy_matrix'])
    early = min(early_tasks, len(matrix))
    trained = np.arange(1, len(matrix) + 1)
    color = f'C{i % 10}'
    axes[0].plot(trained, metrics.average_accuracy_curve(matrix), color=color, label=run['method'])
    axes[1].plot(trained[early - 1:], matrix[early - 1:, :early].mean(1), color=color)
    axes[1].plot(trained, matrix[:, 0], ':', color=color, alpha=0.7)
    axes[2].plot(trained, matrix[-1], '.', color=color, markersize=3)
  axes[0].set_ylabel('average accuracy on the tasks seen so far')
  axes[1].set_ylabel(f'accuracy: tasks 0-{early_tasks - 1} (line), task 0 (dotted)')
  axes[2].set_ylabel('final accuracy')
  for ax, xlabel in zip(axes, ('tasks trained', 'tasks trained', 'task index')):
    ax.set_xlabel(xlabel)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='lower center', ncol=len(runs), fontsize=8)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def tradeoff_plot(
    families: Mapping[str, Sequence[dict[str, Any]]],
    path: str,
    *,
    frontiers: Mapping[str, Any] | None = None,
    axis_labels: Sequence[str] = ('task A accuracy', 'task B accuracy'),
    title: str = '',
) -> None:
  """Writes a PNG of trade-off points: one colour and marker per family, error bars, frontiers drawn.

  Args:
    families: ``{family: [{'mean': [x, y], 'std': [x, y]}, ...]}`` (``std`` may be left out).
    path: where the PNG goes.
    frontiers: ``{family: points of shape (n, 2)}``, each drawn as a line in its family's colour
      (e.g. the Pareto frontier of its means); ``None``: none drawn.
    axis_labels: the x and y axis labels.
    title: the plot's title.

  Example:
    >>> import os, tempfile
    >>> families = {'sfa': [{'mean': [0.5, 0.6], 'std': [0.01, 0.02]},
    ...                     {'mean': [0.7, 0.3], 'std': [0.0, 0.0]}]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'tradeoff.png')
    >>> tradeoff_plot(families, path, frontiers={'sfa': [[0.5, 0.6], [0.7, 0.3]]})
    >>> os.path.getsize(path) > 0
    True
  """
  markers = 'osD^vP*Xhp<>'
  frontiers = frontiers or {}
  fig, ax = plt.subplots(figsize=(7, 6))
  for i, (name, points) in enumerate(families.items()):
    mean = np.asarray([p['mean'] for p in points]).reshape(-1, 2)
    std = np.asarray([p.get('std', [0.0, 0.0]) for p in points]).reshape(-1, 2)
    color = f'C{i % 10}'
    ax.errorbar(mean[:, 0], mean[:, 1], xerr=std[:, 0], yerr=std[:, 1], fmt=markers[i % len(markers)],
                color=color, alpha=0.8, capsize=2, markersize=6, label=name)
    front = np.asarray(frontiers.get(name, np.zeros((0, 2)))).reshape(-1, 2)
    if len(front) > 1:
      ax.plot(front[:, 0], front[:, 1], '-', color=color, alpha=0.6, linewidth=1.2)
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel(axis_labels[0])
  ax.set_ylabel(axis_labels[1])
  ax.grid(alpha=0.3)
  ax.legend(loc='lower left', fontsize=9)
  if title:
    ax.set_title(title)
  _save(fig, path)


def lm_stages_plot(results: Sequence[Any], path: str) -> None:
  """Writes a PNG: held-out loss of each domain (and exact match) after each stage, one line per method.

  Args:
    results: :class:`~sfa_jax.engine.lm.LMResult` of :func:`sfa_jax.engine.lm.run_lm_sequences`
      (one per method, on the same domains).
    path: where the PNG goes.

  Example:
    >>> import os, tempfile
    >>> from sfa_jax.engine.lm import LMResult
    >>> losses = [[3.0, 3.0], [1.0, 3.0], [2.0, 1.0]]
    >>> result = LMResult('sfa', ['a', 'b'], ['initial', 'a', 'b'], losses,
    ...                   {'a': [0.0, 0.5, 0.4]}, [], [], {})
    >>> path = os.path.join(tempfile.mkdtemp(), 'lm.png')
    >>> lm_stages_plot([result], path)
    >>> os.path.getsize(path) > 0
    True
  """
  names = results[0].domain_names
  em_names = list(results[0].exact_match)
  panels = len(names) + len(em_names)
  fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4))
  stages = results[0].stages
  for r in results:
    matrix = np.asarray(r.loss_matrix)
    for j, name in enumerate(names):
      axes[j].plot(range(len(stages)), matrix[:, j], marker='o', label=r.method)
    for j, name in enumerate(em_names):
      axes[len(names) + j].plot(range(len(stages)), r.exact_match[name], marker='o', label=r.method)
  for j, name in enumerate(names):
    axes[j].set_title(f'{name}: held-out loss')
  for j, name in enumerate(em_names):
    axes[len(names) + j].set_title(f'{name}: exact match')
  for ax in axes:
    ax.set_xticks(range(len(stages)), ['init'] + [f'after {s}' for s in stages[1:]], rotation=30, fontsize=7)
  axes[-1].legend(fontsize=6, loc='best')
  _save(fig, path)
