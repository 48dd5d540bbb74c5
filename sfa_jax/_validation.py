"""Eager argument checks shared by the transforms, the Fisher estimators and the merges.

Every check runs on concrete Python or array values at construction or ``init`` time and raises a
``ValueError`` whose message names the argument and, for trees, the offending leaf path. Values that
are JAX tracers (hyper-parameters injected by ``optax.inject_hyperparams`` and traced under ``jit`` or
``vmap``) cannot be inspected and are let through: they were checked when first set.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value: Any) -> bool:
  """True when ``value`` is a JAX tracer, whose concrete value is unknown."""
  return isinstance(value, jax.core.Tracer)


def concrete_float(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced or not a scalar."""
  if is_traced(value) or callable(value):
    return None
  array = np.asarray(value)
  if array.ndim != 0:
    return None
  return float(array)


def check_in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``value`` lies in the interval from ``low`` to ``high``.

  Args:
    name: the argument's name, used in the message.
    value: a number, a 0-d array, a traced value (not checked) or a schedule (not checked).
    low: lower bound.
    high: upper bound.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
  """
  number = concrete_float(value)
  if number is None:
    return
  left = '(' if low_open else '['
  right = ')' if high_open else ']'
  too_low = number <= low if low_open else number < low
  too_high = number >= high if high_open else number > high
  if math.isnan(number) or too_low or too_high:
    raise ValueError(f'{name} must lie in {left}{low}, {high}{right}; got {value!r}.')


def check_non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` if ``value`` is negative or NaN (traced values are not checked)."""
  check_in_interval(name, value, 0.0, math.inf, high_open=True)


def check_positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= 1 (traced values are not checked)."""
  number = concrete_float(value)
  if number is None:
    return
  if not float(number).is_integer() or number < 1:
    raise ValueError(f'{name} must be an integer >= 1; got {value!r}.')


def is_float_leaf(leaf: Any) -> bool:
  """Whether ``leaf`` holds real or complex floating values (integer and PRNG-key leaves do not)."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None:
    return isinstance(leaf, float)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return False
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def check_matching_tree(
    reference: Any,
    other: Any,
    *,
    reference_name: str,
    other_name: str,
    check_dtypes: bool = True,
) -> None:
  """Raises ``ValueError`` unless ``other`` has the structure, shapes and dtypes of ``reference``.

  Args:
    reference: the tree that defines the expected layout (usually the params).
    other: the tree to check (an anchor, a Fisher estimate, a model to merge).
    reference_name: how ``reference`` is called in the message.
    other_name: how ``other`` is called in the message.
    check_dtypes: also require equal dtypes leaf by leaf.
  """
  ref_paths = jax.tree_util.tree_flatten_with_path(reference)[0]
  other_paths = jax.tree_util.tree_flatten_with_path(other)[0]
  ref_keys = [jax.tree_util.keystr(path) for path, _ in ref_paths]
  other_keys = [jax.tree_util.keystr(path) for path, _ in other_paths]
  if ref_keys != other_keys:
    missing = [k for k in ref_keys if k not in set(other_keys)]
    extra = [k for k in other_keys if k not in set(ref_keys)]
    detail = []
    if missing:
      detail.append(f'missing leaves {missing[:5]}')
    if extra:
      detail.append(f'unexpected leaves {extra[:5]}')
    if not detail:
      detail.append('same leaves in a different order or container type')
    raise ValueError(
        f'{other_name} does not have the tree structure of {reference_name}: '
        + '; '.join(detail)
        + f'. {reference_name}: {jax.tree.structure(reference)}; '
        f'{other_name}: {jax.tree.structure(other)}.'
    )
  if jax.tree.structure(reference) != jax.tree.structure(other):
    raise ValueError(
        f'{other_name} has the leaf paths of {reference_name} but other container types: '
        f'{jax.tree.structure(other)} vs {jax.tree.structure(reference)}.'
    )
  for (path, ref_leaf), (_, other_leaf) in zip(ref_paths, other_paths):
    where = jax.tree_util.keystr(path) or '<root>'
    ref_shape, other_shape = np.shape(ref_leaf), np.shape(other_leaf)
    if ref_shape != other_shape:
      raise ValueError(
          f'{other_name}{where} has shape {other_shape}, but {reference_name}{where} '
          f'has shape {ref_shape}.'
      )
    if check_dtypes:
      ref_dtype = _dtype(ref_leaf)
      other_dtype = _dtype(other_leaf)
      if ref_dtype != other_dtype:
        raise ValueError(
            f'{other_name}{where} has dtype {other_dtype}, but {reference_name}{where} '
            f'has dtype {ref_dtype}.'
        )


def _dtype(leaf: Any) -> Any:
  dtype = getattr(leaf, 'dtype', None)
  return dtype if dtype is not None else np.asarray(leaf).dtype


def copy_tree(tree: Any) -> Any:
  """A copy of every array leaf, so that the copy and the original can both be donated.

  Sharding is kept: ``jnp.copy`` of a committed array returns an array with the same sharding.
  """
  return jax.tree.map(jnp.copy, tree)
