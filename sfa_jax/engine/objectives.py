"""What the engine minimises and measures on a batch: the loss and the metric of the accuracy matrix.

An :class:`Objective` is two pure functions of the model's outputs, the batch's targets and a
mask of the valid examples. The default, :data:`CLASSIFICATION`, is softmax cross-entropy and
accuracy; :func:`regression` is the mean squared error scored by the share of predictions within
a tolerance. Yours is any pair of functions:

Example:
  >>> import jax.numpy as jnp
  >>> from sfa_jax.engine import objectives
  >>> def loss(outputs, targets, mask):     # mean absolute error; metric: its negation
  ...   errors = jnp.abs(outputs[:, 0] - targets) * mask
  ...   mean = errors.sum() / jnp.maximum(mask.sum(), 1)
  ...   return mean, -mean
  >>> def score(outputs, targets, mask):    # summed over the valid examples
  ...   return -(jnp.abs(outputs[:, 0] - targets) * mask).sum()
  >>> mae = objectives.Objective('mae', loss, score)
  >>> float(mae.loss(jnp.ones((2, 1)), jnp.zeros(2), jnp.ones(2, bool))[0])
  1.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Objective(NamedTuple):
  """The loss the engine trains on and the metric it reports (the entries of the accuracy matrix).

  Attributes:
    name: identifies the objective in a run's fingerprint (its checkpoints).
    loss: ``loss(outputs, targets, mask) -> (loss, metric)``, both means over the valid examples
      (``mask`` True); the gradient is taken of ``loss``.
    score: ``score(outputs, targets, mask) -> sum`` of the per-example metric over the valid
      examples; the engine divides by the number of examples of the evaluated split.
  """

  name: str
  loss: Callable[[Any, Any, Any], tuple[jax.Array, jax.Array]]
  score: Callable[[Any, Any, Any], jax.Array]


def _cross_entropy_and_accuracy(logits, labels, mask):
  weights = mask.astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (losses * weights).sum() / count, (correct * weights).sum() / count


def _correct_count(logits, labels, mask):
  return jnp.sum((jnp.argmax(logits, -1) == labels) & mask)


CLASSIFICATION = Objective('classification', _cross_entropy_and_accuracy, _correct_count)
"""Softmax cross-entropy on integer labels; the metric is accuracy. EWC's Fisher is the categorical one."""


def regression(tolerance: float = 0.1) -> Objective:
  """Mean squared error on real targets; the metric is the share of predictions within ``tolerance``.

  The model's output has one column per target dimension; targets of shape ``(N,)`` are compared
  with the first column.

  Args:
    tolerance: the largest absolute error that counts as right (> 0).

  Returns:
    The objective.

  Example:
    >>> import jax.numpy as jnp
    >>> objective = regression(0.5)
    >>> outputs, targets, mask = jnp.array([[0.2], [2.0]]), jnp.zeros(2), jnp.ones(2, bool)
    >>> loss, within = objective.loss(outputs, targets, mask)
    >>> round(float(loss), 3), float(within)
    (2.02, 0.5)
  """
  if not tolerance > 0:
    raise ValueError(f'tolerance must be > 0; got {tolerance!r}.')

  def errors(outputs, targets):
    outputs = outputs.reshape(outputs.shape[0], -1)
    targets = targets.reshape(targets.shape[0], -1)
    return outputs[:, : targets.shape[1]] - targets

  def loss(outputs, targets, mask):
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    error = errors(outputs, targets)
    within = jnp.all(jnp.abs(error) <= tolerance, axis=-1).astype(jnp.float32)
    return (jnp.mean(error**2, axis=-1) * weights).sum() / count, (within * weights).sum() / count

  def score(outputs, targets, mask):
    return jnp.sum(jnp.all(jnp.abs(errors(outputs, targets)) <= tolerance, axis=-1) & mask)

  return Objective(f'regression(tolerance={tolerance:g})', loss, score)


def _token_loss_and_accuracy(logits, targets, mask):
  weights = jnp.broadcast_to(mask[:, None], targets.shape).astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (losses * weights).sum() / count, (correct * weights).sum() / count


def _window_token_accuracy(logits, targets, mask):
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(correct.mean(axis=-1) * mask)


NEXT_TOKEN = Objective('next-token', _token_loss_and_accuracy, _window_token_accuracy)
"""A causal language model's objective: inputs are token windows ``(N, L)``, targets the same windows
shifted by one; the loss is the mean next-token cross-entropy over the batch's tokens, the metric
the share of next tokens predicted (greedy), per window."""

