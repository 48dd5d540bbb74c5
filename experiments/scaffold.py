"""Shared pieces of the experiment scripts: their entry, grids, aggregation, trade-off frontiers, outputs.

An experiment script (``experiments/*.py``) only wires these together. Its ``main`` is
:func:`run_script`: the arguments (:func:`experiment_parser`), the compilation cache, the timing,
and the outputs ``<name>.json`` and ``<name>.md`` (:func:`write_results`, with the command that ran
it). In between it names a stream, its grid (``(method, {hyper-parameter: values})`` pairs) and
seeds, trains them with :func:`train` (the engine's :func:`sfa_jax.engine.grids.run_grid`),
aggregates with :func:`final_accuracies` or :func:`sfa_jax.engine.grids.summarize_runs`, and draws
with :mod:`sfa_jax.cli.plots`. Scripts on a long stream share its command-line options and defaults
through :func:`add_stream_arguments` and :func:`long_stream`.

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
import fcntl
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.cli.presets import DEMO_DEFAULTS
from sfa_jax.engine import compile_cache

Grid = Sequence[tuple[Any, Mapping[str, Sequence[float]]]]
"""A grid of several methods: ``(method, {hyper-parameter: values})`` pairs, each expanded by
:func:`sfa_jax.engine.grids.grid` (a method is a registered name, ``'package.module:Class'`` or a
Method subclass; hyper-parameters not named keep their defaults)."""

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
"""Where the experiment scripts write by default: ``experiments/results/`` of the checkout."""


def configurations(grid: Grid, config: engine.TrainConfig, seeds: Sequence[int]) -> list[tuple[engine.Method, engine.TrainConfig]]:
  """Every configuration of ``grid`` with every seed: :func:`sfa_jax.engine.grids.grid` of each of its methods.

  Args:
    grid: ``(method, {hyper-parameter: values})`` pairs.
    config: the training settings shared by every run (its ``seed`` is replaced).
    seeds: the seeds, the innermost loop.

  Returns:
    ``(method, config)`` pairs, method by method in the order of ``grid``.

  Raises:
    ValueError, TypeError: from :func:`sfa_jax.engine.grids.grid` (an unknown method or
      hyper-parameter, a value out of range, no values).

  Example:
    >>> grid = [('finetune', {}), ('sfa', {'p': (0.5, 1.0), 'beta': (0.25,)})]
    >>> [(m.label, c.seed) for m, c in configurations(grid, engine.TrainConfig(), seeds=(0,))]
    [('finetune', 0), ('sfa(beta=0.25, p=0.5)', 0), ('sfa(beta=0.25, p=1)', 0)]
  """
  return [configuration for name, values in grid
          for configuration in engine.grid(name, seeds=tuple(seeds), config=config, **values)]


def train(
    stream: tasks.TaskStream,
    grid: Grid,
    config: engine.TrainConfig,
    seeds: Sequence[int],
    as_sweep: bool | None,
) -> list[dict[str, Any]]:
  """Trains every configuration of ``grid`` with every seed on ``stream``, logging as it goes.

  :func:`sfa_jax.engine.grids.run_grid` on :func:`configurations`, printing its lines (how it
  trains, the budget rule on the ``p`` grid, a line per configuration).

  Args:
    stream: the tasks.
    grid: ``(method, {hyper-parameter: values})`` pairs.
    config: training settings shared by all runs (its ``seed`` is replaced by each of ``seeds``).
    seeds: the seeds.
    as_sweep: ``--sweep``: ``True`` vectorised sweeps, ``False`` one run after another, ``None``
      chosen by the backend.

  Returns:
    One run JSON per configuration and seed, in order (:meth:`sfa_jax.engine.grids.GridRun.to_json`:
    with ``'seed'``, ``'method_name'`` and ``'hyperparams'``).
  """
  runs = engine.run_grid(stream, configurations(grid, config, seeds), as_sweep=as_sweep, log=lambda line: print(line, flush=True))
  return [run.to_json() for run in runs]


def train_missing(
    stream: tasks.TaskStream,
    configurations: Sequence[tuple[engine.Method, engine.TrainConfig]],
    runs: dict[Any, dict[str, Any]],
    runs_path: str,
    key: Callable[[str, int], Any],
    *,
    fields: Callable[[Any, float], Mapping[str, Any]] | None = None,
    keep_curve: bool = False,
    as_sweep: bool | None = None,
    initial: Callable[[int], Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
  """Trains the ``configurations`` that the run log lacks, appending each run to it as it finishes.

  A long experiment loads its run log once (:func:`load_runs`, keyed as ``key`` keys), trains
  here what is missing with :func:`sfa_jax.engine.grids.run_grid`, and builds its tables from
  ``runs``: a stop loses at most the run in progress, and a rerun trains only what is left.

  Args:
    stream: the tasks.
    configurations: ``(method, config)`` pairs (:func:`configurations`).
    runs: the run log's runs by key; each run trained here is added to it.
    runs_path: the run log (:func:`append_run`).
    key: ``key(method label, seed)``: a configuration's key in ``runs``.
    fields: ``fields(finished, seconds)``: what a run records besides
      :meth:`sfa_jax.engine.grids.GridRun.to_json` (its setting, its key...); ``seconds`` is the
      wall time since the previous run finished (or since training began).
    keep_curve: keep the run's learning curve (``'curve'``), which is left out by default.
    as_sweep: ``--sweep`` (see :func:`train`).
    initial: ``initial(seed)``: the starting variables of a run (e.g. a pretrained backbone).
    log: where :func:`~sfa_jax.engine.grids.run_grid` writes its lines (``None``: nowhere).

  Yields:
    Each run trained, once it is on disk and in ``runs``.

  Example:
    >>> import os, tempfile
    >>> from sfa_jax import tasks
    >>> stream = tasks.make_stream('split-mnist', source='digits', num_tasks=2)
    >>> config = engine.TrainConfig(model='mlp', epochs_per_task=1, batch_size=32)
    >>> path, runs = os.path.join(tempfile.mkdtemp(), 'runs.jsonl'), {}
    >>> todo = configurations([('finetune', {})], config, seeds=(0,))
    >>> [run['method'] for run in train_missing(stream, todo, runs, path, lambda label, seed: (label, seed))]
    ['finetune']
    >>> list(train_missing(stream, todo, load_runs(path, lambda run: (run['method'], run['seed'])), path,
    ...                    lambda label, seed: (label, seed)))
    []
  """
  todo = [(method, config) for method, config in configurations if key(method.label, config.seed) not in runs]
  if not todo:
    return
  since = time.perf_counter()
  for finished in engine.run_grid(stream, todo, as_sweep=as_sweep, initial=initial, log=log):
    run = finished.to_json()
    if not keep_curve:
      run.pop('curve', None)
    run |= dict(fields(finished, time.perf_counter() - since)) if fields else {}
    since = time.perf_counter()
    runs[key(finished.method.label, finished.config.seed)] = run
    append_run(runs_path, run)  # at once: a stop loses the run in progress only
    yield run


class RunLogWarning(UserWarning):
  """A run log (:func:`load_runs`, :func:`append_run`) ends in a line a stopped writer left unfinished."""


def load_runs(path: str, key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
  """The finished runs recorded in the JSON-lines file ``path`` (none if it is missing), by ``key(run)``.

  A long experiment appends each run as it finishes (:func:`append_run`) and skips those it finds
  here on a rerun, so a stop loses at most the run in progress. ``key`` may return ``None`` for a
  run that belongs to another setting: it is left out. A last line without its newline that holds
  no run is the run being appended when its writer stopped: it is left out with a warning (the
  next :func:`append_run` removes it). The file is read under a shared lock, so a run another
  process is appending is not mistaken for one.

  Args:
    path: the run log.
    key: maps a run to its key (``None``: leave the run out).

  Returns:
    ``{key(run): run}``; a later run with the same key replaces an earlier one.

  Raises:
    ValueError: naming the file and the line, when a line other than an unfinished last one is not
      a JSON object.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'runs.jsonl')
    >>> append_run(path, {'method': 'sfa', 'seed': 0}); append_run(path, {'method': 'sfa', 'seed': 1})
    >>> sorted(load_runs(path, lambda run: (run['method'], run['seed'])))
    [('sfa', 0), ('sfa', 1)]
  """
  if not os.path.exists(path):
    return {}
  with open(path, 'rb') as f:
    fcntl.flock(f, fcntl.LOCK_SH)
    data = f.read()
  *complete, last = data.split(b'\n')
  runs = [_run_on_line(path, number, line) for number, line in enumerate(complete, 1) if line.strip()]
  if last.strip():
    run = _decode_run(last)
    if run is None:
      warnings.warn(f'{path}, line {len(complete) + 1}: an unfinished last line (a run being appended when its writer '
                    'stopped) is left out; the next append_run removes it.', RunLogWarning, stacklevel=2)
    else:
      runs.append(run)
  keyed = ((key(run), run) for run in runs)
  return {run_key: run for run_key, run in keyed if run_key is not None}


def append_run(path: str, run: Mapping[str, Any]) -> None:
  """Appends ``run`` as one line to the JSON-lines file ``path`` (created with its folder), on disk at once.

  The line is written at the end of the file in one piece under an exclusive lock (processes that
  append side by side take turns), and synced before this returns; a crash can only leave this
  line unfinished. If the file ends in an unfinished line (a writer that stopped mid-append),
  that line is removed first, with a warning; a finished last line without its newline gets one.
  Earlier lines are never rewritten.

  Args:
    path: the run log.
    run: the run, JSON values.

  Raises:
    TypeError: when ``run`` is not JSON values (nothing is written).
  """
  line = (json.dumps(run) + '\n').encode()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    line = _after_unfinished_line(path, fd) + line
    while line:
      line = line[os.write(fd, line):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _decode_run(line: bytes) -> dict[str, Any] | None:
  """The run a line of a run log holds, or ``None`` when it holds no JSON object."""
  try:
    run = json.loads(line)
  except ValueError:  # not JSON, or not UTF-8
    return None
  return run if isinstance(run, dict) else None


def _run_on_line(path: str, number: int, line: bytes) -> dict[str, Any]:
  """The run on the finished line ``number`` of the run log ``path``; raises ``ValueError`` naming both."""
  run = _decode_run(line)
  if run is None:
    raise ValueError(f'{path}, line {number}: not a run (one JSON object a line): {line[:80]!r}. Only an unfinished '
                     'last line is left out on its own; repair or remove this line.')
  return run


def _after_unfinished_line(path: str, fd: int) -> bytes:
  """Makes the run log open at ``fd`` (locked) end where a new line can start: the bytes to write first.

  An unfinished last line that holds no run is cut off (with a :class:`RunLogWarning`); one that
  holds a run needs only its newline.
  """
  size = os.lseek(fd, 0, os.SEEK_END)
  if size == 0 or os.pread(fd, 1, size - 1) == b'\n':
    return b''
  data = os.pread(fd, size, 0)
  start = data.rfind(b'\n') + 1
  if _decode_run(data[start:]) is not None:
    return b'\n'
  os.ftruncate(fd, start)
  number = data.count(b'\n') + 1
  warnings.warn(f'{path}, line {number}: an unfinished last line (a run being appended when its writer '
                'stopped) is removed before the next run is appended.', RunLogWarning, stacklevel=3)
  return b''


def final_accuracies(runs: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
  """The final accuracy on each task, ``(mean, std)`` over seeds, per method label.

  Args:
    runs: run JSONs (from :func:`train`).

  Returns:
    ``{label: [(mean, std) of the final accuracy on task j, for each j]}``, labels in order of
    first appearance; std is the population std (0 for one seed).

  Example:
    >>> runs = [{'method': 'm', 'accuracy_matrix': [[0.9, 0.0], [0.4, 0.8]], 'seconds': {'train': 1.0},
    ...          'metrics': {'average_accuracy': 0.6, 'forgetting': 0.5, 'backward_transfer': -0.5}}]
    >>> final_accuracies(runs)
    {'m': [(0.4, 0.0), (0.8, 0.0)]}
  """
  return {row['method']: row['final_accuracy'] for row in engine.summarize_runs(runs)}


def standard_error(values: Sequence[float]) -> float:
  """The standard error of the mean of ``values`` (sample std, ddof 1, over sqrt(n)); 0 for one value.

  Example:
    >>> round(standard_error([1.0, 2.0, 3.0]), 4), standard_error([5.0])
    (0.5774, 0.0)
  """
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def within_spread(ours: tuple[float, float], published: tuple[float, float]) -> tuple[bool, float, float]:
  """Whether our mean lies within a published one's spread: |ours − theirs| ≤ 2·sqrt(SEM_ours² + SEM_theirs²).

  Args:
    ours: ``(mean, standard error)``.
    published: the paper's ``(mean, standard error)``.

  Returns:
    ``(within, ours − theirs, the spread)``.

  Example:
    >>> within, difference, spread = within_spread((98.70, 0.06), (99.57, 0.02))
    >>> within, round(difference, 2), round(spread, 3)
    (False, -0.87, 0.126)
  """
  (mean, sem), (theirs, their_sem) = ours, published
  spread = 2.0 * float(np.sqrt(sem ** 2 + their_sem ** 2))
  return abs(mean - theirs) <= spread, mean - theirs, spread


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
    runs: run JSONs from :func:`train` (with ``'method'``, ``'method_name'`` and ``'hyperparams'``).
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


def family_frontiers(families: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, np.ndarray]:
  """:func:`frontier` of each family's mean points (from :func:`tradeoff_points`), e.g. for
  :func:`sfa_jax.cli.plots.tradeoff_plot`.

  Example:
    >>> family_frontiers({'sfa': [{'mean': [0.5, 0.5]}, {'mean': [0.4, 0.4]}]})['sfa'].tolist()
    [[0.5, 0.5]]
  """
  return {name: frontier([p['mean'] for p in points]) for name, points in families.items()}


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


def output_name(args: argparse.Namespace, experiment: str, *variant: str) -> str:
  """The base name of an experiment's output files, relative to ``--out``: every script names its files here.

  An experiment with one output writes ``<experiment>.json`` (and ``.md``, ``.png``, ...); one with
  several (a protocol; a stream and a regime) writes each into its own folder,
  ``<experiment>/<variant>.json``, the variant's parts joined by ``_``. Under ``--quick`` the
  experiment is ``<experiment>_quick``, so a quick run never overwrites a full one.

  Args:
    args: the parsed arguments (``quick``).
    experiment: the script's name, e.g. ``'p_ablation'``.
    *variant: the parts that name one output of several, e.g. ``('split-mnist-ci', 'pretrained')``.

  Returns:
    The base name, without extension.

  Raises:
    ValueError: on an empty part or one holding a path separator.

  Example:
    >>> output_name(experiment_parser('demo').parse_args(['--quick']), 'p_ablation')
    'p_ablation_quick'
    >>> output_name(experiment_parser('demo').parse_args([]), 'pretrained_continual', 'split-mnist-ci', 'pretrained')
    'pretrained_continual/split-mnist-ci_pretrained'
  """
  parts = (experiment, *variant)
  if not all(parts) or any('/' in part or os.sep in part for part in parts):
    raise ValueError(f'output name parts must be non-empty and hold no path separator; got {parts!r}.')
  base = experiment + ('_quick' if args.quick else '')
  return f"{base}/{'_'.join(variant)}" if variant else base


def streams_label(keys: Sequence[str]) -> str:
  """The part of an output name that names the streams ``keys``, for :func:`output_name`.

  Each key in order, joined by ``_``; a stream whose class- and task-incremental forms (``<stream>-ci``,
  ``<stream>-ti``) are both present is named once, by ``<stream>``.

  Args:
    keys: stream keys, e.g. ``['split-mnist-ci', 'split-mnist-ti']``.

  Returns:
    The label, e.g. ``'split-mnist'``.

  Example:
    >>> streams_label(['split-mnist-ci', 'split-mnist-ti', 'permuted-mnist'])
    'split-mnist_permuted-mnist'
    >>> streams_label(['split-mnist-ti'])
    'split-mnist-ti'
  """
  def label(key: str) -> str:
    stream, _, setting = key.rpartition('-')
    both = setting in ('ci', 'ti') and {f'{stream}-ci', f'{stream}-ti'} <= set(keys)
    return stream if both else key

  return '_'.join(dict.fromkeys(label(key) for key in keys))


class Outcome(NamedTuple):
  """What an experiment wrote down: ``<name>.json`` holds ``payload``, ``<name>.md`` ``markdown``."""

  name: str
  payload: dict[str, Any]
  markdown: str


def run_script(
    script: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    experiment: Callable[[argparse.Namespace], Outcome],
) -> Outcome:
  """An experiment script's ``main``: parses ``argv``, runs ``experiment``, writes and prints its outcome.

  The compilation cache is enabled (:mod:`sfa_jax.engine.compile_cache`) and the output folder
  ``--out`` created before ``experiment`` runs; its :class:`Outcome` is written by
  :func:`write_results` with the command (:func:`command_line`) and the wall time since the
  arguments were read, and its markdown printed.

  Args:
    script: the script's ``__file__``.
    parser: the script's parser (from :func:`experiment_parser`, with its own arguments).
    argv: the arguments given to its ``main`` (``None``: this process's).
    experiment: runs the experiment on the parsed arguments.

  Returns:
    The outcome.

  Example:
    >>> import os, tempfile
    >>> out = tempfile.mkdtemp()
    >>> outcome = run_script('/x/experiments/demo.py', experiment_parser('demo'), ['--quick', '--out', out],
    ...                      lambda args: Outcome(output_name(args, 'demo'), {'seeds': seeds_of(args)}, '# Demo'))
    # Demo
    >>> sorted(os.listdir(out))
    ['demo_quick.json', 'demo_quick.md']
    >>> json.load(open(os.path.join(out, 'demo_quick.json')))['command'] == f'python experiments/demo.py --quick --out {out}'
    True
  """
  args = parser.parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  outcome = experiment(args)
  write_results(args.out, outcome.name, outcome.payload, outcome.markdown, command_line(script, argv), time.perf_counter() - start)
  print(outcome.markdown)
  return outcome


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
  """The :func:`sfa_jax.engine.grids.summarize_runs` row of each family's best configuration.

  Best: the highest mean (over seeds) final average accuracy. Families are ``method_name`` unless
  ``family`` maps a run to another name; rows are sorted best first and carry ``'family'``.

  Args:
    runs: run JSONs from :func:`train`.
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
  for row in engine.summarize_runs(runs):
    name = family_of[row['method']]
    if name not in best or row['average_accuracy'][0] > best[name]['average_accuracy'][0]:
      best[name] = row | {'family': name}
  return sorted(best.values(), key=lambda row: -row['average_accuracy'][0])


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
    name: the files' base name from :func:`output_name`, e.g. ``'p_ablation'`` or
      ``'three_scenarios/split'`` (its folder is created).
    payload: JSON-serialisable results; must not use the keys ``command``, ``wall_seconds``,
      ``machine``.
    markdown: the report's body (title, tables, links to PNGs).
    command: the exact command that produced the results.
    seconds: its wall time.

  Returns:
    The paths of the JSON and markdown files.

  Raises:
    ValueError: on a name that is not ``<base>`` or ``<folder>/<base>``, or a payload using a
      reserved key.

  Example:
    >>> import json, os, tempfile
    >>> out = tempfile.mkdtemp()
    >>> json_path, md_path = write_results(out, 'demo', {'x': 1}, '# Demo', 'python demo.py', 2.0)
    >>> json.load(open(json_path))['x'], json.load(open(json_path))['wall_seconds']
    (1, 2.0)
  """
  if not _plain_output_name(name):
    raise ValueError(f'name must be a file base name, or a folder and a file base name (from output_name); got {name!r}.')
  reserved = sorted({'command', 'wall_seconds', 'machine'} & set(payload))
  if reserved:
    raise ValueError(f'payload must not use the reserved keys {reserved}.')
  machine = {'cpus': os.cpu_count(), 'platform': platform.platform(), 'loadavg_at_end': _loadavg()}
  json_path = os.path.join(out_dir, f'{name}.json')
  md_path = os.path.join(out_dir, f'{name}.md')
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  with open(json_path, 'w') as f:
    json.dump(payload | {'command': command, 'wall_seconds': float(seconds), 'machine': machine}, f, indent=1)
  load = '' if machine['loadavg_at_end'] is None else f", load average {machine['loadavg_at_end']} at the end"
  with open(md_path, 'w') as f:
    f.write(f'{markdown.rstrip()}\n\nCommand: `{command}` ({seconds:.0f} s wall time on {machine["cpus"]} CPUs{load}).\n')
  return json_path, md_path


def _plain_output_name(name: str) -> bool:
  """Whether ``name`` is ``<base>`` or ``<folder>/<base>``, each part a plain name (no ``..``, no hidden file)."""
  parts = name.split('/')
  return 1 <= len(parts) <= 2 and all(part and not part.startswith('.') and os.sep not in part for part in parts)


def _loadavg() -> str | None:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return None
