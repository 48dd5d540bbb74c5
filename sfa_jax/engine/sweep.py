"""Vectorised sweeps: N configurations of one method on one stream, trained as one compiled program.

A sweep over SFA's ``p`` and ``beta``, L2's or EWC's ``strength``, replay's ``fraction``, any
hyper-parameter of your own method, or the seed runs every configuration side by side: they are
the stacked lanes of the one training loop (:func:`sfa_jax.engine.loop.train_stream`), advanced
by one ``jax.jit(jax.vmap(train_step))``. The hyper-parameters are traced values of the optimizer
state, so SFA's averaging schedule is computed inside the step from each configuration's own
``p`` and ``T``. Each configuration sees exactly the batches, initialisation and replay memory of
its own :func:`sfa_jax.engine.run.run_sequence`, and gets the same accuracy matrix, averaging steps
and curve (to float tolerance); the task-boundary hooks run per configuration.

What a sweep may vary, and what it may not:

* one method class per sweep (the optimizer state must have one structure): mixing is an error;
* every hyper-parameter of that method, except those marked ``sweepable=False`` (replay's
  ``ratio``: it sets how each batch splits between the task and the memory, hence the steps);
* the seed (model initialisation, data order, replay memory); every other
  :class:`~sfa_jax.engine.config.TrainConfig` field must be equal across configurations.

A sweep's ``seconds`` are those of the whole sweep, shared by its results.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from sfa_jax.engine import run as run_lib
from sfa_jax.engine.config import TrainConfig
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import loop
from sfa_jax.engine import methods as methods_lib

__all__ = ['check_configurations', 'run_sweep']

Configuration = tuple[methods_lib.Method, TrainConfig]
"""One configuration of a sweep: a method with its hyper-parameters and the config (with its seed)."""


def check_configurations(configurations: Sequence[Configuration]) -> list[Configuration]:
  """Checks that ``configurations`` can run as one sweep (see the module docstring).

  Args:
    configurations: ``(method, config)`` pairs, e.g. from :func:`sfa_jax.engine.grids.grid`.

  Returns:
    The configurations, as a list.

  Raises:
    TypeError: when ``configurations`` is not a sequence of ``(Method, TrainConfig)`` pairs.
    ValueError: when it is empty, repeats a configuration, mixes methods, varies a hyper-parameter
      that a sweep cannot vary (``sweepable=False``, e.g. replay's ``ratio``), or varies a
      ``TrainConfig`` field other than ``seed``.

  Example:
    >>> from sfa_jax import engine
    >>> engine.check_configurations([(engine.make_method('sfa'), engine.TrainConfig()),
    ...                             (engine.make_method('l2'), engine.TrainConfig())])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: a sweep trains one method, but the configurations mix l2, sfa: run one ...
  """
  configurations = check_pairs(configurations)
  classes = {type(method) for method, _ in configurations}
  if len(classes) > 1:
    names = ', '.join(sorted(cls.name or cls.__name__ for cls in classes))
    raise ValueError(f'a sweep trains one method, but the configurations mix {names}: run one sweep per method.')
  method_class = classes.pop()
  for key, spec in method_class.hyperparams.items():
    found = sorted({method[key] for method, _ in configurations})
    if not spec.sweepable and len(found) > 1:
      raise ValueError(
          f'{key} differs across the configurations ({found}); a sweep cannot vary it: it changes the batches '
          'or the number of steps, which the configurations of a sweep share.'
      )
  for field in dataclasses.fields(TrainConfig):
    found = {repr(getattr(config, field.name)) for _, config in configurations}
    if field.name != 'seed' and len(found) > 1:
      raise ValueError(
          f'TrainConfig.{field.name} differs across the configurations ({", ".join(sorted(found))}); a sweep '
          f'shares every training setting but the seed: run one sweep per {field.name}.'
      )
  return configurations


def check_pairs(configurations: Sequence[Configuration]) -> list[Configuration]:
  """Checks that ``configurations`` is a non-empty sequence of distinct ``(Method, TrainConfig)`` pairs.

  Args:
    configurations: ``(method, config)`` pairs, e.g. from :func:`sfa_jax.engine.grids.grid`.

  Returns:
    The configurations, as a list.

  Raises:
    TypeError: when ``configurations`` is not a sequence of ``(Method, TrainConfig)`` pairs.
    ValueError: when it is empty or repeats a configuration.

  Example:
    >>> from sfa_jax import engine
    >>> check_pairs([(engine.make_method('sfa'), engine.TrainConfig())] * 2)
    Traceback (most recent call last):
    ...
    ValueError: configurations[1] repeats configurations[0] (sfa(beta=0.25, p=0.25), seed 0).
  """
  if isinstance(configurations, (str, bytes)) or not isinstance(configurations, Sequence):
    raise TypeError(f'configurations must be a sequence of (Method, TrainConfig) pairs; got {type(configurations).__name__}.')
  configurations = list(configurations)
  if not configurations:
    raise ValueError('configurations is empty: give at least one (Method, TrainConfig) pair.')
  seen: dict[Configuration, int] = {}
  for i, item in enumerate(configurations):
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], methods_lib.Method)
            and isinstance(item[1], TrainConfig)):
      raise TypeError(f'configurations[{i}] must be a (Method, TrainConfig) pair; got {item!r}.')
    if item in seen:
      raise ValueError(f'configurations[{i}] repeats configurations[{seen[item]}] ({item[0].label}, seed {item[1].seed}).')
    seen[item] = i
  return configurations


def fingerprint(stream: tasks_lib.TaskStream, configurations: Sequence[Configuration], initial_sum: str | None = None) -> str:
  """A JSON string of everything that decides a sweep's numbers: each configuration's run fingerprint."""
  return json.dumps([json.loads(run_lib.fingerprint(stream, method, config, initial_sum)) for method, config in configurations])


def run_sweep(
    stream: tasks_lib.TaskStream,
    configurations: Sequence[Configuration],
    *,
    callbacks: callbacks_lib.Callback | Sequence[callbacks_lib.Callback] | None = None,
    checkpointer: Checkpointer | None = None,
    initial: tuple[Any, Any] | None = None,
) -> list[run_lib.SequenceResult]:
  """Trains every configuration on ``stream`` as one vectorised program; one result per configuration.

  Args:
    stream: the tasks, e.g. ``sfa_jax.tasks.make_stream('mnist-pair')``.
    configurations: ``(method, config)`` pairs of one method, e.g. from :func:`sfa_jax.engine.grids.grid`; see
      :func:`check_configurations` for what may differ.
    callbacks: called with every event of the loop (:mod:`sfa_jax.engine.callbacks`): a step's
      loss and accuracy hold one value per configuration, an evaluation names its configuration.
    checkpointer: saves the stacked run state every ``every_steps`` steps and at each task end,
      and resumes from it, as for :func:`sfa_jax.engine.run.run_sequence`.
    initial: ``(params, model_state)`` every configuration starts from (as for ``run_sequence``).

  Returns:
    A :class:`sfa_jax.engine.run.SequenceResult` per configuration, in order: what
    :func:`sfa_jax.engine.run.run_sequence` returns for it, except ``seconds``, the whole sweep's.

  Raises:
    TypeError, ValueError: from :func:`check_configurations`, and those of
      :func:`sfa_jax.engine.run.run_sequence` (the averaging schedules, the checkpoints).
    DivergedError: (:class:`sfa_jax.engine.loop.DivergedError`, a ``FloatingPointError`` and a
      ``ValueError``) when a configuration diverges: its loss at a step is NaN or infinite, or its
      params or model state are at a task's end or a periodic checkpoint. The whole sweep stops
      there, naming the configurations (their indices in ``error.configurations``), the task and
      the step; the checkpoints saved before it are kept, and none is written past it.

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> results = engine.run_sweep(stream, engine.grid('sfa', p=(0.25, 1.0), config=config))
    >>> [r.method for r in results], len(results[0].accuracy_matrix)
    (['sfa(beta=0.25, p=0.25)', 'sfa(beta=0.25, p=1)'], 2)
  """
  configurations = check_configurations(configurations)
  run_lib.check_run_arguments(stream, *configurations[0])
  all_tasks = [stream[i] for i in range(len(stream))]
  run_id = fingerprint(stream, configurations, None if initial is None else run_lib.initial_checksum(initial))
  records, seconds = loop.train_stream(
      all_tasks, configurations, model=run_lib.build_model(stream, configurations[0][1]),
      fingerprint=run_id, stacked=True, callbacks=callbacks, checkpointer=checkpointer, initial=initial,
  )
  return [
      run_lib.SequenceResult.of(stream, method, all_tasks, record, dict(seconds))
      for (method, _), record in zip(configurations, records)
  ]
