"""The one training loop: a stream of tasks, one or many configurations, checkpointed, on a mesh.

:func:`train_stream` trains every configuration ``(method, config)`` on the tasks of a stream in
order and evaluates every task after each. The configurations are *lanes* of one loop: a single
run is one lane (:func:`sfa_jax.engine.run.run_sequence`); a sweep stacks N lanes on a leading
axis and advances them with one ``jax.vmap``-ed step (:func:`sfa_jax.engine.sweep.run_sweep`). The loop
knows no method by name: it calls the :class:`~sfa_jax.engine.methods.Method` hooks at every task
boundary (per lane, on that lane's :class:`RunState`), takes the batches from
:meth:`~sfa_jax.engine.methods.Method.batch_plan`, and records the averages that
:meth:`~sfa_jax.engine.methods.Method.averaging_schedule` lists ahead or that the state reports.

The device runs whole chunks of steps. At a task's start the loop draws every step's batch rows
on the host and puts the task's examples on the device once (:mod:`sfa_jax.engine.feed`); the
steps between two points where the host must act (an evaluation, a checkpoint, the task's end, an
average it must see) run as fused chunks of about half a second each, one dispatch per chunk
(:mod:`sfa_jax.engine.fused`), and their step events are emitted from the stacked losses after
each. All tasks' test sets are evaluated by one program. A single SFA run trains the steps
between its averages without reading the anchor (``may_average=False``, :func:`sfa_jax.sfa`).

Compile once. The chunk program is one ``jax.jit`` function per (model, method class,
optimizer): anchors, Fisher and hyper-parameters live in the optimizer state, the task id is an
array argument, the chunk's length is a traced count, and every batch has one static shape (the
ragged end of each shuffled epoch is dropped; evaluation pads and masks). Cold, the train
programs compile in a background thread while the model's initialisation compiles.

A checkpoint is the run state (params, model state, optimizer state, the method's extras; stacked
in a sweep) and a JSON record (position, accuracy matrices, curves); it restores into the state of
a fresh start, whose structure never changes during a run. On CPU a resumed run is bit for bit an
uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
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
from sfa_jax.engine import distributed
from sfa_jax import fisher as fisher_lib
from sfa_jax import models
from sfa_jax import partial
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import feed as feed_lib
from sfa_jax.engine import fused
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib
from sfa_jax.engine import config as config_lib

CHECKPOINT_FORMAT = 3  # the layout of a checkpoint's arrays and record; part of every fingerprint


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
  created where :func:`sfa_jax.engine.distributed.tree_shardings` puts it (FSDP).

  Args:
    model: a Flax Linen module taking ``(x, task_id=, train=)``.
    sample: one batch of inputs, e.g. the first training example with its leading axis.
    mesh: optional ``jax.sharding.Mesh`` from :func:`sfa_jax.engine.distributed.make_mesh`.

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
                    trainable: Any = None, *, may_average: bool = True):
  """The train step ``(params, model_state, opt_state, x, y, mask, task_ids) -> (..., loss, metric)``, unjitted.

  With ``trainable`` (a mask of the params, :func:`sfa_jax.partial.path_mask`), only those leaves
  are differentiated and updated: ``tx`` and its state see the trainable tree alone
  (``optax.MaskedNode`` at the frozen leaves), the frozen leaves pass through unchanged. With
  ``may_average=False`` the update is ``tx.update(..., may_average=False)``: a step known not to
  average (SFA then skips its anchor, :func:`sfa_jax.sfa`).

  :func:`jitted_train_step` compiles it alone; :func:`train_stream` fuses it into chunks of steps
  (:func:`sfa_jax.engine.fused.make_chunk`), vmapped for a sweep.
  """
  hint = {} if may_average else {'may_average': False}

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
      updates, opt_state = tx.update(grads, opt_state, params, **hint)
      return optax.apply_updates(params, updates), new_state, opt_state, loss, accuracy
    train, frozen = partial.split_trainable(params, trainable)
    (loss, (new_state, accuracy)), grads = partial.trainable_value_and_grad(loss_fn, has_aux=True)(train, frozen)
    updates, opt_state = tx.update(grads, opt_state, train, **hint)
    return partial.merge_trainable(optax.apply_updates(train, updates), frozen), new_state, opt_state, loss, accuracy

  return step


def jitted_train_step(model, tx: optax.GradientTransformation, objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION,
                      trainable: Any = None):
  """:func:`make_train_step` jitted, params and optimizer state donated; traced once per batch shape."""
  return jax.jit(make_train_step(model, tx, objective, trainable), donate_argnums=(0, 2))


def make_score(model, objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION) -> Callable[..., Any]:
  """``score(params, model_state, x, y, mask, task_ids)``: the objective's score summed over one batch.

  The per-batch function that :func:`sfa_jax.engine.fused.make_scorer` runs over every task's test
  batches in one program; the accuracy matrix's entries are these sums over each test set's size.
  """

  def score(params, model_state, x, y, mask, task_ids):
    logits = _call(model, model.apply, models.merge_variables(params, model_state), x, task_ids, train=False)
    return objective.score(logits, y, mask)

  return score


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
_REUSED_LIMIT = 64  # compiled programs (and update digests) kept; the oldest is dropped beyond


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


def _task_steps(num_examples: int, batch_size: int, config: Any, task_index: int) -> int:
  """A task's steps: ``config.steps_per_task`` (one number, or this task's entry), or
  ``epochs_per_task`` whole epochs of ``batch_size`` (the ragged end of each dropped)."""
  per_epoch = tasks_lib.num_batches(num_examples, batch_size)
  if per_epoch == 0:
    raise ValueError(f'{num_examples} training examples make no batch of {batch_size}: lower batch_size.')
  budget = config.steps_per_task
  if budget is None:
    return per_epoch * config.epochs_per_task
  return budget[task_index] if isinstance(budget, tuple) else budget


# ------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Position:
  """Where a run is: ``step_in_task`` steps of task ``task`` done, ``global_step`` in all."""

  task: int = 0
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


def _abstract_batch(task: tasks_lib.Task, batch_size: int) -> tuple[Any, ...]:
  """The shapes of a train step's ``(x, y, mask, task_ids)`` for ``task``'s examples."""
  shape = lambda array, dtype=None: jax.ShapeDtypeStruct((batch_size,) + np.shape(array)[1:], dtype or array.dtype)
  return (shape(task.train.x), shape(task.train.y), jax.ShapeDtypeStruct((batch_size,), bool),
          jax.ShapeDtypeStruct((batch_size,), np.int32))


def _skips_anchor(config: Any, trainable_params: Any) -> bool:
  """``config.skip_anchor_between_averages``, or (``None``) whether the trainable params are large
  enough for the anchor's pass over memory to matter (``SKIP_ANCHOR_MIN_BYTES``)."""
  if config.skip_anchor_between_averages is not None:
    return bool(config.skip_anchor_between_averages)


  size = sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(trainable_params) if hasattr(leaf, 'dtype'))
  return size >= config_lib.SKIP_ANCHOR_MIN_BYTES


class _TaskInputs(NamedTuple):
  """A task's step count and feed, prepared before it starts."""

  task: int
  total_steps: int
  feed: feed_lib.TaskFeed


_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='sfa_jax-compile')


def _warm_up(program: Callable[..., Any], state: RunState, block: feed_lib.Block) -> concurrent.futures.Future:
  """Compiles ``program`` for these shapes in a background thread, by running it on zeros for no step
  (an unlooped program, :func:`sfa_jax.engine.fused.loops_slowly`, runs its one step on them).

  XLA compiles without holding Python's lock, so a second core compiles the train program while
  the caller compiles the model's initialisation. Shapes it cannot make zeros of (PRNG keys in
  the state) are left to the first real call.
  """
  return _COMPILER.submit(_zeros_call, program, (state.params, state.model_state, state.opt_state), *block, np.int32(0))


def _zeros_call(function: Callable[..., Any], shapes: Any, *args: Any) -> None:
  """``function(zeros shaped like shapes, *args)``, for its compilation alone. Shapes it cannot make
  zeros of (PRNG keys) and any error are left to the first real call, which compiles and reports."""
  if any(not isinstance(leaf.dtype, np.dtype) for leaf in jax.tree.leaves(shapes)):
    return
  try:
    jax.block_until_ready(function(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes), *args))
  except Exception:  # pylint: disable=broad-except
    pass


class _Pace:
  """How many steps the next chunk runs: about :data:`CHUNK_SECONDS` of the latest measured step time.

  A chunk's events (a progress bar's) come when it ends, so chunks stay short enough that the host
  reports at least every second; the first chunk, which may compile, runs few steps.
  """

  def __init__(self):
    self._per_step = None

  def steps(self) -> int:
    if self._per_step is None:
      return 8
    return max(1, int(CHUNK_SECONDS / max(self._per_step, 1e-9)))

  def record(self, steps: int, seconds: float) -> None:
    self._per_step = seconds / max(steps, 1)


CHUNK_SECONDS = 0.5  # a fused chunk's target duration


def _test_groups(batches: fused.TestBatches, budget: int, placement: Any) -> list[fused.TestBatches]:
  """The test batches on the device (one group) if they fit in ``budget`` bytes, else host groups
  of as many batches as fit (shipped at each evaluation)."""
  size = sum(leaf.nbytes for leaf in batches)
  if size <= budget:
    put = jax.device_put if placement is None else (lambda leaf: distributed.place(leaf, placement))
    return [fused.TestBatches(*(put(leaf) for leaf in batches))]
  per_batch = max(1, size // len(batches.task))
  step = max(1, budget // per_batch)
  return [fused.TestBatches(*(leaf[i:i + step] for leaf in batches)) for i in range(0, len(batches.task), step)]


class LaneRecord(NamedTuple):
  """What one configuration measured: the lists of :class:`sfa_jax.engine.run.SequenceResult`."""

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
      method class whose configs differ only in the seed (checked by :mod:`sfa_jax.engine.sweep`).
    model: the Flax module, built for the stream.
    fingerprint: what decides the numbers; a checkpoint must carry the same.
    stacked: vectorise the lanes (a sweep); with ``False`` there is exactly one lane.
    callbacks: called with each event of :mod:`sfa_jax.engine.callbacks`.
    checkpointer: a :class:`sfa_jax.engine.checkpoint.Checkpointer`: save every ``every_steps`` steps
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
  # The shapes the programs take (traced once per process: the jitted init and optimizer init).
  variables = jax.eval_shape(_init_variables, model, jax.random.key(0), all_tasks[0].train.x[:1])
  abstract = RunState(*variables, jax.eval_shape(init_opt[0], variables[0]), None)
  # XLA's CPU backend runs a convolution in a loop several times slower: such steps go one a call.
  sample = all_tasks[0].train.x
  looped = not reused(
      ('loops_slowly', model, objective, shared.trainable, sample.shape[1:], str(sample.dtype), shared.batch_size),
      lambda: fused.loops_slowly(make_train_step(model, txs[0], objective, trainable), abstract.params,
                                 abstract.model_state, abstract.opt_state, *_abstract_batch(all_tasks[0], shared.batch_size)))
  if stacked:
    data_keys = {(config.seed, method.data_key()) for method, config in configurations}
    one_group = len(data_keys) == 1  # the same batches for all lanes: gathered once
    step_key = None  # a sweep's programs are its own
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((count,) + leaf.shape, leaf.dtype), abstract)
  else:
    one_group = True
    # Runs of one process share compiled programs when their updates are one program (the
    # hyper-parameters in the state); a method that bakes them into its update gets its own.
    digest = reused(('update_program', methods[0], shared.optimizer_key(), shared.trainable, model, sample.shape[1:],
                     str(sample.dtype)), lambda: update_program(txs[0], abstract.opt_state, cut(abstract.params)))
    step_key = ('train_step', model, shared.optimizer_key(), objective, shared.trainable, digest, mesh)
  placement = None if mesh is None else distributed.replicated(mesh)
  batch_sharding = None if mesh is None else distributed.batch_sharding(mesh)
  # A single run of a method whose averaging schedule is exact may run the steps between its
  # averages without the averaging arithmetic (``may_average=False``) and each average alone.
  skips_between_averages = not stacked and methods[0].schedule_is_exact and _skips_anchor(shared, cut(abstract.params))
  programs: dict[Any, Any] = {}
  warming: dict[Any, Any] = {}

  def chunk_program(layout: feed_lib.Layout, skip: bool, on_device: bool, stop_on_average: bool):
    """The fused steps for this layout; ``skip``: steps known not to average (``may_average=False``)."""
    key = (layout, skip, on_device, stop_on_average)
    if key not in programs:
      build = lambda: fused.make_chunk(
          make_train_step(model, txs[0], objective, trainable, may_average=not skip), layout,
          averaged=methods[0].averaged if on_device else None, stop_on_average=stop_on_average,
          batch_sharding=batch_sharding, looped=looped)
      programs[key] = build() if step_key is None else reused(step_key + key, build)
    if key in warming:  # compiling in the background: wait for it rather than compile it twice
      warming.pop(key).result()
    return programs[key]

  largest_task = max(len(task.train.y) for task in all_tasks)  # examples on the device: one shape for all

  def prepare(k: int) -> _TaskInputs:
    groups = range(1 if one_group else count)
    plans = [methods[i].batch_plan(all_tasks, k, configs[i].batch_size, configs[i].seed) for i in groups]
    total_steps = _task_steps(len(plans[0].data.y), shared.batch_size - plans[0].replay_size, shared, k)
    rows = [feed_lib.task_rows(plans[i], configs[i].batch_size, methods_lib.task_seed(configs[i].seed, k), total_steps)
            for i in groups]
    task_feed = feed_lib.task_feed(plans, rows, lanes=stacked, budget=shared.device_data_bytes, min_rows=largest_task,
                                   placement=placement)
    return _TaskInputs(k, total_steps, task_feed)

  # Cold, compiling is most of a small run: the train programs compile in the background while
  # the model's initialisation compiles here (on a run's first task's shapes).
  prepared = prepare(0)
  if mesh is None and not stacked:  # the optimizer's init is needed first, right after the model's
    warmed_init = _COMPILER.submit(_zeros_call, init_opt[0], abstract.params)
  if mesh is None:
    on_device = methods[0].averaging_schedule(0, prepared.total_steps) is None
    variants = [True, False] if skips_between_averages and not on_device else [False]
    stop = on_device and bool(shared.eval_every)
    for skip in variants:
      key = (prepared.feed.layout, skip, on_device, stop)
      program = chunk_program(*key)
      warming[key] = _warm_up(program, abstract, prepared.feed.block(0, 1))
  if stacked:
    fresh = [fresh_lane(i) for i in range(count)]
    check_one_update_rule(methods, txs, [lane.opt_state for lane in fresh], cut(fresh[0].params))
    state = _stack(fresh)
  else:
    if mesh is None:
      warmed_init.result()
    state = fresh_lane(0)
  scorer = reused(('scorer', model, objective, stacked), lambda: fused.make_scorer(make_score(model, objective), stacked=stacked))
  test_sizes = np.array([len(t.test.y) for t in all_tasks])
  test_groups = _test_groups(fused.test_batches([t.test for t in all_tasks], [t.index for t in all_tasks],
                                                shared.eval_batch_size), shared.device_data_bytes, placement)
  every_step = callbacks_lib.wants_every_step(callbacks)

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
    totals = sum(np.asarray(scorer(state.params, state.model_state, group, len(all_tasks))) for group in test_groups)
    accuracies = np.atleast_2d(totals / test_sizes)
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

  pace = _Pace()
  while pos.task < len(all_tasks):
    k = pos.task
    inputs = prepared if prepared is not None and prepared.task == k else prepare(k)
    prepared = None
    total_steps, task_feed = inputs.total_steps, inputs.feed
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
    # The steps after which the host must act, whatever the device decides: evaluations (with
    # curves on: also just before and after each known average), checkpoints, the task's end.
    after = np.arange(total_steps + 1)
    global_after = pos.global_step - pos.step_in_task + after
    host_stop = after == total_steps
    if shared.eval_every:
      host_stop |= (global_after % shared.eval_every == 0) | schedules[:, after].any(0) | schedules[:, after + 1].any(0)
    if checkpointer is not None and checkpointer.every_steps:
      host_stop |= global_after % checkpointer.every_steps == 0
    split = skips_between_averages and not on_device
    stop_on_average = on_device and bool(shared.eval_every)
    pending: list[tuple[int, int, Any]] = []  # dispatched chunks whose events are not emitted yet

    def report(keep_last: bool = False) -> np.ndarray:
      """Emits the pending chunks' step and average events in order (all but the newest chunk, if
      ``keep_last``: it runs while the host waits for the others); the last step's averages."""
      averaged = np.zeros(count, bool)
      reporting = pending[:-1] if keep_last else list(pending)
      for first, start_global, outputs in reporting:
        losses, metrics, flags, done = jax.device_get(outputs)
        for j in range(int(done)):
          step, global_step = first + j + 1, start_global + j + 1
          averaged = schedules[:, step] | np.reshape(flags[j], count)
          for i in np.flatnonzero(averaged):
            lanes[i]['averaging_steps'].append(global_step)
            emit(callbacks_lib.AverageEvent(int(i), k, global_step))
          emit(callbacks_lib.StepEvent(k, step, total_steps, global_step, losses[j], metrics[j]))
      del pending[:len(reporting)]
      return averaged

    begin = reported = time.perf_counter()
    reported_steps = pos.step_in_task
    while pos.step_in_task < total_steps:
      t = pos.step_in_task
      averages_next = split and schedules[0, t + 1]
      if averages_next or every_step or not looped:
        n = 1
      else:
        n = int(np.argmax(host_stop[t + 1:])) + 1
        if split and schedules[0, t + 1:total_steps + 1].any():
          n = min(n, int(np.argmax(schedules[0, t + 1:total_steps + 1])))
        n = min(n, task_feed.block_steps, pace.steps())
      program = chunk_program(task_feed.layout, split and not averages_next, on_device, stop_on_average)
      (params, model_state, opt_state), *outputs = program(
          (state.params, state.model_state, state.opt_state), *task_feed.block(t, n), np.int32(n))
      state = state._replace(params=params, model_state=model_state, opt_state=opt_state)
      pending.append((t, pos.global_step, outputs))
      # Without early stops every chunk runs its n steps, so the host goes on: it dispatches the
      # next chunk before it waits for this one's events (at most one chunk ahead of them).
      done = int(outputs[-1]) if stop_on_average else n
      pos.step_in_task += done
      pos.global_step += done
      acts = host_stop[pos.step_in_task] or stop_on_average or every_step
      if acts or len(pending) > 1:
        steps_before = pos.step_in_task - (0 if acts else done)
        averaged = report(keep_last=not acts)
        now = time.perf_counter()
        pace.record(steps_before - reported_steps, now - reported)
        reported, reported_steps = now, steps_before
      if pos.step_in_task == total_steps or not acts:
        continue
      due = (pos.global_step % max(shared.eval_every, 1) == 0) | averaged | schedules[:, pos.step_in_task + 1]
      if shared.eval_every and due.any():
        seconds['train'] += time.perf_counter() - begin
        evaluate_all(k, np.flatnonzero(due))
        begin = time.perf_counter()
      if checkpointer is not None and checkpointer.due(pos.global_step):
        save(force=False)
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
    pos.task, pos.step_in_task = k + 1, 0
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
