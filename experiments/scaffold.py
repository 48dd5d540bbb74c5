"""Shared pieces of the experiment scripts: grids of runs, their aggregation, trade-off frontiers, outputs.

An experiment script (``experiments/*.py``) only wires these together: it names a stream, a grid
of method configurations and seeds, calls :func:`run_grid`, aggregates with
:func:`final_accuracies` or :func:`sfa_jax.cli.report.summarize_runs`, and writes ``<name>.json`` and
``<name>.md`` with :func:`write_results`. Scripts on a long stream share its command-line options
and defaults through :func:`add_stream_arguments` and :func:`long_stream`.

Trade-off frontiers. Two tasks (or two groups of tasks) give each configuration a point
``(accuracy on A, accuracy on B)``. :func:`frontier` keeps the Pareto-optimal points (both
coordinates maximised) and :func:`frontier_area` measures the area they dominate above a reference
point: one number per method family, 1.0 for a perfect method on accuracies in ``[0, 1]`` with the
reference ``(0, 0)``. A family whose hyper-parameter grid is too narrow to reach the corners is
penalised by the measure; that is intended (the grid is part of the method's cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sfa_jax import engine  # noqa: E402
from sfa_jax.cli import report  # noqa: E402
from sfa_jax import tasks  # noqa: E402
from sfa_jax.cli.presets import DEMO_DEFAULTS  # noqa: E402
from sfa_jax.engine import methods as methods_lib  # noqa: E402

Config = tuple[Any, dict[str, float]]
"""A method (a registered name, ``'package.module:Class'`` or a Method subclass) and its hyper-parameters."""

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
"""Where the experiment scripts write by default: ``experiments/results/`` of the checkout."""


def method_grid(name: Any, **axes: Sequence[float]) -> list[Config]:
  """Every combination of the values of ``axes`` for method ``name`` (the first axis varies slowest).

  Args:
    name: a registered method's name, an import path ``'package.module:Class'``, or a
      :class:`~sfa_jax.engine.methods.Method` subclass.
    **axes: each hyper-parameter and the values it takes.

  Returns:
    The configurations, e.g. ``[('sfa', {'p': 0.5, 'beta': 0.25}), ...]``.

  Raises:
    ValueError: on an unknown method, or an empty axis.

  Example:
    >>> method_grid('sfa', p=[0.5, 1.0], beta=[0.25])
    [('sfa', {'p': 0.5, 'beta': 0.25}), ('sfa', {'p': 1.0, 'beta': 0.25})]
    >>> method_grid('finetune')
    [('finetune', {})]
  """
  methods_lib.method_class(name)  # an unknown method fails here, before any run
  for key, values in axes.items():
    if len(values) == 0:
      raise ValueError(f'the axis {key!r} of the {name} grid has no values.')
  keys = list(axes)
  return [(name, {k: float(v) for k, v in zip(keys, combo)}) for combo in itertools.product(*axes.values())]


def _check_grid(configs: Sequence[Config]) -> list[methods_lib.Method]:
  if len(configs) == 0:
    raise ValueError('grid must hold at least one configuration.')
  methods = []
  for config in configs:
    if not (isinstance(config, tuple) and len(config) == 2 and isinstance(config[1], Mapping)):
      raise TypeError(f'each configuration of grid must be a (name, hyperparams dict) pair; got {config!r}.')
    methods.append(methods_lib.make_method(config[0], **config[1]))
  labels = [m.label for m in methods]
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  if repeated:
    raise ValueError(f'grid repeats the configurations {repeated}.')
  return methods


def run_grid(
    stream: tasks.TaskStream,
    grid: Sequence[Config],
    config: engine.TrainConfig,
    seeds: Sequence[int],
    *,
    as_sweep: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
  """Runs every configuration of ``grid`` with every seed on ``stream``.

  Each run is :func:`sfa_jax.engine.run.run_sequence` with ``config`` and ``seed`` replaced; as
  sweeps, the configurations of one method (and their seeds) train side by side as one
  :func:`sfa_jax.engine.sweep.run_sweep` each (the same numbers, one compiled program; hyper-parameters a
  sweep cannot vary split a method into several sweeps). By default sweeps are chosen on an
  accelerator, where one small model does not fill the device, and runs one after another on the
  CPU, where the step is compute-bound and a sweep does not pay (``benchmarks/RESULTS.md``); the
  choice is logged.

  Args:
    stream: the tasks.
    grid: the configurations, e.g. from :func:`method_grid`.
    config: training settings shared by all runs (its ``seed`` is replaced by each of ``seeds``).
    seeds: the seeds.
    as_sweep: ``True``: vectorised sweeps; ``False``: one run after another; ``None``: chosen by
      the backend, as above.
    log: called with one line per configuration (its label, the mean ± std of the final average
      accuracy, of the final accuracy on each task up to 5 tasks, and its seconds); ``None`` is quiet.

  Returns:
    One dict per run, configuration by configuration and seed by seed: ``SequenceResult.to_json()``
    plus ``'seed'``, ``'method_name'`` and ``'hyperparams'`` (every hyper-parameter, defaults
    included).

  Raises:
    ValueError: on an empty grid or seed list, a repeated configuration or seed, or a bad
      hyper-parameter (before anything is trained).
    TypeError: on a configuration that is not a ``(name, dict)`` pair.

  Example:
    >>> from sfa_jax import tasks, engine
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> runs = run_grid(stream, [('finetune', {})], config, seeds=[0], log=None)
    >>> runs[0]['method_name'], runs[0]['seed'], len(runs[0]['accuracy_matrix'])
    ('finetune', 0, 2)
  """
  methods = _check_grid(grid)
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError('seeds must hold at least one seed.')
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds must not repeat; got {seeds}.')
  if as_sweep is None:
    backend = jax.default_backend()
    as_sweep, reason = backend != 'cpu', f'chosen for the {backend} backend'
  else:
    reason = 'as asked'
  if log is not None:
    how = 'one vectorised sweep per method' if as_sweep else 'one configuration after another'
    log(f'run_grid: {len(methods)} configurations x {len(seeds)} seeds, {how} ({reason})')
  check = grid_budget(stream, methods, config)
  if log is not None:
    log(f"run_grid: {check.steps_per_task} steps per task (the fewest of the stream); budget rules on the p grid "
        f"{list(check.p_values)}: {'met' if check.ok else 'FAILED'} (fine-tuning convergence not measured here)")
  results = _sweep_results(stream, methods, config, seeds) if as_sweep else None
  runs: list[dict[str, Any]] = []
  for method in methods:
    group = []
    for seed in seeds:
      run_config = dataclasses.replace(config, seed=seed)
      result = results[method, seed] if results else engine.run_sequence(stream, method, run_config)
      group.append(result.to_json() | {'seed': seed, 'method_name': method.name, 'hyperparams': method.values})
    runs += group
    if log is not None:
      log(_summary_line(group))
  return runs


def grid_budget(stream: tasks.TaskStream, grid: Sequence[Any], config: engine.TrainConfig):
  """The budget rule (:mod:`sfa_jax.engine.budget`) for a grid on ``stream``, warning loudly when it fails.

  Checks the fewest steps per task of the stream against the grid's SFA ``p`` values (each period of
  the smallest ``p`` holds two steps; every two ``p`` average at different steps). Fine-tuning's
  convergence is a measured run (:func:`sfa_jax.engine.budget.measure_convergence`), left to the scripts
  that can pay for it.

  Args:
    stream: the tasks.
    grid: configurations (``(name, hyperparams)`` pairs) or made methods.
    config: the training settings.

  Returns:
    The :class:`sfa_jax.engine.budget.BudgetCheck`.

  Example:
    >>> from sfa_jax import tasks, engine
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> grid_budget(stream, [('sfa', {'p': 0.5})], engine.TrainConfig(steps_per_task=100)).ok
    True
  """
  from sfa_jax.engine import budget

  methods = [m if isinstance(m, methods_lib.Method) else methods_lib.make_method(m[0], **m[1]) for m in grid]
  return budget.check_budget(min(budget.steps_per_task(stream, config)), p_values=budget.grid_p_values(methods),
                             strict=False, what=f'a grid on {stream.name}')


def _sweep_results(
    stream: tasks.TaskStream, methods: Sequence[methods_lib.Method], config: engine.TrainConfig, seeds: Sequence[int]
) -> dict[tuple[methods_lib.Method, int], engine.SequenceResult]:
  """Every (method, seed)'s result, from one sweep per method class and values a sweep must share."""
  groups: dict[Any, list[methods_lib.Method]] = {}
  for method in methods:
    fixed = tuple(method[key] for key, spec in type(method).hyperparams.items() if not spec.sweepable)
    groups.setdefault((type(method), fixed), []).append(method)
  results = {}
  for members in groups.values():
    configurations = [(method, dataclasses.replace(config, seed=seed)) for method in members for seed in seeds]
    for (method, run_config), result in zip(configurations, engine.run_sweep(stream, configurations)):
      results[method, run_config.seed] = result
  return results


def _summary_line(group: Sequence[dict[str, Any]]) -> str:
  row = report.summarize_runs(group)[0]
  cells = [f"{row['method']:<36}", 'avg {:.3f} ± {:.3f}'.format(*row['average_accuracy'])]
  if len(row['final_accuracy']) <= 5:
    cells.append('tasks ' + ' '.join(f'{m:.3f}' for m, _ in row['final_accuracy']))
  cells.append('{:.1f} s'.format(sum(run['seconds']['total'] for run in group)))
  return ' | '.join(cells)


def load_runs(path: str, key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
  """The finished runs recorded in the JSON-lines file ``path`` (none if it is missing), by ``key(run)``.

  A long experiment appends each run as it finishes (:func:`append_run`) and skips those it finds
  here on a rerun, so a stop loses at most the run in progress. ``key`` may return ``None`` for a
  run that belongs to another setting: it is left out.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'runs.jsonl')
    >>> append_run(path, {'method': 'sfa', 'seed': 0}); append_run(path, {'method': 'sfa', 'seed': 1})
    >>> sorted(load_runs(path, lambda run: (run['method'], run['seed'])))
    [('sfa', 0), ('sfa', 1)]
  """
  runs = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          run = json.loads(line)
          run_key = key(run)
          if run_key is not None:
            runs[run_key] = run
  return runs


def append_run(path: str, run: Mapping[str, Any]) -> None:
  """Appends ``run`` to the JSON-lines file ``path`` (created with its folder), flushed at once."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(run) + '\n')


def final_accuracies(runs: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
  """The final accuracy on each task, ``(mean, std)`` over seeds, per method label.

  Args:
    runs: run JSONs (from :func:`run_grid`).

  Returns:
    ``{label: [(mean, std) of the final accuracy on task j, for each j]}``, labels in order of
    first appearance; std is the population std (0 for one seed).

  Example:
    >>> runs = [{'method': 'm', 'accuracy_matrix': [[0.9, 0.0], [0.4, 0.8]], 'seconds': {'train': 1.0},
    ...          'metrics': {'average_accuracy': 0.6, 'forgetting': 0.5, 'backward_transfer': -0.5}}]
    >>> final_accuracies(runs)
    {'m': [(0.4, 0.0), (0.8, 0.0)]}
  """
  return {row['method']: row['final_accuracy'] for row in report.summarize_runs(runs)}


def _check_points(points: Any) -> np.ndarray:
  array = np.asarray(points, dtype=np.float64)
  if array.size == 0:
    return np.zeros((0, 2))
  if array.ndim != 2 or array.shape[1] != 2:
    raise ValueError(f'points must have shape (n, 2); got shape {array.shape}.')
  if not np.all(np.isfinite(array)):
    raise ValueError('points must be finite (no NaN or infinity).')
  return array


def frontier(points: Any) -> np.ndarray:
  """The Pareto frontier of ``points``, both coordinates maximised, sorted by the first coordinate.

  A point is on the frontier when no other point is at least as good on both coordinates and
  better on one. Repeated points appear once.

  Args:
    points: an array of shape ``(n, 2)`` (``n`` may be 0).

  Returns:
    The frontier's points, shape ``(m, 2)``: the first coordinate increasing, the second
    decreasing.

  Raises:
    ValueError: on a shape other than ``(n, 2)`` or a non-finite value.

  Example:
    >>> frontier([[0.1, 0.9], [0.5, 0.5], [0.4, 0.4], [0.9, 0.1]]).tolist()
    [[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]]
  """
  array = _check_points(points)
  order = np.lexsort((-array[:, 1], -array[:, 0]))  # first coordinate descending, ties: second descending
  kept, best = [], -np.inf
  for point in array[order]:
    if point[1] > best:
      kept.append(point)
      best = point[1]
  return np.asarray(kept[::-1]).reshape(-1, 2)


def frontier_area(points: Any, reference: Sequence[float] = (0.0, 0.0)) -> float:
  """The area dominated by the frontier of ``points`` and above ``reference`` on both coordinates.

  The area of the union of the rectangles ``[reference[0], x] × [reference[1], y]`` over the
  points ``(x, y)``; points not above the reference on both coordinates add nothing. With
  accuracies in ``[0, 1]`` and the reference ``(0, 0)``, 1.0 is a perfect method and a single point
  ``(a, b)`` covers ``a · b``.

  Args:
    points: an array of shape ``(n, 2)``.
    reference: the corner the area is measured from.

  Returns:
    The area, a float ≥ 0.

  Raises:
    ValueError: on a shape other than ``(n, 2)``, a non-finite value, or a reference that is not
      two finite numbers.

  Example:
    >>> frontier_area([[0.5, 0.5]])
    0.25
    >>> round(frontier_area([[1.0, 0.2], [0.2, 1.0], [0.5, 0.5]]), 4)
    0.45
  """
  ref = np.asarray(reference, dtype=np.float64)
  if ref.shape != (2,) or not np.all(np.isfinite(ref)):
    raise ValueError(f'reference must be two finite numbers; got {reference!r}.')
  front = frontier(points)
  front = front[(front[:, 0] > ref[0]) & (front[:, 1] > ref[1])]
  widths = np.diff(np.concatenate([[ref[0]], front[:, 0]]))
  return float(np.sum(widths * (front[:, 1] - ref[1])))


def stability_plasticity(run: dict[str, Any]) -> tuple[float, float]:
  """A long run's trade-off point: how well it kept the past tasks, how well it learned new ones.

  Args:
    run: a run JSON with an ``accuracy_matrix`` ``R`` of ``T ≥ 2`` tasks.

  Returns:
    ``(mean_{j<T-1} R[T-1, j], mean_{k≥1} R[k, k])``: the final accuracy on the tasks before the
    last one (stability), and the accuracy on each task right after training it, task 0 left out
    since no method acts on it (plasticity).

  Raises:
    ValueError: on fewer than two tasks.

  Example:
    >>> stability_plasticity({'accuracy_matrix': [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.3, 0.4, 0.6]]})
    (0.35, 0.7)
  """
  matrix = np.asarray(run['accuracy_matrix'], dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f'run must have a square accuracy matrix of at least 2 tasks; got shape {matrix.shape}.')
  return float(matrix[-1, :-1].mean()), float(np.diag(matrix)[1:].mean())


def averaging_jumps(run: dict[str, Any]) -> dict[str, float | None]:
  """How SFA's averaging steps move the accuracies: mean change on the past tasks and on the current task.

  For each averaging step ``s`` (``run['averaging_steps']``) with an evaluation just before
  (step ``s - 1``) and after it (step ``s``), as :func:`sfa_jax.engine.run.run_sequence` records
  when ``eval_every > 0``: the change of the mean accuracy over the tasks before the current one,
  and of the accuracy on the current task. (Step ``s`` also holds one gradient step.)

  Args:
    run: a run JSON with ``curve`` and ``averaging_steps``.

  Returns:
    ``{'past': mean change, 'current': mean change, 'count': averages measured}``; the means are
    ``None`` when no average was measured.

  Example:
    >>> curve = [{'step': 4, 'task': 0, 'accuracies': [0.9, 0.0]}, {'step': 5, 'task': 1, 'accuracies': [0.3, 0.8]},
    ...          {'step': 6, 'task': 1, 'accuracies': [0.7, 0.6]}]
    >>> jumps = averaging_jumps({'curve': curve, 'averaging_steps': [6]})
    >>> round(jumps['past'], 3), round(jumps['current'], 3), jumps['count']
    (0.4, -0.2, 1)
  """
  by_step = {point['step']: point for point in run['curve']}
  past, current = [], []
  for step in run['averaging_steps']:
    if step - 1 not in by_step or step not in by_step:
      continue
    before, after = by_step[step - 1]['accuracies'], by_step[step]['accuracies']
    k = by_step[step]['task']
    if k > 0:
      past.append(float(np.mean(after[:k]) - np.mean(before[:k])))
    current.append(after[k] - before[k])
  return {
      'past': float(np.mean(past)) if past else None,
      'current': float(np.mean(current)) if current else None,
      'count': len(current),
  }


def tradeoff_points(
    runs: Sequence[dict[str, Any]],
    task_x: int = 0,
    task_y: int = 1,
    *,
    point: Callable[[dict[str, Any]], Sequence[float]] | None = None,
    family: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
  """Each configuration's trade-off point, mean and std over seeds, grouped in method families.

  By default a run's point is its final accuracy on tasks ``task_x`` and ``task_y``, and its family
  its ``method_name``.

  Args:
    runs: run JSONs from :func:`run_grid` (with ``'method'``, ``'method_name'`` and ``'hyperparams'``).
    task_x: the task on the first axis.
    task_y: the task on the second axis.
    point: if given, maps a run to its ``(x, y)`` instead (e.g. :func:`stability_plasticity`).
    family: if given, maps a run to its family's name instead.

  Returns:
    ``{family: [{'label', 'hyperparams', 'mean': [x, y], 'std': [x, y]}, ...]}``, families and
    configurations in order of first appearance; std is the population std over seeds.

  Raises:
    ValueError: when a task index is out of range for the runs.

  Example:
    >>> run = {'method': 'l2(strength=1)', 'method_name': 'l2', 'hyperparams': {'strength': 1.0},
    ...        'accuracy_matrix': [[0.9, 0.0], [0.6, 0.7]]}
    >>> tradeoff_points([run])['l2'][0]['mean']
    [0.6, 0.7]
  """
  def final_pair(run):
    finals = run['accuracy_matrix'][-1]
    for task in (task_x, task_y):
      if not -len(finals) <= task < len(finals):
        raise ValueError(f'task index {task} out of range for runs of {len(finals)} tasks.')
    return finals[task_x], finals[task_y]

  point = point or final_pair
  family = family or (lambda run: run['method_name'])
  grouped: dict[str, list[dict[str, Any]]] = {}
  for run in runs:
    grouped.setdefault(run['method'], []).append(run)
  families: dict[str, list[dict[str, Any]]] = {}
  for label, group in grouped.items():
    values = np.asarray([point(run) for run in group], dtype=np.float64)
    families.setdefault(family(group[0]), []).append({
        'label': label,
        'hyperparams': group[0]['hyperparams'],
        'mean': values.mean(0).tolist(),
        'std': values.std(0).tolist(),
    })
  return families


def tradeoff_rows(
    families: Mapping[str, Sequence[dict[str, Any]]],
    extra_columns: Mapping[str, Callable[[str], str]] | None = None,
) -> list[str]:
  """A markdown table of every configuration's trade-off point: task A, task B (mean ± std), their mean.

  Args:
    families: from :func:`tradeoff_points`.
    extra_columns: more columns, ``{header: cell(label)}``, after the mean.

  Returns:
    The table's lines (header, rule, one row per configuration in the families' order).

  Example:
    >>> rows = tradeoff_rows({'l2': [{'label': 'l2(strength=1)', 'mean': [0.5, 0.7], 'std': [0.1, 0.0]}]})
    >>> rows[-1]
    '| l2(strength=1) | 0.500 ± 0.100 | 0.700 ± 0.000 | 0.600 |'
  """
  extra_columns = extra_columns or {}
  lines = ['| configuration | task A | task B | mean |' + ''.join(f' {h} |' for h in extra_columns),
           '|---|---:|---:|---:|' + '---:|' * len(extra_columns)]
  for points in families.values():
    for point in points:
      (a, b), (sa, sb) = point['mean'], point['std']
      extra = ''.join(f' {cell(point["label"])} |' for cell in extra_columns.values())
      lines.append(f"| {point['label']} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} | {(a + b) / 2:.3f} |{extra}")
  return lines


def family_areas(families: Mapping[str, Sequence[dict[str, Any]]], reference: Sequence[float] = (0.0, 0.0)) -> dict[str, float]:
  """:func:`frontier_area` of each family's mean points (from :func:`tradeoff_points`).

  Args:
    families: ``{family: [{'mean': [x, y], ...}, ...]}``.
    reference: the corner the areas are measured from.

  Returns:
    ``{family: area}``, in the order of ``families``.

  Example:
    >>> family_areas({'sfa': [{'mean': [0.5, 0.5]}], 'l2': [{'mean': [0.9, 0.1]}]})
    {'sfa': 0.25, 'l2': 0.09000000000000001}
  """
  return {name: frontier_area([p['mean'] for p in points], reference) for name, points in families.items()}


def tradeoff_plot(
    families: Mapping[str, Sequence[dict[str, Any]]],
    path: str,
    *,
    axis_labels: Sequence[str] = ('task A accuracy', 'task B accuracy'),
    title: str = '',
) -> None:
  """Writes a PNG of the trade-off: one colour and marker per family, error bars, frontiers drawn.

  Args:
    families: from :func:`tradeoff_points`.
    path: where the PNG goes.
    axis_labels: the x and y axis labels.
    title: the plot's title.

  Example:
    >>> import os, tempfile
    >>> families = {'sfa': [{'mean': [0.5, 0.6], 'std': [0.01, 0.02]}, {'mean': [0.7, 0.3], 'std': [0.0, 0.0]}]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'tradeoff.png')
    >>> tradeoff_plot(families, path)
    >>> os.path.getsize(path) > 0
    True
  """
  markers = 'osD^vP*Xhp<>'
  fig, ax = plt.subplots(figsize=(7, 6))
  for i, (name, points) in enumerate(families.items()):
    mean = np.asarray([p['mean'] for p in points]).reshape(-1, 2)
    std = np.asarray([p.get('std', [0.0, 0.0]) for p in points]).reshape(-1, 2)
    color = f'C{i % 10}'
    ax.errorbar(mean[:, 0], mean[:, 1], xerr=std[:, 0], yerr=std[:, 1], fmt=markers[i % len(markers)],
                color=color, alpha=0.8, capsize=2, markersize=6, label=name)
    front = frontier(mean)
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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def curves_grid(runs: Sequence[dict[str, Any]], path: str, *, columns: int = 3) -> None:
  """Writes a PNG with one panel per run: every task's accuracy over the run (see ``report.accuracy_curves``).

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
    >>> run = {'method': 'sfa', 'task_names': ['even', 'odd'], 'steps_per_task': [4, 4], 'averaging_steps': [6, 8],
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
    report.draw_curves(ax, run, legend=False)
  for ax in axes.flat[len(runs):]:
    ax.axis('off')
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(10, len(labels)), fontsize=8)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def experiment_parser(description: str) -> argparse.ArgumentParser:
  """The arguments every experiment script takes: ``--quick``, ``--out``, ``--seeds`` and ``--sweep``.

  Args:
    description: the script's docstring.

  Returns:
    The parser; the script adds its own arguments.

  Example:
    >>> args = experiment_parser('demo').parse_args(['--quick', '--seeds', '0,1'])
    >>> args.quick, args.seeds
    (True, (0, 1))
  """
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='a tiny run (one seed, few configurations, small data)')
  parser.add_argument('--out', default=RESULTS_DIR, help='output folder (default: experiments/results)')
  parser.add_argument('--seeds', type=_seed_list, help='comma-separated seeds (default: 0,1,2; 0 with --quick)')
  parser.add_argument('--sweep', action=argparse.BooleanOptionalAction, default=None,
                      help="--sweep: each method's configurations and seeds side by side, as one vectorised sweep; "
                           '--no-sweep: one after another; default: sweeps on an accelerator, not on the CPU')
  return parser


# The long stream's defaults: its evaluation setting and model, per stream.
_LONG_STREAMS = {
    'permuted-mnist': (tasks.DOMAIN_INCREMENTAL, 'mlp'),
    'split-mnist': (tasks.TASK_INCREMENTAL, 'mlp'),
    'split-cifar100': (tasks.TASK_INCREMENTAL, 'cnn'),
    'split-food101': (tasks.TASK_INCREMENTAL, 'cnn'),
}


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the long-stream options ``--stream``, ``--tasks``, ``--setting``, ``--data-dir``, ``--epochs``.

  Read them back with :func:`long_stream`.

  Args:
    parser: from :func:`experiment_parser`.

  Example:
    >>> parser = experiment_parser('demo')
    >>> add_stream_arguments(parser)
    >>> parser.parse_args(['--tasks', '5']).stream
    'permuted-mnist'
  """
  parser.add_argument('--stream', default='permuted-mnist', choices=sorted(_LONG_STREAMS),
                      help='the task stream (split-cifar100 and split-food101 need --data-dir)')
  parser.add_argument('--tasks', type=int, help='number of tasks (default: the stream\'s own; 3 with --quick)')
  parser.add_argument('--setting', choices=tasks.SETTINGS,
                      help='evaluation setting (default: domain-incremental for permuted-mnist, task-incremental otherwise)')
  parser.add_argument('--data-dir', help='a tfds array_record data folder: read the stream from tfds')
  parser.add_argument('--epochs', type=int, default=2, help='epochs per task (default 2; 1 with --quick)')


def long_stream(args: argparse.Namespace) -> tuple[tasks.TaskStream, engine.TrainConfig]:
  """The stream and training config named by :func:`add_stream_arguments`'s options.

  Data: ``--data-dir`` reads tfds; else the bundled offline MNIST, or scikit-learn's 8x8 digits
  with ``--quick``. Model: the default MLP (256-256 hidden; MNIST streams) or the small CNN; Adam 1e-3,
  batch 64 (32 with ``--quick``).

  Args:
    args: the parsed arguments (with ``quick``).

  Returns:
    ``(stream, config)``.

  Raises:
    ValueError: on a stream that needs ``--data-dir`` without it, or a bad ``--tasks``.

  Example:
    >>> parser = experiment_parser('demo')
    >>> add_stream_arguments(parser)
    >>> stream, config = long_stream(parser.parse_args(['--quick']))
    >>> stream.name, len(stream), stream.setting, config.epochs_per_task
    ('permuted-mnist', 3, 'domain-incremental', 1)
  """
  setting, model = _LONG_STREAMS[args.stream]
  setting = args.setting or setting
  if args.data_dir is None and args.stream not in ('permuted-mnist', 'split-mnist'):
    raise ValueError(f'--stream {args.stream} has no offline data: give --data-dir (a tfds array_record folder).')
  source = 'tfds' if args.data_dir else ('digits' if args.quick else 'offline')
  num_tasks = args.tasks or (3 if args.quick else None)
  if num_tasks is not None and num_tasks < 2:
    raise ValueError(f'--tasks must be at least 2; got {num_tasks}.')
  stream = tasks.make_stream(args.stream, source=source, data_dir=args.data_dir, num_tasks=num_tasks, setting=setting)
  config = engine.TrainConfig(
      model=model, epochs_per_task=1 if args.quick else args.epochs,
      batch_size=32 if args.quick else 64, learning_rate=1e-3,
  )
  return stream, config


def pair_stream(args: argparse.Namespace) -> tuple[tasks.TaskStream, engine.TrainConfig, tuple[int, ...]]:
  """The MNIST task pair with the offline demo's settings (``sfa_jax.cli.presets.DEMO_DEFAULTS``).

  The bundled MNIST, or scikit-learn's 8x8 digits with ``--quick`` (then also one epoch per task,
  batch 32 and seed 0); evaluation only at task ends.

  Args:
    args: from :func:`experiment_parser` (``quick``, ``seeds``).

  Returns:
    ``(stream, config, seeds)``.

  Example:
    >>> stream, config, seeds = pair_stream(experiment_parser('demo').parse_args(['--quick']))
    >>> stream.name, config.epochs_per_task, seeds
    ('mnist-pair', 1, (0,))
  """
  stream = tasks.make_stream(DEMO_DEFAULTS['stream'], source='digits' if args.quick else DEMO_DEFAULTS['source'])
  config = dataclasses.replace(DEMO_DEFAULTS['config'], eval_every=0)
  if args.quick:
    config = dataclasses.replace(config, epochs_per_task=1, batch_size=32)
  return stream, config, seeds_of(args, DEMO_DEFAULTS['seeds'])


def seeds_of(args: argparse.Namespace, default: Sequence[int] = (0, 1, 2)) -> tuple[int, ...]:
  """``--seeds`` if given, else ``(0,)`` with ``--quick``, else ``default``.

  Example:
    >>> seeds_of(experiment_parser('demo').parse_args([]))
    (0, 1, 2)
  """
  return tuple(args.seeds or ((0,) if args.quick else default))


def _seed_list(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(s) for s in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--seeds takes comma-separated integers; got {text!r}.') from None
  if len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f'--seeds must not repeat; got {text!r}.')
  return seeds


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """The command that ran ``script`` with ``argv`` (``None``: this process's arguments), for the records.

  Args:
    script: the script's ``__file__``.
    argv: the arguments given to its ``main``, or ``None``.

  Returns:
    E.g. ``'python experiments/p_ablation.py --quick'``.

  Example:
    >>> command_line('/x/experiments/p_ablation.py', ['--quick'])
    'python experiments/p_ablation.py --quick'
  """
  args = sys.argv[1:] if argv is None else list(argv)
  return ' '.join(['python', f'experiments/{os.path.basename(script)}'] + args)


def best_per_family(runs: Sequence[dict[str, Any]], *, family: Callable[[dict[str, Any]], str] | None = None) -> list[dict[str, Any]]:
  """The :func:`sfa_jax.cli.report.summarize_runs` row of each family's best configuration.

  Best: the highest mean (over seeds) final average accuracy. Families are ``method_name`` unless
  ``family`` maps a run to another name; rows are sorted best first and carry ``'family'``.

  Args:
    runs: run JSONs from :func:`run_grid`.
    family: maps a run to its family's name (default: its ``method_name``).

  Returns:
    One row per family.

  Example:
    >>> def run(label, accuracy):
    ...   return {'method': label, 'method_name': label.split('(')[0], 'accuracy_matrix': [[accuracy]],
    ...           'seconds': {'train': 1.0}, 'metrics': {'average_accuracy': accuracy, 'forgetting': 0.0,
    ...           'backward_transfer': 0.0}}
    >>> [row['method'] for row in best_per_family([run('l2(s=1)', 0.5), run('l2(s=2)', 0.6), run('ft', 0.4)])]
    ['l2(s=2)', 'ft']
  """
  family = family or (lambda run: run['method_name'])
  family_of = {run['method']: family(run) for run in runs}
  best: dict[str, dict[str, Any]] = {}
  for row in report.summarize_runs(runs):
    name = family_of[row['method']]
    if name not in best or row['average_accuracy'][0] > best[name]['average_accuracy'][0]:
      best[name] = row | {'family': name}
  return sorted(best.values(), key=lambda row: -row['average_accuracy'][0])


def average_accuracy_plot(runs: Sequence[dict[str, Any]], path: str, *, title: str = '') -> None:
  """Writes a PNG of the average accuracy over the tasks seen so far after each task, one line per configuration.

  Mean over seeds with a band of ± one std (``metrics['average_accuracy_curve']`` of each run).

  Args:
    runs: run JSONs from :func:`run_grid`.
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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(
    out_dir: str,
    name: str,
    payload: dict[str, Any],
    markdown: str,
    command: str,
    seconds: float,
) -> tuple[str, str]:
  """Writes ``<out_dir>/<name>.json`` (``payload`` plus the command, time and machine) and ``<name>.md``.

  The markdown file is ``markdown`` followed by a line naming the command, its wall time and the
  machine (CPU count, load average at the end).

  Args:
    out_dir: the folder (created if missing).
    name: the files' base name, e.g. ``'p_ablation'`` or ``'p_ablation_quick'``.
    payload: JSON-serialisable results; must not use the keys ``command``, ``wall_seconds``,
      ``machine``.
    markdown: the report's body (title, tables, links to PNGs).
    command: the exact command that produced the results.
    seconds: its wall time.

  Returns:
    The paths of the JSON and markdown files.

  Raises:
    ValueError: on an empty or path-like name, or a payload using a reserved key.

  Example:
    >>> import json, os, tempfile
    >>> out = tempfile.mkdtemp()
    >>> json_path, md_path = write_results(out, 'demo', {'x': 1}, '# Demo', 'python demo.py', 2.0)
    >>> json.load(open(json_path))['x'], json.load(open(json_path))['wall_seconds']
    (1, 2.0)
  """
  if not name or os.sep in name or name.startswith('.'):
    raise ValueError(f'name must be a plain file base name; got {name!r}.')
  reserved = sorted({'command', 'wall_seconds', 'machine'} & set(payload))
  if reserved:
    raise ValueError(f'payload must not use the reserved keys {reserved}.')
  machine = {'cpus': os.cpu_count(), 'platform': platform.platform(), 'loadavg_at_end': _loadavg()}
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f'{name}.json')
  md_path = os.path.join(out_dir, f'{name}.md')
  with open(json_path, 'w') as f:
    json.dump(payload | {'command': command, 'wall_seconds': float(seconds), 'machine': machine}, f, indent=1)
  load = '' if machine['loadavg_at_end'] is None else f", load average {machine['loadavg_at_end']} at the end"
  with open(md_path, 'w') as f:
    f.write(f'{markdown.rstrip()}\n\nCommand: `{command}` ({seconds:.0f} s wall time on {machine["cpus"]} CPUs{load}).\n')
  return json_path, md_path


def _loadavg() -> str | None:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return None
