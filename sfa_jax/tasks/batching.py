"""Deterministic epochs of one static batch shape, and stratified subsets for replay.

A training loop that compiles once wants every batch the same shape. :func:`epoch_batches` turns a
split into one epoch as stacked arrays ``x[num_batches, B, ...]``, ``y[num_batches, B]``, ready for
a ``jax.lax.scan`` over the batches, shuffled from ``(seed, epoch)`` alone. The ragged end of an
epoch is either dropped (the default for training: each epoch drops other examples, since the order
is reshuffled) or padded; :func:`eval_batches` keeps the order and pads, so that every test example
is counted exactly once. Padding repeats examples from the start of the epoch's order, so padded
rows hold real images, and ``mask`` is False on them: weight the loss or the accuracy by it.
:func:`epoch_indices` gives the same epoch as indices, to gather from data kept on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sfa_jax.tasks.stream import Split


class Batches(NamedTuple):
  """An epoch as stacked batches (a NamedTuple, hence also a JAX pytree).

  Attributes:
    x: the images, shape ``(num_batches, batch_size, H, W, C)``.
    y: the labels, int32, shape ``(num_batches, batch_size)`` (real-valued targets keep their dtype
      and shape after the batch axes).
    mask: bool, shape ``(num_batches, batch_size)``: True for real examples, False for padding.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> split = tasks.Split(np.zeros((10, 2), np.float32), np.arange(10, dtype=np.int32))
    >>> batches = tasks.eval_batches(split, batch_size=4)  # the last batch padded
    >>> batches.x.shape, batches.mask.sum(axis=1).tolist()
    ((3, 4, 2), [4, 4, 2])
  """

  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """The number of batches in an epoch of ``num_examples``: rounded down if dropping, else up.

  Use it to compute an optimizer's step count (e.g. SFA's ``total_steps``) before training.

  Example:
    >>> num_batches(10, 4), num_batches(10, 4, drop_remainder=False)
    (2, 3)
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1; got {batch_size}.')
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def _cut(order: np.ndarray, batch_size: int, drop_remainder: bool) -> tuple[np.ndarray, ...]:
  """``order`` cut into rows of ``batch_size``, the end dropped or padded, and the padding mask."""
  count = num_batches(len(order), batch_size, drop_remainder)
  if count == 0:
    raise ValueError(
        f'{len(order)} examples make no full batch of {batch_size}: use a smaller batch_size or '
        f'drop_remainder=False.'
    )
  total = count * batch_size
  padding = max(0, total - len(order))
  indices = np.concatenate([order[:total], order[np.arange(padding) % len(order)]])
  mask = np.arange(total) < len(order)
  return indices.reshape(count, batch_size), mask.reshape(count, batch_size)


def _gather(split: Split, indices: np.ndarray, mask: np.ndarray) -> Batches:
  y = split.y[indices]
  return Batches(split.x[indices], y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y, mask)


def epoch_indices(
    num_examples: int, batch_size: int, *, seed: int, epoch: int, drop_remainder: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """The example indices of one shuffled epoch, ``(num_batches, batch_size)``, and their mask.

  What :func:`epoch_batches` gathers; use it directly to gather from data already on the device.
  The order is ``np.random.default_rng([seed, epoch]).permutation(num_examples)``: the same
  ``(seed, epoch)`` always gives the same epoch, and every epoch its own order.

  Args:
    num_examples: ``N``, the size of the split.
    batch_size: ``B``, the examples per batch.
    seed: a non-negative integer.
    epoch: the epoch's index, a non-negative integer.
    drop_remainder: drop the last ``N % B`` indices of the shuffled order (True), or pad the last
      row with indices repeated from the start of the order, flagged False in the mask (False).

  Returns:
    ``(indices, mask)``: int64 indices and a bool mask, both ``(num_batches(N, B,
    drop_remainder), B)``.

  Example:
    >>> indices, mask = epoch_indices(5, 2, seed=0, epoch=0, drop_remainder=False)
    >>> indices.shape, sorted(indices[mask].tolist()), mask[-1].tolist()
    ((3, 2), [0, 1, 2, 3, 4], [True, False])
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return _cut(order, batch_size, drop_remainder)


def epoch_batches(
    split: Split, batch_size: int, *, seed: int, epoch: int, drop_remainder: bool = True
) -> Batches:
  """One shuffled epoch of ``split`` as batches of one static shape.

  The examples of :func:`epoch_indices` (same arguments), gathered.

  Args:
    split: the examples.
    batch_size: ``B``, the examples per batch.
    seed: a non-negative integer.
    epoch: the epoch's index, a non-negative integer.
    drop_remainder: drop the last ``N % B`` examples of the shuffled order (True), or pad the last
      batch with repeated examples flagged by ``mask`` (False).

  Returns:
    :class:`Batches` with ``num_batches(N, B, drop_remainder)`` batches.

  Example:
    >>> split = Split(np.zeros((10, 2, 2, 1), np.float32), np.arange(10, dtype=np.int32))
    >>> batches = epoch_batches(split, 4, seed=0, epoch=0)
    >>> batches.x.shape, batches.y.shape, bool(batches.mask.all())
    ((2, 4, 2, 2, 1), (2, 4), True)
    >>> padded = epoch_batches(split, 4, seed=0, epoch=0, drop_remainder=False)
    >>> padded.mask.sum(axis=1).tolist()
    [4, 4, 2]
  """
  indices, mask = epoch_indices(
      len(split.y), batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder
  )
  return _gather(split, indices, mask)


def eval_batches(split: Split, batch_size: int) -> Batches:
  """``split`` in its own order as batches of one static shape, the last one padded.

  Args:
    split: the examples.
    batch_size: the examples per batch.

  Returns:
    :class:`Batches`; ``mask`` is False on the padding, True exactly once for every example.

  Example:
    >>> split = Split(np.zeros((5, 1, 1, 1), np.float32), np.arange(5, dtype=np.int32))
    >>> batches = eval_batches(split, 2)
    >>> batches.y.tolist(), batches.mask.tolist()
    ([[0, 1], [2, 3], [4, 0]], [[True, True], [True, True], [True, False]])
  """
  return _gather(split, *_cut(np.arange(len(split.y)), batch_size, drop_remainder=False))


def subsample(split: Split, fraction: float, seed: int) -> Split:
  """A random subset of ``split`` stratified by class, e.g. the replay memory of a past task.

  Class ``c`` with ``n_c`` examples keeps ``max(1, round(fraction * n_c))`` of them (halves rounded
  to even), chosen by ``np.random.default_rng(seed)``; the kept examples stay in their order.
  Targets that are not one integer label per example (real values, token sequences) have no
  classes: ``max(1, round(fraction * N))`` of all the examples are kept.

  Args:
    split: the examples.
    fraction: the fraction of each class kept, in ``(0, 1]``.
    seed: the seed of the choice.

  Returns:
    A new :class:`Split`.

  Example:
    >>> labels = np.array([0] * 8 + [1] * 2, np.int32)
    >>> split = Split(np.zeros((10, 1, 1, 1), np.float32), labels)
    >>> np.bincount(subsample(split, 0.25, seed=0).y).tolist()
    [2, 1]
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must lie in (0, 1]; got {fraction!r}.')
  rng = np.random.default_rng(seed)
  labels = np.asarray(split.y)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):  # real or sequence targets: no classes
    kept = np.sort(rng.choice(len(split.y), max(1, round(fraction * len(split.y))), replace=False))
    return Split(split.x[kept], split.y[kept])
  keep = []
  for c in np.unique(split.y):
    members = np.flatnonzero(split.y == c)
    keep.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
  kept = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
  return Split(split.x[kept], split.y[kept])
