"""Vectorised sweeps: N configurations of one method on one stream, trained as one compiled program.

A sweep over SFA's ``p`` and ``beta``, L2's or EWC's ``strength``, replay's ``fraction`` or the seed
runs every configuration side by side: params, optimizer state and anchors are stacked on a
leading axis of configurations, and one ``jax.jit(jax.vmap(train_step))`` advances them all by one
step. The hyper-parameters are traced values of the optimizer state (fields of the transforms'
states), so SFA's averaging schedule is computed inside the step
from each configuration's own ``p`` and ``T``. Each configuration sees exactly the batches,
initialisation and replay memory of its own :func:`sfa_jax.continual.run_sequence`, and gets the
same accuracy matrix (to float tolerance).

What a sweep may vary, and what it may not:

* one method per sweep (the optimizer state must have one structure): mixing methods is an error;
* every hyper-parameter of that method, except replay's ``ratio`` (it sets how each batch splits
  between the task and the memory, hence the number of steps);
* the seed (model initialisation, data order, replay memory); every other
  :class:`~sfa_jax.continual.TrainConfig` field must be equal across configurations.

Task boundaries (re-anchoring, EWC's Fisher, the merges of WiSE-FT, task arithmetic and TIES) run
per configuration with :mod:`sfa_jax.continual`'s own code, between the vectorised tasks. Sweeps
are not checkpointed; a sweep's ``seconds`` are those of the whole sweep, shared by its results.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import continual
from sfa_jax import tasks as tasks_lib

Configuration = tuple[continual.Method, continual.TrainConfig]

# Hyper-parameters a sweep cannot vary, and why.
_FIXED_HYPERPARAMS = {
    'ratio': 'it sets how each batch splits between the task and the replay memory, hence the number of steps',
}


def grid(
    name: str,
    *,
    seeds: Sequence[int] = (0,),
    config: continual.TrainConfig = continual.TrainConfig(),
    **values: Sequence[float],
) -> list[Configuration]:
  """Every combination of the given hyper-parameter values and seeds, for :func:`run_sweep`.

  Args:
    name: the method, one of :data:`sfa_jax.continual.METHODS`.
    seeds: the seeds; each combination runs once per seed (the innermost loop).
    config: the training settings shared by every configuration (its ``seed`` is replaced).
    **values: for each hyper-parameter, the values to sweep, e.g. ``p=(0.25, 0.5)``; hyper-parameters
      not named keep the method's defaults.

  Returns:
    ``(method, config)`` pairs, in the order of :func:`itertools.product` over ``values`` (in the
    order given), then the seeds.

  Raises:
    ValueError: on an unknown method or hyper-parameter, a value out of range, or no values.
    TypeError: when a hyper-parameter's values or ``seeds`` are not a sequence.

  Example:
    >>> from sfa_jax import sweep
    >>> [(m.label, c.seed) for m, c in sweep.grid('sfa', p=(0.25, 0.5), beta=(0.5,), seeds=(0, 1))]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('sfa(beta=0.5, p=0.25)', 0), ('sfa(beta=0.5, p=0.25)', 1), ('sfa(beta=0.5, p=0.5)', 0),
     ('sfa(beta=0.5, p=0.5)', 1)]
  """
  for key, options in {'seeds': seeds, **values}.items():
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
      raise TypeError(f'{key} must be a sequence of values, e.g. (0.25, 0.5); got {options!r}.')
    if not options:
      raise ValueError(f'{key} is empty: give at least one value.')
  methods = [continual.make_method(name, **dict(zip(values, combination))) for combination in itertools.product(*values.values())]
  return [(method, dataclasses.replace(config, seed=int(seed))) for method in methods for seed in seeds]


def check_configurations(configurations: Sequence[Configuration]) -> list[Configuration]:
  """Checks that ``configurations`` can run as one sweep (see the module docstring).

  Args:
    configurations: ``(method, config)`` pairs, e.g. from :func:`grid`.

  Returns:
    The configurations, as a list.

  Raises:
    TypeError: when ``configurations`` is not a sequence of ``(Method, TrainConfig)`` pairs.
    ValueError: when it is empty, repeats a configuration, mixes methods, varies a hyper-parameter
      that a sweep cannot vary (replay's ``ratio``), or varies a ``TrainConfig`` field other than
      ``seed``.

  Example:
    >>> from sfa_jax import continual, sweep
    >>> sweep.check_configurations([(continual.make_method('sfa'), continual.TrainConfig()),
    ...                             (continual.make_method('l2'), continual.TrainConfig())])
    Traceback (most recent call last):
    ...
    ValueError: a sweep trains one method, but the configurations mix l2, sfa: run one sweep per method.
  """
  if isinstance(configurations, (str, bytes)) or not isinstance(configurations, Sequence):
    raise TypeError(f'configurations must be a sequence of (Method, TrainConfig) pairs; got {type(configurations).__name__}.')
  configurations = list(configurations)
  if not configurations:
    raise ValueError('configurations is empty: a sweep needs at least one (Method, TrainConfig) pair.')
  for i, item in enumerate(configurations):
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], continual.Method)
            and isinstance(item[1], continual.TrainConfig)):
      raise TypeError(f'configurations[{i}] must be a (Method, TrainConfig) pair; got {item!r}.')
  names = sorted({method.name for method, _ in configurations})
  if len(names) > 1:
    raise ValueError(f'a sweep trains one method, but the configurations mix {", ".join(names)}: run one sweep per method.')
  for key, reason in _FIXED_HYPERPARAMS.items():
    found = sorted({dict(method.hyperparams)[key] for method, _ in configurations if key in dict(method.hyperparams)})
    if len(found) > 1:
      raise ValueError(f'{key} differs across the configurations ({found}); a sweep cannot vary it: {reason}.')
  for field in dataclasses.fields(continual.TrainConfig):
    found = {repr(getattr(config, field.name)) for _, config in configurations}
    if field.name != 'seed' and len(found) > 1:
      raise ValueError(
          f'TrainConfig.{field.name} differs across the configurations ({", ".join(sorted(found))}); a sweep '
          f'shares every training setting but the seed: run one sweep per {field.name}.'
      )
  seen: dict[Configuration, int] = {}
  for i, (method, config) in enumerate(configurations):
    if (method, config) in seen:
      raise ValueError(f'configurations[{i}] repeats configurations[{seen[method, config]}] ({method.label}, seed {config.seed}).')
    seen[method, config] = i
  return configurations


# Stacking and unstacking at task boundaries: one compiled program each, not one op per leaf.
@jax.jit
def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree: Any, count: int) -> list[Any]:
  return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(count)]


def _data_key(method: continual.Method, config: continual.TrainConfig) -> tuple[int, float | None]:
  """What decides a configuration's batches besides the shared settings: the seed, replay's memory."""
  return config.seed, dict(method.hyperparams).get('fraction') if method.name == 'replay' else None


def run_sweep(
    stream: tasks_lib.TaskStream,
    configurations: Sequence[Configuration],
    *,
    progress: continual.ProgressFn | None = None,
) -> list[continual.SequenceResult]:
  """Trains every configuration on ``stream`` as one vectorised program; one result per configuration.

  Args:
    stream: the tasks, e.g. ``sfa_jax.tasks.make_stream('mnist-pair')``.
    configurations: ``(method, config)`` pairs of one method, e.g. from :func:`grid`; see
      :func:`check_configurations` for what may differ.
    progress: called after every step with ``{'task', 'step', 'steps', 'loss', 'accuracy'}`` (loss
      and accuracy: device arrays of one value per configuration), and after every evaluation of a
      configuration with ``{'task', 'configuration': i, 'evaluation': CurvePoint}``.

  Returns:
    A :class:`sfa_jax.continual.SequenceResult` per configuration, in order: what
    :func:`sfa_jax.continual.run_sequence` returns for it, except ``seconds``, the whole sweep's.

  Raises:
    TypeError, ValueError: from :func:`check_configurations`.

  Example:
    >>> from sfa_jax import continual, sweep, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = continual.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> results = sweep.run_sweep(stream, sweep.grid('sfa', p=(0.25, 1.0), config=config))
    >>> [r.method for r in results], len(results[0].accuracy_matrix)
    (['sfa(beta=0.25, p=0.25)', 'sfa(beta=0.25, p=1)'], 2)
  """
  start_time = time.perf_counter()
  configurations = check_configurations(configurations)
  report = progress or (lambda event: None)
  methods = [method for method, _ in configurations]
  configs = [config for _, config in configurations]
  shared, count = configs[0], len(configurations)
  all_tasks = [stream[i] for i in range(len(stream))]
  model = continual.build_model(stream, shared)
  init = continual.initializer(model, all_tasks[0].train.x[:1])
  # Each configuration's arrays between tasks, as run_sequence holds them.
  arrays = [dict(zip(('params', 'model_state'), init(config.seed))) for config in configs]
  optimizer = continual._OPTIMIZERS[shared.optimizer](shared.learning_rate)
  # One transform per configuration for its initial state (its constructor's hyper-parameters);
  # they share one update rule, which reads the hyper-parameters from the state. Their inits run
  # eagerly (zeros and copies): jitting each would compile it once per configuration.
  txs = [continual.method_transform(method, optimizer) for method in methods]
  one_data = len({_data_key(method, config) for method, config in configurations}) == 1
  data_axis = None if one_data else 0  # the same batches for all: pass them once
  train_step = jax.jit(
      jax.vmap(continual.make_train_step(model, txs[0]), in_axes=(0, 0, 0, data_axis, data_axis, None, data_axis)),
      donate_argnums=(0, 2),
  )
  evaluate = continual.make_evaluator(model, shared.eval_batch_size, stacked=True)
  records = [{'matrix': [], 'curve': [], 'steps_per_task': [], 'averaging_steps': [], 'num_finetuned': 0} for _ in configs]
  seconds = {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0}
  global_step = 0

  def evaluate_all(params, model_state, task_index: int, which) -> np.ndarray:
    begin = time.perf_counter()
    accuracies = np.stack([evaluate(params, model_state, t.test, t.index) for t in all_tasks], axis=1)
    seconds['evaluate'] += time.perf_counter() - begin
    for i in which:
      point = continual.CurvePoint(global_step, task_index, tuple(float(a) for a in accuracies[i]))
      records[i]['curve'].append(point)
      report({'task': task_index, 'configuration': i, 'evaluation': point})
    return accuracies

  for k in range(len(all_tasks)):
    plans = [continual._plan_task(method, config, all_tasks, k) for method, config in configurations]
    total_steps = plans[0].total_steps  # equal for all: same data sizes, batch split and epochs
    for i in range(count):
      continual._start_task(methods[i], configs[i], arrays[i], k, total_steps, txs[i].init)
    params, model_state, opt_state = _stack([(a['params'], a['model_state'], a['opt_state']) for a in arrays])
    schedules = np.stack([continual.averaging_schedule(method, k, total_steps) for method in methods])
    feeds = range(1) if one_data else range(count)
    mask = np.ones(shared.batch_size, bool)
    step_in_task = 0
    begin = time.perf_counter()
    for epoch in range(shared.epochs_per_task):
      orders = [continual._epoch_orders(plans[i], configs[i], k, epoch) for i in feeds]
      for b in range(len(orders[0][0])):
        batches = [continual._batch(plans[i], *orders[i], b) for i in feeds]
        x, y, ids = batches[0] if one_data else (np.stack(parts) for parts in zip(*batches))
        params, model_state, opt_state, loss, accuracy = train_step(params, model_state, opt_state, x, y, mask, ids)
        step_in_task += 1
        global_step += 1
        averaged = schedules[:, step_in_task]
        for i in np.flatnonzero(averaged):
          records[i]['averaging_steps'].append(global_step)
        report({'task': k, 'step': step_in_task, 'steps': total_steps, 'loss': loss, 'accuracy': accuracy})
        # As run_sequence: with curves on, evaluate every eval_every steps and around each average.
        due = (global_step % max(shared.eval_every, 1) == 0) | averaged | schedules[:, step_in_task + 1]
        if shared.eval_every and due.any() and step_in_task < total_steps:
          seconds['train'] += time.perf_counter() - begin
          evaluate_all(params, model_state, k, np.flatnonzero(due))
          begin = time.perf_counter()
    jax.block_until_ready(params)
    seconds['train'] += time.perf_counter() - begin
    for i, (p, s, o) in enumerate(_unstack((params, model_state, opt_state), count)):
      arrays[i].update(params=p, model_state=s, opt_state=o)
      records[i]['steps_per_task'].append(step_in_task)
      continual._finish_task(methods[i], configs[i], model, all_tasks, k, arrays[i], records[i], seconds)
    final = _stack([(a['params'], a['model_state']) for a in arrays])
    for i, row in enumerate(evaluate_all(*final, k, range(count))):
      records[i]['matrix'].append([float(a) for a in row])

  seconds['total'] = time.perf_counter() - start_time
  return [
      continual.SequenceResult(
          stream=stream.name,
          setting=stream.setting,
          method=method.label,
          task_names=[t.name for t in all_tasks],
          accuracy_matrix=record['matrix'],
          curve=record['curve'],
          steps_per_task=record['steps_per_task'],
          averaging_steps=record['averaging_steps'],
          seconds=dict(seconds),
      )
      for method, record in zip(methods, records)
  ]
