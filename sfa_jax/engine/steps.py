"""The functions a run is made of, built from its model: the variables, the train step, the score, the Fisher.

Each takes a Flax Linen module and returns plain functions of arrays, unjitted where the loop fuses
them (:func:`make_train_step`, :func:`make_score`, fused into chunks by :mod:`sfa_jax.engine.fused`)
and jitted where they run alone (:func:`initializer`, :func:`jitted_train_step`). A module's
``__call__`` may take ``task_id=`` and ``train=`` keywords (the built-in models take both); they
are passed only if it does, so any Linen module works (a module written in NNX: through
``flax.nnx.bridge.to_linen``). With a ``trainable`` mask (:func:`sfa_jax.partial.path_mask`) only
those params are differentiated, updated and held in the optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import _lazy
from sfa_jax import _validation
from sfa_jax import fisher as fisher_lib
from sfa_jax import models
from sfa_jax import partial
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import distributed
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib
from sfa_jax.engine import stored

__all__ = ['initializer', 'make_train_step', 'make_method_step', 'jitted_train_step', 'training_forward', 'task_fisher',
           'task_mas_importance']


def initializer(model, sample: np.ndarray, mesh: Any = None) -> Callable[[int], tuple[Any, Any]]:
  """``init(seed) -> (params, model_state)`` for ``model``, one jitted program for every seed.

  Flax's ``init`` run eagerly dispatches every initializer's operations one by one, and a fresh
  process compiles each of them; jitted, it is one program that the persistent compilation cache
  keeps. The values are bit-for-bit those of the eager ``init``. With the program store on
  (:mod:`sfa_jax.engine.stored`), a small model's values are kept there and read back by a later
  process. With a ``mesh``, every leaf is created where
  :func:`sfa_jax.engine.distributed.tree_shardings` puts it (FSDP).

  Args:
    model: a Flax Linen module taking ``(x, task_id=, train=)``.
    sample: one batch of inputs, e.g. the first training example with its leading axis.
    mesh: optional ``jax.sharding.Mesh`` from :func:`sfa_jax.engine.distributed.make_mesh`.

  Returns:
    The function of the seed, an integer in ``[0, 2**32)`` (the key is made inside the program:
    ``jax.random.key(seed)``'s bits, without a program of its own).

  Raises:
    ValueError: from the function, for a seed outside ``[0, 2**32)``.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import models
    >>> from sfa_jax.engine import steps
    >>> images = np.zeros((1, 8, 8, 1), np.float32)
    >>> init = steps.initializer(models.make_model('mlp', 10), images)
    >>> params, model_state = init(0)
    >>> sorted(params)
    ['Dense_0', 'Dense_1', 'head']
  """
  if mesh is None:
    return functools.partial(_init_from_store_or_program, model, sample)
  shapes = jax.eval_shape(_init_variables, model, jax.random.key(0), sample)
  sharded = jax.jit(
      lambda key: _init_variables(model, key, sample), out_shardings=distributed.tree_shardings(shapes, mesh)
  )
  return lambda seed: sharded(jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model, key: jax.Array, sample: jax.Array) -> tuple[Any, Any]:
  variables = _call(model, model.init, key, sample, jnp.zeros(1, jnp.int32), train=False)
  return models.split_variables(variables)


def _init_from_seed(model, seed: jax.Array, sample: jax.Array) -> tuple[Any, Any]:
  return _init_variables(model, jax.random.key(seed), sample)


def _seed(seed: Any) -> Any:
  """``seed`` as the uint32 the init program takes (``jax.random.key`` of it inside is that of the int).

  A traced integer scalar (``jax.jit`` or ``jax.eval_shape`` of the initializer) is passed as it
  is, as ``jax.random.key`` would take it; a concrete one is checked.
  """
  if isinstance(seed, jax.core.Tracer):
    if seed.shape != () or not jnp.issubdtype(seed.dtype, jnp.integer):
      raise ValueError(f'seed must be an integer scalar; got {seed!r}.')
    return seed
  if isinstance(seed, (np.ndarray, jax.Array)) and seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
    seed = int(seed)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32); got {seed!r}.')
  return np.uint32(seed)


# It runs once: compiled 3.5-4x faster than at XLA's defaults (the MLP's and SmallCNN's; ResNet-18's
# 2.7x), bit for bit the same values (tests/test_stored.py).
_INIT_FROM_SEED = stored.StoredProgram(('init_variables',), lambda: jax.jit(_init_from_seed, static_argnums=0),
                                       static_argnums=(0,), compiler_options=_lazy.RUNS_ONCE)


# A warm process reads a small model's initial variables from the store rather than load the init
# program (tens of milliseconds to deserialize, against one for the values): up to this many bytes.
_REMEMBERED_INIT_BYTES = 16 * 2**20


def _init_from_store_or_program(model, sample: np.ndarray, seed: Any) -> tuple[Any, Any]:
  """The init program's ``(params, model_state)`` for ``seed``, remembered in the store when they are small.

  The values are the program's own (computed by it the first time, then read back bit for bit),
  keyed by the model, the seed and the sample's bytes (an init may read its input). Fresh device
  arrays at every call: a run may donate them.
  """
  seed = _seed(seed)
  if isinstance(seed, jax.core.Tracer) or stored.directory() is None:
    return _INIT_FROM_SEED(model, seed, sample)
  size = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(variable_shapes(model, sample)))
  if size > _REMEMBERED_INIT_BYTES:
    return _INIT_FROM_SEED(model, seed, sample)
  contents = np.ascontiguousarray(sample)
  key = ('init_values', model, contents.shape, str(contents.dtype), hashlib.sha256(contents.tobytes()).hexdigest(), int(seed))
  values = stored.remembered(key, lambda: jax.device_get(_INIT_FROM_SEED(model, seed, sample)), in_memory=False)
  return jax.device_put(values)  # up to 16 MiB a seed: read from disk, not held for every seed of a grid


def variable_shapes(model, sample: np.ndarray) -> tuple[Any, Any]:
  """The shapes and dtypes of ``model``'s ``(params, model_state)``, traced once (nothing runs) and
  remembered in the program store (:mod:`sfa_jax.engine.stored`)."""
  key = ('variable_shapes', model, np.shape(sample), str(np.asarray(sample).dtype))
  # The key is made inside the trace: an eager jax.random.key would compile a program of its own.
  return stored.remembered(key, lambda: jax.eval_shape(lambda x: _init_variables(model, jax.random.key(0), x), sample))


def starting_point(model, sample: np.ndarray, initial: Any, mesh: Any = None) -> Callable[[int], tuple[Any, Any]]:
  """``init(seed)`` returning copies of ``initial``, checked against the model's own variables.

  Args:
    model: the Flax module.
    sample: one batch of inputs, as for :func:`initializer`.
    initial: ``(params, model_state)`` to start from (a pretrained model, another run's end).
    mesh: optional mesh; the copies are then placed as :func:`initializer` places its variables.

  Returns:
    The function of the seed (which it ignores).

  Raises:
    TypeError: when ``initial`` is not a pair.
    ValueError: when its trees differ from the model's variables.
  """
  if not (isinstance(initial, (tuple, list)) and len(initial) == 2):
    raise TypeError(f'initial must be a (params, model_state) pair; got {type(initial).__name__}.')
  expected = variable_shapes(model, sample)
  for name, given, want in zip(('params', 'model_state'), initial, expected):
    _validation.check_matching_tree(want, given, reference_name=f"the model's {name}", other_name=f'initial {name}')
  if mesh is None:  # copies uncommitted, as an initialisation's (committed arrays compile other programs)
    copy = jax.jit(_validation.copy_tree)
    return lambda seed: jax.tree.map(distributed.uncommitted, copy(tuple(initial)))
  copy = jax.jit(_validation.copy_tree, out_shardings=distributed.tree_shardings(expected, mesh))
  return lambda seed: copy(tuple(initial))


def trainable_mask(model, sample: np.ndarray, patterns: str | tuple[str, ...] | None) -> Any:
  """The mask of the params ``patterns`` select (:func:`sfa_jax.partial.path_mask`), or ``None`` for all."""
  if patterns is None:
    return None
  params_shapes, _ = variable_shapes(model, sample)
  return partial.path_mask(params_shapes, patterns)


def trainable_part(params: Any, trainable: Any) -> Any:
  """The leaves of ``params`` that ``trainable`` selects (:func:`sfa_jax.partial.split_trainable`); all if ``None``.

  The optimizer state holds these alone.
  """
  return params if trainable is None else partial.split_trainable(params, trainable)[0]



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

  :func:`jitted_train_step` compiles it alone; :func:`sfa_jax.engine.loop.train_stream` fuses the
  step of :func:`make_method_step` (this one with a method's hooks) into chunks of steps
  (:func:`sfa_jax.engine.fused.make_chunk`), vmapped for a sweep.
  """
  full = make_method_step(model, tx, objective, trainable, may_average=may_average)

  def step(params, model_state, opt_state, x, y, mask, task_ids):
    params, model_state, opt_state, _, loss, metric = full(params, model_state, opt_state, None, x, y, mask, task_ids)
    return params, model_state, opt_state, loss, metric

  return step


def make_method_step(model, tx: optax.GradientTransformation,
                     objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION, trainable: Any = None, *,
                     method: methods_lib.Method | None = None, may_average: bool = True):
  """:func:`make_train_step` with a method's train-step hooks, unjitted.

  The step is ``(params, model_state, opt_state, step_state, x, y, mask, task_ids, memory=None)
  -> (params, model_state, opt_state, step_state, loss, metric)``: the loss differentiated adds
  :meth:`~sfa_jax.engine.methods.Method.step_loss` (the loss reported is the objective's alone),
  the gradient of :meth:`~sfa_jax.engine.methods.Method.reference_loss` reaches ``tx.update`` as
  ``reference_grads=`` (:func:`sfa_jax.agem`), and the step state comes back through
  :meth:`~sfa_jax.engine.methods.Method.after_step`. ``memory`` is ``(x, y, task_ids)`` of a
  memory batch kept apart (:attr:`~sfa_jax.engine.methods.BatchPlan.memory_apart`). A method
  without hooks (``None``, and every method that overrides none) computes what
  :func:`make_train_step` computes.

  Args:
    model, tx, objective, trainable, may_average: as for :func:`make_train_step`.
    method: the :class:`~sfa_jax.engine.methods.Method` whose hooks the step runs.

  Returns:
    The step.
  """
  hint = {} if may_average else {'may_average': False}
  method = methods_lib.Finetune() if method is None else method
  apply, evaluate = training_forward(model), _evaluate_apply(model)

  def step(params, model_state, opt_state, step_state, x, y, mask, task_ids, memory=None):
    batch = methods_lib.StepBatch(x, y, mask, task_ids, memory)
    hooks = methods_lib.StepModel(lambda p, inputs, ids: apply(p, model_state, inputs, ids)[0], evaluate, objective.loss)

    def loss_fn(p):
      outputs, new_state = apply(p, model_state, x, task_ids)
      loss, metric = objective.loss(outputs, y, mask)
      extra = method.step_loss(p, outputs, batch, step_state, hooks)
      return (loss if extra is None else loss + extra), (new_state, metric, loss, outputs)

    reference = lambda p: method.reference_loss(p, batch, step_state, hooks)
    references = jax.eval_shape(reference, params) is not None
    if trainable is None:
      (_, (new_state, metric, loss, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      extra_args = {'reference_grads': jax.grad(reference)(params)} if references else {}
      updates, opt_state = tx.update(grads, opt_state, params, **hint, **extra_args)
      params = optax.apply_updates(params, updates)
    else:
      train, frozen = partial.split_trainable(params, trainable)
      (_, (new_state, metric, loss, outputs)), grads = partial.trainable_value_and_grad(loss_fn, has_aux=True)(train, frozen)
      extra_args = {'reference_grads': partial.trainable_value_and_grad(reference)(train, frozen)[1]} if references else {}
      updates, opt_state = tx.update(grads, opt_state, train, **hint, **extra_args)
      params = partial.merge_trainable(optax.apply_updates(train, updates), frozen)
    step_state = method.after_step(step_state, batch, jax.lax.stop_gradient(outputs))
    return params, new_state, opt_state, step_state, loss, metric

  return step


def training_forward(model) -> Callable[..., Any]:
  """``apply(params, model_state, x, task_ids) -> (outputs, new model state)``: ``model``'s forward pass in training mode."""

  def apply(params, model_state, x, task_ids):
    variables = models.merge_variables(params, model_state)
    if not model_state:
      return _call(model, model.apply, variables, x, task_ids, train=True), model_state
    return _call(model, model.apply, variables, x, task_ids, train=True, mutable=list(model_state))

  return apply


def _evaluate_apply(model) -> Callable[..., Any]:
  """``evaluate(params, model_state, x, task_ids) -> outputs``, in evaluation mode."""
  return lambda params, model_state, x, task_ids: _call(
      model, model.apply, models.merge_variables(params, model_state), x, task_ids, train=False)


def _outputs(model, params: Any, model_state: Any, x: Any, task_ids: Any) -> Any:
  """``model``'s outputs in evaluation mode (:func:`_evaluate_apply`), the model a static argument."""
  return _evaluate_apply(model)(params, model_state, x, task_ids)


# One program per model and shapes for the process's runs (the model static), kept in the store.
_OUTPUTS = stored.StoredProgram(('evaluate_apply',), lambda: jax.jit(_outputs, static_argnums=0), static_argnums=(0,))


def step_spec(model, params: Any, model_state: Any, tasks: Sequence[tasks_lib.Task], batch_size: int,
              seed: int) -> methods_lib.StepSpec:
  """The :class:`~sfa_jax.engine.methods.StepSpec` of a run: its data's and outputs' shapes.

  The model runs on the first training example under task ids 0 and 1: outputs that differ
  mean one head per task.

  Args:
    model: the Flax module.
    params, model_state: its initial variables.
    tasks: the stream's tasks.
    batch_size: examples per batch.
    seed: the run's seed.

  Returns:
    The spec.
  """
  train = tasks[0].train
  one = lambda array: jax.ShapeDtypeStruct(np.shape(array)[1:], np.asarray(array[:1]).dtype)
  outputs = functools.partial(_OUTPUTS, model)
  first = outputs(params, model_state, train.x[:1], np.zeros(1, np.int32))
  heads = len(tasks) > 1 and not np.array_equal(first, outputs(params, model_state, train.x[:1], np.ones(1, np.int32)))
  labels = tuple(tuple(int(label) for label in task.labels) for task in tasks)
  return methods_lib.StepSpec(one(train.x), one(train.y), one(first), labels, bool(heads), batch_size, seed)


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


def task_mas_importance(model, params, model_state, split: tasks_lib.Split, task_index: int, batch_size: int,
                        trainable: Any = None) -> Any:
  """MAS's importance of ``params`` on ``split``'s inputs: the mean per-example ``|∂‖f(x)‖²/∂θ|``.

  ``f`` is the model's output in inference mode (:func:`sfa_jax.fisher.mas_importance`, chunks of
  ``batch_size``); no label is read. With a ``trainable`` mask the frozen leaves' entries are zero.
  """
  task_ids = np.full(len(split.y), task_index, np.int32)
  variables = models.merge_variables(params, model_state)
  full = fisher_lib.mas_importance(_VariablesLogits(model), variables, (split.x, task_ids), batch_size=batch_size)
  importance = models.split_variables(full)[0]
  if trainable is None:
    return importance
  train, frozen = partial.split_trainable(importance, trainable)
  return partial.merge_trainable(train, jax.tree.map(jnp.zeros_like, frozen))


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
