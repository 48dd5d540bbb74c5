"""SFA, L2-to-anchor and EWC as Optax gradient transformations.

Each factory returns an ``optax.GradientTransformationExtraArgs`` whose state is a small ``NamedTuple``
carrying the anchor pytree (a copy, so params and state can both be donated). They chain with any
Optax optimizer:

* ``sfa`` goes *after* the optimizer: it rewrites the final updates so that ``optax.apply_updates``
  lands on the averaged parameters at the averaging steps.
* ``l2`` and ``ewc`` go *before* the optimizer: they add the gradient of a quadratic penalty toward
  the anchor, like ``optax.add_decayed_weights`` adds the gradient of weight decay.

At a task boundary, ``reanchor`` turns the end of the finished task into the anchor of the next one,
wherever the transforms sit inside chains and wrappers.

Only floating-point leaves are averaged or penalised: integer and PRNG-key leaves pass through
unchanged, and their anchors are kept only so that the state mirrors the params' structure.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sfa_jax import _validation


_NO_TOTAL_STEPS_MSG = (
    'sfa needs total_steps=T, the number of optimizer steps in the task: it averages after every '
    'k = max(1, floor(p*T + 1/2)) steps and after step T. Example: '
    'sfa(anchor, p=0.25, beta=0.5, total_steps=num_epochs * steps_per_epoch).'
)


_NO_PARAMS_MSG = (
    'You are using a transformation that requires the current value of parameters, but you are '
    'not passing `params` when calling `update`: call tx.update(updates, state, params).'
)


class SFAState(NamedTuple):
  """State of :func:`sfa`.

  Attributes:
    count: int32 scalar, the number of updates done in this task (saturates at the int32 maximum).
    anchor: the checkpoint θ_o the parameters are pulled toward; same structure as the params.
  """

  count: chex.Array
  anchor: optax.Params


class L2State(NamedTuple):
  """State of :func:`l2`.

  Attributes:
    anchor: the parameters θ_o the penalty pulls toward; same structure as the params.
  """

  anchor: optax.Params


class EWCState(NamedTuple):
  """State of :func:`ewc`.

  Attributes:
    anchor: the parameters θ* at the end of the previous task(s); same structure as the params.
    fisher: the diagonal Fisher information F; same structure as the params.
  """

  anchor: optax.Params
  fisher: optax.Params


AnchoredState = SFAState | L2State | EWCState
_ANCHORED_STATES = (SFAState, L2State, EWCState)

# Anchored states defined outside this module (e.g. sfa_jax.adaptive): state type -> rule
# ``(state, params) -> state`` giving the state for the next task. See register_anchored_state.
_REANCHOR_RULES: dict[type, Callable[[Any, optax.Params], Any]] = {}


def register_anchored_state(state_type: type, rule: Callable[[Any, optax.Params], Any]) -> None:
  """Teaches :func:`reanchor` a new anchored state: ``rule(state, params)`` gives the next task's state.

  ``state_type`` must be a ``NamedTuple`` with an ``anchor`` field like the params; :func:`reanchor`
  checks ``params`` against that anchor before calling ``rule``, wherever the state sits.

  Args:
    state_type: the state's class.
    rule: ``(state, params) -> new state`` of the same structure; it should store a copy of
      ``params`` (so params and state can both be donated).

  Raises:
    TypeError: when ``state_type`` is not a class with an ``anchor`` field.

  Example:
    >>> import jax.numpy as jnp, sfa_jax
    >>> from sfa_jax import adaptive  # registers AdaptiveSFAState
    >>> state = adaptive.adaptive_sfa(threshold=0.1, total_steps=10).init({'w': jnp.zeros(2)})
    >>> new_state = sfa_jax.reanchor(state, {'w': jnp.full(2, 2.0, jnp.float32)})
    >>> new_state.anchor['w'], new_state.anchor_norm
    (Array([2., 2.], dtype=float32), Array(2.828427, dtype=float32))
  """
  if not isinstance(state_type, type) or 'anchor' not in getattr(state_type, '_fields', ()):
    raise TypeError(f'state_type must be a NamedTuple class with an anchor field; got {state_type!r}.')
  _REANCHOR_RULES[state_type] = rule


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

  Example:
    >>> import sfa_jax
    >>> int(sfa_jax.averaging_period(0.25, 10)), int(sfa_jax.averaging_period(0.29, 100))
    (3, 29)
  """
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
    A boolean scalar array.

  Example:
    >>> import sfa_jax
    >>> [t for t in range(1, 13) if sfa_jax.is_averaging_step(t, 0.25, 10)]
    [3, 6, 9, 10]
  """
  step = jnp.asarray(step, jnp.int32)
  total_steps = jnp.asarray(total_steps, jnp.int32)
  period = averaging_period(p, total_steps)
  in_task = (step >= 1) & (step <= total_steps)
  return in_task & ((step % period == 0) | (step == total_steps))


def _check_anchor_like(params: optax.Params, tree: Any, name: str) -> None:
  if tree is not None:
    _validation.check_matching_tree(params, tree, reference_name='params', other_name=name)


def _anchor_at_init(params: optax.Params, anchor: optax.Params | None) -> optax.Params:
  """Validates ``anchor`` against ``params`` and returns a copy of it (or of ``params``)."""
  if params is None:
    raise ValueError(_NO_PARAMS_MSG)
  _check_anchor_like(params, anchor, 'anchor')
  return _validation.copy_tree(params if anchor is None else anchor)


def _float_leaves_map(fn: Callable[..., Any], first: Any, *rest: Any) -> Any:
  """``jax.tree.map(fn, first, *rest)`` on floating leaves; other leaves of ``first`` pass through."""
  return jax.tree.map(
      lambda leaf, *others: fn(leaf, *others) if _validation.is_float_leaf(leaf) else leaf,
      first,
      *rest,
  )


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
  arithmetic is done in at least float32 and cast back to each update's dtype. Integer and
  PRNG-key leaves pass through unchanged. Shared by :func:`sfa` and the transforms built on it
  (:func:`sfa_jax.adaptive.adaptive_sfa`).

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

  return _float_leaves_map(blend, updates, params, anchor)


def sfa(
    anchor: optax.Params | None = None,
    p: chex.Numeric | None = None,
    beta: chex.Numeric = 0.5,
    *,
    total_steps: chex.Numeric | None = None,
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
  an averaging step. Integer and PRNG-key leaves are never averaged.

  It is written branchless, as the multiply-add :math:`u + m(\theta_o - \theta - u)` with
  :math:`m = \beta` at an averaging step and 0 otherwise, which XLA fuses into the optimizer's own
  elementwise loop. ``benchmarks/transform_overhead.py`` chose it over ``jax.lax.cond`` on the
  update tree and over a ``jnp.where`` select, both much slower between averaging steps (see
  ``benchmarks/RESULTS.md``). Non-finite params or anchors are not masked out (``0·inf`` is NaN):
  a diverged run stays visibly diverged.

  Args:
    anchor: the checkpoint :math:`\theta_o` (a pytree like the params); ``None`` means the params
      passed to ``init``. A copy is stored in the state, so params and state can both be donated.
      Under ``optax.inject_hyperparams`` pass it with ``static_args=('anchor',)`` when it is a single
      array, or leave it ``None``.
    p: the fraction of the task between two averages, in (0, 1]. ``p = 1`` averages once, at the
      end of the task.
    beta: the weight of the anchor in the average, in [0, 1] (the paper's typical value is 0.5).
      ``beta = 0`` is plain fine-tuning. To schedule or sweep it, wrap the factory in
      ``optax.inject_hyperparams`` (with ``hyperparam_dtype=jnp.float32`` for low-precision params).
    total_steps: ``T``, the number of optimizer steps in the task. Required: there is no sensible
      default, since it sets where the averages fall.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SFAState`.

  Raises:
    TypeError: when ``p`` or ``total_steps`` is missing.
    ValueError: when ``p``, ``beta`` or ``total_steps`` is out of range (at construction), or when
      ``anchor`` does not match the params in structure, shape or dtype, or ``params`` is ``None``
      (at ``init``).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> anchor = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(anchor, p=0.5, beta=0.5, total_steps=4))
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
  _check_not_schedule(beta=beta)
  _validation.check_in_interval('p', p, 0.0, 1.0, low_open=True)
  _validation.check_in_interval('beta', beta, 0.0, 1.0)
  _validation.check_positive_int('total_steps', total_steps)

  def init_fn(params: optax.Params) -> SFAState:
    return SFAState(count=jnp.zeros([], jnp.int32), anchor=_anchor_at_init(params, anchor))

  def update_fn(
      updates: optax.Updates,
      state: SFAState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SFAState]:
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    count = optax.safe_increment(state.count)
    average_now = is_averaging_step(count, p, total_steps)
    new_updates = averaged_updates(updates, params, state.anchor, average_now, beta)
    return new_updates, SFAState(count=count, anchor=state.anchor)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def l2(strength: chex.Numeric, anchor: optax.Params | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Adds the gradient of an L2 penalty toward an anchor: ``u + strength·(θ − θ_o)``.

  The penalty is :math:`\frac{\lambda}{2}\lVert\theta - \theta_o\rVert^2`, whose gradient
  :math:`\lambda(\theta - \theta_o)` is added to the incoming gradients. Chain it *before* the
  optimizer, as ``optax.add_decayed_weights`` (which is this transform with :math:`\theta_o = 0`).

  With SGD of learning rate :math:`\eta`, one step is
  :math:`\theta' = (1-\eta\lambda)\theta + \eta\lambda\,\theta_o - \eta\nabla L`: SFA averaging
  every step with :math:`\beta = \eta\lambda` has the same form (the paper's L2 correspondence).

  Args:
    strength: :math:`\lambda \ge 0`. To schedule or sweep it, wrap the factory in
      ``optax.inject_hyperparams``.
    anchor: the parameters :math:`\theta_o` to pull toward; ``None`` means the params at ``init``.

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
  _check_not_schedule(strength=strength)
  _validation.check_non_negative('strength', strength)
  return _penalty_transform(strength, lambda params: L2State(_anchor_at_init(params, anchor)))


def ewc(
    fisher: optax.Params,
    strength: chex.Numeric,
    anchor: optax.Params | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Weight Consolidation: adds ``strength·F⊙(θ − θ*)`` to the gradients.

  The penalty convention is FACIL's,
  :math:`\frac{\lambda}{2}\sum_i F_i(\theta_i - \theta^*_i)^2`, whose gradient
  :math:`\lambda F\odot(\theta-\theta^*)` is added to the incoming gradients (Avalanche writes the
  penalty without the 1/2, so its :math:`\lambda` is half of ours). Chain it *before* the optimizer.
  ``F`` is a diagonal Fisher estimate, e.g. from :func:`sfa_jax.fisher.diagonal_fisher`; for online
  EWC accumulate it across tasks and pass the new one to :func:`reanchor`.

  Args:
    fisher: the diagonal Fisher, a pytree with the params' structure, shapes and dtypes and
      non-negative values. A copy is stored in the state.
    strength: :math:`\lambda \ge 0`. To schedule or sweep it, wrap the factory in
      ``optax.inject_hyperparams``.
    anchor: :math:`\theta^*`; ``None`` means the params at ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`EWCState`.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.array([1.0, 1.0])}
    >>> fisher = {'w': jnp.array([0.0, 2.0])}
    >>> tx = optax.chain(sfa_jax.ewc(fisher, 0.5, anchor={'w': jnp.zeros(2)}), optax.sgd(1.0))
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
    >>> updates['w']
    Array([-0., -1.], dtype=float32)

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017
  """
  _check_not_schedule(strength=strength)
  _validation.check_non_negative('strength', strength)
  if fisher is None:
    raise ValueError('ewc needs a Fisher estimate with the structure of the params; got None.')
  _check_non_negative_tree(fisher, 'fisher')

  def make_state(params: optax.Params) -> EWCState:
    anchor_copy = _anchor_at_init(params, anchor)
    _check_anchor_like(params, fisher, 'fisher')
    return EWCState(anchor=anchor_copy, fisher=_validation.copy_tree(fisher))

  return _penalty_transform(strength, make_state)


def _check_not_schedule(**hyperparams: Any) -> None:
  for name, value in hyperparams.items():
    if callable(value):
      raise TypeError(
          f'{name} must be a number; to schedule it, wrap the factory in optax.inject_hyperparams, '
          f'which calls the schedule each step and passes the number on.'
      )


def _check_non_negative_tree(tree: Any, name: str) -> None:
  """Raises ``ValueError`` naming the first leaf with a negative or NaN entry (on device, no copy)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _validation.is_traced(leaf) or not _validation.is_float_leaf(leaf):
      continue
    with jax.ensure_compile_time_eval():  # also when a factory is called inside a trace
      bad = bool(jnp.any(~(jnp.asarray(leaf) >= 0)))
    if bad:
      raise ValueError(f'{name}{jax.tree_util.keystr(path)} has negative or NaN entries.')


def _penalty_transform(
    strength: chex.Numeric,
    make_state: Callable[[optax.Params], L2State | EWCState],
) -> optax.GradientTransformationExtraArgs:
  """A transform adding ``strength·w⊙(θ − anchor)`` to the updates, with ``w`` = 1 (L2) or F (EWC)."""

  def init_fn(params: optax.Params) -> L2State | EWCState:
    return make_state(params)

  def update_fn(
      updates: optax.Updates,
      state: L2State | EWCState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, L2State | EWCState]:
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    def add_penalty(update, param, anchor_leaf, weight=None):
      dtype = jnp.promote_types(update.dtype, jnp.float32)
      pull = param.astype(dtype) - anchor_leaf.astype(dtype)
      if weight is not None:
        pull = weight.astype(dtype) * pull
      return (update.astype(dtype) + jnp.asarray(strength, dtype) * pull).astype(update.dtype)

    if isinstance(state, EWCState):
      new_updates = _float_leaves_map(add_penalty, updates, params, state.anchor, state.fisher)
    else:
      new_updates = _float_leaves_map(add_penalty, updates, params, state.anchor)
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reanchor(opt_state: Any, params: optax.Params, *, fisher: optax.Params | None = None) -> Any:
  """The optimizer state for the next task: every anchor becomes a copy of ``params``.

  Finds every :class:`SFAState`, :class:`L2State` and :class:`EWCState` (and every state taught by
  :func:`register_anchored_state`, such as :class:`sfa_jax.adaptive.AdaptiveSFAState`) anywhere inside
  ``opt_state`` (inside ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.multi_transform`` and any other NamedTuple, tuple, list or dict state) and sets its
  anchor to a copy of ``params``; SFA's step counter restarts at 0. Optimizer moments and other
  state are left as they are. Call it outside ``jit``, between tasks.

  Args:
    opt_state: the state of a transformation containing SFA, L2 or EWC.
    params: the parameters at the end of the finished task: the new anchor.
    fisher: for EWC, the new (e.g. online-accumulated) Fisher estimate; ``None`` keeps the old one.

  Returns:
    The new state, with the same structure as ``opt_state``.

  Raises:
    ValueError: when ``opt_state`` holds none of these states, or ``params`` / ``fisher`` do not
      match the anchors' structure, shapes and dtypes.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(optax.adam(1e-3), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=10))
    >>> state = tx.init(params)
    >>> new_params = {'w': jnp.ones(2)}
    >>> state = sfa_jax.reanchor(state, new_params)
    >>> state[1].anchor['w'], int(state[1].count)
    (Array([1., 1.], dtype=float32), 0)
  """
  found = []
  anchored = _ANCHORED_STATES + tuple(_REANCHOR_RULES)

  def replace(node: Any) -> Any:
    if not isinstance(node, anchored):
      return node
    found.append(type(node).__name__)
    _validation.check_matching_tree(node.anchor, params, reference_name='anchor', other_name='params')
    if type(node) in _REANCHOR_RULES:
      return _REANCHOR_RULES[type(node)](node, params)
    if isinstance(node, SFAState):
      return SFAState(count=jnp.zeros_like(node.count), anchor=_validation.copy_tree(params))
    if isinstance(node, EWCState):
      new_fisher = node.fisher
      if fisher is not None:
        _validation.check_matching_tree(node.fisher, fisher, reference_name='fisher', other_name='new fisher')
        _check_non_negative_tree(fisher, 'fisher')
        new_fisher = _validation.copy_tree(fisher)
      return EWCState(anchor=_validation.copy_tree(params), fisher=new_fisher)
    return L2State(anchor=_validation.copy_tree(params))

  new_state = jax.tree.map(replace, opt_state, is_leaf=lambda x: isinstance(x, anchored))
  if not found:
    raise ValueError('reanchor found no SFAState, L2State or EWCState inside opt_state.')
  if fisher is not None and 'EWCState' not in found:
    raise ValueError('reanchor got a fisher, but opt_state holds no EWCState.')
  return new_state
