"""The budget rule: a task must get enough optimizer steps for the claim that an experiment tests.

An experiment that trains each task for too few steps cannot answer its question: with 12 steps
per task SFA at ``p = 0.96`` averages exactly when ``p = 1`` does, and a baseline that has not
learned the task says nothing about forgetting. The rule, checked by :func:`check_budget`:

1. **Averaging periods.** Every averaging period of the smallest ``p`` holds at least two steps:
   ``T >= ceil(2 / p_min)``.
2. **Distinct schedules.** Every two values of ``p`` in the experiment average at different steps
   (:func:`sfa_jax.is_averaging_step`, the schedule SFA really runs); otherwise they are one
   configuration under two names.
3. **Converged baseline.** Fine-tuning reaches at least ``fraction`` (default 95 %) of its
   converged accuracy on every task within ``T`` steps. The converged accuracy and the steps it
   takes to reach the fraction are measured once per stream by :func:`measure_convergence` (one
   fine-tuning run with a longer reference budget, the current task evaluated every few steps), and
   the measurement is recorded with the results.

A failed rule raises :class:`BudgetError` (``strict=True``) or warns loudly; either way the check's
record (:class:`BudgetCheck`, as JSON through :meth:`BudgetCheck.to_json`) goes into the results.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class BudgetError(ValueError):
  """A task gets fewer steps than the claim under test needs."""


class BudgetWarning(UserWarning):
  """Issued instead of :class:`BudgetError` by ``check_budget(..., strict=False)``."""


def min_steps_for_p(p_min: float) -> int:
  """The fewest steps per task for which each averaging period of ``p_min`` holds two steps: ``ceil(2/p_min)``.

  Args:
    p_min: the smallest averaging fraction of the experiment, in (0, 1].

  Raises:
    ValueError: on ``p_min`` outside (0, 1].

  Example:
    >>> min_steps_for_p(0.25), min_steps_for_p(1.0), min_steps_for_p(0.3)
    (8, 2, 7)
  """
  p_min = float(p_min)
  if not 0.0 < p_min <= 1.0:
    raise ValueError(f'p_min must be in (0, 1]; got {p_min}.')
  return math.ceil(2.0 / p_min - 1e-9)


def averaging_steps(p: float, total_steps: int) -> tuple[int, ...]:
  """The steps (1-based) after which SFA averages in a task of ``total_steps`` steps.

  Example:
    >>> averaging_steps(0.25, 10), averaging_steps(0.96, 12), averaging_steps(0.96, 100)
    ((3, 6, 9, 10), (12,), (96, 100))
  """
  from sfa_jax import transforms

  steps = np.arange(1, int(total_steps) + 1)
  return tuple(int(s) for s in steps[np.asarray(transforms.is_averaging_step(steps, float(p), int(total_steps)))])


def converged_steps(
    curve: Sequence[tuple[int, float]], *, fraction: float = 0.95
) -> dict[str, Any]:
  """From a task's learning curve, its converged accuracy and the steps fine-tuning takes to reach ``fraction`` of it.

  The converged accuracy is the mean of the curve's last three points (the end of a reference
  budget longer than the experiment's); the steps are the first point at or above ``fraction``
  of it.

  Args:
    curve: ``(steps into the task, accuracy on the task)`` pairs, steps increasing.
    fraction: the share of the converged accuracy that counts as learned, in (0, 1].

  Returns:
    ``{'converged_accuracy', 'steps_to_fraction', 'fraction', 'reference_steps'}``.

  Raises:
    ValueError: on an empty curve or a ``fraction`` outside (0, 1].

  Example:
    >>> curve = [(10, 0.5), (20, 0.9), (30, 0.96), (40, 0.97), (50, 0.97)]
    >>> converged_steps(curve)['steps_to_fraction']
    30
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must be in (0, 1]; got {fraction}.')
  if len(curve) == 0:
    raise ValueError('curve must hold at least one (steps, accuracy) point.')
  steps = np.asarray([s for s, _ in curve], np.int64)
  accuracy = np.asarray([a for _, a in curve], np.float64)
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f'curve steps must increase; got {steps.tolist()}.')
  converged = float(np.mean(accuracy[-3:]))
  reached = np.nonzero(accuracy >= fraction * converged)[0]
  return {'converged_accuracy': converged, 'steps_to_fraction': int(steps[reached[0]]), 'fraction': float(fraction),
          'reference_steps': int(steps[-1])}


def task_curves(run: Mapping[str, Any]) -> list[list[tuple[int, float]]]:
  """Each task's own accuracy while it was trained, steps counted from the task's start, from a run JSON.

  Args:
    run: a run of :func:`sfa_jax.engine.run.run_sequence` (``SequenceResult.to_json()``) trained with
      ``eval_every > 0``.

  Returns:
    One curve per task: ``[(steps into task k, accuracy on task k), ...]``.

  Example:
    >>> curve = [{'step': 2, 'task': 0, 'accuracies': [0.5, 0.1]},
    ...          {'step': 4, 'task': 0, 'accuracies': [0.9, 0.1]},
    ...          {'step': 8, 'task': 1, 'accuracies': [0.2, 0.8]}]
    >>> run = {'steps_per_task': [4, 4], 'curve': curve}
    >>> task_curves(run)
    [[(2, 0.5), (4, 0.9)], [(4, 0.8)]]
  """
  starts = np.concatenate([[0], np.cumsum(run['steps_per_task'])[:-1]])
  curves: list[list[tuple[int, float]]] = [[] for _ in run['steps_per_task']]
  for point in run['curve']:
    step, task, accuracies = (point['step'], point['task'], point['accuracies']) if isinstance(point, Mapping) else point
    into = int(step) - int(starts[task])
    if into > 0 and (not curves[task] or curves[task][-1][0] < into):
      curves[task].append((into, float(accuracies[task])))
  return curves


def measure_convergence(
    stream: Any,
    config: Any,
    reference_steps: int,
    *,
    eval_every: int | None = None,
    fraction: float = 0.95,
    initial: Any = None,
) -> dict[str, Any]:
  """Fine-tuning's convergence on each task of ``stream``: one run of ``reference_steps`` steps per task.

  Args:
    stream: the :class:`~sfa_jax.tasks.TaskStream`.
    config: the experiment's :class:`~sfa_jax.engine.config.TrainConfig`; its ``steps_per_task`` and
      ``eval_every`` are replaced.
    reference_steps: steps per task of the measuring run; longer than the experiment's budget, so
      that its end is converged.
    eval_every: evaluate every this many steps (default: ``reference_steps // 20``, at least 1).
    fraction: the share of the converged accuracy that counts as learned.
    initial: the run's initial variables (e.g. a pretrained backbone), as for ``run_sequence``.

  Returns:
    ``{'reference_steps', 'eval_every', 'fraction', 'seed', 'seconds', 'tasks': [converged_steps(...) per task]}``.

  Raises:
    ValueError: on a ``reference_steps`` below 1.
  """
  import time

  from sfa_jax.engine import methods, run

  if int(reference_steps) < 1:
    raise ValueError(f'reference_steps must be at least 1; got {reference_steps}.')
  every = int(eval_every or max(1, int(reference_steps) // 20))
  run_config = dataclasses.replace(config, steps_per_task=int(reference_steps), eval_every=every)
  begin = time.perf_counter()
  result = run.run_sequence(stream, methods.make_method('finetune'), run_config, initial=initial)
  curves = task_curves(result.to_json())
  return {'reference_steps': int(reference_steps), 'eval_every': every, 'fraction': float(fraction),
          'seed': int(config.seed), 'seconds': time.perf_counter() - begin,
          'tasks': [converged_steps(curve, fraction=fraction) | {'curve': curve} for curve in curves]}


def steps_per_task(stream: Any, config: Any, *, method: Any = None) -> list[int]:
  """The optimizer steps each task of ``stream`` trains for under ``config``, as the engine counts them.

  ``config.steps_per_task`` when set, else ``epochs_per_task`` whole epochs of the task's batch
  plan (:meth:`~sfa_jax.engine.methods.Method.batch_plan`): its examples in batches of
  ``batch_size`` less the examples the plan takes from a memory. So replay, whose batches hold
  fewer of the task's examples, takes more steps per epoch, and joint training, on the union of
  the tasks so far, more as the tasks go on. The plans are made as the engine makes them (replay's
  memories included).

  Args:
    stream: the :class:`~sfa_jax.tasks.TaskStream`.
    config: the :class:`~sfa_jax.engine.config.TrainConfig`.
    method: the :class:`~sfa_jax.engine.methods.Method` whose batch plan the tasks train on;
      ``None``: each task on its own examples (fine-tuning, SFA and every method without a plan
      of its own).

  Returns:
    One step count per task.

  Raises:
    ValueError: when a ``steps_per_task`` tuple does not hold one entry per task, or a task's
      examples make no batch.

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=2, batch_size=64)
    >>> examples = [len(stream[k].train.y) for k in range(2)]
    >>> steps_per_task(stream, config) == [2 * (n // 64) for n in examples]
    True
    >>> replay = engine.make_method('replay', ratio=0.5)  # task 1: 32 a batch from memory
    >>> steps_per_task(stream, config, method=replay) == [2 * (examples[0] // 64),
    ...                                                   2 * (examples[1] // 32)]
    True
    >>> steps_per_task(stream, engine.TrainConfig(steps_per_task=300))
    [300, 300]
  """
  from sfa_jax.engine import loop
  from sfa_jax.engine import methods

  method = methods.make_method('finetune') if method is None else method
  all_tasks = loop.check_lanes([stream[k] for k in range(len(stream))], [(method, config)], stacked=False)
  plans = (method.batch_plan(all_tasks, k, config.batch_size, config.seed) for k in range(len(all_tasks)))
  return [loop.task_steps(plan, config, k) for k, plan in enumerate(plans)]


def _grid_p_values(methods: Sequence[Any]) -> list[float]:
  """The averaging fractions ``p`` of the methods of a grid that have one (SFA and its variants)."""
  return sorted({float(m['p']) for m in methods if 'p' in type(m).hyperparams})


def grid_budget(stream: Any, configurations: Sequence[tuple[Any, Any]], *, strict: bool = False) -> BudgetCheck:
  """Rules 1 and 2 of the budget rule for a grid of runs on ``stream`` (:func:`check_budget`).

  Checks the fewest steps per task of the grid's runs that have a ``p`` (all its runs when none
  has) against its ``p`` values: each period of the smallest ``p`` holds two steps, and every two
  ``p`` average at different steps. Fine-tuning's convergence (rule 3) is a measured run
  (:func:`measure_convergence`), left to the experiments that can pay for it.

  Args:
    stream: the :class:`~sfa_jax.tasks.TaskStream`.
    configurations: ``(method, config)`` pairs, e.g. from :func:`sfa_jax.engine.grids.grid`.
    strict: raise :class:`BudgetError` on a failure (else warn with :class:`BudgetWarning`).

  Returns:
    The :class:`BudgetCheck`.

  Raises:
    BudgetError: with ``strict``, when a rule fails.
    ValueError: from :func:`steps_per_task`.

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(steps_per_task=100)
    >>> grid_budget(stream, engine.grid('sfa', p=(0.5, 1.0), config=config)).ok
    True
  """
  with_p = [(method, config) for method, config in configurations if 'p' in type(method).hyperparams]
  counted = {_step_count_key(method, config): (method, config) for method, config in with_p or configurations}
  steps = min(min(steps_per_task(stream, config, method=method)) for method, config in counted.values())
  return check_budget(steps, p_values=_grid_p_values([method for method, _ in configurations]), strict=strict,
                      what=f'a grid on {stream.name}')


def _step_count_key(method: Any, config: Any) -> tuple[Any, ...]:
  """What decides a run's step counts: its method's class and the hyper-parameters a sweep cannot vary
  (those that change the batches), and its settings but the seed."""
  fixed = tuple(method[key] for key, spec in type(method).hyperparams.items() if not spec.sweepable)
  return type(method), fixed, dataclasses.replace(config, seed=0)


@dataclasses.dataclass(frozen=True)
class BudgetCheck:
  """The outcome of :func:`check_budget`: what was asked, what was measured, what failed."""

  steps_per_task: int
  p_values: tuple[float, ...]
  min_steps_for_p: int | None
  identical_schedules: tuple[tuple[float, float], ...]
  steps_to_fraction: tuple[int, ...] | None
  problems: tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.problems

  def to_json(self) -> dict[str, Any]:
    return {'steps_per_task': self.steps_per_task, 'p_values': list(self.p_values),
            'min_steps_for_p': self.min_steps_for_p, 'identical_schedules': [list(p) for p in self.identical_schedules],
            'steps_to_fraction': None if self.steps_to_fraction is None else list(self.steps_to_fraction),
            'ok': self.ok, 'problems': list(self.problems)}


def check_budget(
    steps_per_task: int,
    *,
    p_values: Sequence[float] = (),
    convergence: Mapping[str, Any] | None = None,
    strict: bool = True,
    what: str = 'the experiment',
) -> BudgetCheck:
  """Checks ``steps_per_task`` against the budget rule (module docstring); raises or warns on a failure.

  Args:
    steps_per_task: the optimizer steps each task trains for.
    p_values: SFA's averaging fractions in the experiment (empty: no SFA, rules 1-2 skipped).
    convergence: from :func:`measure_convergence` (``None``: rule 3 skipped, and said so in the
      record).
    strict: raise :class:`BudgetError` on a failure (else warn with :class:`BudgetWarning`).
    what: names the experiment in the messages.

  Returns:
    The :class:`BudgetCheck` (also when it failed and ``strict`` is ``False``).

  Raises:
    BudgetError: with ``strict``, when a rule fails; the message names each failure.
    TypeError: when ``p_values`` is not a sequence of numbers (a bare ``p``, a string).
    ValueError: on ``steps_per_task`` below 1 or a ``p`` outside (0, 1].

  Example:
    >>> check_budget(200, p_values=[0.25, 0.5, 0.96, 1.0]).ok
    True
    >>> check_budget(12, p_values=[0.96, 1.0], strict=False).problems  # doctest: +SKIP
    ('steps_per_task=12: p=0.96 and p=1 average after the same steps (12,) ...',)
  """
  if int(steps_per_task) != steps_per_task or steps_per_task < 1:
    raise ValueError(f'steps_per_task must be a positive integer; got {steps_per_task!r}.')
  T = int(steps_per_task)
  ps = _p_grid(p_values)
  problems = []
  needed = None
  same = []
  if ps:
    needed = min_steps_for_p(ps[0])
    if T < needed:
      problems.append(f'steps_per_task={T} is below ceil(2/p_min)={needed} for p_min={ps[0]:g}: an averaging '
                      'period of p_min holds fewer than two steps.')
    schedules = {p: averaging_steps(p, T) for p in ps}
    for i, a in enumerate(ps):
      for b in ps[i + 1:]:
        if schedules[a] == schedules[b]:
          same.append((a, b))
          problems.append(f'steps_per_task={T}: p={a:g} and p={b:g} average after the same steps {schedules[a]}, '
                          'so they are one configuration.')
  to_fraction = None
  if convergence is not None:
    to_fraction = tuple(int(t['steps_to_fraction']) for t in convergence['tasks'])
    short = [k for k, s in enumerate(to_fraction) if s > T]
    if short:
      problems.append(
          f'steps_per_task={T}: fine-tuning needs more steps to reach {convergence["fraction"]:.0%} of its converged '
          f'accuracy on tasks {short} (steps needed: {[to_fraction[k] for k in short]}; measured over '
          f'{convergence["reference_steps"]} steps per task).')
  check = BudgetCheck(T, ps, needed, tuple(same), to_fraction, tuple(problems))
  if problems:
    message = f'budget rule failed for {what}:\n  ' + '\n  '.join(problems)
    if strict:
      raise BudgetError(message)
    warnings.warn('\n' + '!' * 72 + f'\n{message}\n' + '!' * 72, BudgetWarning, stacklevel=2)
  return check


def _p_grid(p_values: Any) -> tuple[float, ...]:
  """The distinct values of the grid ``p_values``, increasing; raises naming the argument unless each is in (0, 1]."""
  if isinstance(p_values, (str, bytes)) or not isinstance(p_values, Iterable) or getattr(p_values, 'ndim', 1) == 0:
    raise TypeError(f'p_values must be a sequence of averaging fractions, e.g. (0.25, 0.5); got {type(p_values).__name__} '
                    f'{p_values!r}.')
  grid = []
  for i, p in enumerate(p_values):
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
      raise TypeError(f'p_values[{i}] must be a number; got {type(p).__name__} {p!r}.')
    if not 0.0 < float(p) <= 1.0:
      raise ValueError(f'p_values[{i}] must be in (0, 1]; got {p!r}.')
    grid.append(float(p))
  return tuple(sorted(set(grid)))
