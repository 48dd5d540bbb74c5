"""The anchored states inside an optimizer state: re-anchor them, set their hyper-parameters, find them.

An optimizer state is a tree of states: ``optax.chain`` makes a tuple, ``optax.inject_hyperparams``
a ``NamedTuple`` around the inner state, ``optax.masked`` and ``optax.multi_transform`` a state per
group whose params are masked (``optax.MaskedNode`` where a leaf is left out), and ``flax.nnx``
wraps every array in a ``Variable``. The functions here find every anchored state
(:class:`~sfa_jax.transforms.SFAState`, :class:`~sfa_jax.transforms.L2State`,
:class:`~sfa_jax.transforms.EWCState`, :class:`~sfa_jax.transforms.OfflineEWCState`,
:class:`~sfa_jax.transforms.SIState`, and those taught by :func:`register_anchored_state`)
wherever it sits, and fit the params to each one's own sub-tree, so users never index the chain
(``opt_state[1].count``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sfa_jax import _validation
from sfa_jax import fisher as fisher_lib
from sfa_jax import transforms
from sfa_jax.transforms import EWCState
from sfa_jax.transforms import L2State
from sfa_jax.transforms import OfflineEWCState
from sfa_jax.transforms import SFAState
from sfa_jax.transforms import SIState

# State type -> rule ``(state, params) -> state`` giving the next task's state (anchor at a copy of
# ``params``, counters restarted). Fields named ``active`` and ``total_steps`` are set by reanchor.
_RULES: dict[type, Callable[[Any, optax.Params], Any]] = {
    SFAState: lambda state, params: state._replace(
        count=jnp.zeros_like(state.count), averaged=jnp.zeros_like(state.averaged), anchor=_validation.copy_tree(params)
    ),
    L2State: lambda state, params: state._replace(anchor=_validation.copy_tree(params)),
    EWCState: lambda state, params: state._replace(anchor=_validation.copy_tree(params)),
    OfflineEWCState: lambda state, params: state,  # the task's end and Fisher are added by reanchor (fisher=)
    SIState: transforms.si_next_task,
}
# The states whose transform rewrites the final update (they must sit last in their chain).
_AVERAGING: set[type] = {SFAState}


def register_anchored_state(state_type: type, rule: Callable[[Any, optax.Params], Any], *, averaging: bool = False) -> None:
  """Teaches :func:`reanchor` (and :func:`find_states`, :func:`set_hyperparams`) a new anchored state.

  ``state_type`` must be a ``NamedTuple`` with an ``anchor`` field like the params; :func:`reanchor`
  fits ``params`` to that anchor before calling ``rule``, wherever the state sits, and then sets
  its ``active`` and ``total_steps`` fields when it has them.

  Args:
    state_type: the state's class.
    rule: ``(state, params) -> new state`` of the same structure; it should store a copy of
      ``params`` (so params and state can both be donated).
    averaging: whether the transform rewrites the final update (as SFA does), so that
      :func:`check_placement` requires it last in its chain.

  Raises:
    TypeError: when ``state_type`` is not a class with an ``anchor`` field.

  Example:
    >>> import jax.numpy as jnp, sfa_jax
    >>> from sfa_jax import adaptive  # registers AdaptiveSFAState
    >>> tx = adaptive.adaptive_sfa(threshold=0.1, total_steps=10)
    >>> state = tx.init({'w': jnp.zeros(2)})
    >>> new_state = sfa_jax.reanchor(state, {'w': jnp.full(2, 2.0, jnp.float32)})
    >>> new_state.anchor['w'], new_state.anchor_norm
    (Array([2., 2.], dtype=float32), Array(2.828427, dtype=float32))
  """
  if not isinstance(state_type, type) or 'anchor' not in getattr(state_type, '_fields', ()):
    raise TypeError(f'state_type must be a NamedTuple class with an anchor field; got {state_type!r}.')
  _RULES[state_type] = rule
  if averaging:
    _AVERAGING.add(state_type)


def _is_anchored(node: Any) -> bool:
  return type(node) in _RULES


def _is_inject_state(node: Any) -> bool:
  return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def _is_masked_node(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


# ---------------------------------------------------------------------------------------------
# Flax NNX: arrays wrapped in Variables, changed in place.


def _nnx():
  """``flax.nnx`` if the user imported it (an NNX object can only exist then), else ``None``."""
  return sys.modules.get('flax.nnx')


def _is_variable(node: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(node, nnx.Variable)


def _unwrap(tree: Any) -> Any:
  """``tree`` with every ``nnx.Variable`` replaced by its value (the tree itself without NNX)."""
  if _nnx() is None:
    return tree
  return jax.tree.map(lambda node: node.get_value() if _is_variable(node) else node, tree, is_leaf=_is_variable)


def _write_back(tree: Any, new_values: Any) -> Any:
  """``new_values`` put into ``tree``: into its Variables in place (NNX), elsewhere as new leaves."""
  if _nnx() is None:
    return new_values

  def put(node, value):
    if _is_variable(node):
      node.set_value(value)
      return node
    return value

  return jax.tree.map(put, tree, new_values, is_leaf=_is_variable)


def _is_train_state(node: Any) -> bool:
  """A Flax ``TrainState``-like object: ``.params``, ``.opt_state`` and a ``.replace`` method."""
  return all(hasattr(node, name) for name in ('params', 'opt_state', 'replace')) and not _is_anchored(node)


def _target(opt_state: Any, params: Any) -> tuple[Any, Any]:
  """``(opt_state, params)`` as trees: an ``nnx.Optimizer`` and a model, or a ``TrainState``, give theirs."""
  if _is_train_state(opt_state):
    return opt_state.opt_state, opt_state.params if params is None else params
  nnx = _nnx()
  if nnx is not None and isinstance(opt_state, nnx.Optimizer):
    if isinstance(params, nnx.Module):
      params = nnx.state(params, opt_state.wrt)
    return opt_state.opt_state, params
  if nnx is not None and isinstance(params, nnx.Module):
    raise TypeError('reanchor got an nnx.Module as params: pass the nnx.Optimizer with it, '
                    'reanchor(optimizer, model), or nnx.state(model, nnx.Param).')
  return opt_state, params


# ---------------------------------------------------------------------------------------------
# Walking the state.


def _children(node: Any) -> list[Any]:
  """The immediate children of a pytree node (none for a leaf)."""
  if _is_anchored(node) or _is_masked_node(node) or isinstance(node, (jax.Array, float, int)) or node is None:
    return []
  children = jax.tree_util.tree_leaves(node, is_leaf=lambda child: child is not node)
  return [] if len(children) == 1 and children[0] is node else children


def _walk(node: Any, ancestors: tuple = ()):
  """Yields ``(state, ancestors)`` for every anchored state, ``ancestors`` outermost first.

  Each ancestor is ``(container, index)``: the container and the index of the child on the way.
  """
  if _is_anchored(node):
    yield node, ancestors
    return
  for index, child in enumerate(_children(node)):
    yield from _walk(child, ancestors + ((node, index),))


def find_states(opt_state: Any, state_type: type | None = None) -> list[Any]:
  """Every anchored state inside ``opt_state``, in tree order.

  Args:
    opt_state: an optimizer state (any chain or wrapper; an ``nnx.Optimizer`` or its
      ``opt_state`` too, whose Variables are read as their values; a Flax ``TrainState``).
    state_type: keep only states of this class (e.g. ``sfa_jax.SFAState``).

  Returns:
    A list of states (NamedTuples of arrays).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'body': jnp.zeros(2), 'head': jnp.zeros(3)}
    >>> sgd_sfa = lambda p: optax.chain(optax.sgd(0.1),
    ...                                 sfa_jax.sfa(p=p, beta=0.5, total_steps=4))
    >>> tx = optax.multi_transform({'body': sgd_sfa(0.5), 'head': sgd_sfa(1.0)},
    ...                            {'body': 'body', 'head': 'head'})
    >>> [float(s.p) for s in sfa_jax.find_states(tx.init(params))]
    [0.5, 1.0]
  """
  opt_state, _ = _target(opt_state, None)
  found = [state for state, _ in _walk(_unwrap(opt_state))]
  if state_type is not None:
    found = [state for state in found if isinstance(state, state_type)]
  return found


def find_state(opt_state: Any, state_type: type | None = None) -> Any:
  """The one anchored state inside ``opt_state``: read ``count``, ``averaged``, ``p``, ... from it.

  Args:
    opt_state: an optimizer state (see :func:`find_states`).
    state_type: look only for states of this class.

  Returns:
    The state.

  Raises:
    ValueError: when there is none, or several (then use :func:`find_states`).

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=1.0, beta=0.5, total_steps=2))
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({'w': jnp.ones(2)}, state, params)
    ...   sfa = sfa_jax.find_state(state)
    ...   print(int(sfa.count), bool(sfa.averaged))
    1 False
    2 True
  """
  found = find_states(opt_state, state_type)
  kind = 'anchored state' if state_type is None else state_type.__name__
  if not found:
    raise ValueError(f'find_state found no {kind} inside opt_state.')
  if len(found) > 1:
    raise ValueError(f'find_state found {len(found)} of {kind} inside opt_state; use sfa_jax.find_states.')
  return found[0]


# ---------------------------------------------------------------------------------------------
# Placement.


def _class_named(module: str, name: str) -> type | None:
  """``module.name`` if the module is imported (a state of it can only exist then)."""
  loaded = sys.modules.get(module)
  return getattr(loaded, name, None) if loaded is not None else None


def check_placement(opt_state: Any) -> None:
  """Refuses placements of SFA that cannot land on the average, and warns of doubtful ones.

  SFA rewrites the *final* update relative to the params it is handed, so:

  * it must be last in its chain: a transformation after it changes what lands
    (``UserWarning``; a masked group of other leaves after it is fine);
  * chained after ``optax.MultiSteps`` it counts micro-steps (``ValueError``); inside
    ``MultiSteps`` it counts outer steps, which is right;
  * inside ``optax.lookahead`` it averages the fast weights, and with ``reset_state=True`` its
    anchor and counter are wiped at every sync (``UserWarning``);
  * after (or inside) ``optax.contrib.schedule_free`` the evaluation params are not averaged
    (``UserWarning``).

  :func:`reanchor` runs this check; call it once after ``init`` to hear of a bad placement before
  the first task's end.

  Args:
    opt_state: an optimizer state.

  Raises:
    ValueError: for SFA chained after ``optax.MultiSteps``.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> sfa = sfa_jax.sfa(p=0.5, total_steps=8)
    >>> tx = optax.chain(optax.MultiSteps(optax.adam(1e-3), 4), sfa)
    >>> sfa_jax.check_placement(tx.init({'w': jnp.zeros(2)}))
    Traceback (most recent call last):
    ...
    ValueError: SFAState is chained after optax.MultiSteps, so it counts micro-steps ...
  """
  opt_state, _ = _target(opt_state, None)
  _check_walk(_walk(_unwrap(opt_state)))


def _check_walk(walk) -> None:
  """:func:`check_placement` on the ``(state, ancestors)`` pairs of :func:`_walk`."""
  lookahead = _class_named('optax', 'LookaheadState')
  schedule_free = _class_named('optax.contrib', 'ScheduleFreeState')
  for state, ancestors in walk:
    if type(state) not in _AVERAGING:
      continue
    name = type(state).__name__
    for container, index in ancestors:
      if lookahead is not None and isinstance(container, lookahead):
        warnings.warn(f'{name} sits inside optax.lookahead: it averages the fast weights, and with '
                      'reset_state=True its anchor and counter are wiped at every sync.', stacklevel=2)
      if schedule_free is not None and isinstance(container, schedule_free):
        warnings.warn(f'{name} sits inside optax.contrib.schedule_free: the evaluation params are not '
                      'the averaged ones.', stacklevel=2)
      if type(container) is not tuple:  # optax.chain's state is a plain tuple
        continue
      before, after = container[:index], container[index + 1:]
      if any(isinstance(node, optax.MultiStepsState) for node in before):
        raise ValueError(f'{name} is chained after optax.MultiSteps, so it counts micro-steps and averages '
                         'between accumulations: put it inside, optax.MultiSteps(optax.chain(opt, sfa(...)), k).')
      if schedule_free is not None and any(isinstance(node, schedule_free) for node in before):
        warnings.warn(f'{name} is chained after optax.contrib.schedule_free: it averages the training '
                      'params, but the evaluation params (schedule_free_eval_params) are not averaged.', stacklevel=2)
      if any(not isinstance(node, optax.MaskedState) for node in after):
        warnings.warn(f'{name} is not the last transformation of its chain: what follows it changes the '
                      'update, so the params do not land on the average. Chain it last.', stacklevel=2)


# ---------------------------------------------------------------------------------------------
# Changing the anchored states.


def _with_fields(state: Any, **values: Any) -> Any:
  """``state`` with the named fields set to fresh arrays of their own dtype and shape."""
  return state._replace(**{
      name: jnp.full(jnp.shape(getattr(state, name)), value, getattr(state, name).dtype) for name, value in values.items()
  })


def _set_injected(node: Any, values: dict[str, Any]) -> Any:
  """Sets ``values`` in every ``inject_hyperparams`` state that wraps an anchored state directly.

  ``optax.inject_hyperparams(sfa_jax.sfa)(...)`` passes its copies to the factory at every update,
  so they must change with the state's own fields. An ``inject_hyperparams`` around a whole chain
  keeps its own hyper-parameters (a ``beta`` there may mean something else).
  """
  is_wrapper = lambda child: _is_inject_state(child) and _is_anchored(child.inner_state)

  def visit(child):
    if not is_wrapper(child):
      return child
    hyper = dict(child.hyperparams)
    for name, value in values.items():
      if name in hyper:
        hyper[name] = jnp.full(jnp.shape(hyper[name]), value, jnp.asarray(hyper[name]).dtype)
    return child._replace(hyperparams=hyper)

  return jax.tree.map(visit, node, is_leaf=is_wrapper)


def _give_back(holder: Any, opt_state: Any, new_state: Any) -> Any:
  """The result for what the user passed: the new state, the ``TrainState`` with it, or the optimizer."""
  new_state = _write_back(opt_state, new_state)
  if _is_train_state(holder):
    return holder.replace(opt_state=new_state)
  return holder if holder is not opt_state else new_state


def _replace_states(pure_state: Any, replace: Callable[[Any], Any]) -> Any:
  """``pure_state`` (unwrapped) with every anchored state ``s`` replaced by ``replace(s)``."""
  return jax.tree.map(lambda node: replace(node) if _is_anchored(node) else node, pure_state, is_leaf=_is_anchored)


def _in_anchor_dtypes(anchor: Any, params: Any) -> Any:
  """``params`` with each real floating leaf cast to its anchor's floating dtype where they differ.

  An anchor stored in another dtype than its params (``anchor_dtype=`` of sfa / l2 / ewc: a float32
  anchor for bfloat16 params) takes the new params in its own dtype. Leaves that ``anchor`` masks
  out are cut; anything that does not line up is left for :func:`_validation.fit_to` to name.
  """
  real_float = lambda leaf: _validation.is_float_leaf(leaf) and bool(jnp.issubdtype(jnp.result_type(leaf), jnp.floating))

  def cast(anchor_leaf, leaf):
    if _is_masked_node(anchor_leaf):
      return anchor_leaf
    if real_float(anchor_leaf) and real_float(leaf) and jnp.result_type(leaf) != anchor_leaf.dtype:
      return jnp.asarray(leaf).astype(anchor_leaf.dtype)
    return leaf

  try:
    return jax.tree.map(cast, anchor, params, is_leaf=_is_masked_node)
  except (ValueError, TypeError):
    return params


def reanchor(
    opt_state: Any,
    params: Any = None,
    *,
    fisher: optax.Params | None = None,
    importance: optax.Params | None = None,
    total_steps: int | None = None,
) -> Any:
  """The optimizer state for the next task: every anchor becomes a copy of ``params``.

  Finds every anchored state (SFA, L2, EWC, offline EWC, SI, adaptive SFA, and those taught by
  :func:`register_anchored_state`) anywhere inside ``opt_state`` (chains, ``inject_hyperparams``,
  ``MultiSteps``, ``masked``, ``multi_transform``, any NamedTuple, tuple, list or dict) and sets its
  anchor to a copy of ``params``, cut to that state's own sub-tree (so SFA on a masked group, or
  two SFA groups of a ``multi_transform``, each get their leaves) and cast to the anchor's dtype
  where it was stored in another (``anchor_dtype=``); SFA's step counter restarts at
  0 and every state becomes active (see ``wait_for_anchor``). SI's state turns the finished task's
  path integral into importance (:func:`sfa_jax.si`); offline EWC's adds the task's ``fisher``
  with ``params`` as its end, its anchor becoming the Fisher-weighted mean of the ends
  (:func:`sfa_jax.offline_ewc`). Optimizer moments and other state are left as they are. Call it
  outside ``jit``, between tasks. It also runs :func:`check_placement`.

  With Flax NNX, ``reanchor(optimizer, model)`` changes the optimizer in place (and returns it);
  ``reanchor(optimizer.opt_state, nnx.state(model, nnx.Param))`` does the same to that state. With a
  Flax ``TrainState`` (Linen), ``reanchor(train_state)`` returns it with its optimizer state
  re-anchored at its own params.

  Args:
    opt_state: the state of a transformation containing SFA, L2, EWC or SI; or an
      ``nnx.Optimizer``; or a ``TrainState``.
    params: the parameters at the end of the finished task: the new anchor (finite values); with
      an ``nnx.Optimizer``, the ``nnx.Module``; with a ``TrainState``, ``None`` means its params.
    fisher: for EWC, the new (e.g. online-accumulated) Fisher estimate, ``None`` keeping the old
      one; for offline EWC, the finished task's Fisher, which it adds (required there).
    importance: for SI, the importance Ω to hold from now on instead of the one accumulated (one
      restored after the optimizer state was reset, as the engine does); ``None``: accumulated.
    total_steps: the next task's ``T`` for the states that have one (SFA, adaptive SFA); ``None``
      keeps the current one. ``inject_hyperparams`` states around them get it too.

  Returns:
    The new state, with the same structure as ``opt_state`` (the same object, changed in place,
    for NNX; the new ``TrainState`` for a ``TrainState``).

  Raises:
    ValueError: when ``opt_state`` holds none of these states, ``params`` / ``fisher`` /
      ``importance`` do not match the anchors' structure, shapes and dtypes or hold NaN / infinite
      (or negative: ``fisher``, ``importance``) values, ``fisher``, ``importance`` or
      ``total_steps`` is given but no state takes it, or an offline EWC state gets no ``fisher``.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'w': jnp.zeros(2)}
    >>> sfa = sfa_jax.sfa(p=0.5, beta=0.5, total_steps=10, wait_for_anchor=True)
    >>> tx = optax.chain(optax.adam(1e-3), sfa)
    >>> state = tx.init(params)
    >>> state = sfa_jax.reanchor(state, {'w': jnp.ones(2)}, total_steps=20)
    >>> sfa = sfa_jax.find_state(state)
    >>> sfa.anchor['w'], int(sfa.count), int(sfa.total_steps), bool(sfa.active)
    (Array([1., 1.], dtype=float32), 0, 20, True)
  """
  holder = opt_state
  opt_state, params = _target(opt_state, params)
  if params is None:
    raise TypeError('reanchor needs params, the new anchor: reanchor(opt_state, params).')
  params, fisher, importance = _unwrap(params), _unwrap(fisher), _unwrap(importance)
  if total_steps is not None:
    transforms.check_hyperparams(total_steps=total_steps)
  pure = _unwrap(opt_state)
  walk = list(_walk(pure))
  _check_reanchor_arguments([state for state, _ in walk], fisher, importance, total_steps)
  _validation.check_finite_tree(params, 'params')
  for name, tree in (('fisher', fisher), ('importance', importance)):
    if tree is not None:
      _validation.check_finite_tree(tree, name, non_negative=True)
  _check_walk(walk)

  def replace(state):
    fitted = _validation.fit_to(state.anchor, _in_anchor_dtypes(state.anchor, params), reference_name='anchor', other_name='params')
    new = _with_given_trees(_RULES[type(state)](state, fitted), state, fitted, fisher, importance)
    fields = {'active': True} if 'active' in new._fields else {}
    if total_steps is not None and 'total_steps' in new._fields:
      fields['total_steps'] = total_steps
    return _with_fields(new, **fields)

  new_state = _replace_states(pure, replace)
  if total_steps is not None:
    new_state = _set_injected(new_state, {'total_steps': total_steps})
  return _give_back(holder, opt_state, new_state)


def _check_reanchor_arguments(states: list[Any], fisher: Any, importance: Any, total_steps: Any) -> None:
  """Raises ``ValueError`` unless :func:`reanchor`'s trees and ``total_steps`` fit the ``states`` it found."""
  if not states:
    raise ValueError('reanchor found no SFAState, L2State, EWCState or other anchored state inside opt_state.')
  if fisher is not None and not any(isinstance(state, (EWCState, OfflineEWCState)) for state in states):
    raise ValueError('reanchor got a fisher, but opt_state holds no EWCState or OfflineEWCState.')
  if fisher is None and any(isinstance(state, OfflineEWCState) for state in states):
    raise ValueError("offline EWC adds the finished task's Fisher: reanchor(opt_state, params, fisher=F).")
  if importance is not None and not any(isinstance(state, SIState) for state in states):
    raise ValueError('reanchor got an importance, but opt_state holds no SIState.')
  if total_steps is not None and not any('total_steps' in state._fields for state in states):
    raise ValueError('reanchor got total_steps, but no state inside opt_state has a total_steps (only SFA does).')


def _with_given_trees(new: Any, state: Any, params: Any, fisher: Any, importance: Any) -> Any:
  """``new`` (the next task's ``state`` by its rule) with :func:`reanchor`'s ``fisher`` and
  ``importance``: EWC's Fisher replaced, offline EWC's task added at ``params``, SI's importance set."""
  if fisher is not None and isinstance(new, (EWCState, OfflineEWCState)):
    fitted = _validation.fit_to(state.fisher, fisher, reference_name="the state's fisher", other_name='fisher')
    if isinstance(new, EWCState):
      return new._replace(fisher=_validation.copy_tree(fitted))
    total, mean = fisher_lib.offline_fisher(state.fisher, state.anchor, fitted, params)
    return new._replace(fisher=total, anchor=mean)
  if importance is not None and isinstance(new, SIState):
    fitted = _validation.fit_to(state.importance, _in_anchor_dtypes(state.importance, importance),
                                reference_name="the state's importance", other_name='importance')
    return new._replace(importance=_validation.copy_tree(fitted))
  return new


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
  """The state with hyper-parameters changed in every anchored state that has them.

  SFA's ``p``, ``beta`` and ``total_steps``, the penalties' ``strength``, SI's ``damping`` and
  adaptive SFA's ``threshold`` and ``min_p`` live in the state; this sets them (checked as the factories check
  them), and in the ``inject_hyperparams`` states around them. It works inside ``jit`` too (traced
  values are checked for their shape only). For NNX the state is changed in place.

  Args:
    opt_state: an optimizer state, or an ``nnx.Optimizer``.
    **values: hyper-parameter names and their new (0-d) values.

  Returns:
    The new state (for NNX the same object, changed in place).

  Raises:
    TypeError / ValueError: for a bad value, or a name that no anchored state inside has.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=10))
    >>> state = sfa_jax.set_hyperparams(tx.init({'w': jnp.zeros(2)}), beta=0.25)
    >>> float(sfa_jax.find_state(state).beta)
    0.25
  """
  transforms.check_hyperparams(**values)
  holder = opt_state
  opt_state, _ = _target(opt_state, None)
  missing = set(values)

  def replace(state):
    names = {name: value for name, value in values.items() if name in state._fields}
    missing.difference_update(names)
    return _with_fields(state, **names)

  new_state = _replace_states(_unwrap(opt_state), replace)
  if missing:
    raise ValueError(f'set_hyperparams: no anchored state inside opt_state has {sorted(missing)}.')
  return _give_back(holder, opt_state, _set_injected(new_state, values))
