"""Parameter-efficient SFA: train and anchor only a subset of the parameters.

A boolean *mask* (a tree like the params, or a prefix of it, ``True`` where a leaf trains; the
convention of ``optax.masked``) splits the params in two trees of the same structure, each with
``optax.MaskedNode`` where the other holds the leaf:

* :func:`split_trainable` / :func:`merge_trainable` cut the params and put them back together (a
  tree operation: no array is copied);
* :func:`trainable_value_and_grad` differentiates a loss of the whole params with respect to the
  trainable tree only, so the frozen leaves' gradients are never formed;
* the optimizer is then an ordinary chain on the trainable tree, ``optax.chain(optax.adam(lr),
  sfa_jax.sfa(...))``: its moments and SFA's, L2's or EWC's anchor hold the trainable leaves alone
  (``MaskedNode`` elsewhere), so the anchor costs the trainable bytes, not the model's;
* :func:`train_only` is the same optimizer for a loop that keeps one params tree,
  ``optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)``: the same states,
  but the loop computes (and discards) the frozen leaves' gradients.

:func:`path_mask` builds a mask from leaf paths (``'top_layers'``, ``'norm'``, ``'layers/.*/kernel'``);
for a Llama decoder, :func:`sfa_jax.models.llama.train_top_layers` selects the top blocks (and the
final norm and an untied output layer).

:func:`sfa_jax.reanchor` works on both: ``reanchor(opt_state, trainable)`` or, for
:func:`train_only`, ``reanchor(opt_state, params)``; the params are cut to each anchor's leaves.

Example: a train step that differentiates the trainable leaves only.

  >>> import jax, jax.numpy as jnp, optax, sfa_jax
  >>> from sfa_jax import partial
  >>> params = {'body': {'w': jnp.ones((3, 3))}, 'head': {'w': jnp.ones((3, 2))}}
  >>> mask = partial.path_mask(params, 'head')  # only the head trains
  >>> trainable, frozen = partial.split_trainable(params, mask)
  >>> tx = optax.chain(optax.adam(1e-2), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4))
  >>> opt_state = tx.init(trainable)  # moments and anchor: the head only
  >>> loss = lambda p, x: jnp.sum((x @ p['body']['w'] @ p['head']['w']) ** 2)
  >>> grad = partial.trainable_value_and_grad(loss)
  >>> @jax.jit
  ... def step(trainable, opt_state, frozen, x):
  ...   value, grads = grad(trainable, frozen, x)
  ...   updates, opt_state = tx.update(grads, opt_state, trainable)
  ...   return optax.apply_updates(trainable, updates), opt_state, value
  >>> for _ in range(4):
  ...   trainable, opt_state, value = step(trainable, opt_state, frozen, jnp.ones((2, 3)))
  >>> sfa_jax.find_state(opt_state).anchor['body']
  {'w': MaskedNode()}
  >>> params = partial.merge_trainable(trainable, frozen)     # the whole model again
  >>> bool(jnp.all(params['body']['w'] == 1.0)), bool(jnp.all(params['head']['w'] < 1.0))
  (True, True)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

_TRAIN = 'train'
_FROZEN = 'frozen'
"""The labels :func:`train_only` gives the trainable and the frozen leaves (its ``multi_transform`` groups)."""


def _is_masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """A JAX key path as ``'a/b/0'`` (dict keys, attribute names and sequence indices joined by ``/``).

  Args:
    path: a key path from ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The string.

  Example:
    >>> import jax
    >>> leaves, _ = jax.tree_util.tree_flatten_with_path({'a': [1, {'b': 2}]})
    >>> [path_string(path) for path, _ in leaves]
    ['a/0', 'a/1/b']
  """
  return '/'.join(_key_name(key) for key in path)


def path_mask(params: Any, patterns: str | Sequence[str]) -> Any:
  """``True`` on the leaves whose path matches one of ``patterns``, ``False`` elsewhere.

  A leaf's path is its keys joined by ``/`` (``'layers/attention/query/kernel'``, see
  :func:`path_string`). A pattern is a regular expression for the path or for a leading part of
  it ending at a ``/``: ``'norm'`` selects ``norm/scale`` but not ``layers/attention_norm/scale``;
  ``'layers/.*/kernel'`` every kernel under ``layers``.

  Args:
    params: the params (arrays, ``jax.ShapeDtypeStruct`` or anything with leaves).
    patterns: one pattern or several.

  Returns:
    A tree of Python bools with the structure of ``params`` (``optax.MaskedNode`` kept as it is).

  Raises:
    TypeError: if ``patterns`` is not a string or a sequence of strings (``None``, a number, a
      set, an empty sequence).
    ValueError: if a pattern is not a valid regular expression or matches no leaf (the message
      lists some of the paths there are).

  Example:
    >>> import jax.numpy as jnp
    >>> norm = {'scale': jnp.ones(2)}
    >>> params = {'layers': {'attention_norm': norm}, 'norm': norm}
    >>> path_mask(params, 'norm')
    {'layers': {'attention_norm': {'scale': False}}, 'norm': {'scale': True}}
  """
  if not isinstance(patterns, (str, Sequence)):
    raise TypeError(f'patterns must be a string or a sequence of strings; got {type(patterns).__name__} {patterns!r}.')
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  if not patterns or not all(isinstance(pattern, str) for pattern in patterns):
    raise TypeError(f'patterns must be a string or a sequence of strings; got {patterns!r}.')
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(f'(?:{pattern})(?:/.*)?'))
    except re.error as error:
      raise ValueError(f'patterns: {pattern!r} is not a regular expression ({error}).') from error
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
  paths = [path_string(path) for path, _ in leaves]
  for pattern, regex in zip(patterns, compiled):
    if not any(regex.fullmatch(path) for path, (_, leaf) in zip(paths, leaves) if not _is_masked(leaf)):
      raise ValueError(f'patterns: {pattern!r} matches no leaf of params; its paths include {paths[:8]}.')
  flags = [leaf if _is_masked(leaf) else any(regex.fullmatch(path) for regex in compiled)
           for path, (_, leaf) in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, flags)


def _resolve(mask: Any, params: Any) -> Any:
  """``mask`` (a bool tree, a prefix of ``params``, or a callable ``params -> tree``) checked."""
  if callable(mask):
    mask = mask(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_masked)
  for path, flag in flat:
    if not _is_masked(flag) and not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f'mask{jax.tree_util.keystr(path)} must be True or False; got {flag!r}.')
  try:
    jax.tree.map(lambda *_: None, mask, params, is_leaf=_is_masked)
  except (ValueError, TypeError) as error:
    raise ValueError(f'mask must have the tree structure of params (or a prefix of it): {error}') from error
  return mask


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
  """``(trainable, frozen)``: the params cut by ``mask``, ``optax.MaskedNode`` where a tree lacks a leaf.

  Each tree has an ``optax.MaskedNode`` at every leaf the other holds (what ``optax.masked`` hands
  its inner transformation, for a mask of leaves), so both keep the structure of ``params`` and
  :func:`merge_trainable` puts them back together. No array is copied.

  Args:
    params: the whole params.
    mask: ``True`` where a leaf trains: a tree of bools like ``params`` or a prefix of it (a
      ``True`` on a sub-tree selects all of it), or a function ``params -> mask`` (as
      :func:`path_mask` with its patterns bound).

  Returns:
    The two trees.

  Raises:
    TypeError: if a mask leaf is not a bool.
    ValueError: if ``mask`` does not line up with ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'a': jnp.zeros(2), 'b': jnp.ones(2)}
    >>> trainable, frozen = split_trainable(params, {'a': False, 'b': True})
    >>> trainable['a'], frozen['b']
    (MaskedNode(), MaskedNode())
  """
  mask = _resolve(mask, params)
  cut = lambda sub: jax.tree.map(lambda _: optax.MaskedNode(), sub, is_leaf=_is_masked)  # one MaskedNode a leaf
  keep = lambda flag, sub, wanted: sub if _is_masked(flag) or bool(flag) == wanted else cut(sub)
  trainable = jax.tree.map(lambda flag, sub: keep(flag, sub, True), mask, params, is_leaf=_is_masked)
  frozen = jax.tree.map(lambda flag, sub: keep(flag, sub, False), mask, params, is_leaf=_is_masked)
  return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
  """The whole params from :func:`split_trainable`'s two trees (no array is copied).

  Args:
    trainable: the trainable tree (e.g. after some optimizer steps).
    frozen: the frozen tree.

  Returns:
    One tree: each leaf from the tree that holds it.

  Raises:
    ValueError: if the trees do not line up, or a leaf is held by both.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'a': jnp.zeros(2), 'b': jnp.ones(2)}
    >>> merged = merge_trainable(*split_trainable(params, {'a': False, 'b': True}))
    >>> merged['a'], merged['b']
    (Array([0., 0.], dtype=float32), Array([1., 1.], dtype=float32))
  """

  def pick(path, left, right):
    if _is_masked(left):
      return right
    if _is_masked(right):
      return left
    where = jax.tree_util.keystr(path) or '<root>'
    raise ValueError(f'merge_trainable: params{where} is held by both trees; pass the two trees of one split_trainable.')

  try:
    return jax.tree_util.tree_map_with_path(pick, trainable, frozen, is_leaf=_is_masked)
  except (ValueError, TypeError) as error:
    if 'merge_trainable' in str(error):
      raise
    raise ValueError(f'merge_trainable: trainable and frozen do not have one structure: {error}') from error


def trainable_value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """``jax.value_and_grad`` of ``loss_fn(params, ...)`` with respect to the trainable leaves only.

  The returned function takes ``(trainable, frozen, *args, **kwargs)``, calls
  ``loss_fn(merge_trainable(trainable, frozen), *args, **kwargs)`` and differentiates it with
  respect to ``trainable`` alone: ``frozen`` is a constant of the computation, so XLA never forms
  the frozen leaves' gradients (nor keeps what only they would need).

  Args:
    loss_fn: ``(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with ``has_aux``), a
      function of the whole params.
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    ``(trainable, frozen, *args, **kwargs) -> (value, grads)``, ``grads`` with the structure of
    ``trainable``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'a': jnp.ones(2), 'b': jnp.full(2, 3.0)}
    >>> trainable, frozen = split_trainable(params, {'a': True, 'b': False})
    >>> loss = lambda p: jnp.sum(p['a'] * p['b'])
    >>> value, grads = trainable_value_and_grad(loss)(trainable, frozen)
    >>> float(value), grads['a'], grads['b']
    (6.0, Array([3., 3.], dtype=float32), MaskedNode())
  """

  def value_and_grad(trainable, frozen, *args, **kwargs):
    of_trainable = lambda t: loss_fn(merge_trainable(t, frozen), *args, **kwargs)
    return jax.value_and_grad(of_trainable, has_aux=has_aux)(trainable)

  return value_and_grad


def train_only(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformationExtraArgs:
  """``tx`` on the leaves ``mask`` selects, zero updates (and no state) on the others.

  ``optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)``: the optimizer
  of a loop that keeps the whole params in one tree. ``tx``'s state (Adam's moments, SFA's, L2's
  or EWC's anchor, EWC's Fisher) holds the trainable leaves alone, ``optax.MaskedNode`` elsewhere,
  and :func:`sfa_jax.reanchor` ``(opt_state, params)`` cuts the params to them. The frozen leaves'
  gradients are still formed by the loop's ``jax.grad`` (and their zero updates added): a step
  built on :func:`split_trainable` and :func:`trainable_value_and_grad` does not form them.

  Args:
    tx: the optimizer for the trainable leaves, e.g. ``optax.chain(optax.adam(lr), sfa(...))``
      (SFA last) or ``optax.chain(l2(...), optax.adam(lr))``.
    mask: ``True`` where a leaf trains (see :func:`split_trainable`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, sfa_jax
    >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> sfa = sfa_jax.sfa(p=1.0, beta=0.5, total_steps=1)
    >>> tx = train_only(optax.chain(optax.sgd(0.5), sfa), {'body': False, 'head': True})
    >>> state = tx.init(params)
    >>> grads = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> new['body'], new['head']   # the head lands on 0.5 * 1 + 0.5 * (1 - 0.5)
    (Array([1., 1., 1.], dtype=float32), Array([0.75, 0.75], dtype=float32))
  """

  def labels(params):
    return jax.tree.map(lambda flag: _TRAIN if flag else _FROZEN, _resolve(mask, params))

  return optax.multi_transform({_TRAIN: tx, _FROZEN: optax.set_to_zero()}, labels)
