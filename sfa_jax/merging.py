"""Post-hoc model merges over pytrees: WiSE-FT interpolation, task arithmetic and TIES.

Every merge is a pure function of pytrees, computed leaf by leaf in float32 and cast back to each
leaf's dtype, and works under ``jax.jit`` (``beta`` and ``scaling`` may be traced; TIES's
``density`` and ``trim`` are static). Only floating-point leaves are merged: integer and PRNG-key
leaves are taken unchanged from the most recent model (``params`` for :func:`interpolate`, the last
fine-tuned model for :func:`task_arithmetic` and :func:`ties`).

Trees must match in structure, shapes and dtypes; a mismatch raises ``ValueError`` naming the leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from sfa_jax import _validation

TRIM_SCOPES = ('per_tensor', 'global')


def _merge_float_leaves(fn, reference: Any, *trees: Any) -> Any:
  """``fn(*float32 leaves)`` cast to the reference leaf's dtype; other leaves from the last tree."""

  def leaf_fn(ref_leaf, *leaves):
    if not _validation.is_float_leaf(ref_leaf):
      return leaves[-1]
    result = fn(*(jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)) for x in leaves))
    return result.astype(jnp.asarray(ref_leaf).dtype)

  return jax.tree.map(leaf_fn, reference, *trees)


def _check_models(base: Any, models: Sequence[Any], name: str) -> list[Any]:
  if isinstance(models, dict) or not isinstance(models, Sequence):
    raise ValueError(f'{name} must be a list or tuple of pytrees; got {type(models).__name__}.')
  if not models:
    raise ValueError(f'{name} is empty: give at least one fine-tuned model.')
  for i, model in enumerate(models):
    _validation.check_matching_tree(base, model, reference_name='base', other_name=f'{name}[{i}]')
  return list(models)


def interpolate(anchor: Any, params: Any, beta: chex.Numeric) -> Any:
  r"""WiSE-FT: the weighted average :math:`\beta\,\theta_{anchor} + (1-\beta)\,\theta`.

  ``beta`` is the weight of the anchor (the base, or the model before fine-tuning), as SFA's
  ``beta``; WiSE-FT's :math:`\alpha`, the weight of the fine-tuned model, is ``1 - beta``. SFA with
  ``p = 1`` applies exactly this at the end of each task.

  Args:
    anchor: the base or previous model.
    params: the fine-tuned model; same structure, shapes and dtypes.
    beta: in [0, 1]; may be traced.

  Returns:
    The interpolated tree.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> merging.interpolate({'w': jnp.zeros(2)}, {'w': jnp.array([2.0, 4.0])}, 0.25)['w']
    Array([1.5, 3. ], dtype=float32)

  References:
    Wortsman et al, `Robust fine-tuning of zero-shot models <https://arxiv.org/abs/2109.01903>`_, 2022
  """
  _validation.check_in_interval('beta', beta, 0.0, 1.0)
  _validation.check_matching_tree(anchor, params, reference_name='anchor', other_name='params')
  return _merge_float_leaves(lambda a, p: beta * a + (1 - beta) * p, anchor, anchor, params)


def task_vectors(base: Any, finetuned_models: Sequence[Any]) -> list[Any]:
  r"""The task vectors :math:`\tau_k = \theta_k - \theta_{base}` (float leaves; others from :math:`\theta_k`).

  Args:
    base: the model all fine-tuned models started from.
    finetuned_models: a list of models with the base's structure, shapes and dtypes.

  Returns:
    A list of trees, one per model.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> merging.task_vectors({'w': jnp.ones(2)}, [{'w': jnp.array([3.0, 0.0])}])[0]['w']
    Array([ 2., -1.], dtype=float32)
  """
  models = _check_models(base, finetuned_models, 'finetuned_models')
  return [_merge_float_leaves(lambda b, m: m - b, base, base, model) for model in models]


def task_arithmetic(base: Any, finetuned_models: Sequence[Any], scaling: chex.Numeric) -> Any:
  r"""Task arithmetic: :math:`\theta_{base} + \lambda\sum_k(\theta_k - \theta_{base})`.

  Args:
    base: the model all fine-tuned models started from.
    finetuned_models: a list of fine-tuned models.
    scaling: :math:`\lambda \ge 0`; may be traced.

  Returns:
    The merged tree.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> models = [{'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([0.0, 3.0])}]
    >>> merging.task_arithmetic({'w': jnp.zeros(2)}, models, 0.5)['w']
    Array([0.5, 1.5], dtype=float32)

  References:
    Ilharco et al, `Editing models with task arithmetic <https://arxiv.org/abs/2212.04089>`_, 2023
  """
  _validation.check_non_negative('scaling', scaling)
  models = _check_models(base, finetuned_models, 'finetuned_models')
  return _merge_float_leaves(
      lambda b, *ms: b + scaling * sum(m - b for m in ms), base, base, *models
  )


def _keep_count(size: int, density: float) -> int:
  """Entries kept out of ``size`` at ``density``: ``floor(density·size)``, at least 1."""
  return max(1, int(density * size))


def _top_magnitude_mask(values: jax.Array, density: float) -> jax.Array:
  """True on the ``_keep_count`` entries of largest magnitude (ties to the lower flat index)."""
  flat = jnp.abs(values).reshape(-1)
  keep = _keep_count(flat.size, density)
  if keep >= flat.size:
    return jnp.ones(values.shape, bool)
  _, indices = jax.lax.top_k(flat, keep)
  return jnp.zeros(flat.size, bool).at[indices].set(True).reshape(values.shape)


def trim_by_magnitude(vector: Any, density: float, *, trim: str = 'per_tensor') -> Any:
  """Zeroes all but the ``density`` fraction of largest-magnitude entries of a (task) vector.

  ``trim='per_tensor'`` keeps ``max(1, floor(density·n))`` entries of each float leaf of ``n``
  entries, as mergekit's ``magnitude`` sparsification does (mergekit refuses a tensor where that
  count is 0; here it keeps 1). ``trim='global'`` ranks the entries of all float leaves together, as
  the TIES paper does: large layers can then keep more than ``density`` of their entries and small
  ones less. Magnitude ties at the threshold are broken toward the lower flat index, so exactly the
  stated count is kept (the global ranking gathers every leaf: it is not sharding-transparent).

  Args:
    vector: a pytree, e.g. a task vector.
    density: the fraction kept, in (0, 1]; 1 keeps everything. Static.
    trim: ``'per_tensor'`` or ``'global'``.

  Returns:
    The trimmed tree (non-float leaves unchanged).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> merging.trim_by_magnitude({'w': jnp.array([0.1, -3.0, 2.0, -0.5])}, 0.5)['w']
    Array([ 0., -3.,  2.,  0.], dtype=float32)
  """
  _validation.check_in_interval('density', density, 0.0, 1.0, low_open=True)
  if _validation.concrete_float(density) is None:
    raise ValueError('density must be a concrete number: it sets how many entries are kept.')
  if trim not in TRIM_SCOPES:
    raise ValueError(f'trim must be one of {list(TRIM_SCOPES)}; got {trim!r}.')
  if trim == 'per_tensor':
    return jax.tree.map(
        lambda v: jnp.where(_top_magnitude_mask(v, density), v, 0) if _validation.is_float_leaf(v) else v, vector
    )
  leaves, treedef = jax.tree.flatten(vector)
  floats = [i for i, leaf in enumerate(leaves) if _validation.is_float_leaf(leaf)]
  flat = jnp.concatenate([jnp.ravel(leaves[i]).astype(jnp.float32) for i in floats])
  mask = _top_magnitude_mask(flat, density)
  offset = 0
  for i in floats:
    size = leaves[i].size
    leaves[i] = jnp.where(mask[offset : offset + size].reshape(leaves[i].shape), leaves[i], 0)
    offset += size
  return jax.tree.unflatten(treedef, leaves)


def ties(
    base: Any,
    finetuned_models: Sequence[Any],
    density: float,
    scaling: chex.Numeric = 1.0,
    *,
    trim: str = 'per_tensor',
) -> Any:
  r"""TIES merging: trim, elect sign, disjoint mean, then add to the base.

  1. Task vectors :math:`\tau_k = \theta_k - \theta_{base}`, each trimmed to its ``density``
     fraction of largest magnitudes (:func:`trim_by_magnitude`, per tensor by default).
  2. Elected sign per entry: the sign of :math:`\sum_k \hat\tau_k`; a zero sum counts as ``+``
     (as in mergekit).
  3. Disjoint mean per entry: the mean of the :math:`\hat\tau_k` that are non-zero and have the
     elected sign (0 where none does).
  4. :math:`\theta = \theta_{base} + \lambda\cdot\text{mean}`.

  With ``density = 1`` and one model this is task arithmetic with the same ``scaling``. Where the
  definitions meet (per-tensor magnitude trimming, ``consensus_method='sum'``, unit weights,
  ``normalize=True``) it gives mergekit's numbers.

  Args:
    base: the model all fine-tuned models started from.
    finetuned_models: a list of fine-tuned models.
    density: the fraction of each task vector kept, in (0, 1]. Static.
    scaling: :math:`\lambda \ge 0`; may be traced.
    trim: ``'per_tensor'`` (mergekit) or ``'global'`` (the TIES paper).

  Returns:
    The merged tree.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> models = [{'w': jnp.array([2.0, 1.0, -1.0])}, {'w': jnp.array([4.0, -3.0, 1.0])}]
    >>> merging.ties({'w': jnp.zeros(3)}, models, density=1.0)['w']
    Array([ 3., -3.,  1.], dtype=float32)

  References:
    Yadav et al, `TIES-Merging: resolving interference when merging models
    <https://arxiv.org/abs/2306.01708>`_, 2023
  """
  _validation.check_non_negative('scaling', scaling)
  vectors = [trim_by_magnitude(v, density, trim=trim) for v in task_vectors(base, finetuned_models)]

  def merge(b, *taus):
    stacked = jnp.stack(taus)
    elected = jnp.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = (jnp.sign(stacked) == elected) & (stacked != 0)
    count = agrees.sum(0)
    mean = jnp.where(agrees, stacked, 0).sum(0) / jnp.maximum(count, 1)
    return b + scaling * mean

  return _merge_float_leaves(merge, base, base, *vectors)
