r"""Per-example squared gradients of Flax dense layers in closed form, from one batched backward pass.

For a dense layer :math:`z_i = x_i W + b` applied once to each example :math:`i`, the gradient of
example :math:`i`'s loss is :math:`x_i \otimes \delta_i` for :math:`W` and :math:`\delta_i` for
:math:`b`, where :math:`\delta_i = \partial \ell_i / \partial z_i`. So the sums of their squares
over a batch are two matrix products, :math:`(x^2)^\top (\delta^2)` and :math:`\sum_i \delta_i^2`,
and every :math:`\delta_i` comes from one backward pass of the *batched* model: the gradient of
:math:`\sum_i \ell_i` with respect to a zero "tap" added to :math:`z`. No per-example gradient of
the weights is ever formed. (The identity behind Goodfellow's per-example gradient norms, 2015.)

:func:`sfa_jax.fisher.diagonal_fisher` uses it for every ``flax.linen.Dense`` and
:class:`sfa_jax.models.heads.OutputHead` that it can prove qualifies, and its per-example loop for
all other parameters. A layer qualifies when, in the batched forward pass of ``logits_fn``, it is
called exactly once, on a float32 input of shape ``(batch, features)``, with float32 parameters
that are leaves of the params given (the same arrays, not copies or casts), and (Dense) without a
custom ``dot_general``.

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

from sfa_jax.models.heads import OutputHead

_HIGHEST = jax.lax.Precision.HIGHEST


class AffineCall(NamedTuple):
  """A qualifying dense layer: where it sits, and which float leaves are its kernel and bias."""

  path: tuple[str, ...]
  kernel: int
  bias: int | None
  num_heads: int  # 0: a plain (features, outputs) kernel; H: OutputHead's (H, features, outputs)


def _match(module: nn.Module, args: tuple, kwargs: dict, leaf_index: dict[int, int]) -> AffineCall | None:
  """The :class:`AffineCall` of this module call, or ``None`` when the closed form does not apply."""
  if isinstance(module, nn.Dense):
    if module.dot_general is not None or module.dot_general_cls is not None:
      return None
    if module.dtype not in (None, jnp.float32):
      return None
    use_bias, num_heads = module.use_bias, 0
  elif isinstance(module, OutputHead):
    use_bias, num_heads = True, (0 if module.num_heads == 1 else module.num_heads)
  else:
    return None
  if not args or len(getattr(args[0], 'shape', ())) != 2 or args[0].dtype != jnp.float32:
    return None
  kernel = module.get_variable('params', 'kernel')
  bias = module.get_variable('params', 'bias') if use_bias else None
  if kernel is None or id(kernel) not in leaf_index or kernel.dtype != jnp.float32:
    return None
  if use_bias and (bias is None or id(bias) not in leaf_index or bias.dtype != jnp.float32):
    return None
  return AffineCall(module.path, leaf_index[id(kernel)], leaf_index[id(bias)] if use_bias else None, num_heads)


def find_affine_calls(
    apply: Callable[[list[jax.Array], Any], jax.Array], float_leaves: list[jax.Array], inputs: Any
) -> tuple[list[AffineCall], tuple[int, ...]]:
  """The qualifying dense layers of ``apply(float_leaves, inputs)``, and the shape of its logits.

  Traced abstractly (``jax.eval_shape``): nothing is computed. A layer called more than once (shared
  weights) or whose leaves another layer also uses does not qualify.
  """
  seen: list[AffineCall | None] = []
  paths: collections.Counter = collections.Counter()
  batch = jax.tree.leaves(inputs)[0].shape[0]

  def trace(leaves, x):
    leaf_index = {id(leaf): i for i, leaf in enumerate(leaves)}

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == '__call__':
        paths[context.module.path] += 1
        call = _match(context.module, args, kwargs, leaf_index)
        seen.append(call if call is not None and args[0].shape[0] == batch else None)
      return next_fun(*args, **kwargs)

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
  """Adds :math:`\\sum_i w_i (x_i \\otimes \\delta_i)^2` and :math:`\\sum_i w_i \\delta_i^2` to the sums.

  ``rows`` masks the examples (padding rows, whose values may be NaN, are selected away, not
  multiplied by zero); ``row_weights`` weighs each example's term.
  """
  sums = list(sums)
  for call in calls:
    x, task_ids = layer_inputs[call.path]
    x2 = jnp.where(rows[:, None], jnp.square(x), 0.0)
    d2 = jnp.where(rows[:, None], row_weights[:, None] * jnp.square(deltas[call.path]), 0.0)
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
