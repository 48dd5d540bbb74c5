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
import optax

from sfa_jax import _lazy


def is_traced(value: Any) -> bool:
  """True when ``value`` is a JAX tracer, whose concrete value is unknown."""
  return isinstance(value, jax.core.Tracer)


INT32_MAX = 2**31 - 1


def _describe(value: Any) -> str:
  """``value`` for an error message: its repr, or its shape and dtype when it is an array."""
  if hasattr(value, 'shape') and hasattr(value, 'dtype') and np.ndim(value) > 0:
    return f'an array of shape {tuple(np.shape(value))} and dtype {value.dtype}'
  return repr(value)


def concrete_float(name: str, value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced (its value is unknown yet).

  Accepts a Python ``int`` or ``float``, a NumPy number, or a 0-d NumPy / JAX array of a real
  numeric dtype; a tracer must be 0-d too (its shape is known even when its value is not).

  Args:
    name: the argument's name, used in the message.
    value: the value to check.

  Raises:
    TypeError: when ``value`` is a string, a bool, ``None``, a complex number or any other
      non-number, or an array with one or more dimensions.
  """
  dtype = getattr(value, 'dtype', None)
  if isinstance(value, bool) or (dtype is not None and np.dtype(dtype) == np.bool_):
    raise TypeError(f'{name} must be a number; got the bool {value!r}.')
  if dtype is not None:
    if np.ndim(value) != 0:
      raise TypeError(f'{name} must be a scalar (a 0-d number); got {_describe(value)}.')
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
      raise TypeError(f'{name} must be a real number; got dtype {dtype}.')
    if is_traced(value):
      return None
    return float(np.asarray(value))
  if isinstance(value, (int, float)):
    return float(value)
  raise TypeError(f'{name} must be a number; got {type(value).__name__} {value!r}.')


def check_in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raises unless ``value`` is a scalar number in the interval from ``low`` to ``high``.

  Args:
    name: the argument's name, used in the message.
    value: a number or a 0-d array; a traced value is checked for its shape only.
    low: lower bound.
    high: upper bound.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.

  Raises:
    TypeError: when ``value`` is not a scalar number (see :func:`concrete_float`).
    ValueError: when it lies outside the interval or is NaN.
  """
  number = concrete_float(name, value)
  if number is None:
    return
  left = '(' if low_open else '['
  right = ')' if high_open else ']'
  too_low = number <= low if low_open else number < low
  too_high = number >= high if high_open else number > high
  if math.isnan(number) or too_low or too_high:
    raise ValueError(f'{name} must lie in {left}{low}, {high}{right}; got {value!r}.')


def check_non_negative(name: str, value: Any) -> None:
  """Raises unless ``value`` is a finite scalar number >= 0 (traced values: shape only)."""
  check_in_interval(name, value, 0.0, math.inf, high_open=True)


def check_finite(name: str, value: Any) -> None:
  """Raises unless ``value`` is a finite scalar number (traced values: shape only)."""
  number = concrete_float(name, value)
  if number is not None and not math.isfinite(number):
    raise ValueError(f'{name} must be a finite number; got {value!r}.')


def check_positive_int(name: str, value: Any) -> None:
  """Raises unless ``value`` is an integer in [1, 2**31 - 1] (the int32 step counters' range).

  Traced values are checked for their shape only.
  """
  number = concrete_float(name, value)
  if number is None:
    return
  if not number.is_integer() or number < 1:
    raise ValueError(f'{name} must be an integer >= 1; got {value!r}.')
  if number > INT32_MAX:
    raise ValueError(f'{name} must be at most 2**31 - 1 = {INT32_MAX} (int32 step counters); got {value!r}.')


def check_int(name: str, value: Any, low: int = 1, high: int = INT32_MAX) -> None:
  """Raises unless ``value`` is a Python or NumPy integer (not a bool, not a float) in [low, high].

  For the sizes that shape arrays and loops (batch sizes, epochs, steps) and for seeds, where
  ``32.0`` or ``True`` would fail deep inside NumPy or JAX.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an integer; got {type(value).__name__} {value!r}.')
  if not low <= value <= high:
    raise ValueError(f'{name} must be an integer in [{low}, {high}]; got {value!r}.')


def check_full_precision(name: str, value: Any) -> None:
  """Raises when ``value`` is a floating array narrower than float32 (bfloat16, float16).

  A period such as ``p`` rounded to bfloat16 changes where the averages fall (0.35 becomes 0.3496:
  ``p·T = 3.496`` rounds to 3 instead of 4), so the schedule would depend on the params' dtype.
  ``optax.inject_hyperparams`` casts hyper-parameters to the params' dtype unless told otherwise.
  """
  dtype = getattr(value, 'dtype', None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and np.dtype(dtype).itemsize < 4:
    raise ValueError(
        f'{name} arrived as {np.dtype(dtype).name}, which moves the averaging schedule ({name} sets where '
        'the averages fall). Under optax.inject_hyperparams pass hyperparam_dtype=jnp.float32, or '
        f"static_args=('{name}',)."
    )


def check_finite_tree(tree: Any, name: str, *, non_negative: bool = False) -> None:
  """Raises ``ValueError`` naming the first floating leaf with a NaN or infinite entry.

  Checked once, on device, by one program for the whole tree (no host copy of the arrays); traced
  leaves (inside ``jit``) are skipped.

  Args:
    tree: a pytree of arrays (an anchor, a Fisher estimate, a model to merge).
    name: how ``tree`` is called in the message.
    non_negative: also refuse negative entries (a Fisher estimate).
  """
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not is_traced(leaf) and is_float_leaf(leaf)]
  if not leaves:
    return
  with jax.ensure_compile_time_eval():  # also when called inside a trace on concrete leaves
    flags = _bad_entries([leaf for _, leaf in leaves])
  for (path, _), (bad, negative) in zip(leaves, jax.device_get(flags)):  # one transfer for all leaves
    where = jax.tree_util.keystr(path) or '<root>'
    if bad:
      raise ValueError(f'{name}{where} has NaN or infinite entries.')
    if negative and non_negative:
      raise ValueError(f'{name}{where} has negative entries.')


# Booleans, exact at any optimisation level (compiled several times faster so). Both flags always:
# one program serves both kinds of check.
@_lazy.jit(compiler_options=_lazy.EXACT)
def _bad_entries(leaves: list[Any]) -> list[tuple[jax.Array, jax.Array]]:
  """For each leaf: whether it holds a NaN or infinite entry, and whether it holds a negative one."""
  return [(~jnp.all(jnp.isfinite(leaf)), jnp.any(leaf < 0)) for leaf in leaves]


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


def fit_to(reference: Any, other: Any, *, reference_name: str, other_name: str) -> Any:
  """``other`` cut to the structure of ``reference``, then checked as :func:`check_matching_tree` does.

  Where ``reference`` has an ``optax.MaskedNode`` (a leaf or sub-tree that ``optax.masked`` or
  ``optax.multi_transform`` left out of a group), ``other`` gets one too: a full params tree then
  fits the state of a masked group.

  Where ``reference`` is one vector and ``other`` a tree (the state of a transformation inside
  ``optax.flatten``), ``other`` is flattened as ``optax.flatten`` does: its leaves raveled and
  concatenated in tree order.

  Returns:
    The cut tree.
  """
  if isinstance(reference, jax.Array) and reference.ndim == 1 and jax.tree.structure(other).num_nodes > 1:
    other = jnp.concatenate([jnp.reshape(leaf, -1) for leaf in jax.tree.leaves(other)])
  is_masked = lambda node: isinstance(node, optax.MaskedNode)
  try:
    other = jax.tree.map(lambda node, leaf: node if is_masked(node) else leaf, reference, other, is_leaf=is_masked)
  except (ValueError, TypeError):
    pass  # the check below names what does not match
  check_matching_tree(reference, other, reference_name=reference_name, other_name=other_name)
  return other


def _dtype(leaf: Any) -> Any:
  """The dtype ``leaf`` has as a JAX array: a NumPy float64 array or a Python float is float32
  unless ``jax_enable_x64`` is on (``jnp.asarray`` and the copies made of it canonicalise it so)."""
  dtype = getattr(leaf, 'dtype', None)
  dtype = dtype if dtype is not None else np.asarray(leaf).dtype
  if isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    return dtype
  return jax.dtypes.canonicalize_dtype(dtype)


def copy_tree(tree: Any) -> Any:
  """A copy of every array leaf, so that the copy and the original can both be donated.

  One program for the whole tree. Sharding is kept: the copy of a committed array has its sharding.
  """
  return _copies(tree)


@_lazy.jit(compiler_options=_lazy.EXACT)  # copies: the same at any optimisation level
def _copies(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)
