"""The one training loop: a stream of tasks, one or many configurations, checkpointed, on a mesh.

:func:`train_stream` trains every configuration ``(method, config)`` on the tasks of a stream in
order and evaluates every task after each. The configurations are *lanes* of one loop: a single
run is one lane (:func:`sfa_jax.continual.run_sequence`); a sweep stacks N lanes on a leading
axis and advances them with one ``jax.vmap``-ed step (:func:`sfa_jax.sweep.run_sweep`). The loop
knows no method by name: it calls the :class:`~sfa_jax.engine.methods.Method` hooks at every task
boundary (per lane, on that lane's :class:`RunState`), takes the batches from
:meth:`~sfa_jax.engine.methods.Method.batch_plan`, and records the averages that
:meth:`~sfa_jax.engine.methods.Method.averaging_schedule` lists ahead or that the state reports.

Compile once. The train step is one ``jax.jit`` function per (model, method class, optimizer):
anchors, Fisher and hyper-parameters live in the optimizer state, the task id is an array
argument, and every batch has one static shape (the ragged end of each shuffled epoch is
dropped; evaluation pads and masks).

A checkpoint is the run state (params, model state, optimizer state, the method's extras; stacked
in a sweep) and a JSON record (position, accuracy matrices, curves); it restores into the state of
a fresh start, whose structure never changes during a run. On CPU a resumed run is bit for bit an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import _validation
from sfa_jax import distributed
from sfa_jax import fisher as fisher_lib
from sfa_jax import models
from sfa_jax import partial
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib

CHECKPOINT_FORMAT = 2  # the layout of a checkpoint's arrays and record; part of every fingerprint


class RunState(NamedTuple):
  """Everything a run holds on the device: the pytree the loop advances and a checkpoint saves.

  Attributes:
    params: the model's trainable parameters.
    model_state: its other variables (BatchNorm statistics), ``{}`` for most models.
    opt_state: the state of the method's chain around the optimizer.
    extras: what the method keeps across tasks (:meth:`Method.init_extras`), e.g. EWC's Fisher.
  """

  params: Any
  model_state: Any
  opt_state: Any
  extras: Any


# ------------------------------------------------------------------------------------------------
# The pieces of a run: model variables, the train step, the evaluator, the Fisher.


def initializer(model, sample: np.ndarray, mesh: Any = None) -> Callable[[int], tuple[Any, Any]]:
  """``init(seed) -> (params, model_state)`` for ``model``, one jitted program for every seed.

  Flax's ``init`` run eagerly dispatches every initializer's operations one by one, and a fresh
  process compiles each of them; jitted, it is one program that the persistent compilation cache
  keeps. The values are bit-for-bit those of the eager ``init``. With a ``mesh``, every leaf is
  created where :func:`sfa_jax.distributed.tree_shardings` puts it (FSDP).

  Args:
    model: a Flax Linen module taking ``(x, task_id=, train=)``.
    sample: one batch of inputs, e.g. the first training example with its leading axis.
    mesh: optional ``jax.sharding.Mesh`` from :func:`sfa_jax.distributed.make_mesh`.

  Returns:
    The function of the seed.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import models
    >>> from sfa_jax.engine import loop
    >>> init = loop.initializer(models.make_model('mlp', 10), np.zeros((1, 8, 8, 1), np.float32))
    >>> params, model_state = init(0)
    >>> sorted(params)
    ['Dense_0', 'Dense_1', 'head']
  """
  if mesh is None:
    return lambda seed: _init_variables(model, jax.random.key(seed), sample)
  shapes = jax.eval_shape(_init_variables, model, jax.random.key(0), sample)
  sharded = jax.jit(
      lambda key: _init_variables(model, key, sample), out_shardings=distributed.tree_shardings(shapes, mesh)
  )
  return lambda seed: sharded(jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model, key: jax.Array, sample: jax.Array) -> tuple[Any, Any]:
  variables = _call(model, model.init, key, sample, jnp.zeros(1, jnp.int32), train=False)
  return models.split_variables(variables)


@functools.lru_cache(maxsize=None)
def _keywords(module_type: type) -> frozenset[str]:
  """Which of ``task_id`` and ``train`` the module's ``__call__`` takes (by keyword, or ``**kwargs``)."""
  try:
    parameters = inspect.signature(module_type.__call__).parameters
  except (TypeError, ValueError):
    return frozenset()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return frozenset({'task_id', 'train'})
  return frozenset({'task_id', 'train'} & set(parameters))


def _call(model, method: Callable, first: Any, x: Any, task_ids: Any, *, train: bool, **kwargs) -> Any:
  """``method(first, x, ...)`` with ``task_id=`` and ``train=`` passed only if the module takes them.

  The built-in models take both (one head per task, BatchNorm's mode); any Flax Linen module
  ``__call__(self, x)`` works too (a module written in NNX: through ``flax.nnx.bridge.to_linen``).
  """
  takes = _keywords(getattr(model, 'nnx_class', type(model)))  # flax.nnx.bridge.to_linen: the NNX module's
  if 'task_id' in takes:
    kwargs['task_id'] = task_ids
  if 'train' in takes:
    kwargs['train'] = train
  return method(first, x, **kwargs)


def make_train_step(model, tx: optax.GradientTransformation, objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION,
                    trainable: Any = None):
  """The train step ``(params, model_state, opt_state, x, y, mask, task_ids) -> (..., loss, metric)``, unjitted.

  With ``trainable`` (a mask of the params, :func:`sfa_jax.partial.path_mask`), only those leaves
  are differentiated and updated: ``tx`` and its state see the trainable tree alone
  (``optax.MaskedNode`` at the frozen leaves), the frozen leaves pass through unchanged.

  :func:`jitted_train_step` compiles it for one run, :func:`train_stream` vmaps it for a sweep.
  """

  def apply(params, model_state, x, task_ids):
    variables = models.merge_variables(params, model_state)
    if not model_state:
      return _call(model, model.apply, variables, x, task_ids, train=True), model_state
    return _call(model, model.apply, variables, x, task_ids, train=True, mutable=list(model_state))

  def step(params, model_state, opt_state, x, y, mask, task_ids):
    def loss_fn(p):
      logits, new_state = apply(p, model_state, x, task_ids)
      loss, accuracy = objective.loss(logits, y, mask)
      return loss, (new_state, accuracy)

    if trainable is None:
      (loss, (new_state, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_state, opt_state, loss, accuracy
    train, frozen = partial.split_trainable(params, trainable)
    (loss, (new_state, accuracy)), grads = partial.trainable_value_and_grad(loss_fn, has_aux=True)(train, frozen)
    updates, opt_state = tx.update(grads, opt_state, train)
    return partial.merge_trainable(optax.apply_updates(train, updates), frozen), new_state, opt_state, loss, accuracy

  return step


def jitted_train_step(model, tx: optax.GradientTransformation, objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION,
                      trainable: Any = None):
  """:func:`make_train_step` jitted, params and optimizer state donated; traced once per batch shape."""
  return jax.jit(make_train_step(model, tx, objective, trainable), donate_argnums=(0, 2))


def make_evaluator(
    model, batch_size: int, *, stacked: bool = False, objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION
) -> Callable[[Any, Any, tasks_lib.Split, int], Any]:
  """``evaluate(params, model_state, split, task_index) -> metric``, one compilation per input shape.

  The metric is the objective's score summed over the split's examples, over their number
  (accuracy, for classification).

  With ``stacked``, params and model state carry a leading axis of models (a sweep): one
  vectorised program evaluates them all on the same batches and ``evaluate`` returns a NumPy
  array of one accuracy per model.
  """

  def correct_count(params, model_state, x, y, mask, task_ids):
    logits = _call(model, model.apply, models.merge_variables(params, model_state), x, task_ids, train=False)
    return objective.score(logits, y, mask)

  count = jax.jit(jax.vmap(correct_count, in_axes=(0, 0, None, None, None, None)) if stacked else correct_count)

  def evaluate(params, model_state, split: tasks_lib.Split, task_index: int):
    batches = tasks_lib.eval_batches(split, batch_size)
    task_ids = np.full(batches.y.shape[1:], task_index, np.int32)
    total = 0
    for x, y, mask in zip(batches.x, batches.y, batches.mask):
      total = total + np.asarray(count(params, model_state, x, y, mask, task_ids))
    return total / len(split.y) if stacked else int(total) / len(split.y)

  return evaluate


@dataclasses.dataclass(frozen=True)
class _VariablesLogits:
  """``(variables, (x, task_ids)) -> logits``: a hashable logits function for the Fisher.

  Equal for equal models, so the Fisher's jitted chunk function compiles once per run, not per task.
  """

  model: Any

  def __call__(self, variables, inputs):
    x, task_ids = inputs
    return _call(self.model, self.model.apply, variables, x, task_ids, train=False)


def task_fisher(
    model, params, model_state, split: tasks_lib.Split, task_index: int, batch_size: int,
    objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION, trainable: Any = None,
) -> Any:
  """The empirical diagonal Fisher of ``params`` on ``split``: the mean squared per-example gradient.

  For :data:`~sfa_jax.engine.objectives.CLASSIFICATION`, of the log-likelihood (with the batched
  layer-wise pass of :func:`sfa_jax.fisher.diagonal_fisher`); for any other objective, or with a
  ``trainable`` mask (:func:`sfa_jax.partial.path_mask`), of its per-example loss, the frozen
  leaves' entries zero (their gradients are never formed).
  """
  task_ids = np.full(len(split.y), task_index, np.int32)
  if objective is objectives_lib.CLASSIFICATION and trainable is None:
    variables = models.merge_variables(params, model_state)
    full = fisher_lib.diagonal_fisher(_VariablesLogits(model), variables, (split.x, task_ids), split.y, batch_size=batch_size)
    return models.split_variables(full)[0]
  return _loss_fisher(model, objective, params, model_state, split, task_ids, batch_size, trainable)


def _loss_fisher(model, objective, params, model_state, split, task_ids, batch_size, trainable=None) -> Any:
  """``mean_i g_i²``, ``g_i`` the gradient of example ``i``'s loss under ``objective`` (chunks of
  ``batch_size``), with respect to the ``trainable`` leaves (all if ``None``; zero elsewhere)."""
  train, frozen = (params, None) if trainable is None else partial.split_trainable(params, trainable)

  def example_loss(t, frozen, x, y, task_id):
    p = t if frozen is None else partial.merge_trainable(t, frozen)
    outputs = _call(model, model.apply, models.merge_variables(p, model_state), x[None], task_id[None], train=False)
    return objective.loss(outputs, y[None], jnp.ones(1, bool))[0]

  @jax.jit
  def chunk_sum(t, frozen, x, y, ids, valid):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, None, 0, 0, 0))(t, frozen, x, y, ids)
    return jax.tree.map(lambda g: jnp.einsum('n,n...->...', valid, jnp.square(g)), grads)

  total = jax.tree.map(jnp.zeros_like, train)
  n = len(split.y)
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    valid = (np.arange(start, start + batch_size) < n).astype(np.float32)
    part = chunk_sum(train, frozen, split.x[rows], split.y[rows], task_ids[rows], valid)
    total = jax.tree.map(jnp.add, total, part)
  fisher = jax.tree.map(lambda t: t / n, total)
  return fisher if frozen is None else partial.merge_trainable(fisher, jax.tree.map(jnp.zeros_like, frozen))


_REUSED: dict[Any, Any] = {}
_REUSED_LIMIT = 32  # compiled steps and evaluators kept; the oldest is dropped beyond


def reused(key: tuple, build: Callable[[], Any]) -> Any:
  """``build()``, kept under ``key`` for later runs of this process (built afresh if unhashable).

  A jitted function made anew for every run traces, lowers and (without the persistent
  compilation cache) compiles anew: ~0.5 s a run for the MLP, several seconds cold. At most
  ``_REUSED_LIMIT`` are kept (each holds its compiled programs).
  """
  try:
    hash(key)
  except TypeError:  # a model or optimizer with an unhashable field
    return build()
  if key not in _REUSED:
    if len(_REUSED) >= _REUSED_LIMIT:
      del _REUSED[next(iter(_REUSED))]
    _REUSED[key] = build()
  return _REUSED[key]


# ------------------------------------------------------------------------------------------------
# Batches.


def check_batch_size(tasks: Sequence[tasks_lib.Task], batch_size: int) -> None:
  """Raises ``ValueError`` unless every task's training set makes at least one batch of ``batch_size``.

  :func:`train_stream` checks it before the first step (a run does not train the first tasks and
  then fail at a smaller one); the command line checks it before it writes anything.
  """
  smallest = min(tasks, key=lambda task: len(task.train.y))
  if tasks_lib.num_batches(len(smallest.train.y), batch_size) == 0:
    raise ValueError(f'{batch_size} is more than the {len(smallest.train.y)} training examples of the smallest '
                     f'task ({smallest.name}); lower batch_size.')


def _task_budget(num_examples: int, batch_size: int, config: Any, task_index: int) -> tuple[int, int]:
  """``(steps, epochs)`` of a task: ``config.steps_per_task`` steps, or ``epochs_per_task`` whole epochs.

  With a step budget the epochs are the shuffled passes it needs, the last one cut where the
  budget ends.
  """
  per_epoch = tasks_lib.num_batches(num_examples, batch_size)
  if per_epoch == 0:
    raise ValueError(f'{num_examples} training examples make no batch of {batch_size}: lower batch_size.')
  budget = config.steps_per_task
  if budget is None:
    return per_epoch * config.epochs_per_task, config.epochs_per_task
  steps = budget[task_index] if isinstance(budget, tuple) else budget
  return steps, -(-steps // per_epoch)


def _replay_order(num_examples: int, batch_size: int, count: int, seed: int, epoch: int) -> np.ndarray:
  """``count`` batches of memory indices: shuffled passes over the memory, one after another."""
  rng = np.random.default_rng([seed, epoch, 1])
  passes = -(-count * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(passes)])
  return order[: count * batch_size].reshape(count, batch_size)


class _Feed(NamedTuple):
  """One lane's batches of a task: its plan and the task's seed."""

  plan: methods_lib.BatchPlan
  seed: int
  batch_size: int

  @property
  def current_size(self) -> int:
    return self.batch_size - self.plan.replay_size

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The batches of one epoch: rows of example indices and (replay) rows of memory indices."""
    order, _ = tasks_lib.epoch_indices(len(self.plan.data.y), self.current_size, seed=self.seed, epoch=epoch)
    replay_order = None
    if self.plan.replay is not None:
      replay_order = _replay_order(len(self.plan.replay.y), self.plan.replay_size, len(order), self.seed, epoch)
    return order, replay_order

  def batch(self, order: np.ndarray, replay_order: np.ndarray | None, i: int):
    """Batch ``i`` of the epoch: the task's examples, then (replay) the memory's."""
    plan, rows = self.plan, order[i]
    x, y, ids = plan.data.x[rows], plan.data.y[rows], plan.task_ids[rows]
    if replay_order is not None:
      rows = replay_order[i]
      x = np.concatenate([x, plan.replay.x[rows]])
      y = np.concatenate([y, plan.replay.y[rows]])
      ids = np.concatenate([ids, plan.replay_ids[rows]])
    return x, y, ids


# ------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Position:
  """Where a run is: the next batch to train is batch ``batch`` of epoch ``epoch`` of task ``task``."""

  task: int = 0
  epoch: int = 0
  batch: int = 0
  step_in_task: int = 0
  global_step: int = 0


@jax.jit
def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree: Any, count: int) -> list[Any]:
  return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(count)]


def _starting_point(model, task: tasks_lib.Task, initial: Any, mesh: Any) -> Callable[[int], tuple[Any, Any]]:
  """``init(seed)`` returning copies of ``initial``, checked against the model's own variables."""
  if not (isinstance(initial, (tuple, list)) and len(initial) == 2):
    raise TypeError(f'initial must be a (params, model_state) pair; got {type(initial).__name__}.')
  expected = jax.eval_shape(_init_variables, model, jax.random.key(0), task.train.x[:1])
  for name, given, want in zip(('params', 'model_state'), initial, expected):
    _validation.check_matching_tree(want, given, reference_name=f"the model's {name}", other_name=f'initial {name}')
  shardings = distributed.tree_shardings(expected, mesh) if mesh is not None else None
  copy = jax.jit(_validation.copy_tree, out_shardings=shardings)
  return lambda seed: copy(tuple(initial))


def _trainable_mask(model, task: tasks_lib.Task, patterns: str | tuple[str, ...] | None) -> Any:
  """The mask of the params ``patterns`` select (:func:`sfa_jax.partial.path_mask`), or ``None`` for all."""
  if patterns is None:
    return None
  params_shapes, _ = jax.eval_shape(_init_variables, model, jax.random.key(0), task.train.x[:1])
  return partial.path_mask(params_shapes, patterns)


def update_program(tx: optax.GradientTransformation, opt_state: Any, params: Any) -> str:
  """A digest of the program ``tx.update`` runs on states and params of these shapes (jaxpr and constants).

  Two transforms with one digest update alike from the same state: their hyper-parameters are
  read from the state, not baked into the update. Traced abstractly (nothing runs).
  """
  abstract = lambda tree: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype), tree)
  shapes = abstract(params)
  closed = jax.make_jaxpr(tx.update)(shapes, abstract(opt_state), shapes)
  digest = hashlib.sha256(str(closed.jaxpr).encode())
  for const in closed.consts:
    const = np.asarray(const)
    digest.update(f'{const.dtype}{const.shape}'.encode() + np.ascontiguousarray(const).tobytes())
  return digest.hexdigest()


def check_one_update_rule(methods: Sequence[methods_lib.Method], txs: Sequence[optax.GradientTransformation],
                          opt_states: Sequence[Any], params: Any) -> None:
  """Raises unless every lane's transform updates by one program, its hyper-parameters read from its state.

  A sweep advances all lanes with the first lane's update: a method whose transform bakes a
  hyper-parameter into its update function (a Python number in a closure, not a field of the
  state) would silently train every lane with the first lane's value.

  Raises:
    ValueError: naming the method and the first lane whose update program differs.
  """
  reference, seen = update_program(txs[0], opt_states[0], params), {methods[0]}
  for i in range(1, len(methods)):
    if methods[i] in seen:
      continue
    seen.add(methods[i])
    if update_program(txs[i], opt_states[i], params) != reference:
      raise ValueError(
          f'{methods[i].label} (configuration {i}) updates by another program than {methods[0].label}: its '
          'transform bakes a hyper-parameter into its update. Keep hyper-parameters in the optimizer state '
          '(as sfa_jax.sfa does) to sweep them, or run the configurations one by one.'
      )


class LaneRecord(NamedTuple):
  """What one configuration measured: the lists of :class:`sfa_jax.continual.SequenceResult`."""

  matrix: list[list[float]]
  curve: list[tuple[int, int, tuple[float, ...]]]
  steps_per_task: list[int]
  averaging_steps: list[int]
  extra: list[Any]


def train_stream(
    tasks: Sequence[tasks_lib.Task],
    configurations: Sequence[tuple[methods_lib.Method, Any]],
    *,
    model: Any,
    fingerprint: str,
    stacked: bool,
    callbacks: callbacks_lib.Callback | Sequence[callbacks_lib.Callback] | None = None,
    checkpointer: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    initial: Any = None,
    evaluate_state: Callable[[RunState], Any] | None = None,
) -> tuple[list[LaneRecord], dict[str, float]]:
  """Trains every configuration on ``tasks`` in order; evaluates every task after each.

  Args:
    tasks: the tasks, built once (``list(stream)``: a stream builds a task each time it is indexed).
    configurations: ``(method, config)`` lanes: one of them (``stacked=False``) or several of one
      method class whose configs differ only in the seed (checked by :mod:`sfa_jax.sweep`).
    model: the Flax module, built for the stream.
    fingerprint: what decides the numbers; a checkpoint must carry the same.
    stacked: vectorise the lanes (a sweep); with ``False`` there is exactly one lane.
    callbacks: called with each event of :mod:`sfa_jax.engine.callbacks`.
    checkpointer: a :class:`sfa_jax.checkpoint.Checkpointer`: save every ``every_steps`` steps
      and at each task end, resume from its latest checkpoint of this ``fingerprint``.
    mesh: train the (single) lane on these devices: batches split over the mesh, params and
      optimizer state FSDP-sharded.
    initial: ``(params, model_state)`` every lane starts from (a pretrained model, another run's
      end) instead of the model's initialisation with the lane's seed; copied, never donated.
    evaluate_state: ``evaluate_state(state, after_task)``, a further evaluation of one lane's
      state (JSON values, e.g. held-out losses and exact match of a language model), before the
      first task (``after_task=None``) and after every task end (its index); kept in
      :attr:`LaneRecord.extra` and in the checkpoints. Unstacked runs only.

  Returns:
    One :class:`LaneRecord` per configuration, and the seconds spent training, evaluating, in
    the Fisher, and in all.
  """
  start_time = time.perf_counter()
  emit = callbacks_lib.as_callbacks(callbacks)
  methods = [method for method, _ in configurations]
  configs = [config for _, config in configurations]
  shared, count = configs[0], len(configurations)
  if not stacked and count != 1:
    raise ValueError(f'an unstacked run has one configuration; got {count}.')
  if stacked and evaluate_state is not None:
    raise ValueError('evaluate_state evaluates one run: it is not available in a sweep.')
  all_tasks = list(tasks)
  check_batch_size(all_tasks, shared.batch_size)
  for config in configs:
    if isinstance(config.steps_per_task, tuple) and len(config.steps_per_task) != len(all_tasks):
      raise ValueError(f'steps_per_task has {len(config.steps_per_task)} entries for {len(all_tasks)} tasks: give one per task.')
  init = initializer(model, all_tasks[0].train.x[:1], mesh) if initial is None else _starting_point(model, all_tasks[0], initial, mesh)
  trainable = _trainable_mask(model, all_tasks[0], shared.trainable)
  cut = (lambda params: params) if trainable is None else (lambda params: partial.split_trainable(params, trainable)[0])
  optimizer = shared.make_optimizer()
  txs = [method.transform(optimizer) for method in methods]
  # One transform per lane for its initial state (its constructor's hyper-parameters); the lanes
  # share one update rule, which reads them from the state. A sweep's inits run eagerly (zeros
  # and copies): jitting each would compile it once per configuration. The optimizer state holds
  # the trainable leaves alone.
  if stacked:
    init_opt = [lambda params, tx=tx: tx.init(cut(params)) for tx in txs]
  else:
    jitted_init = reused(('opt_init', methods[0], shared.optimizer_key(), model, shared.trainable),
                         lambda: jax.jit(lambda params: txs[0].init(cut(params))))
    init_opt = [jitted_init]

  def fresh_lane(i: int) -> RunState:
    params, model_state = init(configs[i].seed)
    extras = methods[i].init_extras(params, model_state, len(all_tasks))
    return RunState(params, model_state, init_opt[i](params), extras)

  objective = shared.objective
  if stacked:
    data_keys = {(config.seed, method.data_key()) for method, config in configurations}
    data_axis = None if len(data_keys) == 1 else 0  # the same batches for all: pass them once
    train_step = jax.jit(
        jax.vmap(make_train_step(model, txs[0], objective, trainable), in_axes=(0, 0, 0, data_axis, data_axis, None, data_axis)),
        donate_argnums=(0, 2),
    )
    evaluate = make_evaluator(model, shared.eval_batch_size, stacked=True, objective=objective)
    fresh = [fresh_lane(i) for i in range(count)]
    check_one_update_rule(methods, txs, [lane.opt_state for lane in fresh], cut(fresh[0].params))
    state = _stack(fresh)
  else:
    data_axis = None
    state = fresh_lane(0)
    # Runs of one process share a compiled step when their updates are one program (the
    # hyper-parameters in the state); a method that bakes them into its update gets its own.
    step_key = ('train_step', model, shared.optimizer_key(), objective, shared.trainable,
                update_program(txs[0], state.opt_state, cut(state.params)))
    train_step = reused(step_key, lambda: jitted_train_step(model, txs[0], objective, trainable))
    if mesh is not None:  # the same step on sharded inputs (sfa_jax.distributed)
      train_step = distributed.shard_step(train_step, mesh)
    evaluate = reused(('evaluate', model, shared.eval_batch_size, objective),
                      lambda: make_evaluator(model, shared.eval_batch_size, objective=objective))

  record: dict[str, Any] = {
      'fingerprint': fingerprint,
      'position': dataclasses.asdict(_Position()),
      'lanes': [{'matrix': [], 'curve': [], 'steps_per_task': [], 'averaging_steps': [], 'extra': []} for _ in range(count)],
      'seconds': {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0},
  }
  if checkpointer is not None:
    restored = checkpointer.restore_latest(state._asdict(), fingerprint=fingerprint)
    if restored is not None:
      arrays, record = restored
      state = RunState(**arrays)
      emit(callbacks_lib.ResumeEvent(record['position']['global_step']))
  pos = _Position(**record['position'])
  seconds, lanes = record['seconds'], record['lanes']

  def evaluate_extra(after_task: int | None) -> None:
    if evaluate_state is not None:
      begin = time.perf_counter()
      lanes[0]['extra'].append(evaluate_state(state, after_task))
      seconds['evaluate'] += time.perf_counter() - begin

  if pos.global_step == 0 and not lanes[0]['extra']:
    evaluate_extra(None)  # before any training: the starting point's row

  def lane_states() -> list[RunState]:
    return _unstack(state, count) if stacked else [state]

  def joined(states: list[RunState]) -> RunState:
    return _stack(states) if stacked else states[0]

  def save(force: bool) -> None:
    if checkpointer is not None:
      record['position'] = dataclasses.asdict(pos)
      checkpointer.save(pos.global_step, state._asdict(), record, force=force)
      emit(callbacks_lib.CheckpointEvent(pos.global_step, checkpointer.directory))

  def evaluate_all(task_index: int, which: Sequence[int]) -> np.ndarray:
    begin = time.perf_counter()
    accuracies = np.stack(
        [np.atleast_1d(evaluate(state.params, state.model_state, t.test, t.index)) for t in all_tasks], axis=1
    )
    seconds['evaluate'] += time.perf_counter() - begin
    for i in which:
      point = (pos.global_step, task_index, tuple(float(a) for a in accuracies[i]))
      lanes[i]['curve'].append(list(point))
      emit(callbacks_lib.EvaluationEvent(i, _curve_point(point)))
    return accuracies

  def boundary(k: int, total_steps: int) -> methods_lib.Boundary:
    def fisher(lane: RunState) -> Any:
      begin = time.perf_counter()
      split = all_tasks[k].train
      if shared.fisher_examples is not None:
        split = tasks_lib.Split(split.x[: shared.fisher_examples], split.y[: shared.fisher_examples])
      value = task_fisher(model, lane.params, lane.model_state, split, k, shared.eval_batch_size, objective, trainable)
      seconds['fisher'] += time.perf_counter() - begin
      return value

    return methods_lib.Boundary(k, len(all_tasks), total_steps, fisher)

  while pos.task < len(all_tasks):
    k = pos.task
    feeds = [
        _Feed(method.batch_plan(all_tasks, k, config.batch_size, config.seed), methods_lib.task_seed(config.seed, k), config.batch_size)
        for method, config in configurations
    ]
    total_steps, epochs = _task_budget(len(feeds[0].plan.data.y), feeds[0].current_size, shared, k)
    at = boundary(k, total_steps)
    if pos.step_in_task == 0:
      started = []
      for i, lane in enumerate(lane_states()):
        lane = methods[i].start_task(lane, at)
        if configs[i].reset_optimizer:
          lane = lane._replace(opt_state=init_opt[i](lane.params))
        started.append(lane._replace(opt_state=methods[i].prepare_optimizer(lane.opt_state, lane, at)))
      state = joined(started)
    schedules = [method.averaging_schedule(k, total_steps) for method in methods]
    on_device = any(schedule is None for schedule in schedules)
    schedules = np.stack([np.zeros(total_steps + 2, bool) if s is None else s for s in schedules])
    inputs = feeds[:1] if data_axis is None else feeds
    mask = np.ones(shared.batch_size, bool)
    begin = time.perf_counter()
    while pos.epoch < epochs and pos.step_in_task < total_steps:
      orders = [feed.epoch(pos.epoch) for feed in inputs]
      while pos.batch < len(orders[0][0]) and pos.step_in_task < total_steps:
        batches = [feed.batch(*order, pos.batch) for feed, order in zip(inputs, orders)]
        x, y, ids = batches[0] if data_axis is None else (np.stack(parts) for parts in zip(*batches))
        params, model_state, opt_state, loss, accuracy = train_step(
            state.params, state.model_state, state.opt_state, x, y, mask, ids
        )
        state = state._replace(params=params, model_state=model_state, opt_state=opt_state)
        pos.batch += 1
        pos.step_in_task += 1
        pos.global_step += 1
        averaged = schedules[:, pos.step_in_task]
        if on_device:
          averaged = averaged | np.asarray(methods[0].averaged(state.opt_state), bool).reshape(count)
        for i in np.flatnonzero(averaged):
          lanes[i]['averaging_steps'].append(pos.global_step)
          emit(callbacks_lib.AverageEvent(int(i), k, pos.global_step))
        emit(callbacks_lib.StepEvent(k, pos.step_in_task, total_steps, pos.global_step, loss, accuracy))
        last_step = pos.step_in_task == total_steps
        # With curves on, also evaluate just before and after each average, to show its jump.
        due = (pos.global_step % max(shared.eval_every, 1) == 0) | averaged | schedules[:, pos.step_in_task + 1]
        if shared.eval_every and due.any() and not last_step:
          seconds['train'] += time.perf_counter() - begin
          evaluate_all(k, np.flatnonzero(due))
          begin = time.perf_counter()
        if checkpointer is not None and checkpointer.due(pos.global_step) and not last_step:
          if pos.batch == len(orders[0][0]):
            pos.epoch, pos.batch = pos.epoch + 1, 0
          save(force=False)
      if pos.batch == len(orders[0][0]):
        pos.epoch, pos.batch = pos.epoch + 1, 0
    jax.block_until_ready(state.params)
    seconds['train'] += time.perf_counter() - begin
    ended = []
    for i, lane in enumerate(lane_states()):
      lanes[i]['steps_per_task'].append(pos.step_in_task)
      ended.append(methods[i].end_task(lane, at))
    state = joined(ended)
    for i, row in enumerate(evaluate_all(k, range(count))):
      lanes[i]['matrix'].append([float(a) for a in row])
      emit(callbacks_lib.TaskEndEvent(i, k, tuple(lanes[i]['matrix'][-1])))
    evaluate_extra(k)
    pos.task, pos.epoch, pos.batch, pos.step_in_task = k + 1, 0, 0, 0
    save(force=True)

  seconds['total'] = seconds.get('total', 0.0) + time.perf_counter() - start_time
  results = [
      LaneRecord(lane['matrix'], [_curve_point(p) for p in lane['curve']], lane['steps_per_task'], lane['averaging_steps'],
                 lane['extra'])
      for lane in lanes
  ]
  return results, dict(seconds)


class CurvePoint(NamedTuple):
  """Accuracy on every task at one step of the run.

  Attributes:
    step: global optimizer steps done so far.
    task: the task being trained.
    accuracies: accuracy on every task of the stream.
  """

  step: int
  task: int
  accuracies: tuple[float, ...]


def _curve_point(point: Sequence[Any]) -> CurvePoint:
  step, task, accuracies = point
  return CurvePoint(step, task, tuple(accuracies))
