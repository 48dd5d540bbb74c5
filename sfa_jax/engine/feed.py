"""A task's batches: rows drawn on the host once per task, examples gathered on the device.

The engine never ships a batch per step. At a task's start it draws, for every lane, which
examples each of the task's ``T`` steps trains on (:func:`task_rows`: the shuffled epochs of
:func:`sfa_jax.tasks.epoch_indices`, the replay memory's rows beside them) and places the task's
examples on the device once (:func:`on_device`); the fused steps of
:mod:`sfa_jax.engine.fused` gather each batch there. Data larger than
``TrainConfig.device_data_bytes`` (a memory-mapped :func:`sfa_jax.tasks.split_from_batches`, a
large replay memory, a sweep's many memories) stays on the host: each chunk of steps gathers its
own batches there (:func:`gathered`) and ships them at once. Both ways feed a step exactly the same
examples, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import methods as methods_lib

__all__ = ['Examples', 'examples', 'gathered']


class Examples(NamedTuple):
  """Inputs, targets and task ids of some examples (NumPy on the host, arrays on the device)."""

  x: Any
  y: Any
  ids: Any

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize for leaf in self)


class TaskRows(NamedTuple):
  """Which examples every step of a task trains on.

  Attributes:
    data: int32 ``(T, B - R)`` rows of the task's examples (:attr:`BatchPlan.data`).
    replay: int32 ``(T, R)`` rows of the replay memory, or ``None`` without one.
  """

  data: np.ndarray
  replay: np.ndarray | None


def replay_order(num_examples: int, batch_size: int, count: int, seed: int, epoch: int) -> np.ndarray:
  """``count`` batches of memory indices: shuffled passes over the memory, one after another."""
  rng = np.random.default_rng([seed, epoch, 1])
  passes = -(-count * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(passes)])
  return order[: count * batch_size].reshape(count, batch_size)


def task_rows(plan: methods_lib.BatchPlan, batch_size: int, seed: int, total_steps: int) -> TaskRows:
  """The rows of a task's ``total_steps`` steps: shuffled epochs, the last one cut where the budget ends.

  Each epoch is :func:`sfa_jax.tasks.epoch_indices` of the task's examples (the ragged end
  dropped) with ``B - R`` examples a batch (``B`` when the memory is kept apart); with a replay
  memory, each batch's last ``R`` examples are :func:`replay_order`'s rows of it.

  Args:
    plan: the lane's :class:`~sfa_jax.engine.methods.BatchPlan` for the task.
    batch_size: ``B``, examples per batch.
    seed: the task's seed (:func:`sfa_jax.engine.methods.task_seed`).
    total_steps: ``T``.

  Returns:
    The :class:`TaskRows`.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import feed, methods
    >>> split = tasks.Split(np.zeros((10, 1), np.float32), np.arange(10, dtype=np.int32))
    >>> rows = feed.task_rows(methods.BatchPlan(split, np.zeros(10, np.int32)), 4, seed=0, total_steps=5)
    >>> rows.data.shape, rows.replay
    ((5, 4), None)
  """
  current = plan.task_share(batch_size)
  per_epoch = tasks_lib.num_batches(len(plan.data.y), current)
  data, replay = [], []
  for epoch in range(-(-total_steps // per_epoch)):
    order, _ = tasks_lib.epoch_indices(len(plan.data.y), current, seed=seed, epoch=epoch)
    data.append(order)
    if plan.replay is not None:
      replay.append(replay_order(len(plan.replay.y), plan.replay_size, len(order), seed, epoch))
  cut = lambda parts: np.concatenate(parts)[:total_steps].astype(np.int32)
  return TaskRows(cut(data), cut(replay) if plan.replay is not None else None)


def examples(plan: methods_lib.BatchPlan) -> tuple[Examples, Examples | None]:
  """The plan's task examples and its replay memory (or ``None``), as :class:`Examples`."""
  data = Examples(plan.data.x, plan.data.y, plan.task_ids)
  replay = None if plan.replay is None else Examples(plan.replay.x, plan.replay.y, plan.replay_ids)
  return data, replay


def padded_length(n: int) -> int:
  """``n`` rounded up to a multiple of ``2**(bit_length(n) - 4)``: at most 1/8 more rows, and tasks
  of about one size share one shape (one compilation)."""
  grain = 1 << max(0, n.bit_length() - 4)
  return -(-n // grain) * grain


def _padded(leaf: Any, length: int) -> np.ndarray:
  leaf = np.asarray(leaf)
  if len(leaf) == length:
    return leaf
  return np.concatenate([leaf, np.zeros((length - len(leaf),) + leaf.shape[1:], leaf.dtype)])


def on_device(part: Examples, placement: Any = None) -> Examples:
  """``part`` put on the device: the default one, or with ``placement`` (a sharding, e.g. replicated
  over a mesh)."""
  if placement is None:
    return Examples(*(jax.device_put(np.asarray(leaf)) for leaf in part))
  from sfa_jax.engine import distributed

  return Examples(*(distributed.place(np.asarray(leaf), placement) for leaf in part))


def _flat(part: Examples, index: np.ndarray, length: int) -> Examples:
  """``part``'s rows ``index`` (``(steps, width)``), flattened to ``(steps·width, ...)`` and padded
  with zeros to ``length`` rows."""
  return Examples(*(_padded(np.asarray(leaf[index]).reshape((-1,) + leaf.shape[1:]), length) for leaf in part))


def gathered(data: Examples, replay: Examples | None, rows: TaskRows, start: int, count: int, length: int) -> Examples:
  """The batches of steps ``start`` to ``start + count`` gathered on the host, flattened to
  ``(length·B, ...)`` (zeros after the ``count`` steps): each step's task examples, then its
  memory's, what the device gathers from :func:`on_device` data."""
  index = rows.data[start:start + count]
  if replay is None:
    return _flat(data, index, length * index.shape[1])
  memory = rows.replay[start:start + count]
  take = lambda part, i: Examples(*(np.asarray(leaf[i]) for leaf in part))
  batches = Examples(*(np.concatenate([a, b], axis=1) for a, b in zip(take(data, index), take(replay, memory))))
  width = index.shape[1] + memory.shape[1]
  return Examples(*(_padded(leaf.reshape((-1,) + leaf.shape[2:]), length * width) for leaf in batches))


MAX_CHUNK_STEPS = 256  # the most steps one chunk program runs (the block its rows and outputs fill)


class Layout(NamedTuple):
  """Where a chunk's inputs carry a sweep's lanes: the ``jax.vmap`` axis of each, ``None`` if shared.

  Attributes:
    lanes: the step is vmapped over stacked lanes (a sweep).
    data: the task's examples: ``0`` stacked per lane, ``None`` shared.
    replay: the replay memory: ``0`` per lane, ``None`` shared or absent.
    rows: each step's rows of the task's examples: ``0`` per lane, ``None`` shared.
    replay_rows: each step's rows of the memory: ``0`` per lane, ``None`` shared.
    apart: how many of the last examples of each gathered batch are the memory's batch of its own
      (:attr:`sfa_jax.engine.methods.BatchPlan.memory_apart`), 0 when the memory is a share of
      the batch or there is none.
  """

  lanes: bool = False
  data: int | None = None
  replay: int | None = None
  rows: int | None = None
  replay_rows: int | None = None
  apart: int = 0


class Block(NamedTuple):
  """The arguments of one chunk call after the state: examples, rows, memory rows."""

  data: Examples
  replay: Examples | None
  rows: np.ndarray
  replay_rows: np.ndarray | None


class TaskFeed(NamedTuple):
  """A task's inputs for every lane of the loop: its examples, where they live, every step's rows.

  The lanes of a sweep that draw the same batches (same seed and data) form one *group*; each
  group has its examples and rows. The task's examples live on the device for the whole task
  (padded to at least the stream's largest task, so that tasks share one program); a replay
  memory, which grows from task to task, is gathered on the host for each chunk (its batches'
  share only), so that its growth changes no shape.

  Attributes:
    layout: the :class:`Layout` of the chunk calls' inputs.
    groups: each group's examples on the host: the task's, and the replay memory's (or ``None``).
    rows: each group's :class:`TaskRows`.
    device: the task's examples on the device (stacked over the groups where they differ), or
      ``None``: over the budget, each chunk's batches are gathered on the host (:func:`gathered`).
    block_steps: ``S``, the steps one chunk call holds rows for.
  """

  layout: Layout
  groups: list[tuple[Examples, Examples | None]]
  rows: list[TaskRows]
  device: Examples | None
  block_steps: int

  def block(self, start: int, count: int) -> Block:
    """The chunk call's inputs for steps ``start`` to ``start + count`` (``count <= block_steps``)."""
    size = self.block_steps
    stack = lambda parts, axis: parts[0] if axis is None else Examples(*(np.stack(leaves) for leaves in zip(*parts)))
    if self.device is None:
      batches = [gathered(data, replay, rows, start, count, size) for (data, replay), rows in zip(self.groups, self.rows)]
      width = len(batches[0].y) // size
      return Block(stack(batches, self.layout.data), None, _arange(size, width), None)
    parts = [_padded(rows.data[start:start + count], size) for rows in self.rows]
    rows = parts[0] if self.layout.rows is None else np.stack(parts, axis=1)
    if self.rows[0].replay is None:
      return Block(self.device, None, rows, None)
    width = self.rows[0].replay.shape[1]
    memory = [_flat(replay, r.replay[start:start + count], size * width) for (_, replay), r in zip(self.groups, self.rows)]
    return Block(self.device, stack(memory, self.layout.replay), rows, _arange(size, width))


def _arange(steps: int, width: int) -> np.ndarray:
  return np.arange(steps * width, dtype=np.int32).reshape(steps, width)


def task_feed(
    plans: Sequence[methods_lib.BatchPlan], rows: Sequence[TaskRows], *, lanes: bool, budget: int,
    min_rows: int = 0, placement: Any = None, place: bool = True, max_steps: int = MAX_CHUNK_STEPS,
) -> TaskFeed:
  """The :class:`TaskFeed` of a task: its examples on the device when they fit in ``budget`` bytes.

  Args:
    plans: each group's batch plan (one when every lane draws the same batches).
    rows: each group's :func:`task_rows`.
    lanes: the loop's step is vmapped over lanes (a sweep).
    budget: the most bytes of examples placed on the device for the task (the groups' task
      examples, counted once when they are the same arrays), and of one chunk's host-gathered
      batches.
    min_rows: pad the examples on the device to at least this many rows (the stream's largest
      task: every task then has one shape).
    placement: ``None`` (the default device) or the sharding of the examples (a mesh's replicated one).
    place: put the examples on the device; ``False`` leaves the feed's ``device`` as their shapes
      (``jax.ShapeDtypeStruct``), to compile the task's programs ahead without a second copy there.
    max_steps: the most steps any task of the run takes: a block of batches gathered on the host
      (a memory's, or all of them over the budget) holds no more steps than that, so that a short
      task's chunk gathers and sends no padding (every task keeps one block shape).

  Returns:
    The feed.
  """
  groups = [examples(plan) for plan in plans]
  shared = all(p.data is plans[0].data and p.task_ids is plans[0].task_ids for p in plans)
  several = len(groups) > 1
  data = groups[0][0]
  per_example = max(1, data.nbytes // max(1, len(data.y)))
  width = rows[0].data.shape[1] + (0 if rows[0].replay is None else rows[0].replay.shape[1])
  length = padded_length(max(min_rows, max(len(part.y) for part, _ in groups)))
  apart = plans[0].replay_size if plans[0].memory_apart and plans[0].replay is not None else 0
  if length * per_example * (1 if shared else len(groups)) <= budget:
    memory_width = width - rows[0].data.shape[1]
    block = MAX_CHUNK_STEPS if not memory_width else min(max_steps, _steps_within(budget, per_example * memory_width * len(groups)))
    several_memories = 0 if several and groups[0][1] is not None else None
    layout = Layout(lanes, None if shared or not several else 0, several_memories, 0 if several else None, None, apart)
    if not place:
      lead = () if shared or not several else (len(groups),)
      shapes = Examples(*(jax.ShapeDtypeStruct(lead + (length,) + np.shape(leaf)[1:], np.asarray(leaf).dtype) for leaf in data))
      return TaskFeed(layout, groups, list(rows), shapes, block)
    pad = lambda part: Examples(*(_padded(leaf, length) for leaf in part))
    device = on_device(pad(data), placement) if shared or not several else on_device(
        Examples(*(np.stack(leaves) for leaves in zip(*(pad(part) for part, _ in groups)))), placement)
    return TaskFeed(layout, groups, list(rows), device, block)
  block = min(max_steps, _steps_within(budget, per_example * width * len(groups)))
  return TaskFeed(Layout(lanes, 0 if several else None, None, None, None, apart), groups, list(rows), None, block)


def _steps_within(budget: int, bytes_per_step: int) -> int:
  """The most steps (at most :data:`MAX_CHUNK_STEPS`, at least one) whose batches fit in ``budget``."""
  return int(np.clip(budget // max(1, bytes_per_step), 1, MAX_CHUNK_STEPS))
