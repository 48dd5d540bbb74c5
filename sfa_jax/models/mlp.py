"""A multi-layer perceptron that flattens its input."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from sfa_jax.models.heads import OutputHead


class MLP(nn.Module):
  """Flatten, then ``Dense -> ReLU`` for each hidden width, then the output head.

  Attributes:
    hidden: the widths of the hidden layers.
    num_outputs: logits per head.
    num_heads: ``1`` for a shared head, ``T`` for one head per task (see
      :mod:`sfa_jax.models.heads`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.models import MLP
    >>> model = MLP(hidden=(32,), num_outputs=10)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> variables = model.init(jax.random.key(0), x)
    >>> model.apply(variables, x, task_id=0, train=True).shape
    (2, 10)
  """

  hidden: Sequence[int] = (256, 256)
  num_outputs: int = 10
  num_heads: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, task_id: Any = None, train: bool = False) -> jax.Array:
    """Logits of shape ``(batch, num_outputs)``.

    Args:
      x: inputs of shape ``(batch, ...)``, flattened per example.
      task_id: picks the head when ``num_heads > 1``; ignored otherwise.
      train: unused (no dropout, no batch statistics); accepted so that every model is called alike.

    Returns:
      The logits.
    """
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return OutputHead(self.num_outputs, self.num_heads, name='head')(x, task_id)
