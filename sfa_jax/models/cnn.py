"""A small convolutional network for 28x28 or 32x32 images."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from sfa_jax.models._inputs import check_images
from sfa_jax.models.heads import OutputHead


class SmallCNN(nn.Module):
  """``(Conv 3x3 -> ReLU -> MaxPool 2x2)`` per width, then ``Dense -> ReLU``, then the output head.

  With the default widths this is the classic MNIST network: 32 and 64 channels, 128 hidden units.

  Attributes:
    features: channels of each convolution.
    hidden: width of the dense layer.
    num_outputs: logits per head.
    num_heads: ``1`` for a shared head, ``T`` for one head per task (see
      :mod:`sfa_jax.models.heads`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.models import SmallCNN
    >>> model = SmallCNN(num_outputs=2, num_heads=5)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> # shapes only: nothing runs
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x, task_id=0)
    >>> variables['params']['head']['kernel'].shape
    (5, 128, 2)
    >>> jax.eval_shape(model.apply, variables, x, task_id=3).shape
    (2, 2)
  """

  features: Sequence[int] = (32, 64)
  hidden: int = 128
  num_outputs: int = 10
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, task_id: Any = None, train: bool = False) -> jax.Array:
    """Logits of shape ``(batch, num_outputs)``.

    Args:
      x: images of shape ``(batch, height, width, channels)``.
      task_id: picks the head when ``num_heads > 1``; ignored otherwise.
      train: unused (no dropout, no batch statistics); accepted so that every model is called alike.

    Returns:
      The logits.
    """
    del train
    check_images(x, 'SmallCNN')
    for width in self.features:
      x = nn.relu(nn.Conv(width, kernel_size=(3, 3), padding='SAME')(x))
      x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return OutputHead(self.num_outputs, self.num_heads, name='head')(x, task_id)
