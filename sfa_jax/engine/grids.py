"""Grids of runs: every combination of hyper-parameter values and seeds, trained and summed up.

:func:`grid` builds the configurations (``(method, config)`` pairs, the seeds innermost); grids of
several methods are added up as lists. :func:`run_grid` trains them on one stream, one run after
another (:func:`sfa_jax.engine.run.run_sequence`) or as vectorised sweeps
(:func:`sfa_jax.engine.sweep.run_sweep`, one per group of configurations a sweep can hold), and
yields each :class:`GridRun` as soon as it and the configurations before it have finished.
:func:`summarize_runs` aggregates finished runs over their seeds (mean ± std)::

  from sfa_jax import engine, tasks

  stream = tasks.make_stream('mnist-pair')
  config = engine.TrainConfig()
  configurations = (engine.grid('finetune', seeds=(0, 1), config=config)
                    + engine.grid('sfa', p=(0.25, 0.5), seeds=(0, 1), config=config))
  runs = [run.to_json() for run in engine.run_grid(stream, configurations, log=print)]
  engine.summarize_runs(runs)  # one row per configuration: mean ± std over the seeds
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sfa_jax import _validation
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import budget
from sfa_jax.engine import loop
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import run as run_lib
from sfa_jax.engine import steps
from sfa_jax.engine import sweep
from sfa_jax.engine.callbacks import ConsoleProgress
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.config import TrainConfig

__all__ = ['grid', 'GridRun', 'run_grid', 'summarize_runs']

Configuration = sweep.Configuration


def grid(
    name: Any,
    *,
    seeds: Sequence[int] = (0,),
    config: TrainConfig = TrainConfig(),
    **values: Sequence[float],
) -> list[Configuration]:
  """Every combination of the given hyper-parameter values and seeds, for :func:`run_grid` or a sweep.

  Args:
    name: the method: a registered name, an import path ``'package.module:Class'`` or a
      :class:`~sfa_jax.engine.methods.Method` subclass.
    seeds: the seeds; each combination runs once per seed (the innermost loop).
    config: the training settings shared by every configuration (its ``seed`` is replaced).
    **values: for each hyper-parameter, the values to sweep, e.g. ``p=(0.25, 0.5)``; hyper-parameters
      not named keep the method's defaults.

  Returns:
    ``(method, config)`` pairs, in the order of :func:`itertools.product` over ``values`` (in the
    order given), then the seeds.

  Raises:
    ValueError: on an unknown method or hyper-parameter, a value out of range, no values, or a seed
      outside ``[0, 2**32 - 1]``.
    TypeError: when a hyper-parameter's values or ``seeds`` are not a sequence, or a seed is not an
      integer (``1.5``, ``True``, ``'1'``; NumPy integers are integers), as ``TrainConfig`` refuses it.

  Example:
    >>> from sfa_jax import engine
    >>> configurations = engine.grid('sfa', p=(0.25, 0.5), beta=(0.5,), seeds=(0, 1))
    >>> [(m.label, c.seed) for m, c in configurations]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('sfa(beta=0.5, p=0.25)', 0), ('sfa(beta=0.5, p=0.25)', 1),
     ('sfa(beta=0.5, p=0.5)', 0), ('sfa(beta=0.5, p=0.5)', 1)]
  """
  for key, options in {'seeds': seeds, **values}.items():
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
      raise TypeError(f'{key} must be a sequence of values, e.g. (0.25, 0.5); got {options!r}.')
    if not options:
      raise ValueError(f'{key} is empty: give at least one value.')
  for i, seed in enumerate(seeds):
    _validation.check_int(f'seeds[{i}]', seed, low=0, high=2**32 - 1)  # as TrainConfig checks its seed
  methods = [methods_lib.make_method(name, **dict(zip(values, combination))) for combination in itertools.product(*values.values())]
  return [(method, dataclasses.replace(config, seed=int(seed))) for method in methods for seed in seeds]


class GridRun(NamedTuple):
  """One finished run of :func:`run_grid`: its configuration and its result.

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> configurations = engine.grid('l2', strength=(0.1,), config=config)
    >>> run = next(engine.run_grid(stream, configurations))
    >>> run.method, run.config.seed, len(run.result.accuracy_matrix)
    (L2(strength=0.1), 0, 2)
  """

  method: methods_lib.Method
  config: TrainConfig
  result: run_lib.SequenceResult

  def to_json(self) -> dict[str, Any]:
    """``result.to_json()`` with ``'seed'``, ``'method_name'`` and ``'hyperparams'`` (every
    hyper-parameter of the method, defaults included)."""
    return self.result.to_json() | {'seed': self.config.seed, 'method_name': self.method.name, 'hyperparams': self.method.values}


def run_grid(
    stream: tasks_lib.TaskStream,
    configurations: Sequence[Configuration],
    *,
    as_sweep: bool | None = None,
    initial: Callable[[int], tuple[Any, Any] | None] | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
    mesh: Any = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[GridRun]:
  """Trains every configuration on ``stream``; yields each run in order, as soon as it is ready.

  One after another, each configuration is :func:`sfa_jax.engine.run.run_sequence`. As sweeps, the
  configurations that one sweep can hold (one method class, equal values of the hyper-parameters a
  sweep cannot vary, equal training settings but the seed; with ``initial``, one seed) train side
  by side as one :func:`sfa_jax.engine.sweep.run_sweep`: the same numbers, one compiled program per
  group, each group's runs ready when it ends. By default sweeps are chosen on an accelerator,
  where one small model does not fill the device, and runs one after another on the CPU, where the
  step is compute-bound and a sweep does not pay (``benchmarks/RESULTS.md``), or on a mesh.

  Every configuration is checked when this is called, before anything trains, as its run would
  check it before its first step (the stream; each sweep's configurations; each configuration's
  batch size and step budget against the stream, its model, optimizer and trainable params), and
  an error names the configuration. The training happens as the runs are taken from the iterator;
  ``initial`` is called for a seed when its first run starts.

  Args:
    stream: the tasks.
    configurations: ``(method, config)`` pairs, e.g. from :func:`grid` (several grids added up).
    as_sweep: ``True``: vectorised sweeps; ``False``: one run after another; ``None``: chosen by
      the backend (and ``mesh``), as above.
    initial: maps a seed to the ``(params, model_state)`` its runs start from (e.g. a pretrained
      backbone with a new head initialised with the seed), as ``run_sequence``'s ``initial``;
      ``None``: the model's initialisation.
    checkpoints: a folder: each run is checkpointed (and resumed) in its own subfolder,
      ``slug(f'{label}-seed{seed}')``; a sweep in ``sweep`` (``sweep-1``, ``sweep-2``, ... when
      there are several). ``None``: no checkpoints.
    checkpoint_every: with ``checkpoints``, also checkpoint every this many steps (0: only at
      task ends).
    progress: draw a progress bar per run (``'<label> seed <seed>'``) or per sweep (``'sweep of
      <n> <method> (mean over configurations)'``) on standard error; off a terminal, a line every
      10 % of each task (:class:`~sfa_jax.engine.callbacks.ConsoleProgress` with ``disable=False``).
    mesh: train each run on these devices (:func:`sfa_jax.engine.distributed.make_mesh`); runs
      one after another only.
    log: called with how the grid trains, the budget rule's verdict on its SFA ``p`` values
      (:func:`sfa_jax.engine.budget.grid_budget`; a failed rule also warns), and a line per
      configuration once all its seeds have finished (the mean ± std of the final average accuracy,
      of the final accuracy on each task up to 5 tasks, and its seconds); ``None`` is quiet.

  Returns:
    An iterator of :class:`GridRun`, one per configuration, in the order of ``configurations``.

  Raises:
    TypeError: when ``stream`` is not a :class:`~sfa_jax.tasks.TaskStream`, ``configurations`` not
      a sequence of ``(Method, TrainConfig)`` pairs, or ``initial`` not callable; or from a
      configuration's model or optimizer.
    ValueError: when it is empty or repeats a configuration, when two runs would share a checkpoint
      folder, on sweeps asked for with a ``mesh``, when the configurations of a sweep could not share
      one (:func:`sfa_jax.engine.sweep.check_configurations`), or when a configuration does not fit
      the stream (a batch larger than a task, a ``steps_per_task`` tuple of another length, trainable
      patterns that match no param).

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> configurations = engine.grid('finetune', seeds=(0, 1), config=config)
    >>> runs = [run.to_json() for run in engine.run_grid(stream, configurations)]
    >>> [(run['method_name'], run['seed']) for run in runs], len(runs[0]['accuracy_matrix'])
    ([('finetune', 0), ('finetune', 1)], 2)
  """
  configurations = sweep.check_pairs(configurations)
  if as_sweep and mesh is not None:
    raise ValueError('as_sweep=True with a mesh: a sweep trains on one device; give mesh=None, or as_sweep=False.')
  if as_sweep is None:
    backend = jax.default_backend()
    as_sweep = backend != 'cpu' and mesh is None
    reason = f'chosen for the {backend} backend' + (' and the mesh' if mesh is not None else '')
  else:
    reason = 'as asked'
  if initial is not None and not callable(initial):
    raise TypeError(f'initial must map a seed to (params, model_state), or be None; got {type(initial).__name__}.')
  groups = _sweep_groups(configurations, by_seed=initial is not None) if as_sweep else [[i] for i in range(len(configurations))]
  folders = [None] * len(groups) if checkpoints is None else [
      os.path.join(checkpoints, folder) for folder in _checkpoint_folders(configurations, groups, as_sweep)]
  _check_runs(stream, configurations, groups if as_sweep else [])
  check = None if log is None else budget.grid_budget(stream, configurations)

  def train(group: list[int], folder: str | None) -> list[run_lib.SequenceResult]:
    members = [configurations[i] for i in group]
    method, config = members[0]
    start = None if initial is None else initial(config.seed)
    checkpointer = None if folder is None else Checkpointer(folder, every_steps=checkpoint_every)
    try:
      if as_sweep:
        bar = _progress(progress, f'sweep of {len(members)} {method.name} (mean over configurations)')
        return sweep.run_sweep(stream, members, callbacks=bar, checkpointer=checkpointer, initial=start)
      bar = _progress(progress, f'{method.label} seed {config.seed}')
      return [run_lib.run_sequence(stream, method, config, callbacks=bar, checkpointer=checkpointer, mesh=mesh, initial=start)]
    finally:
      if checkpointer is not None:
        checkpointer.close()

  how = f'as {len(groups)} vectorised sweeps' if as_sweep else 'one after another'
  seeds = {config.seed for _, config in configurations}
  opening = [f'run_grid: {len(configurations)} runs of {len(_methods(configurations))} configurations and {len(seeds)} seeds, '
             f'{how} ({reason})']
  if check is not None:
    opening.append(f"run_grid: {check.steps_per_task} steps per task (the fewest of the stream); budget rules on the p grid "
                   f"{list(check.p_values)}: {'met' if check.ok else 'FAILED'} (fine-tuning convergence not measured here)")
  trained = ((group, train(group, folder)) for group, folder in zip(groups, folders))
  return _in_order(configurations, trained, log, opening)


def _check_runs(stream: Any, configurations: Sequence[Configuration], sweeps: Sequence[list[int]]) -> None:
  """Raises what the runs of ``configurations`` would raise before their first step, naming the configuration.

  Args:
    stream: the tasks.
    configurations: checked ``(method, config)`` pairs.
    sweeps: the indices of the configurations of each sweep (none when the runs are one after another).
  """
  run_lib.check_run_arguments(stream, *configurations[0])
  for group in sweeps:
    sweep.check_configurations([configurations[i] for i in group])
  all_tasks = [stream[k] for k in range(len(stream))]
  first: dict[TrainConfig, int] = {}  # the first configuration of each setting (the checks do not read the seed)
  for i, (_, config) in enumerate(configurations):
    first.setdefault(dataclasses.replace(config, seed=0), i)
  for i in first.values():
    method, config = configurations[i]
    try:
      loop.check_lanes(all_tasks, [(method, config)], stacked=False)
      config.make_optimizer()
      steps.trainable_mask(run_lib.build_model(stream, config), all_tasks[0].train.x[:1], config.trainable)
    except (TypeError, ValueError) as error:
      error.add_note(f'run_grid: configurations[{i}] ({method.label}, seed {config.seed}).')
      raise


def _in_order(
    configurations: Sequence[Configuration],
    trained: Iterator[tuple[list[int], list[run_lib.SequenceResult]]],
    log: Callable[[str], None] | None,
    opening: Sequence[str],
) -> Iterator[GridRun]:
  """Each configuration's :class:`GridRun` once it and those before it are trained; the log lines."""
  if log is not None:
    for line in opening:
      log(line)
  remaining = collections.Counter(method for method, _ in configurations)
  finished: dict[methods_lib.Method, list[dict[str, Any]]] = {}
  ready: dict[int, run_lib.SequenceResult] = {}
  position = 0
  for group, results in trained:
    ready.update(zip(group, results))
    while position in ready:
      method, config = configurations[position]
      run = GridRun(method, config, ready.pop(position))
      yield run
      position += 1
      remaining[method] -= 1
      if log is not None:
        finished.setdefault(method, []).append(run.to_json())
        if not remaining[method]:
          log(_summary_line(finished.pop(method)))


def _methods(configurations: Sequence[Configuration]) -> list[methods_lib.Method]:
  """The methods of ``configurations``, each once, in order of first appearance."""
  return list(dict.fromkeys(method for method, _ in configurations))


def _sweep_groups(configurations: Sequence[Configuration], by_seed: bool) -> list[list[int]]:
  """The indices of the configurations that one sweep can hold, groups in order of first appearance."""
  groups: dict[Any, list[int]] = {}
  for i, (method, config) in enumerate(configurations):
    fixed = tuple(method[key] for key, spec in type(method).hyperparams.items() if not spec.sweepable)
    key = (type(method), fixed, dataclasses.replace(config, seed=0), config.seed if by_seed else None)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def _checkpoint_folders(configurations: Sequence[Configuration], groups: list[list[int]], as_sweep: bool) -> list[str]:
  """Each group's checkpoint subfolder (see :func:`run_grid`); raises if two would share one."""
  if as_sweep:
    folders = ['sweep'] if len(groups) == 1 else [f'sweep-{k + 1}' for k in range(len(groups))]
  else:
    folders = [slug(f'{configurations[i][0].label}-seed{configurations[i][1].seed}') for (i,) in groups]
  seen: dict[str, int] = {}
  for k, folder in enumerate(folders):
    if folder in seen:
      raise ValueError(f'configurations[{groups[seen[folder]][0]}] and configurations[{groups[k][0]}] would share the '
                       f'checkpoint folder {folder!r} (one method and seed, other settings): checkpoint them apart.')
    seen[folder] = k
  return folders


def _progress(progress: bool, label: str) -> list[ConsoleProgress]:
  return [ConsoleProgress(label, disable=False)] if progress else []


def _summary_line(group: Sequence[dict[str, Any]]) -> str:
  """One configuration's runs in a line: label, final average accuracy (and per task, up to 5), seconds."""
  row = summarize_runs(group)[0]
  cells = [f"{row['method']:<36}", 'avg {:.3f} ± {:.3f}'.format(*row['average_accuracy'])]
  if len(row['final_accuracy']) <= 5:
    cells.append('tasks ' + ' '.join(f'{m:.3f}' for m, _ in row['final_accuracy']))
  cells.append('{:.1f} s'.format(sum(run['seconds']['total'] for run in group)))
  return ' | '.join(cells)


def summarize_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Aggregates runs over seeds: one row per method label, in order of first appearance.

  Each row holds the method, the number of seeds, and ``(mean, std)`` over seeds (population std)
  of: the final accuracy on each task, the average accuracy after the last task, forgetting
  (max convention), backward transfer and the training seconds.

  Args:
    runs: run JSONs (``SequenceResult.to_json()``, e.g. :meth:`GridRun.to_json`), each with
      ``method``, ``accuracy_matrix``, ``metrics`` and ``seconds``.

  Returns:
    The rows.

  Example:
    >>> metrics = {'average_accuracy': 0.75, 'forgetting': 0.5, 'backward_transfer': -0.5}
    >>> runs = [{'method': 'm', 'accuracy_matrix': [[1.0, 0.0], [0.5, 1.0]],
    ...          'seconds': {'train': 1.0}, 'metrics': metrics}]
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  array = np.asarray(values, dtype=float)
  return float(array.mean()), float(array.std())


def slug(label: str) -> str:
  """``label`` as a file name: each run of characters other than letters, digits and ``_.=-`` is one ``_``.

  Example:
    >>> slug('sfa(beta=0.25, p=0.5)-seed0')
    'sfa_beta=0.25_p=0.5_-seed0'
  """
  return re.sub(r'[^A-Za-z0-9_.=-]+', '_', label).strip('_')
