"""Post-hoc model merges over pytrees: interpolation (WiSE-FT), task arithmetic, TIES, MagMax and
Fisher-weighted averaging.

Every merge is a pure function of parameter trees, applied leaf by leaf, that runs eagerly or under
``jax.jit``. The weights ``beta``, ``scaling``, ``weights`` and ``fisher_floor`` may be traced
arrays, so that a sweep can ``vmap`` over them; ``density`` and ``trim`` of TIES set how many
entries are kept and must be static.
Element-wise maths keeps the sharding of the inputs; the only cross-entry work is what the maths
needs: the reductions that find the TIES magnitude threshold, per tensor or over the whole model.

Conventions shared by all merges:

* The fine-tuned models are a ``list`` or ``tuple`` of parameter trees, each with the structure,
  shapes and dtypes of the base (or, for :func:`fisher_merge`, of the first model; a mismatch
  raises ``ValueError`` naming the leaf path).
* Only floating leaves are merged. Integer, boolean and PRNG-key leaves are never averaged: they are
  taken unchanged from the most recent model, ``params`` for :func:`interpolate`, the last
  fine-tuned model for :func:`task_arithmetic`, :func:`ties` and :func:`magmax`, and the last
  model for :func:`fisher_merge`.
* Each result leaf keeps its dtype; leaves narrower than float32 (bfloat16, float16) are computed in
  float32 and rounded once at the end.
* Where every model agrees (the same value in the anchor and ``params``, in the base and every
  fine-tuned model, or in every model merged by :func:`fisher_merge`), the merge is that value bit
  for bit: an entry no model changed (a frozen param) stays as it was, although ``β·a + (1−β)·a``
  need not round to ``a``.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from sfa_jax import _lazy
from sfa_jax import _validation

__all__ = [
    'interpolate', 'task_vectors', 'task_arithmetic', 'trim_by_magnitude', 'ties', 'magmax',
    'fisher_merge',
]


TRIM_SCOPES = ('per_tensor', 'global')


def interpolate(anchor: optax.Params, params: optax.Params, beta: chex.Numeric) -> optax.Params:
  """Linear interpolation between an anchor (the base) and fine-tuned params: WiSE-FT.

  .. math::

    \\theta = \\beta \\, \\theta_{anchor} + (1 - \\beta) \\, \\theta_{params}

  ``beta`` is the weight of the *anchor*, as in SFA's average ``θ ← β·θ_o + (1−β)·θ``, so SFA with
  ``p = 1`` ends its task on ``interpolate(θ_o, θ_T, beta)``. WiSE-FT writes the same mix with the
  weight ``α`` of the fine-tuned model: ``α = 1 − β``. ``beta = 0`` returns ``params`` and
  ``beta = 1`` returns ``anchor`` exactly (for finite values).

  Args:
    anchor: the base (zero-shot, pre-trained or previous-task) parameters.
    params: the fine-tuned parameters; same structure, shapes and dtypes as ``anchor``.
    beta: the weight of ``anchor``, in [0, 1]; a Python number or a (possibly traced) scalar array.

  Returns:
    The interpolated tree; non-floating leaves are those of ``params``.

  Raises:
    ValueError: when ``beta`` is outside [0, 1] or the trees do not match (the path is named).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> anchor = {'w': jnp.array([0.0, 4.0]), 'step': jnp.array(1)}
    >>> params = {'w': jnp.array([2.0, 0.0]), 'step': jnp.array(7)}
    >>> merged = merging.interpolate(anchor, params, beta=0.25)
    >>> merged['w'].tolist(), int(merged['step'])
    ([1.5, 1.0], 7)

  References:
    Wortsman et al, `Robust fine-tuning of zero-shot models
    <https://arxiv.org/abs/2109.01903>`_, 2022
  """
  _validation.check_in_interval('beta', beta, 0.0, 1.0)
  _validation.check_matching_tree(params, anchor, reference_name='params', other_name='anchor')
  _validation.check_finite_tree(anchor, 'anchor')
  _validation.check_finite_tree(params, 'params')

  def mix(anchor_leaf, params_leaf, dtype):
    weight = jnp.asarray(beta, dtype)
    return _kept_where_agreed(params_leaf, [anchor_leaf], weight * anchor_leaf + (1 - weight) * params_leaf)

  return _map_float_leaves(mix, anchor, params)


def task_vectors(
    base: optax.Params, finetuned_models: Sequence[optax.Params]
) -> list[optax.Params]:
  """The task vectors ``τ_k = θ_k − θ_base`` of fine-tuned models.

  Args:
    base: the parameters the models were fine-tuned from.
    finetuned_models: a non-empty ``list`` or ``tuple`` of fine-tuned parameter trees, each matching
      ``base`` in structure, shapes and dtypes.

  Returns:
    A list with one tree per model, in each leaf's dtype; non-floating leaves are the model's.

  Raises:
    TypeError: when ``finetuned_models`` is not a list or tuple.
    ValueError: when ``finetuned_models`` is empty or a model does not match ``base``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> vectors = merging.task_vectors({'w': jnp.ones(2)}, [{'w': jnp.array([3.0, 0.0])}])
    >>> vectors[0]['w'].tolist()
    [2.0, -1.0]

  References:
    Ilharco et al, `Editing models with task arithmetic <https://arxiv.org/abs/2212.04089>`_, 2023
  """
  _check_models(base, finetuned_models)
  return [
      _map_float_leaves(lambda base_leaf, leaf, dtype: leaf - base_leaf, base, model)
      for model in finetuned_models
  ]


def task_arithmetic(
    base: optax.Params,
    finetuned_models: Sequence[optax.Params],
    scaling: chex.Numeric,
) -> optax.Params:
  """Adds the scaled sum of the task vectors to the base: task arithmetic.

  With task vectors ``τ_k = θ_k − θ_base``:

  .. math::

    \\theta = \\theta_{base} + \\lambda \\sum_k \\tau_k

  Args:
    base: the parameters the models were fine-tuned from.
    finetuned_models: a non-empty ``list`` or ``tuple`` of fine-tuned parameter trees, each matching
      ``base`` in structure, shapes and dtypes.
    scaling: ``λ``, any real number (a negative one subtracts the tasks: "forgetting via negation");
      a Python number or a (possibly traced) scalar array.

  Returns:
    The merged tree; non-floating leaves are those of the last fine-tuned model.

  Raises:
    TypeError: when ``finetuned_models`` is not a list or tuple.
    ValueError: when ``finetuned_models`` is empty or a model does not match ``base``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> base = {'w': jnp.array([1.0, 1.0])}
    >>> models = [{'w': jnp.array([3.0, 1.0])}, {'w': jnp.array([1.0, -3.0])}]
    >>> merging.task_arithmetic(base, models, scaling=0.5)['w'].tolist()
    [2.0, -1.0]

  References:
    Ilharco et al, `Editing models with task arithmetic <https://arxiv.org/abs/2212.04089>`_, 2023
  """
  _check_models(base, finetuned_models)
  _validation.check_finite('scaling', scaling)

  def merge(base_leaf, *model_leaves, dtype):
    total = sum(leaf - base_leaf for leaf in model_leaves)
    return _kept_where_agreed(base_leaf, model_leaves, base_leaf + jnp.asarray(scaling, dtype) * total)

  return _map_float_leaves(merge, base, *finetuned_models)


def trim_by_magnitude(vector: optax.Params, density: float, *, trim: str = 'per_tensor') -> Any:
  """Zeroes the entries of a (task) vector below its top-``density`` magnitudes: TIES's trim step.

  The threshold ``t`` is the ``n``-th largest magnitude, counted with multiplicity, with

  .. math::

    n = \\max(1, \\lfloor \\mathrm{density} \\cdot N \\rfloor), \\qquad
    \\hat v_i = v_i \\, [\\, |v_i| \\ge t \\,]

  where ``N`` is the number of entries ranked together: each floating leaf alone with
  ``trim='per_tensor'`` (mergekit's ``magnitude`` sparsification), all floating leaves together with
  ``trim='global'`` (the TIES paper), where large layers may keep more than ``density`` of their
  entries and small ones less. The floor is Python's ``int`` of the float64 product, as in mergekit
  (``density = 0.29, N = 100`` keeps 28). ``density = 1`` keeps everything.

  Entries tied in magnitude with the threshold are all kept, so more than ``n`` entries survive when
  the ``n``-th and ``(n+1)``-th largest magnitudes are equal and non-zero. mergekit keeps exactly
  ``n`` there, choosing among the tied entries in whatever order ``torch`` sorts them; elsewhere the
  two agree, and mergekit fails where ``density · N < 1`` while this keeps one entry.

  The threshold is found exactly by bisection over the bits of the magnitudes (31 counting passes
  for float32), each a reduction: on a sharded model, the only cross-device traffic is one
  all-reduce of a few counts per pass; nothing is sorted or gathered.

  Args:
    vector: a tree, e.g. one of :func:`task_vectors`.
    density: the fraction of entries kept, in (0, 1]; a concrete number (static under ``jit``).
    trim: ``'per_tensor'`` or ``'global'``.

  Returns:
    The trimmed tree; non-floating leaves are unchanged.

  Raises:
    TypeError: when ``density`` is traced.
    ValueError: when ``density`` is outside (0, 1], ``trim`` is unknown, a leaf is complex, or more
      entries are ranked together than the default integer type counts (about 2·10⁹ without
      ``jax_enable_x64``).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> vector = {'big': jnp.array([4.0, -3.0, 2.0, 1.0]), 'small': jnp.array([0.5, -0.1])}
    >>> merging.trim_by_magnitude(vector, 0.5)['small'].tolist()
    [0.5, 0.0]
    >>> merging.trim_by_magnitude(vector, 0.5, trim='global')['small'].tolist()
    [0.0, 0.0]
  """
  _check_density_and_trim(density, trim)
  _validation.check_finite_tree(vector, 'vector')
  leaves, treedef = jax.tree.flatten(vector)
  floats = _real_float_leaf_indices(vector, 'vector')
  ranks = _keep_counts([jnp.size(leaves[i]) for i in floats], float(density), trim)
  if ranks is not None:
    trimmed = _trim_to_ranks([jnp.asarray(leaves[i])[None] for i in floats], ranks, trim)
    for i, leaf in zip(floats, trimmed):
      leaves[i] = leaf[0]
  return treedef.unflatten(leaves)


def ties(
    base: optax.Params,
    finetuned_models: Sequence[optax.Params],
    density: float,
    scaling: chex.Numeric = 1.0,
    *,
    trim: str = 'per_tensor',
) -> optax.Params:
  """TIES-Merging: trim each task vector, elect a sign per entry, average the agreeing entries.

  With task vectors ``τ_k = θ_k − θ_base`` (computed in float32 or wider), for every entry:

  1. *Trim*: ``τ̂_k`` keeps the top-``density`` magnitudes of ``τ_k``, per tensor or over the whole
     model, with the count and tie rule of :func:`trim_by_magnitude`.
  2. *Elect*: ``γ = +1`` if ``Σ_k τ̂_k ≥ 0`` else ``−1`` (a zero sum goes to ``+``, as in mergekit).
  3. *Disjoint mean*: with ``A = {k : sign(τ̂_k) = γ}`` (zero entries, trimmed or not, never
     agree), ``τ_m = Σ_{k∈A} τ̂_k / |A|``, and ``τ_m = 0`` where ``A`` is empty.

  .. math::

    \\theta = \\theta_{base} + \\lambda \\, \\tau_m

  ``density = 1`` skips the trim; with a single model, TIES is then task arithmetic with the same
  ``λ``. With ``trim='per_tensor'`` and ``λ = 1`` this is mergekit's ``ties`` (equal ``weight``\\ s,
  ``normalize: true``, no ``rescale``) wherever the trims agree (see :func:`trim_by_magnitude`), up
  to float rounding: mergekit subtracts in the checkpoint's dtype (bfloat16 for most LLMs), this in
  float32. The TIES paper ranks over the whole flattened model (``trim='global'``); its reference
  code keeps ``|τ|`` at or above the ``(N − n)``-th smallest magnitude (one entry more than ``n``)
  and sends zero sums to the sign of the whole tensor's sum rather than to ``+``.

  Args:
    base: the parameters the models were fine-tuned from.
    finetuned_models: a non-empty ``list`` or ``tuple`` of ``K`` fine-tuned parameter trees, each
      matching ``base`` in structure, shapes and dtypes.
    density: the fraction of each task vector kept, in (0, 1]; a concrete number (static under
      ``jit``).
    scaling: ``λ``, the weight of the merged task vector; a Python number or a (possibly traced)
      scalar array.
    trim: ``'per_tensor'`` (rank each leaf of each task vector alone, as mergekit does) or
      ``'global'`` (rank all floating leaves of a task vector together, as the TIES paper does).

  Returns:
    The merged tree; non-floating leaves are those of the last fine-tuned model.

  Raises:
    TypeError: when ``finetuned_models`` is not a list or tuple, or ``density`` is traced.
    ValueError: when ``finetuned_models`` is empty, a model does not match ``base``, ``density`` is
      outside (0, 1], ``trim`` is unknown, a leaf is complex, or too many entries are ranked
      together (see :func:`trim_by_magnitude`).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> base = {'w': jnp.zeros(4)}
    >>> models = [{'w': jnp.array([3.0, -1.0, 2.0, 0.5])},
    ...           {'w': jnp.array([1.0, -4.0, -3.0, 0.25])}]
    >>> merging.ties(base, models, density=1.0)['w'].tolist()
    [2.0, -2.5, -3.0, 0.375]
    >>> merging.ties(base, models, density=0.5)['w'].tolist()
    [3.0, -4.0, -3.0, 0.0]

  References:
    Yadav et al, `TIES-Merging: resolving interference when merging models
    <https://arxiv.org/abs/2306.01708>`_, 2023
  """
  _check_models(base, finetuned_models)
  _check_density_and_trim(density, trim)
  _validation.check_finite('scaling', scaling)
  base_leaves, treedef = jax.tree.flatten(base)
  model_leaves = [jax.tree.leaves(model) for model in finetuned_models]
  floats = _real_float_leaf_indices(base, 'base')
  ranks = _keep_counts([jnp.size(base_leaves[i]) for i in floats], float(density), trim)
  merged_floats = _ties_float_leaves(
      [base_leaves[i] for i in floats],
      [[leaves[i] for i in floats] for leaves in model_leaves],
      scaling,
      ranks,
      trim,
  )
  merged = list(model_leaves[-1])
  for i, leaf in zip(floats, merged_floats):
    merged[i] = leaf
  return treedef.unflatten(merged)


@_lazy.jit(static_argnames='trim')
def _ties_float_leaves(
    base_leaves: list[chex.Array],
    model_leaves: list[list[chex.Array]],
    scaling: chex.Numeric,
    ranks: chex.Array | None,
    trim: str,
) -> list[chex.Array]:
  """TIES on the floating leaves; jitted so that an eager call is one compiled program.

  Args:
    base_leaves: the base's floating leaves.
    model_leaves: per model, the same leaves of that model.
    scaling: ``λ``.
    ranks: the keep counts of :func:`_keep_counts`, or ``None`` for no trimming.
    trim: ``'per_tensor'`` or ``'global'``.

  Returns:
    The merged leaves, in the base's dtypes.
  """
  deltas = []
  for i, base_leaf in enumerate(base_leaves):
    dtype = _compute_dtype(base_leaf)
    stacked = jnp.stack([leaves[i].astype(dtype) for leaves in model_leaves])
    deltas.append(stacked - base_leaf.astype(dtype))
  if ranks is not None:
    deltas = _trim_to_ranks(deltas, ranks, trim)
  return [
      _kept_where_agreed(base_leaf, [leaves[i] for leaves in model_leaves],
                         (base_leaf.astype(delta.dtype) + scaling * _disjoint_mean(delta)).astype(base_leaf.dtype))
      for i, (base_leaf, delta) in enumerate(zip(base_leaves, deltas))
  ]


def magmax(
    base: optax.Params,
    finetuned_models: Sequence[optax.Params],
    scaling: chex.Numeric = 0.5,
) -> optax.Params:
  """MagMax: per entry, the task vector of largest magnitude, scaled and added to the base.

  With task vectors ``τ_k = θ_k − θ_base`` (computed in float32 or wider), for every entry:

  .. math::

    \\tau_{max} = \\tau_{k^*}, \\quad k^* = \\arg\\max_k |\\tau_k|, \\qquad
    \\theta = \\theta_{base} + \\lambda \\, \\tau_{max}

  Ties in magnitude go to the later model: walking ``k = 1 .. K``, ``τ_k`` replaces the kept
  vector where ``|τ_k| ≥ |τ_max|``, as in the paper's code. The merge is therefore invariant to
  the order of the models except where two task vectors have the same magnitude and opposite
  signs. With one model, MagMax is task arithmetic with the same ``λ``.

  In the paper the models come from *sequential* fine-tuning: ``θ_k`` is trained from
  ``θ_{k−1}`` (the fine-tuned model, not the merge), while every ``τ_k`` is taken relative to the
  pre-trained base; ``λ = 0.5`` in all its experiments. :class:`sfa_jax.engine.methods.MagMax`
  runs it so at the task boundaries.

  Args:
    base: the parameters the first model was fine-tuned from (the pre-trained model).
    finetuned_models: a non-empty ``list`` or ``tuple`` of fine-tuned parameter trees, each
      matching ``base`` in structure, shapes and dtypes.
    scaling: ``λ``, any real number (default 0.5, the paper's); a Python number or a (possibly
      traced) scalar array.

  Returns:
    The merged tree; non-floating leaves are those of the last fine-tuned model.

  Raises:
    TypeError: when ``finetuned_models`` is not a list or tuple.
    ValueError: when ``finetuned_models`` is empty, a model does not match ``base``, or
      ``scaling`` is not finite.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> base = {'w': jnp.zeros(3)}
    >>> models = [{'w': jnp.array([3.0, -1.0, 2.0])},
    ...           {'w': jnp.array([1.0, -4.0, -2.0])}]  # |2| = |-2|: the later one
    >>> merging.magmax(base, models)['w'].tolist()
    [1.5, -2.0, -1.0]

  References:
    Marczak et al, `MagMax: Leveraging model merging for seamless continual learning
    <https://arxiv.org/abs/2407.06322>`_, 2024
  """
  _check_models(base, finetuned_models)
  _validation.check_finite('scaling', scaling)

  def merge(base_leaf, *model_leaves, dtype):
    selected = functools.reduce(
        lambda kept, vector: jnp.where(jnp.abs(vector) >= jnp.abs(kept), vector, kept),
        [leaf - base_leaf for leaf in model_leaves],
    )
    return _kept_where_agreed(base_leaf, model_leaves, base_leaf + jnp.asarray(scaling, dtype) * selected)

  return _map_float_leaves(merge, base, *finetuned_models)


def fisher_merge(
    models: Sequence[optax.Params],
    fishers: Sequence[optax.Params],
    weights: Sequence[chex.Numeric] | chex.Array | None = None,
    *,
    fisher_floor: chex.Numeric = 1e-6,
    favor_first: bool = True,
) -> optax.Params:
  """Fisher-weighted averaging: per entry, the models' average weighted by ``w_k·F_k``.

  With the diagonal Fisher ``F_k`` of each model and model weights ``w_k``:

  .. math::

    \\theta = \\frac{\\sum_k w_k \\tilde F_k \\odot \\theta_k}{\\sum_k w_k \\tilde F_k}, \\qquad
    \\tilde F_k = \\max(F_k, \\epsilon)

  The floor ``ε`` (``fisher_floor``, 1e-6 by default) is Matena & Raffel's implementation: with
  ``favor_first`` (their ``favor_target_model``, on by default) only the first model's Fisher is
  floored, so that where no model has Fisher information the merge is the first model (their
  "target"); ``favor_first=False`` floors every model's. Hence, up to rounding: equal Fishers (at
  least ``ε``) give the ``w``-weighted plain average; where only model ``j``'s Fisher is non-zero
  the merge is ``θ_j`` (within ``ε·w_1·|θ_1 − θ_j| / (w_j F_j)`` for ``j > 1``); and every entry
  is a convex combination of the models' entries. Only the ratios of the weights matter.

  Their code also divides each ``w_k`` by the L2 norm of model ``k``'s whole Fisher
  (``normalize_fishers``, on by default): pass ``w_k / ‖F_k‖`` as the weights for that. CoFiMA
  (Marouf et al) applies this merge at every task boundary to the previous merged model and the
  newly trained one, with ``w = (1 − α, α)`` and ``α = 0.4``, no floor (``0/0`` where both Fishers
  vanish) and its Fisher, from squared mini-batch gradients, capped at 1e-4:
  :class:`sfa_jax.engine.methods.CoFiMA` runs it with every Fisher floored (``favor_first=False``),
  so that entries without Fisher information take the plain weighted average (the paper's CoMA).

  Args:
    models: a non-empty ``list`` or ``tuple`` of ``K`` parameter trees with the structure, shapes
      and dtypes of the first.
    fishers: ``K`` diagonal Fisher estimates, one per model in the same order (e.g. from
      :func:`sfa_jax.diagonal_fisher`), with the models' structure and shapes in any floating
      dtype, finite and non-negative; their leaves at non-floating params are ignored.
    weights: the ``K`` model weights ``w_k``, non-negative, as a sequence or an array of shape
      ``(K,)`` (possibly traced); ``None`` weighs the models equally. The floored models' weights
      must not all be 0: ``w_1 > 0`` with ``favor_first``, else some ``w_k > 0``.
    fisher_floor: ``ε``, positive and finite (default 1e-6); possibly traced.
    favor_first: floor only the first model's Fisher (default), or every model's.

  Returns:
    The merged tree; non-floating leaves are those of the last model.

  Raises:
    TypeError: when ``models`` or ``fishers`` is not a list or tuple.
    ValueError: when they are empty or of different lengths, a tree does not match the first
      model, a Fisher holds a negative, NaN or infinite entry, or ``weights`` or
      ``fisher_floor`` is out of range (each is named).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import merging
    >>> models = [{'w': jnp.array([0.0, 0.0])}, {'w': jnp.array([10.0, 10.0])}]
    >>> fishers = [{'w': jnp.array([1.0, 3.0])}, {'w': jnp.array([3.0, 1.0])}]
    >>> merging.fisher_merge(models, fishers)['w'].tolist()
    [7.5, 2.5]
    >>> merging.fisher_merge(models, fishers, weights=[3.0, 1.0])['w'].tolist()
    [5.0, 1.0]

  References:
    Matena & Raffel, `Merging models with Fisher-weighted averaging
    <https://arxiv.org/abs/2111.09832>`_, 2022

    Marouf et al, `Weighted ensemble models are strong continual learners
    <https://arxiv.org/abs/2312.08977>`_, 2024
  """
  _check_fisher_merge_trees(models, fishers)
  _validation.check_in_interval('fisher_floor', fisher_floor, 0.0, math.inf, low_open=True, high_open=True)
  weights = _model_weights(weights, len(models), favor_first)
  count = len(models)

  def merge(*leaves):
    model_leaves, fisher_leaves = leaves[:count], leaves[count:]
    if not _validation.is_float_leaf(model_leaves[0]):
      return model_leaves[-1]
    arrays = [jnp.asarray(leaf) for leaf in model_leaves]
    dtype = _compute_dtype(arrays[0])
    floor = jnp.asarray(fisher_floor, dtype)
    coefficients = [
        weights[k].astype(dtype) * (jnp.maximum(fisher, floor) if k == 0 or not favor_first else fisher)
        for k, fisher in enumerate(jnp.asarray(leaf).astype(dtype) for leaf in fisher_leaves)
    ]
    total = sum(c * array.astype(dtype) for c, array in zip(coefficients, arrays)) / sum(coefficients)
    return _kept_where_agreed(arrays[0], arrays, total.astype(arrays[0].dtype))

  return jax.tree.map(merge, *models, *fishers)


def _compute_dtype(leaf: chex.Array) -> Any:
  """The dtype the merge maths runs in: the leaf's, widened to at least float32."""
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _kept_where_agreed(reference: chex.Array, others: Sequence[chex.Array], merged: chex.Array) -> chex.Array:
  """``merged``, but ``reference`` wherever every one of ``others`` equals it, bit for bit (a merge of
  equal entries is that entry, although ``β·a + (1−β)·a`` or ``a + λ·0`` may round to another value)."""
  agreed = functools.reduce(jnp.logical_and, [other == reference for other in others])
  return jnp.where(agreed, reference, merged)


def _map_float_leaves(fn: Callable[..., chex.Array], *trees: Any) -> Any:
  """``fn(*leaves, dtype=dtype)`` on floating leaves, in the compute dtype and cast back.

  Non-floating leaves are taken from the last tree.
  """

  def leaf_fn(*leaves):
    if not _validation.is_float_leaf(leaves[0]):
      return leaves[-1]
    arrays = [jnp.asarray(leaf) for leaf in leaves]
    dtype = _compute_dtype(arrays[0])
    return fn(*(array.astype(dtype) for array in arrays), dtype=dtype).astype(arrays[0].dtype)

  return jax.tree.map(leaf_fn, *trees)


def _check_models(base: optax.Params, finetuned_models: Sequence[optax.Params]) -> None:
  """Raises unless ``finetuned_models`` is a non-empty list or tuple of trees matching ``base``."""
  _check_tree_list(finetuned_models, 'finetuned_models', 'model')
  _validation.check_finite_tree(base, 'base')
  for k, model in enumerate(finetuned_models):
    _validation.check_matching_tree(
        base, model, reference_name='base', other_name=f'finetuned_models[{k}]'
    )
    _validation.check_finite_tree(model, f'finetuned_models[{k}]')


def _check_fisher_merge_trees(models: Sequence[optax.Params], fishers: Sequence[optax.Params]) -> None:
  """Raises unless ``models`` and ``fishers`` are equally long non-empty lists or tuples of trees
  matching the first model (the Fishers in any dtype, non-negative), every one finite."""
  _check_tree_list(models, 'models', 'model')
  _check_tree_list(fishers, 'fishers', 'fisher')
  if len(fishers) != len(models):
    raise ValueError(f'fishers has {len(fishers)} trees for {len(models)} models: give one Fisher per model.')
  for k, model in enumerate(models):
    _validation.check_matching_tree(models[0], model, reference_name='models[0]', other_name=f'models[{k}]')
    _validation.check_finite_tree(model, f'models[{k}]')
  for k, fisher in enumerate(fishers):
    _validation.check_matching_tree(models[0], fisher, reference_name='models[0]', other_name=f'fishers[{k}]',
                                    check_dtypes=False)
    _validation.check_finite_tree(fisher, f'fishers[{k}]', non_negative=True)


def _check_tree_list(trees: Any, name: str, item: str) -> None:
  """Raises unless ``trees`` is a non-empty list or tuple (``item`` names one of them in the hint)."""
  if not isinstance(trees, (list, tuple)):
    raise TypeError(
        f'{name} must be a list or tuple of parameter trees; got {type(trees).__name__}. To merge a '
        f'single model, pass [{item}].'
    )
  if not trees:
    raise ValueError(f'{name} is empty: pass at least one parameter tree.')


def _model_weights(weights: Any, count: int, favor_first: bool) -> chex.Array:
  """The model weights of :func:`fisher_merge` as a ``(count,)`` array, checked where concrete.

  Raises:
    ValueError: when ``weights`` does not hold one number per model, or (concrete) one is
      negative or not finite, or the floored models' weights are all 0.
  """
  if weights is None:
    return jnp.ones(count, jnp.float32)
  array = jnp.asarray(weights)
  if array.shape != (count,):
    raise ValueError(f'weights must hold one number per model ({count}); got shape {array.shape}.')
  if _validation.is_traced(array):
    return array
  values = [float(value) for value in jax.device_get(array)]
  if not all(math.isfinite(value) and value >= 0 for value in values):
    raise ValueError(f'weights must be finite and non-negative; got {values}.')
  if favor_first and values[0] == 0:
    raise ValueError('weights[0] must be positive with favor_first=True: the first model carries the '
                     f'Fisher floor, which keeps every denominator positive; got {values}.')
  if not any(values):
    raise ValueError(f'weights are all 0; got {values}.')
  return array


def _check_density_and_trim(density: Any, trim: str) -> None:
  """Raises unless ``density`` is a concrete number in (0, 1] and ``trim`` a known scope."""
  if _validation.is_traced(density):
    raise TypeError(
        'density must be a concrete number, since it sets how many entries are kept; under jit, '
        'make it static, e.g. jax.jit(merging.ties, static_argnames=("density", "trim")).'
    )
  _validation.check_in_interval('density', density, 0.0, 1.0, low_open=True)
  if trim not in TRIM_SCOPES:
    raise ValueError(f'trim must be one of {TRIM_SCOPES}; got {trim!r}.')


def _real_float_leaf_indices(tree: Any, name: str) -> list[int]:
  """Positions of the floating leaves of ``tree``; raises ``ValueError`` on a complex leaf."""
  indices = []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    if _validation.is_float_leaf(leaf):
      if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
        raise ValueError(
            f'magnitude trimming and sign election need real leaves; {name}'
            f'{jax.tree_util.keystr(path)} is {jnp.result_type(leaf)}.'
        )
      indices.append(i)
  return indices


def _keep_counts(sizes: list[int], density: float, trim: str) -> chex.Array | None:
  """The number of entries kept per group, ``n = max(1, int(density · N))``.

  Args:
    sizes: the number of entries of each floating leaf.
    density: the fraction kept, in (0, 1].
    trim: ``'per_tensor'`` (each leaf is a group) or ``'global'`` (all leaves are one group).

  Returns:
    One count per group, or ``None`` when nothing is trimmed (``density = 1`` or no leaves).
  """
  if density >= 1.0 or not sizes:
    return None
  count_dtype = jax.dtypes.canonicalize_dtype(jnp.int64)
  group_sizes = [sum(sizes[j] for j in group) for group in _groups(len(sizes), trim)]
  if max(group_sizes) > jnp.iinfo(count_dtype).max:
    raise ValueError(
        f'{max(group_sizes)} entries are ranked together, more than {count_dtype} counts; enable '
        'jax_enable_x64, or trim per tensor.'
    )
  return jnp.asarray([max(1, int(density * size)) for size in group_sizes], count_dtype)


def _groups(num_arrays: int, trim: str) -> list[list[int]]:
  """The positions of the arrays ranked together: all at once, or each alone."""
  return [list(range(num_arrays))] if trim == 'global' else [[j] for j in range(num_arrays)]


@_lazy.jit(static_argnames='trim')
def _trim_to_ranks(deltas: list[chex.Array], ranks: chex.Array, trim: str) -> list[chex.Array]:
  """Zeroes, per model, the entries below the ``ranks[g]``-th largest magnitude of their group.

  The threshold is the largest bit pattern ``t`` with ``#{entries ≥ t} ≥ n``: non-negative floats
  order like their bit patterns read as signed integers. It is built bit by bit from the top, one
  counting pass per bit, all groups in the same loop. Jitted, with the counts as data, so that eager
  calls compile once per shape whatever the density; under an outer ``jit`` it is inlined.

  Args:
    deltas: arrays of shape ``(K, ...)``.
    ranks: the number of entries kept per model in each group, ``n``.
    trim: the grouping (see :func:`_groups`).

  Returns:
    ``deltas`` with ``0`` where ``|τ| < t``.
  """
  search_dtype = jnp.promote_types(jnp.result_type(*deltas), jnp.float32)
  bits_dtype = jnp.int64 if jnp.dtype(search_dtype).itemsize == 8 else jnp.int32
  bits = [
      jax.lax.bitcast_convert_type(jnp.abs(delta).astype(search_dtype), bits_dtype)
      for delta in deltas
  ]
  groups = _groups(len(bits), trim)
  num_bits = jnp.iinfo(bits_dtype).bits - 1  # a magnitude's sign bit is 0

  def count_at_least(threshold, group):
    return sum(
        jnp.sum(
            bits[j] >= _per_model(threshold, bits[j].ndim),
            axis=tuple(range(1, bits[j].ndim)),
            dtype=ranks.dtype,
        )
        for j in group
    )

  def set_next_bit(i, thresholds):
    bit = jnp.left_shift(jnp.ones((), bits_dtype), (num_bits - 1 - i).astype(bits_dtype))
    return tuple(
        jnp.where(count_at_least(threshold | bit, group) >= ranks[g], threshold | bit, threshold)
        for g, (threshold, group) in enumerate(zip(thresholds, groups))
    )

  start = tuple(jnp.zeros(bits[0].shape[:1], bits_dtype) for _ in groups)
  thresholds = jax.lax.fori_loop(0, num_bits, set_next_bit, start)
  trimmed = list(deltas)
  for threshold, group in zip(thresholds, groups):
    for j in group:
      trimmed[j] = jnp.where(bits[j] >= _per_model(threshold, bits[j].ndim), deltas[j], 0)
  return trimmed


def _per_model(values: chex.Array, ndim: int) -> chex.Array:
  """``(K,)`` values reshaped to broadcast against a ``(K, ...)`` array of ``ndim`` dimensions."""
  return values.reshape((-1,) + (1,) * (ndim - 1))


def _disjoint_mean(trimmed: chex.Array) -> chex.Array:
  """Elects a sign per entry from the sum over models and averages the models that agree with it.

  Args:
    trimmed: the trimmed task vectors, shape ``(K, ...)``.

  Returns:
    The merged task vector, shape ``(...)``; ``0`` where no model agrees with the elected sign.
  """
  elected = jnp.where(jnp.sum(trimmed, axis=0) >= 0, 1, -1).astype(trimmed.dtype)
  agree = jnp.sign(trimmed) == elected
  total = jnp.sum(jnp.where(agree, trimmed, 0), axis=0)
  count = jnp.sum(agree, axis=0)
  return total / jnp.maximum(count, 1).astype(trimmed.dtype)
