"""Adaptive SFA: the run itself decides when to average, by how far the params drifted from the anchor.

SFA (:func:`sfa_jax.sfa`) averages on a fixed schedule, every ``p·T`` steps. The paper leaves open
whether ``p`` could adapt during training (averaging before the current task is substantially
learned hurts it; how soon that happens depends on the task). :func:`adaptive_sfa` replaces the
period by a trigger on the drift from the anchor :math:`\\theta_o`: it averages after step :math:`t`
when the parameters :math:`\\theta_t` that the step starts from are far from the anchor,

.. math::
  \\lVert\\theta_t - \\theta_o\\rVert \\ge \\tau\\,\\lVert\\theta_o\\rVert,

(global norms over the floating leaves), but never sooner than ``min_p·T`` steps after the previous
average (or the task's start), and always after the task's last step ``T``. Between averages the
params move freely; once they leave the ball of radius :math:`\\tau\\lVert\\theta_o\\rVert` around the
anchor they are pulled back by the average :math:`\\beta\\theta_o + (1-\\beta)(\\theta_t + u_t)`, so a
task that moves the params fast is averaged often and a task that moves them little is averaged
rarely. The two ends of the threshold are plain SFA: ``threshold = 0`` averages every ``min_p·T``
steps (SFA with ``p = min_p``, the same steps exactly), ``threshold = inf`` only at the end of the
task (SFA with ``p = 1``, WiSE-FT-like).

The drift is measured relative to :math:`\\lVert\\theta_o\\rVert` (stored in the state when the
anchor is set) so that one threshold serves models of different sizes and scales; an alternative,
relative to the drift right after the previous average, needs an absolute threshold for the first
average of each task and was not chosen.

Cost. The drift of :math:`\\theta_t` is computed by step :math:`t-1`, as the norm of what that step
lands on, and stored in the state: that reduction reads what SFA's multiply-add and
``optax.apply_updates`` read, so XLA can compute it in the same loop. Deciding on the drift of
:math:`\\theta_t + u_t` instead (where the current step lands, one step earlier) needs the
reduction *before* the multiply-add, a second pass over the params; ``benchmarks/adaptive_overhead.py``
measured it much slower (figures in ``benchmarks/RESULTS.md``), so it was not chosen. The price is a
one-step lag.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from sfa_jax import _validation
from sfa_jax import anchors
from sfa_jax import transforms

__all__ = ['AdaptiveSFAState', 'is_adaptive_averaging_step', 'adaptive_sfa']


class AdaptiveSFAState(NamedTuple):
  """State of :func:`adaptive_sfa`.

  Attributes:
    count: int32 scalar, the number of updates done in this task (saturates at the int32 maximum).
    threshold: float32 scalar, :math:`\\tau`.
    beta: float32 scalar, the weight of the anchor in the average.
    min_p: float32 scalar, the smallest fraction of the task between two averages.
    total_steps: int32 scalar, ``T``.
    active: bool scalar; while false the updates pass through (see ``wait_for_anchor``).
    averaged: bool scalar, whether the latest update averaged.
    last_average: int32 scalar, the step (1-based, within the task) of the latest average; 0 before
      the first average of the task.
    num_averages: int32 scalar, the number of averages done in this task.
    drift: float32 scalar, :math:`\\lVert\\theta - \\theta_o\\rVert` of the params the next step starts
      from (measured by the latest step, after its average if any; at ``init``, of the params).
    anchor_norm: float32 scalar, :math:`\\lVert\\theta_o\\rVert`, the scale of the threshold.
    anchor: the checkpoint :math:`\\theta_o` the parameters are pulled toward.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> sfa = sfa_jax.adaptive_sfa(threshold=0.1, beta=0.5, total_steps=10)
    >>> tx = optax.chain(optax.sgd(0.1), sfa)
    >>> state = sfa_jax.find_state(tx.init({'w': jnp.ones(4)}))
    >>> round(float(state.threshold), 6), float(state.anchor_norm)  # ‖θ_o‖ = 2
    (0.1, 2.0)
  """

  count: chex.Array
  threshold: chex.Array
  beta: chex.Array
  min_p: chex.Array
  total_steps: chex.Array
  active: chex.Array
  averaged: chex.Array
  last_average: chex.Array
  num_averages: chex.Array
  drift: chex.Array
  anchor_norm: chex.Array
  anchor: optax.Params


def float_norm(tree: Any) -> chex.Array:
  """The global L2 norm of the floating leaves of ``tree``, accumulated in float32.

  Integer and PRNG-key leaves are left out (they are never averaged).

  Args:
    tree: a pytree of arrays.

  Returns:
    A float32 scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import adaptive
    >>> float(adaptive.float_norm({'w': jnp.array([3.0, 4.0]), 'step': jnp.array(7)}))
    5.0
  """
  def squared_norm(leaf):
    # An elementwise square and a sum, not jnp.vdot: XLA fuses the producer of ``leaf`` into this
    # reduction (a dot would need it written out first).
    leaf = jnp.asarray(leaf)
    leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    magnitude = jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf
    return jnp.sum(jnp.square(magnitude)).astype(jnp.float32)

  squares = [squared_norm(leaf) for leaf in jax.tree.leaves(tree) if _validation.is_float_leaf(leaf)]
  return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def is_adaptive_averaging_step(
    step: chex.Numeric,
    last_average: chex.Numeric,
    drift: chex.Numeric,
    anchor_norm: chex.Numeric,
    threshold: chex.Numeric,
    min_p: chex.Numeric,
    total_steps: chex.Numeric,
) -> chex.Array:
  """Whether :func:`adaptive_sfa` averages right after step ``step`` (counted from 1 in the task).

  The rule, exactly: with ``gap = averaging_period(min_p, T)``, it averages after step ``t`` when
  ``1 <= t <= T`` and either ``t == T``, or ``t - last_average >= gap`` and ``drift >= threshold ·
  anchor_norm``. Branchless, so every argument may be traced.

  Args:
    step: 1-based index of the step just taken.
    last_average: the step of the previous average in this task (0 if none).
    drift: :math:`\\lVert\\theta_t - \\theta_o\\rVert`, where this step starts from.
    anchor_norm: :math:`\\lVert\\theta_o\\rVert`.
    threshold: :math:`\\tau \\ge 0`, the drift that triggers an average, relative to ``anchor_norm``.
    min_p: the smallest fraction of the task between two averages, in (0, 1].
    total_steps: ``T``, the number of optimizer steps in the task.

  Returns:
    A boolean scalar array.

  Example:
    >>> from sfa_jax import adaptive
    >>> # a drift of 2 >= 0.1 * 10, 5 steps after the last average
    >>> bool(adaptive.is_adaptive_averaging_step(5, 0, 2.0, 10.0, 0.1, 0.5, 10))
    True
    >>> bool(adaptive.is_adaptive_averaging_step(4, 0, 2.0, 10.0, 0.1, 0.5, 10))  # too soon
    False
  """
  step = jnp.asarray(step, jnp.int32)
  total_steps = jnp.asarray(total_steps, jnp.int32)
  gap = transforms.averaging_period(min_p, total_steps)
  in_task = (step >= 1) & (step <= total_steps)
  far = jnp.asarray(drift, jnp.float32) >= jnp.asarray(threshold, jnp.float32) * jnp.asarray(anchor_norm, jnp.float32)
  return in_task & ((step == total_steps) | ((step - jnp.asarray(last_average, jnp.int32) >= gap) & far))


def adaptive_sfa(
    anchor: optax.Params | None = None,
    threshold: chex.Numeric | None = None,
    beta: chex.Numeric = 0.5,
    min_p: chex.Numeric = 0.1,
    *,
    total_steps: chex.Numeric | None = None,
    wait_for_anchor: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SFA that averages when the params drift far from the anchor, instead of every ``p·T`` steps.

  At step :math:`t` of a task of ``T`` steps, with :math:`d_t = \lVert\theta_t - \theta_o\rVert` the
  drift of the params the step starts from, it averages

  .. math::
    \theta_{t+1} = \beta\,\theta_o + (1 - \beta)\,(\theta_t + u_t)

  when :math:`d_t \ge \tau\lVert\theta_o\rVert` and at least ``min_p·T`` steps passed since the
  previous average (or the task's start), and always after step ``T`` (see
  :func:`is_adaptive_averaging_step` for the exact rule). Otherwise the updates pass unchanged.
  :math:`d_t` is measured by step :math:`t-1` (by ``init`` for the first step), which assumes the
  updates are applied unchanged, as ``optax.apply_updates`` does; see the module docstring for
  why (cost).
  Like :func:`sfa_jax.sfa` it goes last in a chain, emits the averaged step as an update (the same
  fused multiply-add, :func:`sfa_jax.transforms.averaged_updates`), keeps the optimizer's state
  across an average, never averages integer or PRNG-key leaves, and is re-anchored at a task
  boundary by :func:`sfa_jax.reanchor` (which also recomputes :math:`\lVert\theta_o\rVert` and
  restarts the counters). ``threshold = 0`` gives exactly ``sfa(p=min_p)``; ``threshold = inf``
  gives ``sfa(p=1)``.

  Args:
    anchor: the checkpoint :math:`\theta_o`; ``None`` means the params passed to ``init``. A copy
      is stored in the state, so params and state can both be donated. Under
      ``optax.inject_hyperparams`` leave it ``None`` (or pass it in ``static_args``).
    threshold: :math:`\tau \ge 0` (``inf`` allowed), the drift that triggers an average, as a
      fraction of :math:`\lVert\theta_o\rVert`.
    beta: the weight of the anchor in the average, in [0, 1].
    min_p: the smallest fraction of the task between two averages, in (0, 1]: the rule never
      averages more often than ``sfa(p=min_p)`` would.
    total_steps: ``T``, the number of optimizer steps in the task. Required; the next task's is
      set by ``reanchor(state, params, total_steps=T_next)``.
    wait_for_anchor: start inactive until :func:`sfa_jax.reanchor` sets the first anchor.

  The hyper-parameters live in the state, as :func:`sfa_jax.sfa`'s do (same rules for
  ``inject_hyperparams``, :func:`sfa_jax.set_hyperparams` and placement).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AdaptiveSFAState`.

  Raises:
    TypeError: when ``threshold`` or ``total_steps`` is missing, or a hyper-parameter is a
      schedule (wrap the factory in ``optax.inject_hyperparams`` instead).
    ValueError: when a hyper-parameter is out of range (at construction), or when ``anchor`` does
      not match the params, or ``params`` is ``None`` (at ``init``).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> from sfa_jax import adaptive
    >>> params = {'w': jnp.array([1.0, 0.0])}  # the anchor: norm 1
    >>> sfa = adaptive.adaptive_sfa(threshold=0.25, beta=0.5, min_p=0.1, total_steps=10)
    >>> tx = optax.chain(optax.sgd(0.1), sfa)
    >>> state, averaged = tx.init(params), []
    >>> for step in range(1, 11):
    ...   updates, state = tx.update({'w': jnp.array([0.0, -1.0])}, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   if sfa_jax.find_state(state).averaged:
    ...     averaged.append(step)
    >>> # the drift grows by 0.1 a step; steps starting 0.25 or more away average (and T)
    >>> averaged
    [4, 6, 8, 10]

  References:
    Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model averaging
    <https://arxiv.org/abs/2501.05559>`_, 2025 (SFA; adapting ``p`` is one of its open questions)
  """
  if threshold is None:
    raise TypeError('adaptive_sfa needs threshold, the drift that triggers an average relative to ||anchor||.')
  if total_steps is None:
    raise TypeError('adaptive_sfa needs total_steps=T, the number of optimizer steps in the task.')
  transforms.check_hyperparams(threshold=threshold, beta=beta, min_p=min_p, total_steps=total_steps)
  _validation.check_full_precision('min_p', min_p)

  def init_fn(params: optax.Params) -> AdaptiveSFAState:
    anchor_copy = transforms.copy_anchor(params, anchor)
    zero = lambda: jnp.zeros([], jnp.int32)
    return AdaptiveSFAState(
        count=zero(),
        threshold=transforms.scalar(threshold, jnp.float32),
        beta=transforms.scalar(beta, jnp.float32),
        min_p=transforms.scalar(min_p, jnp.float32),
        total_steps=transforms.scalar(total_steps, jnp.int32),
        active=transforms.scalar(not wait_for_anchor, jnp.bool_),
        averaged=jnp.zeros([], jnp.bool_),
        last_average=zero(),
        num_averages=zero(),
        drift=float_norm(transforms.map_float_params(lambda _, p, a: _offset(p, a), params, params, anchor_copy)),
        anchor_norm=float_norm(anchor_copy),
        anchor=anchor_copy,
    )

  def update_fn(
      updates: optax.Updates,
      state: AdaptiveSFAState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, AdaptiveSFAState]:
    del extra_args
    if params is None:
      raise ValueError(transforms.NO_PARAMS_MSG)
    count = optax.safe_increment(state.count)
    hyper = {
        'threshold': transforms.current(threshold, state.threshold),
        'beta': transforms.current(beta, state.beta),
        'min_p': transforms.current(min_p, state.min_p),
        'total_steps': transforms.current(total_steps, state.total_steps),
    }
    average_now = state.active & is_adaptive_averaging_step(
        count, state.last_average, state.drift, state.anchor_norm, hyper['threshold'], hyper['min_p'], hyper['total_steps']
    )
    new_updates = transforms.averaged_updates(updates, params, state.anchor, average_now, hyper['beta'])
    # The drift of the next step's params θ + u': it reads what the multiply-add reads, so XLA
    # computes both in one pass.
    drift = float_norm(transforms.map_float_params(lambda u, p, a: _offset(p, a, u), new_updates, params, state.anchor))
    return new_updates, state._replace(
        count=count,
        **hyper,
        averaged=average_now,
        last_average=jnp.where(average_now, count, state.last_average),
        num_averages=state.num_averages + average_now.astype(state.num_averages.dtype),
        drift=drift,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _offset(param: chex.Array, anchor_leaf: chex.Array, update: chex.Array | None = None) -> chex.Array:
  """``θ − θ_o``, or ``θ + u − θ_o``, for one leaf, in at least float32.

  ``θ + u`` comes first: it is ``optax.apply_updates``'s own sum, which XLA then computes once for
  both (``(θ − θ_o) + u`` measured slower on an Adam step, ``benchmarks/adaptive_overhead.py``).
  """
  dtype = jnp.promote_types(param.dtype, jnp.float32)
  moved = param.astype(dtype) if update is None else param.astype(dtype) + update.astype(dtype)
  return moved - anchor_leaf.astype(dtype)


def _reanchor(state: AdaptiveSFAState, params: optax.Params) -> AdaptiveSFAState:
  """The next task's state: anchor at a copy of ``params``, its norm recomputed, counters and drift at 0."""
  anchor = _validation.copy_tree(params)
  return state._replace(
      count=jnp.zeros_like(state.count),
      averaged=jnp.zeros_like(state.averaged),
      last_average=jnp.zeros_like(state.last_average),
      num_averages=jnp.zeros_like(state.num_averages),
      drift=jnp.zeros_like(state.drift),
      anchor_norm=float_norm(anchor),
      anchor=anchor,
  )


anchors.register_anchored_state(AdaptiveSFAState, _reanchor, averaging=True)
transforms.register_hyperparam('threshold', lambda name, v: _validation.check_in_interval(name, v, 0.0, float('inf')))
transforms.register_hyperparam('min_p', lambda name, v: _validation.check_in_interval(name, v, 0.0, 1.0, low_open=True))
