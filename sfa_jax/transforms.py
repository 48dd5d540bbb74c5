"""SFA, L2-to-anchor and EWC as Optax gradient transformations.

Each factory returns an ``optax.GradientTransformationExtraArgs`` whose state is a small ``NamedTuple``
carrying the anchor pytree (a copy, so params and state can both be donated). They chain with any
Optax optimizer:

* ``sfa`` goes *after* the optimizer: it rewrites the final updates so that ``optax.apply_updates``
  lands on the averaged parameters at the averaging steps.
* ``l2``, ``ewc``, ``offline_ewc`` and ``si`` go *before* the optimizer: they add the gradient of a
  quadratic penalty toward the anchor, like ``optax.add_decayed_weights`` adds the gradient of weight
  decay (``si`` also reads the raw gradient there, for its path integral).

At a task boundary, ``reanchor`` turns the end of the finished task into the anchor of the next one,
wherever the transforms sit inside chains and wrappers.

Only floating-point leaves are averaged or penalised: integer and PRNG-key leaves pass through
unchanged, and their anchors are kept only so that the state mirrors the params' structure.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import _validation

__all__ = [
    'SFAState', 'L2State', 'EWCState', 'averaging_period', 'is_averaging_step', 'sfa', 'l2', 'ewc',
    'SIState', 'OfflineEWCState', 'si', 'offline_ewc',
    'AGEMState', 'agem',
]


_NO_TOTAL_STEPS_MSG = (
    'sfa needs total_steps=T, the number of optimizer steps in the task: it averages after every '
    'k = max(1, floor(p*T + 1/2)) steps and after step T. Example: '
    'sfa(anchor, p=0.25, beta=0.5, total_steps=num_epochs * steps_per_epoch).'
)


NO_PARAMS_MSG = (  # what a transformation that reads the params raises without them (optax's wording)
    'You are using a transformation that requires the current value of parameters, but you are '
    'not passing `params` when calling `update`: call tx.update(updates, state, params).'
)


class SFAState(NamedTuple):
  """State of :func:`sfa`.

  The hyper-parameters live here, so one transform serves a whole task sequence (the task boundary
  sets the next task's ``T`` with ``reanchor(state, params, total_steps=T)``) and a checkpoint of
  the state restores its schedule.

  Attributes:
    count: int32 scalar, the number of updates done in this task (saturates at the int32 maximum).
    p: float32 scalar, the fraction of the task between two averages.
    beta: float32 scalar, the weight of the anchor in the average.
    total_steps: int32 scalar, ``T``, the task's number of optimizer steps.
    active: bool scalar; while false the updates pass through unchanged (see ``wait_for_anchor``).
    averaged: bool scalar, whether the latest update averaged (as ``optax.MultiSteps`` has
      ``has_updated``).
    anchor: the checkpoint θ_o the parameters are pulled toward; same structure as the params.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4))
    >>> state = sfa_jax.find_state(tx.init({'w': jnp.zeros(2)}))
    >>> int(state.count), float(state.p), float(state.beta), int(state.total_steps)
    (0, 0.5, 0.5, 4)
  """

  count: chex.Array
  p: chex.Array
  beta: chex.Array
  total_steps: chex.Array
  active: chex.Array
  averaged: chex.Array
  anchor: optax.Params


class L2State(NamedTuple):
  """State of :func:`l2`.

  Attributes:
    strength: float32 scalar, λ.
    active: bool scalar; while false the penalty is off (see ``wait_for_anchor``).
    anchor: the parameters θ_o the penalty pulls toward; same structure as the params.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(sfa_jax.l2(0.1), optax.sgd(0.1))
    >>> state = sfa_jax.find_state(tx.init({'w': jnp.ones(2)}))
    >>> round(float(state.strength), 6), bool(state.active), state.anchor['w'].tolist()
    (0.1, True, [1.0, 1.0])
  """

  strength: chex.Array
  active: chex.Array
  anchor: optax.Params


class EWCState(NamedTuple):
  """State of :func:`ewc`.

  Attributes:
    strength: float32 scalar, λ.
    active: bool scalar; while false the penalty is off (see ``wait_for_anchor``).
    anchor: the parameters θ* at the end of the previous task(s); same structure as the params.
    fisher: the diagonal Fisher information F; same structure as the params.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.ones(2)}
    >>> tx = optax.chain(sfa_jax.ewc({'w': jnp.full(2, 0.5)}, 10.0), optax.sgd(0.1))
    >>> state = sfa_jax.find_state(tx.init(params))
    >>> float(state.strength), state.fisher['w'].tolist()
    (10.0, [0.5, 0.5])
  """

  strength: chex.Array
  active: chex.Array
  anchor: optax.Params
  fisher: optax.Params


class OfflineEWCState(NamedTuple):
  r"""State of :func:`offline_ewc`: one penalty per past task, held in two trees of the params' size.

  :math:`\sum_k F_k\odot(\theta-\theta_k) = S\odot(\theta-\bar\theta)` with :math:`S = \sum_k F_k`
  and :math:`\bar\theta = \sum_k F_k\odot\theta_k / S`, so the past tasks' Fishers and ends are kept
  as their sum and their Fisher-weighted mean, whatever the number of tasks.

  Attributes:
    strength: float32 scalar, λ.
    active: bool scalar; while false the penalty is off (see ``wait_for_anchor``).
    anchor: :math:`\bar\theta`, the Fisher-weighted mean of the past tasks' ends (where
      :math:`S = 0`, the latest end); same structure as the params.
    fisher: :math:`S`, the sum of the past tasks' Fishers; same structure as the params.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(sfa_jax.offline_ewc(10.0), optax.sgd(0.1))
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> for end, fisher in ((1.0, 1.0), (4.0, 2.0)):  # two tasks' ends and Fishers
    ...   state = sfa_jax.reanchor(state, {'w': jnp.full(2, end)},
    ...                            fisher={'w': jnp.full(2, fisher)})
    >>> found = sfa_jax.find_state(state)
    >>> found.fisher['w'].tolist(), found.anchor['w'].tolist()  # 1 + 2; (1·1 + 2·4) / 3
    ([3.0, 3.0], [3.0, 3.0])
  """

  strength: chex.Array
  active: chex.Array
  anchor: optax.Params
  fisher: optax.Params


class SIState(NamedTuple):
  r"""State of :func:`si`.

  Attributes:
    strength: float32 scalar, λ.
    damping: float32 scalar, ξ (read by :func:`sfa_jax.reanchor`).
    active: bool scalar; while false the penalty is off (the path integral still accumulates).
    anchor: :math:`\theta^*`, the params where the task began; same structure as the params.
    importance: :math:`\Omega`, the importance summed over the finished tasks (at least 0).
    path: :math:`\omega`, the task's path integral so far (its latest step's term is added at
      the next update, or by :func:`sfa_jax.reanchor`).
    previous_params: the params at the latest update.
    previous_grad: the raw gradient at the latest update (zero before the task's first).

    ``importance``, ``path`` and ``previous_grad`` are held in at least float32.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(sfa_jax.si(1.0, damping=0.1), optax.sgd(0.5))
    >>> params, state = {'w': jnp.zeros(2)}, tx.init({'w': jnp.zeros(2)})
    >>> for _ in range(2):  # two steps on the gradient 1
    ...   updates, state = tx.update({'w': jnp.ones(2)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> state = sfa_jax.reanchor(state, params)  # ω = 2·0.5 = 1, Δ = -1
    >>> si = sfa_jax.find_state(state)
    >>> [round(x, 4) for x in si.importance['w'].tolist()]  # 1 / (1 + 0.1)
    [0.9091, 0.9091]
  """

  strength: chex.Array
  damping: chex.Array
  active: chex.Array
  anchor: optax.Params
  importance: optax.Params
  path: optax.Params
  previous_params: optax.Params
  previous_grad: optax.Params


def averaging_period(p: chex.Numeric, total_steps: chex.Numeric) -> chex.Array:
  """The number of steps ``k`` between two SFA averages: ``max(1, floor(p·T + 1/2))``.

  ``p·T`` is rounded half up to the nearest integer (``p = 0.25, T = 10`` gives ``k = 3``) and never
  falls below 1. Works on Python numbers and on traced arrays alike, so ``p`` and ``T`` can be swept
  under ``vmap`` or changed by ``optax.inject_hyperparams``.

  Args:
    p: the fraction of the task between two averages, in (0, 1].
    total_steps: the number of optimizer steps ``T`` in the task.

  Returns:
    An int32 scalar array.

  Raises:
    TypeError, ValueError: for a concrete ``p`` outside (0, 1] or ``T`` not an integer in [1, 2**31).

  Example:
    >>> import sfa_jax
    >>> int(sfa_jax.averaging_period(0.25, 10)), int(sfa_jax.averaging_period(0.29, 100))
    (3, 29)
  """
  check_hyperparams(p=p, total_steps=total_steps)
  product = jnp.asarray(p, jnp.float32) * jnp.asarray(total_steps, jnp.float32)
  return jnp.maximum(1, jnp.floor(product + 0.5)).astype(jnp.int32)


def is_averaging_step(step: chex.Numeric, p: chex.Numeric, total_steps: chex.Numeric) -> chex.Array:
  """Whether SFA averages right after the optimizer step numbered ``step`` (counted from 1).

  The schedule, exactly: with ``k = averaging_period(p, T)``, SFA averages after step ``t`` when
  ``1 <= t <= T`` and (``t % k == 0`` or ``t == T``). So:

  * ``T`` a multiple of ``k``: the last periodic average *is* the end-of-task average (once, not
    twice); ``p = 1`` gives a single average at step ``T`` (WiSE-FT applied at the end of the task).
  * ``p·T`` not an integer: ``k`` is rounded half up, and the end-of-task average still happens at
    ``T`` (``p = 0.25, T = 10``: ``k = 3``, averages after steps 3, 6, 9 and 10).
  * steps past ``T`` never average: the transform then passes updates through unchanged, until
    :func:`reanchor` starts the next task.

  Args:
    step: 1-based index of the step just taken (a Python int or an int array).
    p: the fraction of the task between two averages, in (0, 1].
    total_steps: the number of optimizer steps ``T`` in the task.

  Returns:
    A boolean array of the shape of ``step``.

  Raises:
    TypeError, ValueError: for a concrete ``p`` or ``T`` out of range (see :func:`averaging_period`).

  Example:
    >>> import sfa_jax
    >>> [t for t in range(1, 13) if sfa_jax.is_averaging_step(t, 0.25, 10)]
    [3, 6, 9, 10]
  """
  period = averaging_period(p, total_steps)
  step = jnp.asarray(step, jnp.int32)
  total_steps = jnp.asarray(total_steps, jnp.int32)
  in_task = (step >= 1) & (step <= total_steps)
  return in_task & ((step % period == 0) | (step == total_steps))


def _anchor_storage_dtype(anchor_dtype: Any) -> Any:
  """``anchor_dtype`` checked: ``None`` (each param's own dtype) or a real floating dtype.

  Args:
    anchor_dtype: what :func:`sfa`, :func:`l2` or :func:`ewc` got: ``None``, a floating dtype
      (``jnp.float32``, ``jnp.bfloat16``, ``'float32'``, a ``numpy.dtype``).

  Returns:
    ``None`` or a ``numpy.dtype``.

  Raises:
    TypeError: for something that is not a dtype (an array, as ``optax.inject_hyperparams`` makes
      of ``jnp.float32`` unless told ``static_args=('anchor_dtype',)``).
    ValueError: for a dtype that is not a real floating one (integers, bool, complex).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import transforms
    >>> transforms._anchor_storage_dtype(jnp.float32), transforms._anchor_storage_dtype(None)
    (dtype('float32'), None)
  """
  if anchor_dtype is None:
    return None
  if isinstance(anchor_dtype, (jax.Array, np.ndarray, jax.core.Tracer)) or not isinstance(anchor_dtype, (str, type, np.dtype)):
    raise TypeError(
        f'anchor_dtype must be a dtype such as jnp.float32 or jnp.bfloat16 (or None: the params\' dtype); got '
        f'{type(anchor_dtype).__name__} {anchor_dtype!r}. Under optax.inject_hyperparams pass '
        "static_args=('anchor_dtype',): it calls jnp.float32 as if it were a schedule."
    )
  try:
    dtype = jnp.dtype(anchor_dtype)
  except TypeError as error:
    raise TypeError(f'anchor_dtype must be a dtype such as jnp.float32; got {anchor_dtype!r}.') from error
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'anchor_dtype must be a real floating dtype (float32, bfloat16, ...); got {dtype.name}.')
  return dtype


def _is_real_float(leaf: Any) -> bool:
  return _validation.is_float_leaf(leaf) and bool(jnp.issubdtype(getattr(leaf, 'dtype', jnp.float32), jnp.floating))


def copy_anchor(params: optax.Params, anchor: optax.Params | None, dtype: Any = None) -> optax.Params:
  """Validates ``anchor`` against ``params`` (structure, shapes, dtypes, finite) and returns a copy.

  The ``init`` of every anchored transform (``sfa``, ``l2``, ``ewc``, ``adaptive_sfa``, yours) keeps
  this copy, so that params and state can both be donated. With ``dtype`` (a checked
  ``anchor_dtype``) the real floating leaves are stored in ``dtype``: a given ``anchor`` is cast to
  it first, and ``None`` gives the params cast to it.

  Args:
    params: the params at ``init``.
    anchor: the anchor given to the transform, or ``None`` for the params themselves.
    dtype: the storage dtype of the floating leaves, or ``None`` for the params' own.

  Returns:
    A fresh tree shaped like ``params``.

  Raises:
    ValueError: without params, or for an anchor that does not fit them or holds NaN or inf
      (the leaf is named).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.transforms import copy_anchor
    >>> copy_anchor({'w': jnp.zeros(2)}, None)['w'].tolist()
    [0.0, 0.0]
  """
  if params is None:
    raise ValueError(NO_PARAMS_MSG)
  if dtype is None:
    if anchor is not None:
      anchor = _validation.fit_to(params, anchor, reference_name='params', other_name='anchor')
      _validation.check_finite_tree(anchor, 'anchor')
    return _validation.copy_tree(params if anchor is None else anchor)

  def stored(leaf):  # a fresh buffer in the storage dtype (a copy where it has it already)
    leaf = jnp.asarray(leaf)
    return leaf.astype(dtype) if _is_real_float(leaf) and leaf.dtype != dtype else jnp.copy(leaf)

  if anchor is None:
    return jax.tree.map(stored, params)
  if isinstance(params, jax.Array) and params.ndim == 1:  # inside optax.flatten: fit_to ravels the tree
    layout = params.astype(dtype) if _is_real_float(params) else params
  else:
    layout = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), dtype) if _is_real_float(leaf) else leaf, params)
  is_masked = lambda node: isinstance(node, optax.MaskedNode)
  try:  # cut to the params' groups first, so that only the leaves kept are cast
    anchor = jax.tree.map(lambda node, leaf: node if is_masked(node) else leaf, layout, anchor, is_leaf=is_masked)
  except (ValueError, TypeError):
    pass  # fit_to names what does not match
  anchor = _validation.fit_to(layout, jax.tree.map(stored, anchor), reference_name='params', other_name='anchor')
  _validation.check_finite_tree(anchor, 'anchor')
  return anchor


def map_float_params(fn: Callable[..., Any], updates: Any, params: Any, *rest: Any) -> Any:
  """``fn(update, param, *rest)`` on the leaves whose *param* is floating; other updates pass through.

  Whether a leaf is averaged or penalised is decided by the param's dtype, not the update's:
  optimizers emit float updates for integer params (``optax.adam`` of an int32 counter gives
  float32 zeros), and those params must stay as they are.

  Args:
    fn: ``(update, param, *rest_leaves) -> new update``.
    updates: the incoming updates.
    params: the params, which decide; same structure as ``updates``.
    *rest: further trees of that structure (anchors, Fisher estimates).

  Returns:
    The new updates.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import transforms
    >>> updates = {'w': jnp.ones(2), 'step': jnp.zeros((), jnp.float32)}
    >>> params = {'w': jnp.zeros(2), 'step': jnp.array(7)}
    >>> new = transforms.map_float_params(lambda u, p: u * 2, updates, params)
    >>> new['w'], new['step']
    (Array([2., 2.], dtype=float32), Array(0., dtype=float32))
  """
  names = ('updates', 'params', 'the anchor', 'the fisher')

  def leaf(path, update, param, *others):
    if not _validation.is_float_leaf(param):
      return update
    arrays = [jnp.asarray(x) for x in (update, param, *others)]  # Python numbers as optax takes them
    for name, array in zip(names[1:], arrays[1:]):
      if array.shape != arrays[0].shape:
        where = jax.tree_util.keystr(path)
        raise ValueError(f'{name}{where} has shape {array.shape}, but updates{where} has shape {arrays[0].shape}.')
    return fn(*arrays)

  try:
    return jax.tree_util.tree_map_with_path(leaf, updates, params, *rest)
  except (ValueError, TypeError) as error:
    if 'has shape' in str(error):
      raise
    _validation.check_matching_tree(params, updates, reference_name='params', other_name='updates', check_dtypes=False)
    raise


def current(argument: Any, stored: chex.Array) -> chex.Array:
  """The value of a hyper-parameter for this update: the factory's argument or the state's field.

  A ``jax.Array`` argument (what ``optax.inject_hyperparams`` passes at every update, and a value
  traced under ``vmap`` or ``jit``) is read at every update, so schedules and edits of
  ``inject_hyperparams``' state take effect. A Python or NumPy number is only the initial value of
  the state's field, which :func:`sfa_jax.reanchor` and :func:`sfa_jax.set_hyperparams` change.

  Args:
    argument: what the factory was called with.
    stored: the state's field (its dtype is kept).

  Returns:
    A scalar array with the dtype of ``stored``.
  """
  if isinstance(argument, jax.Array):
    return jnp.asarray(argument).astype(stored.dtype)
  return stored


def scalar(value: Any, dtype: Any) -> chex.Array:
  """A fresh scalar array (its own buffer, so states can be donated) of ``value`` in ``dtype``."""
  return jnp.array(value, dtype)


def averaged_updates(
    updates: optax.Updates,
    params: optax.Params,
    anchor: optax.Params,
    average_now: chex.Array,
    beta: chex.Numeric,
) -> optax.Updates:
  r"""SFA's update rewrite: ``u + m·(θ_o − θ − u)`` with ``m = β`` when ``average_now``, else 0.

  ``optax.apply_updates(params, ·)`` of the result lands on :math:`\beta\theta_o + (1-\beta)(\theta
  + u)` when ``average_now`` is true and on :math:`\theta + u` otherwise. Written branchless, as a
  multiply-add that XLA fuses into the optimizer's own elementwise loop (see :func:`sfa`); the
  arithmetic is done in at least float32 and cast back to each update's dtype. Leaves whose param
  is an integer or a PRNG key pass through unchanged. Shared by :func:`sfa` and the transforms
  built on it (:func:`sfa_jax.adaptive.adaptive_sfa`).

  Args:
    updates: the incoming updates :math:`u`.
    params: the current parameters :math:`\theta`.
    anchor: the anchor :math:`\theta_o`; same structure as ``params``.
    average_now: a boolean scalar (possibly traced): whether to average at this step.
    beta: the weight of the anchor in the average, in [0, 1] (possibly traced).

  Returns:
    The new updates, with the dtypes of ``updates``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import transforms
    >>> u = transforms.averaged_updates({'w': jnp.ones(2)}, {'w': jnp.zeros(2)}, {'w': jnp.full(2, 4.0)},
    ...                                 jnp.bool_(True), 0.5)
    >>> u['w']  # lands on 0.5 * 4 + 0.5 * (0 + 1)
    Array([2.5, 2.5], dtype=float32)
  """

  def blend(update, param, anchor_leaf):
    dtype = jnp.promote_types(update.dtype, jnp.float32)
    weight = jnp.asarray(average_now).astype(dtype) * jnp.asarray(beta, dtype)
    update_, param_, anchor_ = (x.astype(dtype) for x in (update, param, anchor_leaf))
    return (update_ + weight * (anchor_ - param_ - update_)).astype(update.dtype)

  return map_float_params(blend, updates, params, anchor)


def sfa(
    anchor: optax.Params | None = None,
    p: chex.Numeric | None = None,
    beta: chex.Numeric = 0.5,
    *,
    total_steps: chex.Numeric | None = None,
    wait_for_anchor: bool = False,
    anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sequential Fine-tuning with Averaging: pulls the params back toward an anchor every ``p·T`` steps.

  While fine-tuning on a task of ``T`` steps, after every ``k``-th step (``k = averaging_period(p,
  T)``) and after step ``T`` (see :func:`is_averaging_step` for the exact schedule) the parameters
  are replaced by an average with the anchor :math:`\theta_o`, the checkpoint where the task began:

  .. math::
    \theta_{t+1} = \beta\,\theta_o + (1 - \beta)\,(\theta_t + u_t)

  where :math:`u_t` are the incoming updates (the optimizer's step). This transform goes last in a
  chain and emits, at an averaging step, :math:`u'_t = \beta(\theta_o - \theta_t) + (1-\beta)u_t`,
  so that ``optax.apply_updates(params, u')`` lands exactly on the average; between averaging steps
  it returns :math:`u_t` unchanged. The optimizer's own state (e.g. Adam's moments) is kept across
  an averaging step. Leaves whose *param* is an integer or a PRNG key are never averaged.

  It is written branchless, as the multiply-add :math:`u + m(\theta_o - \theta - u)` with
  :math:`m = \beta` at an averaging step and 0 otherwise, which XLA fuses into the optimizer's own
  elementwise loop. ``benchmarks/transform_overhead.py`` chose it over ``jax.lax.cond`` on the
  update tree and over a ``jnp.where`` select, both much slower between averaging steps (see
  ``benchmarks/RESULTS.md``). A concrete anchor is checked for NaN / infinite values once, at
  ``init`` (and by :func:`sfa_jax.reanchor`); inside the step nothing is masked out (``0·inf`` is
  NaN): a run that diverges stays visibly diverged.

  Between averaging steps the multiply-add still reads the anchor, one more pass over a tree the
  size of the params. A caller that knows the schedule ahead (it is a function of ``p``, ``T`` and
  the step, :func:`is_averaging_step`) can skip even that: ``tx.update(grads, state, params,
  may_average=False)`` (an extra argument, which ``optax.chain`` passes to every transform that
  takes it) promises that this step does not average, and the update passes through unchanged
  without reading the anchor; the step counter still advances. The engine runs the steps between
  SFA's averages of a single run this way (:mod:`sfa_jax.engine.fused`). A promise that is wrong
  skips an average: pass it only for steps that ``is_averaging_step`` says do not average.

  ``p``, ``beta`` and ``T`` live in the state (:class:`SFAState`): the arguments given here are
  their initial values, changed by :func:`sfa_jax.reanchor` (``total_steps=``) and
  :func:`sfa_jax.set_hyperparams`. Wrapped in ``optax.inject_hyperparams`` the injected values
  (``jax.Array``\ s) are read at every update instead, so schedules work as in optax; pass
  ``hyperparam_dtype=jnp.float32`` there for low-precision params (a bfloat16 ``p`` is refused: it
  would move the averages).

  Where it may sit: **last** in its chain (``optax.chain(optimizer, sfa(...))``), relative to the
  params it is handed. Inside ``optax.MultiSteps`` (wrapping the whole chain) it counts outer
  steps, which is right; chained *after* ``MultiSteps`` it would count micro-steps, and anything
  chained after it changes the update that lands on the average: :func:`sfa_jax.check_placement`
  refuses both. Inside ``optax.lookahead`` it averages the fast weights, and with
  ``reset_state=True`` its anchor and counter are wiped at every sync; after
  ``optax.contrib.schedule_free`` the evaluation params are not the averaged ones: it warns of
  both. Inside ``optax.masked`` / ``optax.multi_transform`` only the selected leaves are averaged
  (SFA on a model's body only), and :func:`sfa_jax.reanchor` re-anchors each group.

  Args:
    anchor: the checkpoint :math:`\theta_o` (a pytree like the params); ``None`` means the params
      passed to ``init``. A copy is stored in the state, so params and state can both be donated.
      Under ``optax.inject_hyperparams`` pass it with ``static_args=('anchor',)`` when it is a single
      array, or leave it ``None``.
    p: the fraction of the task between two averages, in (0, 1]. ``p = 1`` averages once, at the
      end of the task.
    beta: the weight of the anchor in the average, in [0, 1] (the paper's typical value is 0.5).
      ``beta = 0`` is plain fine-tuning.
    total_steps: ``T``, the number of optimizer steps in the task. Required: there is no sensible
      default, since it sets where the averages fall. The next task's ``T`` is set at the task
      boundary, ``reanchor(state, params, total_steps=T_next)``, so one transform (and one
      compilation) serves tasks of any length.
    wait_for_anchor: start inactive: the updates pass through unchanged until :func:`sfa_jax.reanchor`
      sets the first anchor (a loop that uses one transform for every task, whose first task has
      nothing to average toward).
    anchor_dtype: the dtype the anchor is stored in, for its real floating leaves: ``None`` (the
      default) stores each leaf in its param's dtype; ``jnp.float32`` on bfloat16 params keeps an
      anchor given in float32 exactly (twice the anchor's bytes); ``jnp.bfloat16`` on float32 params
      halves them. A given ``anchor`` and :func:`sfa_jax.reanchor`'s params are cast to it. Either
      way the average is computed in (at least) float32 and cast back to the update's dtype. Under
      ``optax.inject_hyperparams`` pass ``static_args=('anchor_dtype',)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SFAState`.

  Raises:
    TypeError: when ``p`` or ``total_steps`` is missing, or a hyper-parameter is not a 0-d number
      (a string, a bool, an array with dimensions, a schedule).
    ValueError: when ``p``, ``beta`` or ``total_steps`` is out of range (``T`` at most 2**31 - 1)
      or ``p`` is bfloat16 / float16 or ``anchor_dtype`` is not a real floating dtype (at
      construction), or when ``anchor`` does not match the params in structure, shape or dtype
      (the storage dtype, with ``anchor_dtype``) or holds NaN / infinite values, or ``params`` is
      ``None`` (at ``init``).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> anchor = {'w': jnp.zeros(2)}
    >>> sfa = sfa_jax.sfa(anchor, p=0.5, beta=0.5, total_steps=4)
    >>> tx = optax.chain(optax.sgd(0.1), sfa)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([1.0, 1.0])}
    >>> for step in range(1, 5):
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(step, [round(float(w), 3) for w in params['w']])
    1 [0.9, 1.9]
    2 [0.4, 0.9]
    3 [0.3, 0.8]
    4 [0.1, 0.35]

  References:
    Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model averaging
    <https://arxiv.org/abs/2501.05559>`_, 2025
  """
  if p is None:
    raise TypeError('sfa needs p, the fraction of the task between two averages, in (0, 1].')
  if total_steps is None:
    raise TypeError(_NO_TOTAL_STEPS_MSG)
  check_hyperparams(p=p, beta=beta, total_steps=total_steps)
  _validation.check_full_precision('p', p)
  storage = _anchor_storage_dtype(anchor_dtype)

  def init_fn(params: optax.Params) -> SFAState:
    return SFAState(
        count=jnp.zeros([], jnp.int32),
        p=scalar(p, jnp.float32),
        beta=scalar(beta, jnp.float32),
        total_steps=scalar(total_steps, jnp.int32),
        active=scalar(not wait_for_anchor, jnp.bool_),
        averaged=jnp.zeros([], jnp.bool_),
        anchor=copy_anchor(params, anchor, storage),
    )

  def update_fn(
      updates: optax.Updates,
      state: SFAState,
      params: optax.Params | None = None,
      *,
      may_average: bool = True,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SFAState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    if not isinstance(may_average, (bool, np.bool_)):
      raise TypeError(f'may_average must be a Python bool, known when the update is traced; got {may_average!r}.')
    count = optax.safe_increment(state.count)
    p_now, beta_now, steps_now = current(p, state.p), current(beta, state.beta), current(total_steps, state.total_steps)
    if not may_average:  # the caller knows that this step does not average: the anchor is not read
      return updates, SFAState(count, p_now, beta_now, steps_now, state.active, jnp.zeros([], jnp.bool_), state.anchor)
    average_now = state.active & is_averaging_step(count, p_now, steps_now)
    new_updates = averaged_updates(updates, params, state.anchor, average_now, beta_now)
    new_state = SFAState(count, p_now, beta_now, steps_now, state.active, average_now, state.anchor)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def l2(
    strength: chex.Numeric,
    anchor: optax.Params | None = None,
    *,
    wait_for_anchor: bool = False,
    anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of an L2 penalty toward an anchor: ``u + strength·(θ − θ_o)``.

  The penalty is :math:`\frac{\lambda}{2}\lVert\theta - \theta_o\rVert^2`, whose gradient
  :math:`\lambda(\theta - \theta_o)` is added to the incoming gradients. Chain it *before* the
  optimizer, as ``optax.add_decayed_weights`` (which is this transform with :math:`\theta_o = 0`).
  Leaves whose param is an integer or a PRNG key are not penalised.

  With SGD of learning rate :math:`\eta`, one step is
  :math:`\theta' = (1-\eta\lambda)\theta + \eta\lambda\,\theta_o - \eta\nabla L`: SFA averaging
  every step with :math:`\beta = \eta\lambda` has the same form (the paper's L2 correspondence).

  Args:
    strength: :math:`\lambda \ge 0`, the initial value of the state's ``strength``
      (:func:`sfa_jax.set_hyperparams` changes it; under ``optax.inject_hyperparams`` the injected
      value is read at every update).
    anchor: the parameters :math:`\theta_o` to pull toward; ``None`` means the params at ``init``.
    wait_for_anchor: start inactive (no penalty) until :func:`sfa_jax.reanchor` sets the first
      anchor.
    anchor_dtype: the dtype the anchor is stored in (``None``: each param's dtype); see
      :func:`sfa`. The pull :math:`\theta - \theta_o` is computed in (at least) float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`L2State`.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(sfa_jax.l2(0.5, anchor={'w': jnp.zeros(2)}), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.zeros(2)}, state, params)
    >>> optax.apply_updates(params, updates)['w']
    Array([ 0.5, -1. ], dtype=float32)

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017 (the L2 baseline)
  """
  check_hyperparams(strength=strength)
  storage = _anchor_storage_dtype(anchor_dtype)

  def make_state(params: optax.Params) -> L2State:
    anchor_copy = copy_anchor(params, anchor, storage)
    return L2State(scalar(strength, jnp.float32), scalar(not wait_for_anchor, jnp.bool_), anchor_copy)

  return _penalty_transform(strength, make_state)


def ewc(
    fisher: optax.Params,
    strength: chex.Numeric,
    anchor: optax.Params | None = None,
    *,
    wait_for_anchor: bool = False,
    anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Weight Consolidation: adds ``strength·F⊙(θ − θ*)`` to the gradients.

  The penalty convention is FACIL's,
  :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i - \theta^*_i)^2`, whose gradient
  :math:`\lambda F\odot(\theta-\theta^*)` is added to the incoming gradients (Avalanche writes the
  penalty without the 1/2, so its :math:`\lambda` is half of ours). Chain it *before* the optimizer.
  ``F`` is a diagonal Fisher estimate, e.g. from :func:`sfa_jax.fisher.diagonal_fisher`; for online
  EWC accumulate it across tasks and pass the new one to :func:`reanchor`. With Memory Aware
  Synapses' importance (:func:`sfa_jax.fisher.mas_importance`, summed over the tasks with
  ``online_fisher(Ω_old, Ω_new, gamma=1.0)``) in place of ``F``, this is MAS's penalty (Aljundi et
  al, 2018). One penalty per past task is :func:`offline_ewc`. Leaves whose param is an integer or
  a PRNG key are not penalised.

  Args:
    fisher: the diagonal Fisher, a pytree with the params' structure, shapes and dtypes and
      finite, non-negative values. A copy is stored in the state.
    strength: :math:`\lambda \ge 0`, the initial value of the state's ``strength`` (see
      :func:`l2`).
    anchor: :math:`\theta^*`; ``None`` means the params at ``init``.
    wait_for_anchor: start inactive (no penalty) until :func:`sfa_jax.reanchor` sets the first
      anchor (and Fisher).
    anchor_dtype: the dtype the anchor is stored in (``None``: each param's dtype); see
      :func:`sfa`. The Fisher keeps the params' dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`EWCState`.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> fisher = {'w': jnp.array([0.0, 2.0])}
    >>> ewc = sfa_jax.ewc(fisher, 0.5, anchor={'w': jnp.zeros(2)})
    >>> tx = optax.chain(ewc, optax.sgd(1.0))
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
    >>> updates['w']
    Array([-0., -1.], dtype=float32)

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017
  """
  check_hyperparams(strength=strength)
  if fisher is None:
    raise ValueError('ewc needs a Fisher estimate with the structure of the params; got None.')
  _validation.check_finite_tree(fisher, 'fisher', non_negative=True)
  storage = _anchor_storage_dtype(anchor_dtype)

  def make_state(params: optax.Params) -> EWCState:
    anchor_copy = copy_anchor(params, anchor, storage)
    fitted = _validation.fit_to(params, fisher, reference_name='params', other_name='fisher')
    return EWCState(
        scalar(strength, jnp.float32), scalar(not wait_for_anchor, jnp.bool_), anchor_copy, _validation.copy_tree(fitted)
    )

  return _penalty_transform(strength, make_state)


def offline_ewc(
    strength: chex.Numeric,
    fisher: optax.Params | None = None,
    anchor: optax.Params | None = None,
    *,
    wait_for_anchor: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Offline EWC: one penalty per past task, :math:`\sum_k \frac{\lambda}{2} F_k\odot(\theta - \theta_k)^2`.

  Kirkpatrick et al's original EWC keeps, for every finished task :math:`k`, its diagonal Fisher
  :math:`F_k` and its end :math:`\theta_k`. The gradient of the sum,
  :math:`\lambda\sum_k F_k\odot(\theta-\theta_k) = \lambda(S\odot\theta - M)` with
  :math:`S = \sum_k F_k` and :math:`M = \sum_k F_k\odot\theta_k`, needs two trees of the params'
  size whatever the number of tasks. The state holds :math:`S` and :math:`\bar\theta = M/S` (the
  Fisher-weighted mean of the ends, :class:`OfflineEWCState`), and the pull is computed as
  :math:`\lambda S\odot(\theta-\bar\theta)`, as :func:`ewc`'s: the same gradient, without the
  cancellation of :math:`S\odot\theta - M` in floating point. Chain it *before* the optimizer.

  :func:`sfa_jax.reanchor` adds a finished task: ``reanchor(state, params, fisher=F_k)`` (the
  Fisher is required) adds :math:`F_k` to :math:`S` and moves :math:`\bar\theta` to the new
  weighted mean with :math:`\theta_k` = ``params`` (:func:`sfa_jax.fisher.offline_fisher`).
  :func:`ewc` is online EWC (Schwarz et al): one penalty toward the latest end with an accumulated
  Fisher, whose :func:`sfa_jax.reanchor` replaces the Fisher and the anchor.

  Conventions: the penalty has FACIL's 1/2, as :func:`ewc`'s; van de Ven et al's offline EWC
  (``--ewc`` in GMvandeVen/continual-learning) has the same 1/2, so their ``ewc_lambda`` is this
  ``strength`` (their Fisher uses the model's predicted labels by default, the engine's the true
  ones). Avalanche's ``EWCPlugin(mode='separate')`` has no 1/2: its ``ewc_lambda`` is half of ours.

  Args:
    strength: :math:`\lambda \ge 0`, the initial value of the state's ``strength`` (see :func:`l2`).
    fisher: the Fisher of a task learnt before ``init`` (``None``: no past task yet, :math:`S = 0`
      and no penalty until :func:`sfa_jax.reanchor` adds one); finite, non-negative, shaped and
      typed like the params.
    anchor: that task's end :math:`\theta_k`; ``None`` means the params at ``init``.
    wait_for_anchor: start inactive (no penalty) until :func:`sfa_jax.reanchor` adds a task.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`OfflineEWCState`.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([2.0, 2.0])}
    >>> tx = optax.chain(sfa_jax.offline_ewc(1.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> state = sfa_jax.reanchor(state, {'w': jnp.array([0.0, 0.0])},
    ...                          fisher={'w': jnp.array([1.0, 0.0])})  # task 0
    >>> state = sfa_jax.reanchor(state, {'w': jnp.array([1.0, 1.0])},
    ...                          fisher={'w': jnp.array([1.0, 1.0])})  # task 1
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, state, params)
    >>> updates['w']  # -(1·(2 - 0) + 1·(2 - 1)), -(0·(2 - 0) + 1·(2 - 1))
    Array([-3., -1.], dtype=float32)

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017

    van de Ven et al, `Three types of incremental learning
    <https://www.nature.com/articles/s42256-022-00568-3>`_, 2022
  """
  check_hyperparams(strength=strength)
  if fisher is not None:
    _validation.check_finite_tree(fisher, 'fisher', non_negative=True)

  def make_state(params: optax.Params) -> OfflineEWCState:
    anchor_copy = copy_anchor(params, anchor)
    if fisher is None:
      total = jax.tree.map(lambda leaf: jnp.zeros_like(leaf) if _validation.is_float_leaf(leaf) else jnp.copy(leaf), params)
    else:
      total = _validation.copy_tree(_validation.fit_to(params, fisher, reference_name='params', other_name='fisher'))
    return OfflineEWCState(scalar(strength, jnp.float32), scalar(not wait_for_anchor, jnp.bool_), anchor_copy, total)

  return _penalty_transform(strength, make_state)


def si(
    strength: chex.Numeric,
    damping: chex.Numeric = 0.1,
    anchor: optax.Params | None = None,
    *,
    wait_for_anchor: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Synaptic Intelligence: a quadratic penalty weighted by each parameter's path integral.

  Chained *before* the optimizer, at every update it sees the raw task gradient :math:`g_t` and
  the params :math:`\theta_t`, and keeps both in its state (:class:`SIState`), so that at the next
  update it adds the previous step's term to the task's path integral

  .. math::
    \omega \mathrel{+}= -g_t\odot(\theta_{t+1} - \theta_t),

  where :math:`\theta_{t+1}-\theta_t` is the update the optimizer actually applied, whatever the
  optimizer (Adam, momentum, clipping after this transform). At a task boundary
  :func:`sfa_jax.reanchor` adds the last step's term, turns :math:`\omega` into importance,

  .. math::
    \Omega \leftarrow \max\Big(0,\ \Omega + \frac{\omega}{(\theta_{\mathrm{end}}-\theta^*)^2+\xi}\Big),

  and restarts the task: :math:`\omega = 0`, :math:`\theta^* = \theta_{\mathrm{end}}`. :math:`\Omega`
  is summed over the tasks and clipped at 0 after each, as Zenke et al's implementation does (a
  ReLU of the running sum; ``ganguli-lab/pathint``). Each update adds the gradient
  :math:`\lambda\,\Omega\odot(\theta-\theta^*)` of the penalty
  :math:`\frac{\lambda}{2}\sum_i\Omega_i(\theta_i-\theta^*_i)^2` to the gradients, as :func:`ewc`
  does with the Fisher (the path integral accumulates also while the penalty is off, during the
  first task). Leaves whose param is an integer or a PRNG key are not penalised.

  Which gradient: :math:`\omega` uses the gradient of the task's loss alone, what this transform
  sees before it adds its penalty, as Zenke et al define it (their code's ``unreg_grads``). Chain
  it first, on the raw gradient: a transformation before it (clipping, noise) changes the
  :math:`g_t` of the path integral. van de Ven et al's implementation, Avalanche's and Mammoth's use
  the gradient of the total loss, the penalty's included; Mammoth also replaces
  :math:`-g\odot\Delta\theta` by ``lr``·:math:`g^2`, which is the same only for plain SGD.

  Conventions: the penalty has FACIL's 1/2, as :func:`ewc`'s, while the paper writes
  :math:`c\sum_i\Omega_i(\theta_i-\theta^*_i)^2`: ``strength`` is :math:`2c`. So van de Ven et al's
  ``--c`` (``si_c``), Zenke et al's ``c`` and Mammoth's ``--c`` give ``strength = 2·c``, with their
  ``epsilon`` / ``xi`` as ``damping``. Avalanche's ``SynapticIntelligence(si_lambda, eps)`` has the
  1/2 but scales its importance by a fixed 0.0015 and clips it *above* at ``clip_to`` (0.001), not
  below at 0: its ``si_lambda`` is about ``strength / 0.0015`` only while no importance reaches the
  clip.

  Args:
    strength: :math:`\lambda \ge 0`, the initial value of the state's ``strength`` (see :func:`l2`).
    damping: :math:`\xi > 0`, which bounds :math:`\Omega` where a parameter hardly moved during the
      task (default 0.1, van de Ven et al's); the state's ``damping``, read by
      :func:`sfa_jax.reanchor`.
    anchor: :math:`\theta^*` of the first task; ``None`` means the params at ``init``.
    wait_for_anchor: start inactive (no penalty, the path integral accumulating) until
      :func:`sfa_jax.reanchor` ends the first task.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SIState`.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(sfa_jax.si(2.0, damping=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> curvature = jnp.array([4.0, 1.0])  # task 0: ½·Σ a·(w − 1)², w from 0 to 1
    >>> grad = lambda p: {'w': curvature * (p['w'] - 1.0)}
    >>> for _ in range(100):
    ...   updates, state = tx.update(grad(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> state = sfa_jax.reanchor(state, params)  # task 0 ends: Ω from its path integral
    >>> omega = sfa_jax.find_state(state).importance['w']
    >>> [round(x, 3) for x in omega.tolist()]  # ω = a / (2 − 0.1·a), over Δ² + ξ = 1.1
    [2.273, 0.478]

  References:
    Zenke, Poole and Ganguli, `Continual learning through synaptic intelligence
    <https://arxiv.org/abs/1703.04200>`_, 2017
  """
  check_hyperparams(strength=strength, damping=damping)

  def init_fn(params: optax.Params) -> SIState:
    anchor_copy = copy_anchor(params, anchor)
    return SIState(
        scalar(strength, jnp.float32), scalar(damping, jnp.float32), scalar(not wait_for_anchor, jnp.bool_), anchor_copy,
        _accumulator(params), _accumulator(params), _validation.copy_tree(params), _accumulator(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: SIState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SIState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    strength_now, damping_now = current(strength, state.strength), current(damping, state.damping)
    path = map_float_params(_path_step, state.path, params, state.previous_params, state.previous_grad)
    grads = map_float_params(lambda old, _, grad: grad.astype(old.dtype), state.previous_grad, params, updates)
    new_updates = _penalised(updates, params, state.anchor, state.importance, jnp.where(state.active, strength_now, 0.0))
    new_state = state._replace(strength=strength_now, damping=damping_now, path=path, previous_params=params,
                               previous_grad=grads)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _accumulator(params: optax.Params) -> optax.Params:
  """Zeros shaped like the floating leaves of ``params``, in at least float32; a copy of the others."""
  def zeros(leaf):
    leaf = jnp.asarray(leaf)
    return jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32)) if _validation.is_float_leaf(leaf) else jnp.copy(leaf)

  return jax.tree.map(zeros, params)


def _path_step(path: chex.Array, param: chex.Array, previous: chex.Array, grad: chex.Array) -> chex.Array:
  """SI's path integral after one more step: ``ω − g_t⊙(θ_{t+1} − θ_t)``, in ``ω``'s dtype."""
  dtype = path.dtype
  return path - grad.astype(dtype) * (param.astype(dtype) - previous.astype(dtype))


def si_next_task(state: SIState, params: optax.Params) -> SIState:
  r""":func:`si`'s state for the next task, the finished one ending at ``params`` (:func:`sfa_jax.reanchor`'s rule).

  Adds the last step's term to :math:`\omega`, then
  :math:`\Omega \leftarrow \max(0, \Omega + \omega / ((\theta_{\mathrm{end}}-\theta^*)^2 + \xi))`, and
  restarts the task at ``params``: anchor and previous params copies of them, :math:`\omega` and the
  previous gradient zero.

  Args:
    state: the state at the end of the task.
    params: the params at the end of the task, shaped like the state's anchor.

  Returns:
    The new state.
  """
  path = map_float_params(_path_step, state.path, params, state.previous_params, state.previous_grad)

  def importance(old, param, omega, anchor_leaf):
    dtype = old.dtype
    moved = param.astype(dtype) - anchor_leaf.astype(dtype)
    return jnp.maximum(old + omega / (moved * moved + state.damping.astype(dtype)), 0.0)

  omega = map_float_params(importance, state.importance, params, path, state.anchor)
  zeros = map_float_params(lambda leaf, _: jnp.zeros_like(leaf), state.path, params)
  return state._replace(anchor=_validation.copy_tree(params), importance=omega, path=zeros,
                        previous_params=_validation.copy_tree(params), previous_grad=jax.tree.map(jnp.copy, zeros))


def _check_not_schedule(**hyperparams: Any) -> None:
  for name, value in hyperparams.items():
    if callable(value):
      raise TypeError(
          f'{name} must be a number; to schedule it, wrap the factory in optax.inject_hyperparams, '
          f'which calls the schedule each step and passes the number on.'
      )


_RANGES: dict[str, Callable[[str, Any], None]] = {
    'p': lambda name, v: _validation.check_in_interval(name, v, 0.0, 1.0, low_open=True),
    'beta': lambda name, v: _validation.check_in_interval(name, v, 0.0, 1.0),
    'total_steps': _validation.check_positive_int,
    'strength': _validation.check_non_negative,
    'damping': lambda name, v: _validation.check_in_interval(name, v, 0.0, math.inf, low_open=True, high_open=True),
}


def register_hyperparam(name: str, check: Callable[[str, Any], None]) -> None:
  """Teaches :func:`check_hyperparams` (and so :func:`sfa_jax.set_hyperparams`) a hyper-parameter.

  Args:
    name: the state field's name (e.g. ``'threshold'``).
    check: ``(name, value) -> None``, raising ``TypeError`` / ``ValueError`` for a bad value.
  """
  _RANGES[name] = check


def check_hyperparams(**values: Any) -> None:
  """Checks each named hyper-parameter: a 0-d number (or traced 0-d value) in its range.

  Args:
    **values: ``p``, ``beta``, ``total_steps``, ``strength`` and those taught by
      :func:`register_hyperparam`.

  Raises:
    TypeError: for a schedule, a string, a bool, ``None`` or an array with dimensions; and for a
      name no transform knows.
    ValueError: for a value out of range; the message names the argument.
  """
  for name, value in values.items():
    if name not in _RANGES:
      raise TypeError(f'unknown hyper-parameter {name!r}; known: {sorted(_RANGES)}.')
    _check_not_schedule(**{name: value})
    _RANGES[name](name, value)


def _penalty_transform(
    strength: chex.Numeric,
    make_state: Callable[[optax.Params], L2State | EWCState | OfflineEWCState],
) -> optax.GradientTransformationExtraArgs:
  """A transform adding ``strength·w⊙(θ − anchor)`` to the updates, with ``w`` = 1 (L2) or the state's Fisher."""

  def update_fn(
      updates: optax.Updates,
      state: L2State | EWCState | OfflineEWCState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, L2State | EWCState | OfflineEWCState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    strength_now = current(strength, state.strength)
    weight_now = jnp.where(state.active, strength_now, 0.0)
    new_updates = _penalised(updates, params, state.anchor, getattr(state, 'fisher', None), weight_now)
    return new_updates, state._replace(strength=strength_now)

  return optax.GradientTransformationExtraArgs(make_state, update_fn)


def _penalised(
    updates: optax.Updates,
    params: optax.Params,
    anchor: optax.Params,
    weights: optax.Params | None,
    coefficient: chex.Array,
) -> optax.Updates:
  """``updates + coefficient·w⊙(params − anchor)`` on the floating leaves, in at least float32 (``w`` = 1 without ``weights``)."""

  def add_penalty(update, param, anchor_leaf, weight=None):
    dtype = jnp.promote_types(update.dtype, jnp.float32)
    pull = param.astype(dtype) - anchor_leaf.astype(dtype)
    if weight is not None:
      pull = weight.astype(dtype) * pull
    return (update.astype(dtype) + coefficient.astype(dtype) * pull).astype(update.dtype)

  extra = () if weights is None else (weights,)
  return map_float_params(add_penalty, updates, params, anchor, *extra)


# ------------------------------------------------------------------------------------------------
# A-GEM: the gradient projected against a reference gradient from an episodic memory.


class AGEMState(NamedTuple):
  """State of :func:`agem`.

  Attributes:
    projected: bool scalar, whether the latest update was projected (it conflicted with the
      reference gradient).
    projections: int32 scalar, the number of projected updates so far (saturates at the int32
      maximum).

  Example:
    >>> import jax.numpy as jnp, sfa_jax
    >>> tx = sfa_jax.agem()
    >>> g, reference = {'w': jnp.array([1.0, -1.0])}, {'w': jnp.array([0.0, 1.0])}
    >>> _, state = tx.update(g, tx.init(g), reference_grads=reference)
    >>> bool(state.projected), int(state.projections)
    (True, 1)
  """

  projected: chex.Array
  projections: chex.Array


def _real_float(leaf: Any) -> bool:
  return _validation.is_float_leaf(leaf) and bool(jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating))


def tree_dot(a: Any, b: Any) -> chex.Array:
  """``Σ a·b`` over the real floating leaves of two trees of one structure, in float32 at least.

  Args:
    a: a tree of arrays (gradients, updates).
    b: a tree of the same structure and shapes.

  Returns:
    A scalar in the widest of float32 and the leaves' dtypes; 0 without floating leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import transforms
    >>> a = {'w': jnp.array([1.0, 2.0]), 'n': jnp.array(3)}
    >>> float(transforms.tree_dot(a, a))  # the integer leaf is left out
    5.0
  """
  pairs = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if _real_float(x)]
  dtype = jnp.result_type(jnp.float32, *(jnp.asarray(x).dtype for x, _ in pairs))
  return sum((jnp.vdot(jnp.asarray(x, dtype), jnp.asarray(y, dtype)) for x, y in pairs), jnp.zeros((), dtype))


def agem() -> optax.GradientTransformationExtraArgs:
  r"""A-GEM: the gradient projected so that it does not increase the loss on an episodic memory.

  With :math:`g` the incoming gradient and :math:`g_{ref}` the gradient of the loss on a batch
  from the memory of past tasks, passed to ``update`` as the extra argument ``reference_grads``:

  .. math::

    \tilde g = \begin{cases} g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}}\, g_{ref} &
    \text{if } g^\top g_{ref} < 0 \\ g & \text{otherwise,} \end{cases}

  the dot products taken over every real floating leaf of the tree at once (one flat vector, as
  the paper's), in float32 at least; the projected leaves keep their dtypes, other leaves pass
  through. Without ``reference_grads`` (``None``: the first task, whose memory is empty) ``g``
  passes through. Chain it *before* the optimizer, on raw gradients:
  ``optax.chain(sfa_jax.agem(), optax.sgd(lr))``; ``optax.chain`` hands ``reference_grads`` to
  every transform, and those that take no extra argument ignore it. The engine's
  :class:`~sfa_jax.engine.methods.AGEM` computes the reference gradient in its train step.

  Mammoth's ``agem`` projects in the same way (its buffer splits a total size between the tasks;
  the memory here is a number of examples per past task, as in the paper); Avalanche's ``AGEM``
  projects the same flat gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AGEMState`; its ``update``
    takes ``reference_grads``, a tree with the updates' structure and shapes, or ``None``.

  Raises:
    ValueError: (at ``update``) when ``reference_grads`` does not have the updates' structure or
      shapes (the leaf is named).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(sfa_jax.agem(), optax.sgd(1.0))
    >>> params = {'w': jnp.zeros(2)}
    >>> g, reference = {'w': jnp.array([1.0, -1.0])}, {'w': jnp.array([0.0, 1.0])}
    >>> updates, _ = tx.update(g, tx.init(params), params, reference_grads=reference)
    >>> updates['w'].tolist()  # g·g_ref = -1 < 0: g + g_ref; sgd negates
    [-1.0, -0.0]

  References:
    Chaudhry et al, `Efficient Lifelong Learning with A-GEM <https://arxiv.org/abs/1812.00420>`_,
    2019
  """

  def init_fn(params: optax.Params) -> AGEMState:
    del params
    return AGEMState(jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.int32))

  def update_fn(updates: optax.Updates, state: AGEMState, params: optax.Params | None = None, *,
                reference_grads: optax.Updates | None = None, **extra_args: Any) -> tuple[optax.Updates, AGEMState]:
    del params, extra_args
    if reference_grads is None:
      return updates, state._replace(projected=jnp.zeros((), jnp.bool_))
    _validation.check_matching_tree(updates, reference_grads, reference_name='updates', other_name='reference_grads',
                                    check_dtypes=False)
    dot, norm = tree_dot(updates, reference_grads), tree_dot(reference_grads, reference_grads)
    conflict = dot < 0
    scale = jnp.where(conflict, dot / jnp.where(norm > 0, norm, 1), 0)

    def project(g, r):
      if not _real_float(g):
        return g
      projected = (jnp.asarray(g, scale.dtype) - scale * jnp.asarray(r, scale.dtype)).astype(jnp.asarray(g).dtype)
      return jnp.where(conflict, projected, g)

    count = jnp.where(state.projections < jnp.iinfo(jnp.int32).max, state.projections + conflict, state.projections)
    return jax.tree.map(project, updates, reference_grads), AGEMState(conflict, count.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
