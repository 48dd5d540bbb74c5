"""The sequence trainer: one method trained on a stream of tasks, evaluated on every task after each.

A method is an Optax chain built from :mod:`sfa_jax.transforms` plus, at most, a data rule (replay,
joint) or a merge rule applied at task ends (WiSE-FT, task arithmetic, TIES):

============== ========================================================================================
method         what happens on task ``k`` (tasks counted from 0; task 0 is always plain training)
============== ========================================================================================
finetune       train from the end of task ``k-1``.
sfa            ``chain(optimizer, sfa(anchor=θ_{k-1}, p, beta, total_steps=T_k))``.
l2             ``chain(l2(strength, anchor=θ_{k-1}), optimizer)``.
ewc            ``chain(ewc(F, strength, anchor=θ_{k-1}), optimizer)``, ``F`` the online Fisher
               ``γ·F_old + F_{k-1}`` of the past tasks' training data (per-example, empirical).
replay         each batch mixes ``batch_size - r`` examples of task ``k`` with ``r = round(ratio ·
               batch_size)`` examples of the memory: ``fraction`` of each past task's training set,
               stratified by class. Task 0 (empty memory) uses whole batches of its own data.
wise-ft        fine-tune, then at the task's end ``θ_k ← interpolate(θ_{k-1}, θ_k, beta)``
               (one average at the end: SFA with ``p = 1``).
task-arithmetic the model after task 0 is the base ``θ_b``. Task ``k ≥ 1`` is trained from ``θ_b``
               (independently of the other tasks) into ``θ_k``; the model evaluated after task
               ``k`` is ``θ_b + scaling·Σ_{j≤k}(θ_j − θ_b)``. It stores one task vector per task.
ties           as task-arithmetic, merged with TIES (``density``, ``scaling``).
joint          cumulative joint training: stage ``k`` trains on the union of tasks ``0..k``,
               starting from stage ``k-1``. Its last row is the upper bound of the stream.
adaptive-sfa   ``chain(optimizer, adaptive_sfa(anchor=θ_{k-1}, threshold, beta, min_p, total_steps=T_k))``
               (:mod:`sfa_jax.adaptive`): averages when the drift from the anchor reaches
               ``threshold·‖θ_{k-1}‖``, at most every ``min_p·T_k`` steps, and at the task's end.
multi-anchor-  SFA whose anchor is the running mean ``(1/k)·Σ_{j<k} θ_j`` of the checkpoints at the
sfa            ends of all past tasks, not only the last one. Averaging toward each past checkpoint
               with weight ``β/k`` is exactly averaging toward their mean with weight ``β``, so the
               several anchors cost one extra params-sized copy (the mean), not one per task.
============== ========================================================================================

Compile once. The train step is one ``jax.jit`` function per (model, method): anchors, Fisher and
hyper-parameters live in the optimizer state (fields of the transforms' states, re-anchored with
:func:`sfa_jax.reanchor`, which also sets each task's ``T``), the task id is an array argument, and
every batch has one static shape (the ragged end of each shuffled epoch is dropped; evaluation pads
and masks). Task 0 runs the same compiled step with the method inactive (``wait_for_anchor``).

The optimizer state (e.g. Adam's moments) is re-initialised at the start of every task by default
(``TrainConfig.reset_optimizer``); SFA keeps it across its averaging steps within a task.

Non-parameter model state (ResNet18's BatchNorm statistics) is trained as usual and is not touched
by SFA, L2 or EWC; the merges (WiSE-FT, task arithmetic, TIES) apply to it like to the params (see
:mod:`sfa_jax.models.state`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import _validation
from sfa_jax import adaptive
from sfa_jax import anchors
from sfa_jax import distributed
from sfa_jax import fisher as fisher_lib
from sfa_jax import merging
from sfa_jax import metrics
from sfa_jax import models
from sfa_jax import names
from sfa_jax import tasks as tasks_lib
from sfa_jax import transforms
from sfa_jax.checkpoint import Checkpointer

METHODS = names.METHODS  # the method names and their defaults live in sfa_jax.names (no JAX there)


@dataclasses.dataclass(frozen=True)
class Method:
  """A continual-learning method and its hyper-parameters.

  Build it with :func:`make_method`, which fills the defaults and checks the ranges.

  Attributes:
    name: one of :data:`METHODS`.
    hyperparams: the method's hyper-parameters, as a sorted tuple of ``(name, value)`` pairs.
  """

  name: str
  hyperparams: tuple[tuple[str, float], ...] = ()

  def __getitem__(self, key: str) -> float:
    return dict(self.hyperparams)[key]

  @property
  def label(self) -> str:
    """A short readable label, e.g. ``'sfa(beta=0.25, p=0.25)'``."""
    if not self.hyperparams:
      return self.name
    return f"{self.name}({', '.join(f'{k}={v:g}' for k, v in self.hyperparams)})"


def make_method(name: str, **hyperparams: float) -> Method:
  """A :class:`Method` with its defaults filled in and its hyper-parameters checked.

  Args:
    name: one of :data:`METHODS`.
    **hyperparams: ``p``, ``beta`` (sfa, wise-ft); ``strength`` (l2, ewc; ``λ`` ≥ 0); ``gamma``
      (ewc, online decay in [0, 1]); ``fraction`` (replay, share of each past task kept, in
      (0, 1]); ``ratio`` (replay, share of each batch taken from the memory, in (0, 1));
      ``scaling`` (task-arithmetic, ties, ≥ 0); ``density`` (ties, in (0, 1]); ``threshold``
      (adaptive-sfa, relative drift ≥ 0) and ``min_p`` (adaptive-sfa, in (0, 1]).

  Returns:
    The method.

  Raises:
    ValueError: on an unknown method, an unknown hyper-parameter for it, or a value out of range.

  Example:
    >>> from sfa_jax.continual import make_method
    >>> make_method('sfa', p=0.5).label
    'sfa(beta=0.25, p=0.5)'
  """
  if name not in names.METHOD_DEFAULTS:
    raise ValueError(f'unknown method {name!r}; known methods: {", ".join(METHODS)}.')
  defaults = names.METHOD_DEFAULTS[name]
  unknown = sorted(set(hyperparams) - set(defaults))
  if unknown:
    allowed = ', '.join(defaults) or 'none'
    raise ValueError(f'method {name!r} takes no hyper-parameter {unknown}; it takes: {allowed}.')
  values = {**defaults, **{k: float(v) for k, v in hyperparams.items()}}
  checks = {
      'p': lambda v: _validation.check_in_interval('p', v, 0.0, 1.0, low_open=True),
      'beta': lambda v: _validation.check_in_interval('beta', v, 0.0, 1.0),
      'strength': lambda v: _validation.check_non_negative('strength', v),
      'gamma': lambda v: _validation.check_in_interval('gamma', v, 0.0, 1.0),
      'fraction': lambda v: _validation.check_in_interval('fraction', v, 0.0, 1.0, low_open=True),
      'ratio': lambda v: _validation.check_in_interval('ratio', v, 0.0, 1.0, low_open=True, high_open=True),
      'scaling': lambda v: _validation.check_non_negative('scaling', v),
      'density': lambda v: _validation.check_in_interval('density', v, 0.0, 1.0, low_open=True),
      'threshold': lambda v: _validation.check_in_interval('threshold', v, 0.0, math.inf),
      'min_p': lambda v: _validation.check_in_interval('min_p', v, 0.0, 1.0, low_open=True),
  }
  for key, value in values.items():
    checks[key](value)
  return Method(name, tuple(sorted(values.items())))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How each task is trained and evaluated.

  Attributes:
    model: a name of :func:`sfa_jax.models.make_model` (``'mlp'``, ``'cnn'``, ``'resnet18'``).
    model_kwargs: extra model attributes, as ``(name, value)`` pairs, e.g. ``(('hidden', (256,)),)``.
    epochs_per_task: passes over each task's training data.
    batch_size: examples per training batch (one static shape for the whole run).
    learning_rate: the optimizer's learning rate.
    optimizer: ``'adam'`` or ``'sgd'``.
    seed: seeds the model's initialisation, the data order and the replay memory.
    eval_every: also evaluate every task every this many steps, and (SFA) just before and after
      each averaging step (0: only at task ends).
    eval_batch_size: examples per evaluation batch.
    reset_optimizer: re-initialise the optimizer state (e.g. Adam's moments) at each task start.
  """

  model: str = 'mlp'
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  epochs_per_task: int = 2
  batch_size: int = 64
  learning_rate: float = 1e-3
  optimizer: str = 'adam'
  seed: int = 0
  eval_every: int = 0
  eval_batch_size: int = 500
  reset_optimizer: bool = True

  def __post_init__(self):
    _validation.check_positive_int('epochs_per_task', self.epochs_per_task)
    _validation.check_positive_int('batch_size', self.batch_size)
    _validation.check_positive_int('eval_batch_size', self.eval_batch_size)
    _validation.check_in_interval('learning_rate', self.learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    if self.eval_every < 0:
      raise ValueError(f'eval_every must be >= 0; got {self.eval_every}.')
    if self.optimizer not in _OPTIMIZERS:
      raise ValueError(f'optimizer must be one of {sorted(_OPTIMIZERS)}; got {self.optimizer!r}.')


_OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'adam': optax.adam,
    'sgd': optax.sgd,
}


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


@dataclasses.dataclass
class SequenceResult:
  """What a run of one method on a stream measured.

  Attributes:
    stream: the stream's name.
    setting: its evaluation setting.
    method: the method's label.
    task_names: the stream's task names.
    accuracy_matrix: ``R[i][j]``, the accuracy on task ``j`` after training on task ``i``.
    curve: accuracies on every task every ``eval_every`` steps and at each task end.
    steps_per_task: optimizer steps taken on each task.
    averaging_steps: for SFA, the global steps after which it averaged.
    seconds: wall time of the training, evaluation, and of the whole run.
  """

  stream: str
  setting: str
  method: str
  task_names: list[str]
  accuracy_matrix: list[list[float]]
  curve: list[CurvePoint]
  steps_per_task: list[int]
  averaging_steps: list[int]
  seconds: dict[str, float]

  def summary(self) -> dict[str, float]:
    """Average accuracy, forgetting and backward transfer of the accuracy matrix."""
    return metrics.summarize(np.asarray(self.accuracy_matrix))

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict of everything, with the metrics."""
    data = dataclasses.asdict(self)
    data['curve'] = [p._asdict() | {'accuracies': list(p.accuracies)} for p in self.curve]
    data['metrics'] = self.summary()
    return data


# ------------------------------------------------------------------------------------------------
# The pieces of a run.


def build_model(stream: tasks_lib.TaskStream, config: TrainConfig):
  """The Flax model for ``stream``: one head per task in the task-incremental setting."""
  num_heads = len(stream) if stream.setting == tasks_lib.TASK_INCREMENTAL else 1
  return models.make_model(config.model, stream.num_classes, num_heads=num_heads, **dict(config.model_kwargs))


def initializer(model, sample: np.ndarray, mesh: Any = None) -> Callable[[int], tuple[Any, Any]]:
  """``init(seed) -> (params, model_state)`` for ``model``, one jitted program for every seed.

  Flax's ``init`` run eagerly dispatches every initializer's operations one by one, and a fresh
  process compiles each of them; jitted, it is one program that the persistent compilation cache
  keeps (0.72 s against 0.39 s for the MLP in a fresh process with a warm cache). The program is
  cached by the model's configuration and the sample's shape, so the runs of one process compile
  it once. The values are bit-for-bit those of the eager ``init``. With a ``mesh``, every leaf is
  created where :func:`sfa_jax.distributed.tree_shardings` puts it (FSDP): a model that does not
  fit one device is never gathered on one.

  Args:
    model: a model of :mod:`sfa_jax.models` (it takes ``task_id`` and ``train``).
    sample: one batch of inputs, e.g. the first training example with its leading axis.
    mesh: optional ``jax.sharding.Mesh`` from :func:`sfa_jax.distributed.make_mesh`.

  Returns:
    The function of the seed.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import continual, models
    >>> init = continual.initializer(models.make_model('mlp', 10), np.zeros((1, 8, 8, 1), np.float32))
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
  variables = model.init(key, sample, task_id=jnp.zeros(1, jnp.int32), train=False)
  return models.split_variables(variables)


def method_transform(method: Method, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """The Optax chain of ``method`` around ``optimizer``; its knobs live in the transform's state.

  The method waits for its first anchor (``wait_for_anchor``): on task 0 it is off, and
  :func:`configure_task` switches it on from the second task. Its hyper-parameters (SFA's ``p`` and
  ``beta``, the penalties' ``strength``) are fields of the state, so runs and sweep configurations
  with other values share one compiled step.
  """
  if method.name in ('sfa', 'multi-anchor-sfa'):
    return optax.chain(optimizer, transforms.sfa(p=method['p'], beta=method['beta'], total_steps=1, wait_for_anchor=True))
  if method.name == 'adaptive-sfa':
    return optax.chain(optimizer, adaptive.adaptive_sfa(
        threshold=method['threshold'], beta=method['beta'], min_p=method['min_p'], total_steps=1, wait_for_anchor=True))
  if method.name == 'l2':
    return optax.chain(transforms.l2(method['strength'], wait_for_anchor=True), optimizer)
  if method.name == 'ewc':
    return optax.chain(_ewc_from_zero_fisher(method['strength']), optimizer)
  return optimizer


def _ewc_from_zero_fisher(strength: chex.Numeric) -> optax.GradientTransformationExtraArgs:
  """:func:`sfa_jax.transforms.ewc` whose Fisher starts at zero and then lives only in its state.

  ``init`` makes the zeros (no params-sized tree is held by the transform or baked into a compiled
  ``init`` as a constant); :func:`configure_task` puts each task's Fisher into the state.
  """

  def init(params):
    return transforms.ewc(jax.tree.map(jnp.zeros_like, params), strength, wait_for_anchor=True).init(params)

  def update(updates, state, params=None, **extra_args):
    return transforms.ewc(state.fisher, strength).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init, update)


def configure_task(
    method: Method,
    opt_state: Any,
    params: Any,
    task_index: int,
    total_steps: int,
    fisher: Any = None,
    anchor: Any = None,
) -> Any:
  """The optimizer state for task ``task_index``: anchors at ``params``, the method switched on.

  Args:
    method: the method.
    opt_state: the state of :func:`method_transform`'s chain.
    params: the parameters the task starts from (the new anchor).
    task_index: the task about to be trained; the method is off on task 0 (nothing to anchor to).
    total_steps: the task's number of optimizer steps (SFA's ``T``).
    fisher: for EWC, the accumulated Fisher of the past tasks.
    anchor: the anchor, when it is not ``params`` (multi-anchor-sfa: the mean of the past tasks' ends).

  Returns:
    The new optimizer state (same structure, so the compiled step is reused).
  """
  if method.name not in ('sfa', 'l2', 'ewc', 'adaptive-sfa', 'multi-anchor-sfa') or task_index == 0:
    return opt_state
  if method.name in ('sfa', 'adaptive-sfa', 'multi-anchor-sfa'):
    return anchors.reanchor(opt_state, params if anchor is None else anchor, total_steps=total_steps)
  return anchors.reanchor(opt_state, params, fisher=fisher if method.name == 'ewc' else None)


def _cross_entropy_and_accuracy(logits, labels, mask):
  weights = mask.astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (losses * weights).sum() / count, (correct * weights).sum() / count


_REUSED: dict[Any, Any] = {}


def _reused(key: tuple, build: Callable[[], Any]) -> Any:
  """``build()``, kept under ``key`` for later runs of this process (built afresh if unhashable).

  A jitted function made anew for every run traces, lowers and (without the persistent
  compilation cache) compiles anew: ~0.5 s a run for the MLP, several seconds cold.
  """
  try:
    hash(key)
  except TypeError:  # a model with an unhashable field
    return build()
  if key not in _REUSED:
    _REUSED[key] = build()
  return _REUSED[key]


def make_train_step(model, tx: optax.GradientTransformation):
  """The jitted train step ``(params, model_state, opt_state, x, y, mask, task_ids) -> (..., loss, acc)``.

  Params and optimizer state are donated. The step is traced once per batch shape.
  """

  def apply(params, model_state, x, task_ids):
    variables = models.merge_variables(params, model_state)
    if not model_state:
      return model.apply(variables, x, task_id=task_ids, train=True), model_state
    return model.apply(variables, x, task_id=task_ids, train=True, mutable=list(model_state))

  def step(params, model_state, opt_state, x, y, mask, task_ids):
    def loss_fn(p):
      logits, new_state = apply(p, model_state, x, task_ids)
      loss, accuracy = _cross_entropy_and_accuracy(logits, y, mask)
      return loss, (new_state, accuracy)

    (loss, (new_state, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss, accuracy

  return jax.jit(step, donate_argnums=(0, 2))


def make_evaluator(model, batch_size: int, *, stacked: bool = False) -> Callable[[Any, Any, tasks_lib.Split, int], Any]:
  """``evaluate(params, model_state, split, task_index) -> accuracy``, one compilation per input shape.

  With ``stacked``, params and model state carry a leading axis of models (a sweep, see
  :mod:`sfa_jax.sweep`): one vectorised program evaluates them all on the same batches and
  ``evaluate`` returns a NumPy array of one accuracy per model.
  """

  def correct_count(params, model_state, x, y, mask, task_ids):
    logits = model.apply(models.merge_variables(params, model_state), x, task_id=task_ids, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)

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
    return self.model.apply(variables, x, task_id=task_ids, train=False)


def task_fisher(model, params, model_state, split: tasks_lib.Split, task_index: int, batch_size: int) -> Any:
  """The empirical diagonal Fisher of ``params`` on ``split`` (per-example gradients)."""
  logits_fn = _VariablesLogits(model)
  variables = models.merge_variables(params, model_state)
  task_ids = np.full(len(split.y), task_index, np.int32)
  full = fisher_lib.diagonal_fisher(logits_fn, variables, (split.x, task_ids), split.y, batch_size=batch_size)
  return models.split_variables(full)[0]


# ------------------------------------------------------------------------------------------------
# The run.


class _TaskData(NamedTuple):
  """The training examples of one stage and the task id of each."""

  split: tasks_lib.Split
  task_ids: np.ndarray


def _concat(parts: Sequence[_TaskData]) -> _TaskData:
  return _TaskData(
      tasks_lib.Split(np.concatenate([p.split.x for p in parts]), np.concatenate([p.split.y for p in parts])),
      np.concatenate([p.task_ids for p in parts]),
  )


def _with_ids(split: tasks_lib.Split, task_index: int) -> _TaskData:
  return _TaskData(split, np.full(len(split.y), task_index, np.int32))


def _replay_order(num_examples: int, batch_size: int, count: int, seed: int, epoch: int) -> np.ndarray:
  """``count`` batches of memory indices: shuffled passes over the memory, one after another."""
  rng = np.random.default_rng([seed, epoch, 1])
  passes = -(-count * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(passes)])
  return order[: count * batch_size].reshape(count, batch_size)


def _num_steps(num_examples: int, batch_size: int, epochs: int) -> int:
  steps = tasks_lib.num_batches(num_examples, batch_size) * epochs
  if steps == 0:
    raise ValueError(f'{num_examples} training examples make no batch of {batch_size}: lower batch_size.')
  return steps


ProgressFn = Callable[[dict[str, Any]], None]


class _TaskPlan(NamedTuple):
  """What training task ``k`` looks like: its data, the replay memory, the batch split, the steps."""

  data: _TaskData
  replay: _TaskData | None
  replay_size: int
  current_size: int
  total_steps: int


def _plan_task(method: Method, config: TrainConfig, all_tasks: Sequence[tasks_lib.Task], k: int) -> _TaskPlan:
  data = _with_ids(all_tasks[k].train, k)
  if method.name == 'joint':
    data = _concat([_with_ids(t.train, t.index) for t in all_tasks[: k + 1]])
  replay, replay_size = None, 0
  if method.name == 'replay' and k > 0:
    replay = _concat([_with_ids(tasks_lib.subsample(t.train, method['fraction'], seed=_task_seed(config, t.index)), t.index) for t in all_tasks[:k]])
    replay_size = min(config.batch_size - 1, max(1, round(method['ratio'] * config.batch_size)))
  current_size = config.batch_size - replay_size
  total_steps = _num_steps(len(data.split.y), current_size, config.epochs_per_task)
  return _TaskPlan(data, replay, replay_size, current_size, total_steps)


def _task_seed(config: TrainConfig, task_index: int) -> int:
  return config.seed * 1000 + task_index


def _epoch_orders(plan: _TaskPlan, config: TrainConfig, k: int, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
  """The batches of one epoch of task ``k``: rows of task indices and (replay) rows of memory indices."""
  order, _ = tasks_lib.epoch_indices(len(plan.data.split.y), plan.current_size, seed=_task_seed(config, k), epoch=epoch)
  replay_order = None
  if plan.replay is not None:
    replay_order = _replay_order(len(plan.replay.split.y), plan.replay_size, len(order), _task_seed(config, k), epoch)
  return order, replay_order


def _batch(plan: _TaskPlan, order: np.ndarray, replay_order: np.ndarray | None, i: int):
  """Batch ``i`` of the epoch: current-task examples, then (replay) memory examples."""
  rows = order[i]
  x, y, ids = plan.data.split.x[rows], plan.data.split.y[rows], plan.data.task_ids[rows]
  if replay_order is not None:
    rows = replay_order[i]
    x = np.concatenate([x, plan.replay.split.x[rows]])
    y = np.concatenate([y, plan.replay.split.y[rows]])
    ids = np.concatenate([ids, plan.replay.task_ids[rows]])
  return x, y, ids


@dataclasses.dataclass
class _Position:
  """Where a run is: the next batch to train is batch ``batch`` of epoch ``epoch`` of task ``task``."""

  task: int = 0
  epoch: int = 0
  batch: int = 0
  step_in_task: int = 0
  global_step: int = 0


def describe_stream(stream: tasks_lib.TaskStream) -> dict[str, Any]:
  """What decides a stream's data, as JSON values: name, setting, source, seed, and every task."""
  return {
      'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'seed': stream.seed,
      'num_classes': stream.num_classes, 'input_shape': list(stream.input_shape),
      'tasks': list(stream.task_names), 'task_classes': [list(c) for c in stream.task_classes],
  }


def describe_method(method: Method) -> dict[str, Any]:
  """A method as JSON values: its name and its exact hyper-parameters (a label rounds them)."""
  return {'name': method.name, 'hyperparams': dict(method.hyperparams)}


def fingerprint(stream: tasks_lib.TaskStream, method: Method, config: TrainConfig) -> str:
  """A JSON string of everything that decides a run's numbers; checkpoints must match it.

  It holds :func:`describe_stream`, :func:`describe_method` and every :class:`TrainConfig` field
  (the model and its attributes, optimizer, learning rate, epochs, batch sizes, seed, evaluation
  schedule).

  Example:
    >>> import json
    >>> from sfa_jax import continual, tasks
    >>> run = json.loads(continual.fingerprint(tasks.make_stream('mnist-pair', source='digits'),
    ...                                         continual.make_method('sfa'), continual.TrainConfig()))
    >>> run['stream']['tasks'], run['method']['hyperparams'], run['config']['learning_rate']
    (['mnist-pair/even', 'mnist-pair/odd'], {'beta': 0.25, 'p': 0.25}, 0.001)
  """
  run = {'stream': describe_stream(stream), 'method': describe_method(method), 'config': dataclasses.asdict(config)}
  return json.dumps(run, sort_keys=True, default=repr)


def run_sequence(
    stream: tasks_lib.TaskStream,
    method: Method,
    config: TrainConfig = TrainConfig(),
    *,
    progress: ProgressFn | None = None,
    checkpointer: Checkpointer | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> SequenceResult:
  """Trains ``method`` on the tasks of ``stream`` in order and evaluates every task after each.

  Args:
    stream: the tasks, e.g. ``sfa_jax.tasks.make_stream('mnist-pair')``.
    method: from :func:`make_method`.
    config: training and evaluation settings.
    progress: called after every step with ``{'task', 'step', 'steps', 'loss', 'accuracy'}`` (loss
      and accuracy as device scalars), after every evaluation with ``{'task', 'evaluation':
      CurvePoint}``, and with ``{'resumed': global_step}`` when a checkpoint was restored.
    checkpointer: saves the run every ``checkpointer.every_steps`` steps and at each task end; if
      it holds a checkpoint of this configuration, the run resumes from it (on CPU the results are
      then bit for bit those of an uninterrupted run).
    mesh: train on these devices (:func:`sfa_jax.distributed.make_mesh`): batches split over the
      mesh, params and optimizer state (anchors included) FSDP-sharded; ``None``: one device.

  Returns:
    The :class:`SequenceResult`.

  Raises:
    CheckpointError: when the checkpointer holds a checkpoint of another configuration, or
      checkpoints of which none is usable (a corrupt one is skipped for the previous one, with a
      :class:`~sfa_jax.checkpoint.CheckpointWarning`).

  Example:
    >>> from sfa_jax import continual, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = continual.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> result = continual.run_sequence(stream, continual.make_method('sfa', p=0.5), config)
    >>> len(result.accuracy_matrix), len(result.accuracy_matrix[0])
    (2, 2)
  """
  start_time = time.perf_counter()
  report = progress or (lambda event: None)
  all_tasks = [stream[i] for i in range(len(stream))]
  model = build_model(stream, config)
  params, model_state = initializer(model, all_tasks[0].train.x[:1], mesh)(config.seed)
  optimizer = _OPTIMIZERS[config.optimizer](config.learning_rate)
  tx = method_transform(method, optimizer)
  init_state = jax.jit(tx.init)
  # Runs of one process that share a model, a method and an optimizer share one compiled step and
  # one evaluator (the method's knobs are fields of the optimizer state, not constants of the trace).
  train_step = _reused(('train_step', model, method.name, config.optimizer, config.learning_rate),
                       lambda: make_train_step(model, tx))
  if mesh is not None:  # the same step on sharded inputs (sfa_jax.distributed)
    train_step = distributed.shard_step(train_step, mesh)
  evaluate = _reused(('evaluate', model, config.eval_batch_size), lambda: make_evaluator(model, config.eval_batch_size))
  run_id = fingerprint(stream, method, config)

  # Everything a checkpoint holds: arrays, and a JSON record.
  arrays = {'params': params, 'model_state': model_state, 'opt_state': init_state(params)}
  record: dict[str, Any] = {
      'fingerprint': run_id,
      'position': dataclasses.asdict(_Position()),
      'matrix': [],
      'curve': [],
      'steps_per_task': [],
      'averaging_steps': [],
      'seconds': {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0},
      'num_finetuned': 0,
      'array_names': ['model_state', 'opt_state', 'params'],
  }
  if checkpointer is not None:
    arrays, record = _restore(checkpointer, arrays, record, run_id, report)
  pos = _Position(**record['position'])
  seconds = record['seconds']

  def save(force: bool) -> None:
    if checkpointer is not None:
      record['position'] = dataclasses.asdict(pos)
      checkpointer.save(pos.global_step, arrays, record, force=force)

  def evaluate_all(task_index: int) -> list[float]:
    begin = time.perf_counter()
    accuracies = [evaluate(arrays['params'], arrays['model_state'], t.test, t.index) for t in all_tasks]
    seconds['evaluate'] += time.perf_counter() - begin
    point = CurvePoint(pos.global_step, task_index, tuple(accuracies))
    record['curve'].append(list(point))
    report({'task': task_index, 'evaluation': point})
    return accuracies

  while pos.task < len(all_tasks):
    k = pos.task
    plan = _plan_task(method, config, all_tasks, k)
    if pos.step_in_task == 0:
      _start_task(method, config, arrays, k, plan.total_steps, init_state)
    averages = averaging_schedule(method, k, plan.total_steps).__getitem__
    begin = time.perf_counter()
    while pos.epoch < config.epochs_per_task:
      order, replay_order = _epoch_orders(plan, config, k, pos.epoch)
      mask = np.ones(config.batch_size, bool)
      while pos.batch < len(order):
        x, y, ids = _batch(plan, order, replay_order, pos.batch)
        params, model_state, opt_state, loss, accuracy = train_step(
            arrays['params'], arrays['model_state'], arrays['opt_state'], x, y, mask, ids
        )
        arrays.update(params=params, model_state=model_state, opt_state=opt_state)
        pos.batch += 1
        pos.step_in_task += 1
        pos.global_step += 1
        averaged = averages(pos.step_in_task) or _adaptive_averaged(method, k, arrays['opt_state'], pos.step_in_task)
        if averaged:
          record['averaging_steps'].append(pos.global_step)
        report({'task': k, 'step': pos.step_in_task, 'steps': plan.total_steps, 'loss': loss, 'accuracy': accuracy})
        last_step = pos.step_in_task == plan.total_steps
        # With curves on, also evaluate just before and after each average, to show its jump.
        around_average = averaged or averages(pos.step_in_task + 1)
        if config.eval_every and (pos.global_step % config.eval_every == 0 or around_average) and not last_step:
          seconds['train'] += time.perf_counter() - begin
          evaluate_all(k)
          begin = time.perf_counter()
        if checkpointer is not None and checkpointer.due(pos.global_step) and not last_step:
          if pos.batch == len(order):
            pos.epoch, pos.batch = pos.epoch + 1, 0
          save(force=False)
      if pos.batch == len(order):
        pos.epoch, pos.batch = pos.epoch + 1, 0
    jax.block_until_ready(arrays['params'])
    seconds['train'] += time.perf_counter() - begin
    record['steps_per_task'].append(pos.step_in_task)
    _finish_task(method, config, model, all_tasks, k, arrays, record, seconds)
    record['matrix'].append(evaluate_all(k))
    pos.task, pos.epoch, pos.batch, pos.step_in_task = k + 1, 0, 0, 0
    save(force=True)

  seconds['total'] = seconds.get('total', 0.0) + time.perf_counter() - start_time
  return SequenceResult(
      stream=stream.name,
      setting=stream.setting,
      method=method.label,
      task_names=[t.name for t in all_tasks],
      accuracy_matrix=record['matrix'],
      curve=[CurvePoint(step, task, tuple(acc)) for step, task, acc in record['curve']],
      steps_per_task=record['steps_per_task'],
      averaging_steps=record['averaging_steps'],
      seconds=seconds,
  )


def averaging_schedule(method: Method, task_index: int, total_steps: int) -> np.ndarray:
  """Whether SFA averages after each step ``t = 0 .. T + 1`` of task ``task_index`` (never on task 0).

  One vectorised call of :func:`sfa_jax.transforms.is_averaging_step` per task, not one per step
  (each eager call costs milliseconds of dispatch).

  Args:
    method: the method (only ``'sfa'`` and ``'multi-anchor-sfa'`` average on a schedule; adaptive
      SFA's averages are read from its state after each step).
    task_index: the task; task 0 is plain training.
    total_steps: ``T``, the task's number of optimizer steps.

  Returns:
    A bool array of length ``T + 2``, indexed by the 1-based step number.

  Example:
    >>> from sfa_jax import continual
    >>> continual.averaging_schedule(continual.make_method('sfa', p=0.25), 1, 10).nonzero()[0].tolist()
    [3, 6, 9, 10]
  """
  steps = np.arange(total_steps + 2)
  if method.name not in ('sfa', 'multi-anchor-sfa') or task_index == 0:
    return np.zeros(len(steps), bool)
  return np.asarray(transforms.is_averaging_step(steps, method['p'], total_steps))


def _adaptive_averaged(method: Method, task_index: int, opt_state: Any, step: int) -> bool:
  """Whether adaptive SFA averaged after step ``step``: its state says (reading it waits for the step).

  Its averages are decided on the device, so :func:`averaging_schedule` cannot list them ahead.
  """
  return method.name == 'adaptive-sfa' and task_index > 0 and int(anchors.find_state(opt_state, adaptive.AdaptiveSFAState).last_average) == step


def _restore(checkpointer, arrays, record, run_id, report):
  """The newest usable checkpoint of this run, or the fresh ``(arrays, record)`` if there is none."""
  def like(saved: dict[str, Any]) -> dict[str, Any]:
    # The arrays a run holds grow with it (anchor, Fisher, merge base, fine-tuned models): the
    # record names those saved, each shaped like the params or like (params, model state).
    model = (arrays['params'], arrays['model_state'])
    shapes = {
        'anchor': model, 'base': model, 'fisher': arrays['params'], 'mean_anchor': arrays['params'],
        'finetuned': [model] * saved['num_finetuned'],
    }
    return {name: arrays[name] if name in arrays else shapes[name] for name in saved['array_names']}

  restored = checkpointer.restore_latest(like, fingerprint=run_id)
  if restored is None:
    return arrays, record
  restored_arrays, saved = restored
  report({'resumed': saved['position']['global_step']})
  return dict(restored_arrays), saved


def _start_task(method, config, arrays, k, total_steps, init_state) -> None:
  """Task ``k``'s starting point, optimizer state and anchors (only when the task starts afresh)."""
  if method.name in ('task-arithmetic', 'ties') and 'base' in arrays:
    arrays['params'], arrays['model_state'] = jax.tree.map(jnp.copy, arrays['base'])
  if method.name == 'wise-ft':  # its end-of-task merge reads the task's starting point
    arrays['anchor'] = jax.tree.map(jnp.copy, (arrays['params'], arrays['model_state']))
  if method.name == 'multi-anchor-sfa' and k > 0:
    # The running mean of the checkpoints at the ends of tasks 0..k-1 (params: the end of task k-1).
    previous = arrays.get('mean_anchor', arrays['params'])
    arrays['mean_anchor'] = merging.interpolate(previous, arrays['params'], (k - 1) / k)
  if config.reset_optimizer:
    arrays['opt_state'] = init_state(arrays['params'])
  arrays['opt_state'] = configure_task(
      method, arrays['opt_state'], arrays['params'], k, total_steps, arrays.get('fisher'), arrays.get('mean_anchor')
  )


def _finish_task(method, config, model, all_tasks, k, arrays, record, seconds) -> None:
  """The end-of-task rules: merges (wise-ft, task arithmetic, TIES) and EWC's Fisher."""
  merge_at_task_end(method, k, arrays)
  record['num_finetuned'] = len(arrays.get('finetuned', []))
  if method.name == 'ewc' and k + 1 < len(all_tasks):  # the last task's Fisher has no use
    begin = time.perf_counter()
    current = task_fisher(model, arrays['params'], arrays['model_state'], all_tasks[k].train, k, config.eval_batch_size)
    previous = arrays.get('fisher')
    arrays['fisher'] = current if previous is None else fisher_lib.online_fisher(previous, current, method['gamma'])
    seconds['fisher'] += time.perf_counter() - begin
  record['array_names'] = sorted(arrays)


def merge_at_task_end(method: Method, task_index: int, arrays: dict[str, Any]) -> None:
  """Applies the merge rule of wise-ft, task-arithmetic and ties at the end of a task, in place.

  Args:
    method: the method (other methods leave ``arrays`` alone).
    task_index: the task just trained.
    arrays: the run's arrays: ``params``, ``model_state``, ``anchor`` (``(params, model_state)``
      at the task's start); task arithmetic and TIES keep ``base`` and the list ``finetuned`` in it.
  """
  k = task_index
  trained = (arrays['params'], arrays['model_state'])
  if method.name == 'wise-ft' and k > 0:  # anchor: the task's start, kept by _start_task
    arrays['params'], arrays['model_state'] = merging.interpolate(arrays['anchor'], trained, method['beta'])
  elif method.name in ('task-arithmetic', 'ties'):
    if k == 0:
      arrays['base'] = jax.tree.map(jnp.copy, trained)
    else:
      arrays['finetuned'] = arrays.get('finetuned', []) + [jax.tree.map(jnp.copy, trained)]
      if method.name == 'task-arithmetic':
        merged = merging.task_arithmetic(arrays['base'], arrays['finetuned'], method['scaling'])
      else:
        merged = merging.ties(arrays['base'], arrays['finetuned'], method['density'], method['scaling'])
      arrays['params'], arrays['model_state'] = merged
