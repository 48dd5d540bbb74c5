"""ResNet-18 in its CIFAR form: a 3x3 stem, no max-pool, four stages of two basic blocks.

The layout follows the ResNet-18 most continual-learning papers train on CIFAR (the ``ResNet18`` of
kuangliu/pytorch-cifar and Mammoth): 11,173,962 parameters with 10 outputs. Convolutions have no
bias; BatchNorm uses PyTorch's defaults (momentum 0.1 on the new statistics, i.e. Flax
``momentum=0.9``, and ``epsilon=1e-5``). Padding is symmetric as in PyTorch, also on strided
convolutions.

References:
  He et al, `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`_, 2016
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfa_jax.models._inputs import check_images
from sfa_jax.models.heads import OutputHead

__all__ = ['ResNet18']

_STAGE_WIDTHS = (64, 128, 256, 512)
_BLOCKS_PER_STAGE = 2


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


_conv3x3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, use_bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a residual connection.

  The shortcut is the identity, or a strided 1x1 convolution and BatchNorm when the block changes
  the resolution or the number of channels.

  Attributes:
    features: output channels.
    strides: stride of the first convolution and of the projection shortcut.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """The block's output, of shape ``(batch, height / strides, width / strides, features)``."""
    y = _conv3x3(self.features, strides=self.strides, name='conv1')(x)
    y = nn.relu(_batch_norm(train, 'bn1')(y))
    y = _conv3x3(self.features, name='conv2')(y)
    y = _batch_norm(train, 'bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(
          self.features, (1, 1), strides=self.strides, use_bias=False, name='shortcut_conv'
      )(x)
      shortcut = _batch_norm(train, 'shortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """CIFAR-style ResNet-18 with a shared or per-task output head.

  BatchNorm keeps its running statistics in the ``'batch_stats'`` collection. In training mode the
  batch's own statistics normalise and the running ones must be updated:
  ``logits, state = model.apply(variables, x, train=True, mutable=['batch_stats'])``; in evaluation
  mode the running statistics normalise and nothing changes.

  Attributes:
    num_outputs: logits per head.
    num_heads: ``1`` for a shared head, ``T`` for one head per task (see
      :mod:`sfa_jax.models.heads`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.models import ResNet18
    >>> model = ResNet18(num_outputs=10)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only
    >>> sorted(shapes)
    ['batch_stats', 'params']
    >>> sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))
    11173962
  """

  num_outputs: int = 10
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, task_id: Any = None, train: bool = False) -> jax.Array:
    """Logits of shape ``(batch, num_outputs)``.

    Args:
      x: images of shape ``(batch, height, width, channels)``; 32x32 for CIFAR, any size works.
      task_id: picks the head when ``num_heads > 1``; ignored otherwise.
      train: normalise with the batch's statistics and update the running ones (pass
        ``mutable=['batch_stats']`` to ``apply``); otherwise use the running statistics.

    Returns:
      The logits.
    """
    check_images(x, 'ResNet18')
    x = _conv3x3(_STAGE_WIDTHS[0], name='stem_conv')(x)
    x = nn.relu(_batch_norm(train, 'stem_bn')(x))
    for stage, width in enumerate(_STAGE_WIDTHS):
      for block in range(_BLOCKS_PER_STAGE):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return OutputHead(self.num_outputs, self.num_heads, name='head')(x, task_id)
