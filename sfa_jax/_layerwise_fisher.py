r"""Per-example squared gradients of Flax dense and convolution layers from one batched backward pass.

For a dense layer :math:`z_i = x_i W + b` applied once to each example :math:`i`, the gradient of
example :math:`i`'s loss is :math:`x_i \otimes \delta_i` for :math:`W` and :math:`\delta_i` for
:math:`b`, where :math:`\delta_i = \partial \ell_i / \partial z_i`. So the sums of their squares
over a batch are two matrix products, :math:`(x^2)^\top (\delta^2)` and :math:`\sum_i \delta_i^2`,
and every :math:`\delta_i` comes from one backward pass of the *batched* model: the gradient of
:math:`\sum_i \ell_i` with respect to a zero "tap" added to :math:`z`. No per-example gradient of
the weights is formed. (The identity behind Goodfellow's per-example gradient norms, 2015.) For a
2-D convolution the per-example kernel gradient is :math:`\sum_p \mathrm{patch}_{ip} \otimes
\delta_{ip}` over the output positions :math:`p`: formed for the whole batch as one batched matrix
product (``(batch, kernel size)`` floats, so only below :data:`MAX_CONV_GRADIENT_FLOATS`), squared
and reduced with a matrix product.

:func:`sfa_jax.fisher.diagonal_fisher` uses this for every ``flax.linen.Dense``, stacked output
head and ``flax.linen.Conv`` that it can prove qualifies, and
its per-example loop for all other parameters. A layer qualifies when, in the batched forward pass
of ``logits_fn``, it is called exactly once, on a float32 input whose leading axis is the batch,
with float32 parameters that are leaves of the params given (the same arrays, not copies or casts)
and used by no other layer; a Dense layer on rows ``(batch, features)`` without a custom
``dot_general``; a Conv on NHWC images, 2-D kernel, ``'SAME'`` or ``'VALID'`` padding, no feature
groups, mask, input dilation or custom ``conv_general_dilated``; a stacked output head is any
module whose class sets ``stacked_heads_layout = True`` (as :class:`sfa_jax.models.heads.OutputHead`
does): one dense layer's ``kernel`` and ``bias`` per head, stacked on a leading axis of
``num_heads`` when that is above 1, the head picked per example by ``task_id``.

Reference:
  Goodfellow, `Efficient per-example gradient computations <https://arxiv.org/abs/1510.01799>`_,
  2015
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


_HIGHEST = jax.lax.Precision.HIGHEST


class AffineCall(NamedTuple):
  """A qualifying layer: where it sits, which float leaves are its kernel and bias, its output shape."""

  path: tuple[str, ...]
  kernel: int
  bias: int | None
  num_heads: int  # 0: a plain (features, outputs) kernel; H: a stacked head's (H, features, outputs)
  conv: tuple | None = None  # nn.Conv: (window_strides, padding, kernel_dilation); None: dense
  out_shape: tuple[int, ...] = ()


# Per-example convolution gradients are formed explicitly, (batch, kernel size) floats: above this
# many, the layer is left to the per-example loop.
MAX_CONV_GRADIENT_FLOATS = 2**25


def _pair(value) -> tuple[int, int] | None:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  return value if len(value) == 2 and all(isinstance(v, int) for v in value) else None


def _conv_settings(module: nn.Conv, x) -> tuple | None:
  """(window_strides, padding, kernel_dilation) of a plain 2-D NHWC convolution, else ``None``."""
  if type(module) is not nn.Conv or x.ndim != 4 or len(module.kernel_size) != 2:
    return None
  if module.feature_group_count != 1 or module.mask is not None:
    return None
  if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
    return None
  if module.padding not in ('SAME', 'VALID') or _pair(module.input_dilation) != (1, 1):
    return None
  strides, dilation = _pair(module.strides), _pair(module.kernel_dilation)
  if strides is None or dilation is None:
    return None
  return (strides, module.padding, dilation)


def _match(module: nn.Module, args: tuple, leaf_index: dict[int, int]) -> AffineCall | None:
  """The :class:`AffineCall` of this module call (output shape not yet known), or ``None``."""
  if not args or not hasattr(args[0], 'shape') or args[0].dtype != jnp.float32:
    return None
  x, conv = args[0], None
  if isinstance(module, nn.Dense):
    if module.dot_general is not None or module.dot_general_cls is not None:
      return None
    use_bias, num_heads = module.use_bias, 0
  elif getattr(type(module), 'stacked_heads_layout', False):  # e.g. sfa_jax.models.heads.OutputHead
    use_bias, num_heads = True, (0 if module.num_heads == 1 else module.num_heads)
  elif isinstance(module, nn.Conv):
    conv = _conv_settings(module, x)
    if conv is None:
      return None
    use_bias, num_heads = module.use_bias, 0
  else:
    return None
  if conv is None and x.ndim != 2:
    return None
  if getattr(module, 'dtype', None) not in (None, jnp.float32):
    return None
  kernel = module.get_variable('params', 'kernel')
  bias = module.get_variable('params', 'bias') if use_bias else None
  if kernel is None or id(kernel) not in leaf_index or kernel.dtype != jnp.float32:
    return None
  if use_bias and (bias is None or id(bias) not in leaf_index or bias.dtype != jnp.float32):
    return None
  if conv is not None and x.shape[0] * kernel.size > MAX_CONV_GRADIENT_FLOATS:
    return None
  return AffineCall(
      module.path, leaf_index[id(kernel)], leaf_index[id(bias)] if use_bias else None, num_heads, conv
  )


def find_affine_calls(
    apply: Callable[[list[jax.Array], Any], jax.Array], float_leaves: list[jax.Array], inputs: Any
) -> tuple[list[AffineCall], tuple[int, ...]]:
  """The qualifying layers of ``apply(float_leaves, inputs)``, and the shape of its logits.

  Traced abstractly (``jax.eval_shape``): nothing is computed. A layer called more than once (shared
  weights) or whose leaves another layer also uses does not qualify.
  """
  seen: list[AffineCall | None] = []
  paths: collections.Counter = collections.Counter()
  batch = jax.tree.leaves(inputs)[0].shape[0]

  def trace(leaves, x):
    leaf_index = {id(leaf): i for i, leaf in enumerate(leaves)}

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != '__call__':
        return next_fun(*args, **kwargs)
      paths[context.module.path] += 1
      call = _match(context.module, args, leaf_index)
      out = next_fun(*args, **kwargs)
      if call is not None and args[0].shape[0] == batch and getattr(out, 'shape', (None,))[0] == batch:
        seen.append(call._replace(out_shape=tuple(out.shape)))
      return out

    with nn.intercept_methods(interceptor):
      return apply(leaves, x)

  logits = jax.eval_shape(trace, float_leaves, inputs)
  calls = [call for call in seen if call is not None and paths[call.path] == 1]
  uses = collections.Counter(i for call in calls for i in (call.kernel, call.bias) if i is not None)
  calls = [call for call in calls if all(uses[i] == 1 for i in (call.kernel, call.bias) if i is not None)]
  return calls, logits.shape


def tapped_log_probs(
    apply: Callable[[list[jax.Array], Any], jax.Array],
    calls: list[AffineCall],
    float_leaves: list[jax.Array],
    inputs: Any,
) -> Callable[[dict], tuple[jax.Array, dict]]:
  """``taps -> (log_probs, layer_inputs)``: the batched model with ``taps[path]`` added to each output.

  Differentiating ``log_probs`` with respect to the (zero) taps gives each layer's output gradient
  per example; ``layer_inputs[path]`` is ``(x, task_ids)``, the layer's input and (OutputHead with
  several heads) the head of each example.
  """
  by_path = {call.path: call for call in calls}

  def forward(taps):
    layer_inputs = {}

    def interceptor(next_fun, args, kwargs, context):
      call = by_path.get(context.module.path) if context.method_name == '__call__' else None
      if call is None:
        return next_fun(*args, **kwargs)
      task_ids = None
      if call.num_heads:
        task_ids = args[1] if len(args) > 1 else kwargs['task_id']
        task_ids = jnp.broadcast_to(jnp.asarray(task_ids), (args[0].shape[0],))
      layer_inputs[call.path] = (jax.lax.stop_gradient(args[0]), task_ids)
      return next_fun(*args, **kwargs) + taps[call.path]

    with nn.intercept_methods(interceptor):
      logits = apply(float_leaves, inputs)
    return jax.nn.log_softmax(logits.astype(jnp.float32)), layer_inputs

  return forward


def add_squared_gradients(
    sums: list[jax.Array],
    calls: list[AffineCall],
    layer_inputs: dict,
    deltas: dict,
    row_weights: jax.Array,
    rows: jax.Array,
) -> list[jax.Array]:
  r"""Adds each layer's :math:`\sum_i w_i g_i^2`, kernel and bias, to the sums.

  Dense layers: :math:`(x^2)^\top (w\,\delta^2)` and :math:`\sum_i w_i \delta_i^2`.
  Convolutions: the per-example gradients, :math:`g_i = \sum_p \mathrm{patch}_{ip} \otimes
  \delta_{ip}` over output positions :math:`p`, as one batched product, squared and reduced with
  a matrix product. ``rows`` masks the examples (padding rows, whose values may be NaN, are
  selected away, not multiplied by zero); ``row_weights`` weighs each example's term.
  """
  sums = list(sums)
  weights = jnp.where(rows, row_weights, 0.0)
  for call in calls:
    x, task_ids = layer_inputs[call.path]
    delta = deltas[call.path]
    if call.conv is not None:
      kernel_shape = sums[call.kernel].shape
      per_example = _conv_gradients(x, delta, kernel_shape, call.conv)
      kernel = jnp.tensordot(weights, jnp.where(rows[:, None], jnp.square(per_example), 0.0), axes=1)
      kernel = kernel.reshape(kernel_shape)
      bias_grads = jnp.sum(delta.reshape(delta.shape[0], -1, delta.shape[-1]), axis=1)
      bias = jnp.tensordot(weights, jnp.where(rows[:, None], jnp.square(bias_grads), 0.0), axes=1)
    else:
      x2 = jnp.where(rows[:, None], jnp.square(x), 0.0)
      d2 = jnp.where(rows[:, None], weights[:, None] * jnp.square(delta), 0.0)
      if call.num_heads:
        heads = jax.nn.one_hot(task_ids, call.num_heads, dtype=jnp.float32)
        kernel = jnp.einsum('bh,bf,bo->hfo', heads, x2, d2, precision=_HIGHEST)
        bias = jnp.einsum('bh,bo->ho', heads, d2, precision=_HIGHEST)
      else:
        kernel, bias = jnp.matmul(x2.T, d2, precision=_HIGHEST), jnp.sum(d2, axis=0)
    sums[call.kernel] = sums[call.kernel] + kernel
    if call.bias is not None:
      sums[call.bias] = sums[call.bias] + bias
  return sums


def _conv_gradients(x: jax.Array, delta: jax.Array, kernel_shape: tuple, conv: tuple) -> jax.Array:
  """Per-example kernel gradients of a 2-D NHWC convolution, flattened: ``(batch, kh·kw·cin·cout)``."""
  batch = x.shape[0]
  kh, kw, cin, cout = kernel_shape
  patches = _patches(x, (kh, kw), *conv)  # (batch, positions, kh·kw·cin), the kernel's order
  per_example = jnp.einsum('bpk,bpo->bko', patches, delta.reshape(batch, -1, cout), precision=_HIGHEST)
  return per_example.reshape(batch, -1)


def _patches(x: jax.Array, window: tuple, strides: tuple, padding: str, dilation: tuple) -> jax.Array:
  """The input window of every output position, by strided slices (data movement only).

  ``jax.lax.conv_general_dilated_patches`` computes the same as a convolution with an identity
  kernel, which costs (kh·kw·cin)² multiply-adds per position: slower here than the whole Fisher.
  """
  batch, _, _, cin = x.shape
  extent = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
  pads = jax.lax.padtype_to_pads(x.shape[1:3], extent, strides, padding)
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = [(size - e) // s + 1 for size, e, s in zip(x.shape[1:3], extent, strides)]
  windows = [
      jax.lax.slice(
          x,
          (0, i * dilation[0], j * dilation[1], 0),
          (batch, i * dilation[0] + (out[0] - 1) * strides[0] + 1, j * dilation[1] + (out[1] - 1) * strides[1] + 1, cin),
          (1, strides[0], strides[1], 1),
      )
      for i in range(window[0])
      for j in range(window[1])
  ]
  return jnp.stack(windows, axis=3).reshape(batch, out[0] * out[1], window[0] * window[1] * cin)
