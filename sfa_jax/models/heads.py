"""Output heads: one shared head, or one head per task for the task-incremental setting.

With ``num_heads = 1`` the head is a plain dense layer (``kernel`` of shape ``(features, outputs)``,
``bias`` of shape ``(outputs,)``, the layout of ``flax.linen.Dense``) and ``task_id`` is ignored, so
the class-incremental and domain-incremental settings pass it or not, alike.

With ``num_heads = H > 1`` the head holds one dense layer per task, stacked: ``kernel`` of shape
``(H, features, outputs)`` and ``bias`` of shape ``(H, outputs)``, so
``params['head']['kernel'][t]`` is task ``t``'s head. ``task_id`` then picks the head: a scalar for
a batch from one task, or a vector with one task id per example for a batch that mixes tasks
(replay). ``task_id`` is an array argument, not a static one: one compiled step serves every task.
The head computes all ``H`` logits and gathers the selected ones, which costs ``H`` small matrix
products, and gradients reach only the heads that were selected.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import _validation


def _check_task_id(task_id: Any, num_heads: int, batch_size: int) -> None:
  """Raises ``ValueError`` unless ``task_id`` can select among ``num_heads`` heads.

  ``task_id`` must be given, hold integers, and be a scalar or a vector of ``batch_size`` entries.
  Concrete values must also lie in ``[0, num_heads)``; traced ones cannot be inspected (an
  out-of-range traced id gives NaN logits, see :class:`OutputHead`).

  Args:
    task_id: the ``task_id`` passed to the model.
    num_heads: the number of heads, ``> 1``.
    batch_size: the leading dimension of the input batch.
  """
  if task_id is None:
    raise ValueError(
        f'This model has num_heads={num_heads} task heads: pass task_id=<int in [0, {num_heads})> '
        f'(or one id per example) to pick the head.'
    )
  dtype = getattr(task_id, 'dtype', None)
  dtype = dtype if dtype is not None else np.asarray(task_id).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'task_id must hold integers; got dtype {dtype}.')
  shape = np.shape(task_id)
  if shape not in ((), (batch_size,)):
    raise ValueError(
        f'task_id must be a scalar or have shape ({batch_size},), one id per example; '
        f'got shape {shape}.'
    )
  if _validation.is_traced(task_id):
    return
  ids = np.asarray(task_id)
  if np.any((ids < 0) | (ids >= num_heads)):
    raise ValueError(f'task_id must lie in [0, {num_heads}); got {ids.tolist()}.')


class OutputHead(nn.Module):
  """The classification head: a shared dense layer, or one per task selected by ``task_id``.

  Attributes:
    num_outputs: logits per head (classes per task in the task-incremental setting).
    num_heads: ``1`` for a shared head, ``T`` for one head per task.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.models.heads import OutputHead
    >>> head = OutputHead(num_outputs=2, num_heads=5)
    >>> features = jnp.ones((3, 4))
    >>> variables = head.init(jax.random.key(0), features, task_id=0)
    >>> variables['params']['kernel'].shape
    (5, 4, 2)
    >>> head.apply(variables, features, task_id=jnp.array([0, 4, 2])).shape
    (3, 2)
  """

  num_outputs: int
  num_heads: int = 1

  # The layout :func:`sfa_jax.diagonal_fisher`'s batched layer-wise pass reads: ``kernel`` and
  # ``bias`` of one dense layer per head, stacked on a leading axis when ``num_heads > 1``, the
  # head picked per example by ``task_id``.
  stacked_heads_layout: ClassVar[bool] = True

  @nn.compact
  def __call__(self, features: jax.Array, task_id: Any = None) -> jax.Array:
    """Logits of shape ``(batch, num_outputs)`` from ``features`` of shape ``(batch, features)``.

    Args:
      features: the model's penultimate activations.
      task_id: ignored with one head; with several, an int scalar or an ``(batch,)`` int vector.
        A traced id outside ``[0, num_heads)`` gives NaN logits rather than another task's.

    Returns:
      The logits of the selected head(s).
    """
    _validation.check_int('num_outputs', self.num_outputs)
    _validation.check_int('num_heads', self.num_heads)
    num_features = features.shape[-1]
    if self.num_heads == 1:
      kernel = self.param(
          'kernel', nn.initializers.lecun_normal(), (num_features, self.num_outputs)
      )
      bias = self.param('bias', nn.initializers.zeros_init(), (self.num_outputs,))
      return features @ kernel + bias
    _check_task_id(task_id, self.num_heads, features.shape[0])
    # Each head is initialised like its own dense layer: axis 0 indexes heads, not inputs.
    kernel_init = nn.initializers.lecun_normal(batch_axis=(0,))
    kernel = self.param('kernel', kernel_init, (self.num_heads, num_features, self.num_outputs))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.num_heads, self.num_outputs))
    all_logits = jnp.einsum('bf,hfo->bho', features, kernel) + bias
    ids = jnp.broadcast_to(jnp.asarray(task_id), (features.shape[0],))
    selected = jnp.take_along_axis(
        all_logits, ids[:, None, None], axis=1, mode='fill', wrap_negative_indices=False
    )
    return selected[:, 0]
