r"""Diagonal Fisher information estimates for EWC, their accumulation across tasks, and MAS's importance.

For a classifier :math:`p(y \mid x; \theta) = \mathrm{softmax}(f_\theta(x))_y` the diagonal of the
Fisher information over a data set :math:`\{x_i, y_i\}_{i=1}^N` is estimated from *per-example*
gradients :math:`g_i(y) = \nabla_\theta \log p(y \mid x_i; \theta)`, squared entrywise:

* ``'empirical'``: the observed labels, :math:`\frac{1}{N}\sum_i g_i(y_i)^2`;
* ``'sampled'``: labels drawn from the model,
  :math:`\frac{1}{NS}\sum_i\sum_{s=1}^S g_i(\hat y_{is})^2`, with
  :math:`\hat y_{is} \sim p(\cdot \mid x_i; \theta)`;
* ``'expected'``: the exact expectation over the classes,
  :math:`\frac{1}{N}\sum_i\sum_c p(c \mid x_i; \theta)\, g_i(c)^2`, of which ``'sampled'`` is an
  unbiased Monte Carlo estimate.

Across tasks, :func:`online_fisher` keeps online EWC's running Fisher and :func:`offline_fisher`
offline EWC's sum of the tasks' Fishers with their weighted mean end. :func:`mas_importance` is
Memory Aware Synapses' importance (the gradient of the output's squared norm, no labels), which
EWC's penalty takes in place of the Fisher.

Convention: the square is taken per example, as in Kirkpatrick et al and most papers. Avalanche
squares the gradient of each *mini-batch* mean loss instead: cross terms between examples enter,
and near a minimum, where the mean gradient is small, the estimate shrinks by about the batch size.
Its numbers (and so its EWC strengths) are not comparable with ours.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import _lazy
from sfa_jax import _validation


_KINDS = ('empirical', 'sampled', 'expected')


def diagonal_fisher(
    logits_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    labels: chex.Array | None = None,
    *,
    kind: str = 'empirical',
    key: chex.PRNGKey | None = None,
    batch_size: int = 256,
    num_samples: int = 1,
    layerwise: bool = True,
) -> chex.ArrayTree:
  r"""The diagonal Fisher information of a softmax classifier, from per-example gradients.

  With :math:`g_i(y) = \nabla_\theta \log \mathrm{softmax}(f_\theta(x_i))_y`, one gradient per
  example, the estimate is

  * ``kind='empirical'``: :math:`F = \frac{1}{N}\sum_i g_i(y_i)^2`, with the given labels;
  * ``kind='sampled'``: :math:`F = \frac{1}{NS}\sum_i\sum_{s=1}^{S} g_i(\hat y_{is})^2`, with
    :math:`S` = ``num_samples`` labels :math:`\hat y_{is} \sim \mathrm{softmax}(f_\theta(x_i))`
    drawn from ``jax.random.fold_in(key, i)``, so the draws do not depend on ``batch_size``;
  * ``kind='expected'``: :math:`F = \frac{1}{N}\sum_i\sum_c p(c \mid x_i)\, g_i(c)^2`, exact over
    the classes; it costs one backward pass per class and example, so it suits few classes.

  The data set is walked in chunks of ``batch_size`` examples. Every chunk has the same shape (the
  last one is padded, and its padding masked out), so the jitted chunk function compiles once per
  ``(logits_fn, kind, num_samples, batch_size)``, input shapes and dtypes, whatever ``N``; pass the
  same ``logits_fn`` object from call to call to reuse that compilation. Memory is the float32 sums,
  one gradient, one chunk's inputs and activations, and (convolutions) one chunk's per-example
  kernel gradients, at most ``sfa_jax._layerwise_fisher.MAX_CONV_GRADIENT_FLOATS`` floats: never ``N`` or
  ``batch_size`` times all the parameters. The result depends on ``batch_size`` only through float
  rounding. Sums are accumulated in float32 and the result is cast back to each leaf's dtype.
  Sharded params and inputs are used where they lie: nothing is moved to a chosen device (meshes
  with explicit axis types, ``jax.sharding.AxisType.Explicit``, are not supported yet).

  How the per-example gradients are had: the parameters of Flax dense and convolution layers
  (``nn.Dense``, :class:`sfa_jax.models.heads.OutputHead`, plain 2-D ``nn.Conv``) that ``logits_fn``
  calls once per batch get their squared per-example gradients from one batched backward pass
  (:mod:`sfa_jax._layerwise_fisher`: for a dense layer :math:`(x^2)^\top(\delta^2)`, no
  per-example weight gradient is formed); every other parameter is differentiated one example at a
  time, a ``jax.vjp`` per example whose square is added straight into the sums. The batched pass
  assumes that ``logits_fn`` treats the examples of a batch independently (inference mode: no
  batch statistics); pass ``layerwise=False`` for a model that mixes them. Its speed
  against a ``vmap`` of per-example gradients is measured by ``benchmarks/fisher_speed.py``
  (figures in ``benchmarks/RESULTS.md``).

  Only the floating-point leaves of ``params`` are differentiated; integer, boolean and PRNG-key
  leaves get zeros of their own dtype, so that the result matches ``params`` leaf for leaf.

  Args:
    logits_fn: ``logits_fn(params, x_batch)`` returns logits of shape ``(batch, classes)``, e.g.
      ``lambda p, x: model.apply(p, x)`` for a Flax model in inference mode. It is a static argument
      of the jitted chunk function: it must be hashable.
    params: the parameters θ at which the Fisher is estimated; a pytree of arrays.
    inputs: the examples, an array of shape ``(N, ...)`` or a pytree of such arrays sharing ``N``;
      each chunk is passed to ``logits_fn`` with the same structure.
    labels: int array of shape ``(N,)``, class indices in ``[0, classes)``; needed by
      ``'empirical'``, ignored by ``'sampled'`` and ``'expected'``.
    kind: ``'empirical'``, ``'sampled'`` or ``'expected'``.
    key: a PRNG key, needed by ``'sampled'`` and ignored otherwise.
    batch_size: the number of examples per chunk (the unit moved to the device and compiled for),
      at least 1.
    num_samples: the labels drawn per example by ``'sampled'``, at least 1.
    layerwise: use the batched pass for the dense and convolution layers that qualify
      (see above); ``False``: the per-example loop for every parameter.

  Returns:
    A pytree with the structure, shapes and dtypes of ``params``, non-negative.

  Raises:
    ValueError: on an unknown ``kind``, a missing ``labels`` or ``key``, labels not of shape
      ``(N,)`` or not integers, inputs without examples or of unequal lengths, ``batch_size`` or
      ``num_samples`` below 1, and (``'empirical'``) labels outside ``[0, classes)``.

  Example:
    >>> import jax.numpy as jnp, sfa_jax.fisher
    >>> logits_fn = lambda params, x: x @ params['w']
    >>> params = {'w': jnp.zeros((2, 2)), 'step': jnp.int32(3)}
    >>> inputs, labels = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([0, 1])
    >>> fisher = sfa_jax.fisher.diagonal_fisher(logits_fn, params, inputs, labels)
    >>> fisher['w']
    Array([[0.125, 0.125],
           [0.5  , 0.5  ]], dtype=float32)
    >>> fisher['step']
    Array(0, dtype=int32)

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017

    Kunstner et al, `Limitations of the empirical Fisher approximation for natural gradient descent
    <https://arxiv.org/abs/1905.12558>`_, 2019
  """
  if kind not in _KINDS:
    raise ValueError(f"kind must be 'empirical', 'sampled' or 'expected'; got {kind!r}.")
  _validation.check_int('batch_size', batch_size)
  _validation.check_int('num_samples', num_samples)
  num_examples = _num_examples(inputs)
  if kind == 'empirical':
    if labels is None:
      raise ValueError(
          "kind='empirical' needs the labels, an int array of shape (N,); without labels use "
          "kind='sampled' (with a key) or kind='expected'."
      )
    _check_labels(labels, num_examples)
  else:
    labels = None
  if kind == 'sampled':
    if key is None:
      raise ValueError(
          "kind='sampled' needs a PRNG key to draw the labels, e.g. key=jax.random.key(0)."
      )
  else:
    key = None

  batch_size, num_samples = int(batch_size), int(num_samples)
  leaves, treedef = jax.tree.flatten(params)
  carry = _zero_sums([leaf for leaf in leaves if _validation.is_float_leaf(leaf)])
  for start in range(0, num_examples, batch_size):
    carry = _accumulate(
        carry,
        params,
        _chunk(inputs, start, batch_size),
        None if labels is None else _chunk(labels, start, batch_size),
        np.int32(min(batch_size, num_examples - start)),
        np.int32(start),
        key,
        logits_fn=logits_fn,
        kind=kind,
        num_samples=num_samples,
        layerwise=bool(layerwise),
    )
  sums, num_bad_labels = carry
  if int(num_bad_labels):
    raise ValueError(
        f'{int(num_bad_labels)} labels lie outside [0, classes), where classes is the last '
        'dimension of the logits of logits_fn.'
    )
  return treedef.unflatten(_means(sums, leaves, np.int32(num_examples)))


@_lazy.jit(compiler_options=_lazy.EXACT)
def _zero_sums(float_leaves: list[chex.Array]) -> tuple[list[chex.Array], chex.Array]:
  """:func:`_accumulate`'s first carry: float32 zeros like each float leaf, and no bad label (MAS's sums: the zeros)."""
  return [jnp.zeros(jnp.shape(leaf), jnp.float32) for leaf in float_leaves], jnp.zeros((), jnp.int32)


@_lazy.jit(compiler_options=_lazy.EXACT)  # one division (and cast) per entry: the same at any level
def _means(sums: list[chex.Array], leaves: list[chex.Array], num_examples: chex.Array) -> list[chex.Array]:
  """Each float leaf's sum over ``num_examples`` (traced: one program for every ``N``), in its dtype;
  zeros for the other leaves."""
  sums = iter(sums)
  return [(next(sums) / num_examples).astype(jnp.result_type(leaf)) if _validation.is_float_leaf(leaf)
          else jnp.zeros_like(leaf) for leaf in leaves]


def online_fisher(
    previous: chex.ArrayTree, current: chex.ArrayTree, gamma: chex.Numeric
) -> chex.ArrayTree:
  r"""Online EWC's running Fisher: :math:`\gamma F_{\mathrm{previous}} + F_{\mathrm{current}}`.

  After each task :math:`t`, :math:`F^*_t = \gamma F^*_{t-1} + F_t` (Schwarz et al), with
  :math:`F^*_1 = F_1`: :math:`\gamma = 1` sums the Fisher of all tasks, :math:`\gamma = 0` keeps
  only the latest. The sum is computed in float32 and cast to ``current``'s dtypes; non-float
  leaves are taken from ``current``. Works under ``jit`` (a traced ``gamma`` is not checked).

  Args:
    previous: the running Fisher :math:`F^*_{t-1}`.
    current: the Fisher :math:`F_t` of the task just finished, e.g. from :func:`diagonal_fisher`;
      same structure, shapes and dtypes as ``previous``.
    gamma: the decay :math:`\gamma \in [0, 1]`.

  Returns:
    :math:`F^*_t`, a pytree like ``current``.

  Raises:
    ValueError: if ``gamma`` lies outside ``[0, 1]``, the trees do not match, or a leaf holds a
      negative, NaN or infinite entry (the leaf is named).

  Example:
    >>> import jax.numpy as jnp, sfa_jax.fisher
    >>> previous, current = {'w': jnp.array([2.0, 4.0])}, {'w': jnp.array([1.0, 0.0])}
    >>> sfa_jax.fisher.online_fisher(previous, current, gamma=0.5)
    {'w': Array([2., 2.], dtype=float32)}

  References:
    Schwarz et al, `Progress & Compress: A scalable framework for continual learning
    <https://arxiv.org/abs/1805.06370>`_, 2018
  """
  _validation.check_in_interval('gamma', gamma, 0.0, 1.0)
  _validation.check_matching_tree(
      previous, current, reference_name='previous', other_name='current'
  )
  _validation.check_finite_tree(previous, 'previous', non_negative=True)
  _validation.check_finite_tree(current, 'current', non_negative=True)

  return _online_sum(previous, current, gamma)


@_lazy.jit
def _online_sum(previous: chex.ArrayTree, current: chex.ArrayTree, gamma: chex.Numeric) -> chex.ArrayTree:
  """:math:`\\gamma F_{\\mathrm{previous}} + F_{\\mathrm{current}}` in float32, cast to ``current``'s dtypes."""

  def combine(old: chex.Array, new: chex.Array) -> chex.Array:
    if not _validation.is_float_leaf(new):
      return new
    total = gamma * jnp.asarray(old, jnp.float32) + jnp.asarray(new, jnp.float32)
    return total.astype(jnp.result_type(new))

  return jax.tree.map(combine, previous, current)


def offline_fisher(
    fisher_sum: chex.ArrayTree, mean_anchor: chex.ArrayTree, fisher: chex.ArrayTree, anchor: chex.ArrayTree
) -> tuple[chex.ArrayTree, chex.ArrayTree]:
  r"""Offline EWC's two trees after one more task: :math:`S + F_k` and the new Fisher-weighted mean end.

  Offline EWC's gradient :math:`\lambda\sum_k F_k\odot(\theta-\theta_k)` is
  :math:`\lambda S\odot(\theta-\bar\theta)` with :math:`S = \sum_k F_k` and
  :math:`\bar\theta = \sum_k F_k\odot\theta_k / S` (:func:`sfa_jax.offline_ewc`). Adding task
  :math:`k` gives :math:`S' = S + F_k` and
  :math:`\bar\theta' = \bar\theta + (F_k / S')\odot(\theta_k - \bar\theta)`, and
  :math:`\bar\theta' = \theta_k` where :math:`S' = 0` (no penalty there). Computed in float32 and
  cast to the dtypes of ``fisher`` and ``anchor``; non-float leaves are taken from ``fisher`` and
  ``anchor``. :func:`sfa_jax.reanchor` applies it to an :class:`~sfa_jax.OfflineEWCState`; the
  engine's ``ewc-offline`` keeps the two trees itself and passes them to :func:`sfa_jax.ewc`.

  Args:
    fisher_sum: :math:`S`, the sum of the past tasks' Fishers (zeros before the first task).
    mean_anchor: :math:`\bar\theta` (anything finite before the first task).
    fisher: :math:`F_k`, the Fisher of the task just finished (e.g. :func:`diagonal_fisher`).
    anchor: :math:`\theta_k`, the params at its end.

  Returns:
    ``(S', θ̄')``, new trees shaped and typed like ``fisher`` and ``anchor``.

  Raises:
    ValueError: if the trees do not match, or a Fisher holds a negative, NaN or infinite entry (the
      leaf is named).

  Example:
    >>> import jax.numpy as jnp, sfa_jax.fisher
    >>> total, mean = {'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([2.0, 2.0])}
    >>> fisher, end = {'w': jnp.array([3.0, 0.0])}, {'w': jnp.array([6.0, 5.0])}
    >>> total, mean = sfa_jax.fisher.offline_fisher(total, mean, fisher, end)
    >>> total['w'].tolist(), mean['w'].tolist()  # (1·2 + 3·6) / 4; no Fisher: the new end
    ([4.0, 0.0], [5.0, 5.0])
  """
  for name, tree in (('mean_anchor', mean_anchor), ('fisher', fisher), ('anchor', anchor)):
    _validation.check_matching_tree(fisher_sum, tree, reference_name='fisher_sum', other_name=name)
  _validation.check_finite_tree(fisher_sum, 'fisher_sum', non_negative=True)
  _validation.check_finite_tree(fisher, 'fisher', non_negative=True)

  def total(old_sum, new):
    if not _validation.is_float_leaf(new):
      return new
    return (jnp.asarray(old_sum, jnp.float32) + jnp.asarray(new, jnp.float32)).astype(jnp.result_type(new))

  def mean(old_sum, old_mean, new, end):
    if not _validation.is_float_leaf(new):
      return end
    new_sum = jnp.asarray(old_sum, jnp.float32) + jnp.asarray(new, jnp.float32)
    share = jnp.asarray(new, jnp.float32) / jnp.where(new_sum > 0, new_sum, 1.0)
    old_mean, end32 = jnp.asarray(old_mean, jnp.float32), jnp.asarray(end, jnp.float32)
    moved = old_mean + share * (end32 - old_mean)
    return jnp.where(new_sum > 0, moved, end32).astype(jnp.result_type(end))  # exactly θ_k where S' = 0

  return jax.tree.map(total, fisher_sum, fisher), jax.tree.map(mean, fisher_sum, mean_anchor, fisher, anchor)


def mas_importance(
    apply_fn: Callable[[Any, Any], Any],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    *,
    batch_size: int = 256,
) -> chex.ArrayTree:
  r"""Memory Aware Synapses' importance: the mean over examples of :math:`|\partial\lVert f(x)\rVert_2^2/\partial\theta|`.

  With :math:`f_\theta(x)` the model's output for one example (all its entries: the logits of a
  classifier), the importance of each parameter is

  .. math::
    \Omega = \frac{1}{N}\sum_{i=1}^N \Big|\frac{\partial \lVert f_\theta(x_i)\rVert_2^2}{\partial\theta}\Big|,

  the absolute value taken per example, as in Aljundi et al's definition (their Eq. 4 with the
  squared :math:`\ell_2` norm); no label is used. MAS's penalty is :func:`sfa_jax.ewc` with
  :math:`\Omega` in place of the Fisher, accumulated over the tasks as a sum, as the paper does:
  ``reanchor(state, params, fisher=online_fisher(Ω_old, Ω_new, gamma=1.0))``.

  Conventions: Aljundi et al's code and Avalanche's ``MASPlugin`` take the absolute value of each
  *mini-batch's* gradient (of the summed, resp. averaged, squared norms), whose entries cancel
  between examples: their importance is at most this one, equal for batches of one. Avalanche also
  runs the model in training mode, combines the tasks by :math:`\alpha\Omega_{\mathrm{old}} +
  (1-\alpha)\Omega_{\mathrm{new}}` (:math:`\alpha = 0.5`) rather than the sum, and writes the penalty
  :math:`\lambda\sum\Omega(\theta-\theta^*)^2` without EWC's 1/2, as the paper does: their
  :math:`\lambda` is ``strength / 2`` of :func:`sfa_jax.ewc`.

  The examples are walked in chunks of ``batch_size`` of one shape (the last padded and masked), one
  example's gradient at a time inside each chunk (a loop, so memory is one gradient, not
  ``batch_size`` of them); the jitted chunk function compiles once per ``apply_fn``, chunk shape
  and dtypes. Sums are float32, cast back to each leaf's dtype; non-float leaves get zeros.

  Args:
    apply_fn: ``apply_fn(params, x_batch)``, the model's output for a batch (any shape with the
      batch first), e.g. ``lambda p, x: model.apply(p, x)`` in inference mode; hashable.
    params: the parameters :math:`\theta` (at the end of the task).
    inputs: the examples, an array of shape ``(N, ...)`` or a pytree of such arrays sharing ``N``.
    batch_size: the examples per chunk, at least 1.

  Returns:
    A pytree like ``params``, non-negative.

  Raises:
    ValueError: for inputs without examples or of unequal lengths, or ``batch_size`` below 1.

  Example:
    >>> import jax.numpy as jnp, sfa_jax.fisher
    >>> apply_fn = lambda params, x: x @ params['w']  # f(x) = x·w, ‖f‖² = (x·w)²
    >>> params = {'w': jnp.array([[1.0], [2.0]])}
    >>> inputs = jnp.array([[1.0, 0.0], [1.0, -1.0]])  # f = 1 and -1: |2 f x|
    >>> sfa_jax.fisher.mas_importance(apply_fn, params, inputs)['w'].tolist()
    [[2.0], [1.0]]

  References:
    Aljundi et al, `Memory Aware Synapses: Learning what (not) to forget
    <https://arxiv.org/abs/1711.09601>`_, 2018
  """
  _validation.check_int('batch_size', batch_size)
  num_examples, batch_size = _num_examples(inputs), int(batch_size)
  leaves, treedef = jax.tree.flatten(params)
  sums, _ = _zero_sums([leaf for leaf in leaves if _validation.is_float_leaf(leaf)])
  for start in range(0, num_examples, batch_size):
    sums = _add_output_gradients(sums, params, _chunk(inputs, start, batch_size),
                                 np.int32(min(batch_size, num_examples - start)), apply_fn=apply_fn)
  return treedef.unflatten(_means(sums, leaves, np.int32(num_examples)))


@_lazy.jit(static_argnames=('apply_fn',), donate_argnums=0)
def _add_output_gradients(sums: list[chex.Array], params: chex.ArrayTree, inputs: chex.ArrayTree, num_valid: chex.Array, *,
                          apply_fn: Callable[[Any, Any], Any]) -> list[chex.Array]:
  """Adds ``|∂‖f(x_i)‖²/∂θ|`` of the chunk's first ``num_valid`` examples to the float32 ``sums`` (one per float leaf)."""
  leaves, treedef = jax.tree.flatten(params)
  is_float = [_validation.is_float_leaf(leaf) for leaf in leaves]

  def squared_norm(differentiated, x):
    replaced = iter(differentiated)
    full = treedef.unflatten([next(replaced) if flt else leaf for leaf, flt in zip(leaves, is_float)])
    return jnp.sum(jnp.square(jnp.asarray(apply_fn(full, x), jnp.float32)))

  float_leaves = [leaf for leaf, flt in zip(leaves, is_float) if flt]

  def add_example(i, total):
    x = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, i, 1), inputs)
    grads = jax.grad(squared_norm)(float_leaves, x)
    return [t + jnp.abs(g.astype(jnp.float32)) for t, g in zip(total, grads)]

  return jax.lax.fori_loop(0, num_valid, add_example, sums)


def _num_examples(inputs: chex.ArrayTree) -> int:
  """The shared leading dimension ``N`` of the leaves of ``inputs``, checked to be at least 1."""
  shapes = [np.shape(leaf) for leaf in jax.tree.leaves(inputs)]
  if not shapes or any(len(shape) == 0 for shape in shapes):
    raise ValueError(
        'inputs must be an array of shape (N, ...) or a pytree of such arrays; '
        f'got shapes {shapes}.'
    )
  if len({shape[0] for shape in shapes}) > 1:
    raise ValueError(f'the leaves of inputs have different numbers of examples: shapes {shapes}.')
  if shapes[0][0] == 0:
    raise ValueError('inputs has no examples (N == 0): the Fisher is a mean over examples.')
  return shapes[0][0]


def _check_labels(labels: chex.Array, num_examples: int) -> None:
  shape = np.shape(labels)
  if len(shape) != 1:
    raise ValueError(
        f'labels must have shape (N,), one class index per example; got shape {shape}.'
    )
  if shape[0] != num_examples:
    raise ValueError(f'labels has {shape[0]} entries but inputs has {num_examples} examples.')
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f'labels must be integer class indices; got dtype {jnp.result_type(labels)}.')


def _chunk(tree: chex.ArrayTree, start: int, size: int) -> chex.ArrayTree:
  """Rows ``start`` to ``start + size`` of every leaf, zero-padded to ``size`` rows at the end.

  A NumPy leaf is padded by NumPy (no device program); a JAX array where it lies.
  """

  def rows(leaf: chex.Array) -> chex.Array:
    part = leaf[start : start + size]
    missing = size - part.shape[0]
    if missing:
      pad = np.pad if isinstance(part, np.ndarray) else jnp.pad
      part = pad(part, [(0, missing)] + [(0, 0)] * (part.ndim - 1))
    return part

  return jax.tree.map(rows, tree)


@_lazy.jit(static_argnames=('logits_fn', 'kind', 'num_samples', 'layerwise'), donate_argnums=0)
def _accumulate(
    carry: tuple[list[chex.Array], chex.Array],
    params: chex.ArrayTree,
    inputs: chex.ArrayTree,
    labels: chex.Array | None,
    num_valid: chex.Array,
    offset: chex.Array,
    key: chex.PRNGKey | None,
    *,
    logits_fn: Callable[[Any, Any], jax.Array],
    kind: str,
    num_samples: int,
    layerwise: bool,
) -> tuple[list[chex.Array], chex.Array]:
  """Adds one chunk's per-example squared gradients to the float32 sums.

  ``carry`` is (the sums, one per float leaf of ``params`` in flattening order; the count of
  out-of-range labels). Only the first ``num_valid`` rows are examples (the rest is padding);
  ``offset`` is the chunk's first example's index in the data set.

  With ``layerwise``, the leaves of qualifying dense and convolution layers get their sums from
  one batched backward pass (:mod:`sfa_jax._layerwise_fisher`). The other leaves are walked one
  example at a time by a loop that adds each squared gradient straight into the sums, rather than
  by a ``vmap`` that materialises a ``(batch, parameters)`` array and reduces it over the leading
  axis: on XLA:CPU that reduction is poorly vectorised and dominated the cost (see
  ``benchmarks/fisher_speed.py``), and the loop's memory does not grow with the chunk size.
  """
  sums, num_bad_labels = carry
  leaves, treedef = jax.tree.flatten(params)
  is_float = [_validation.is_float_leaf(leaf) for leaf in leaves]
  float_leaves = [leaf for leaf, flt in zip(leaves, is_float) if flt]
  rows = jnp.arange(jax.tree.leaves(inputs)[0].shape[0]) < num_valid

  def apply(differentiated: list[chex.Array], x: chex.ArrayTree) -> chex.Array:
    replaced = iter(differentiated)
    full = treedef.unflatten([next(replaced) if flt else leaf for leaf, flt in zip(leaves, is_float)])
    logits = logits_fn(full, x)
    if jnp.ndim(logits) != 2:
      raise ValueError(
          f'logits_fn must return logits of shape (batch, classes); got shape {jnp.shape(logits)}.'
      )
    return logits

  def targets(log_probs: chex.Array, label: chex.Array, index: chex.Array):
    """The classes whose squared gradients one example adds, and their weights."""
    if kind == 'empirical':
      return label[None], jnp.ones(1)
    if kind == 'sampled':
      classes = jax.random.categorical(jax.random.fold_in(key, index), log_probs, shape=(num_samples,))
      return classes, jnp.full(num_samples, 1.0 / num_samples)
    return jnp.arange(log_probs.shape[-1]), jnp.exp(log_probs)

  # A Flax layer can only be in the model when the user imported flax.linen: only then is the
  # batched pass (and flax with it) loaded, so that ``import sfa_jax`` stays the core alone.
  layers = importlib.import_module('sfa_jax._layerwise_fisher') if layerwise and 'flax.linen' in sys.modules else None
  if layers is not None:
    calls, logits_shape = layers.find_affine_calls(apply, float_leaves, inputs)
  else:
    calls, logits_shape = [], jax.eval_shape(apply, float_leaves, inputs).shape
  num_classes = logits_shape[-1]
  if labels is None:
    labels = jnp.zeros(rows.shape, jnp.int32)
  else:
    bad = rows & ((labels < 0) | (labels >= num_classes))
    num_bad_labels = num_bad_labels + jnp.sum(bad, dtype=jnp.int32)
  indices = offset + jnp.arange(rows.shape[0], dtype=jnp.int32)

  if calls:
    forward = layers.tapped_log_probs(apply, calls, float_leaves, inputs)
    taps = {call.path: jnp.zeros(call.out_shape) for call in calls}
    log_probs, pullback, layer_inputs = jax.vjp(forward, taps, has_aux=True)
    classes, weights = jax.vmap(targets)(log_probs, labels, indices)

    def add_target(j, sums):
      (deltas,) = pullback(jax.nn.one_hot(classes[:, j], num_classes, dtype=jnp.float32))
      return layers.add_squared_gradients(sums, calls, layer_inputs, deltas, weights[:, j], rows)

    sums = jax.lax.fori_loop(0, classes.shape[1], add_target, sums)

  closed_form = {i for call in calls for i in (call.kernel, call.bias) if i is not None}
  looped = [i for i in range(len(float_leaves)) if i not in closed_form]
  if not looped:
    return sums, num_bad_labels

  def add_example(i, looped_sums):
    x = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, i, 1), inputs)

    def log_probs_fn(differentiated):
      full = list(float_leaves)
      for j, leaf in zip(looped, differentiated):
        full[j] = leaf
      return jax.nn.log_softmax(apply(full, x)[0].astype(jnp.float32))

    log_probs, example_pullback = jax.vjp(log_probs_fn, [float_leaves[j] for j in looped])
    classes, weights = targets(log_probs, labels[i], indices[i])

    def add(j, total):
      (grads,) = example_pullback(jax.nn.one_hot(classes[j], num_classes, dtype=jnp.float32))
      return [t + weights[j] * jnp.square(g.astype(jnp.float32)) for t, g in zip(total, grads)]

    return jax.lax.fori_loop(0, classes.shape[0], add, looped_sums)

  looped_sums = jax.lax.fori_loop(0, num_valid, add_example, [sums[j] for j in looped])
  sums = list(sums)
  for j, total in zip(looped, looped_sums):
    sums[j] = total
  return sums, num_bad_labels
