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
  dropped) with ``B - R`` examples a batch; with a replay memory, each batch's last ``R`` examples
  are :func:`replay_order`'s rows of it.

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
  current = batch_size - plan.replay_size
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


def stacked(parts: Sequence[Examples]) -> Examples:
  """The lanes' examples stacked on a leading axis, each padded to one :func:`padded_length`."""
  length = padded_length(max(len(part.y) for part in parts))
  return Examples(*(np.stack([_padded(leaf, length) for leaf in leaves]) for leaves in zip(*parts)))


def on_device(part: Examples, placement: Any = None, *, pad: bool = True) -> Examples:
  """``part`` put on the device, its rows padded to :func:`padded_length` (``pad``; a part of
  :func:`stacked` lanes is padded already).

  Args:
    part: the examples, NumPy.
    placement: ``None`` (the default device) or a sharding, e.g. replicated over a mesh.
    pad: pad the rows (axis 0).

  Returns:
    The examples as device arrays.
  """
  if pad:
    part = Examples(*(_padded(leaf, padded_length(len(part.y))) for leaf in part))
  if placement is None:
    return Examples(*(jax.device_put(np.asarray(leaf)) for leaf in part))
  from sfa_jax import distributed

  return Examples(*(distributed.place(np.asarray(leaf), placement) for leaf in part))


def gathered(data: Examples, replay: Examples | None, rows: TaskRows, start: int, count: int, length: int) -> Examples:
  """The batches of steps ``start .. start + count`` gathered on the host, flattened to
  ``(length·B, ...)`` (zeros after the ``count`` steps): each step's task examples, then its
  memory's, what the device gathers from :func:`on_device` data."""
  take = lambda part, index: Examples(part.x[index], part.y[index], part.ids[index])
  batches = take(data, rows.data[start:start + count])
  if replay is not None:
    memory = take(replay, rows.replay[start:start + count])
    batches = Examples(*(np.concatenate([a, b], axis=1) for a, b in zip(batches, memory)))
  flat = (np.asarray(leaf).reshape((-1,) + leaf.shape[2:]) for leaf in batches)
  width = len(rows.data[0]) + (0 if replay is None else len(rows.replay[0]))
  return Examples(*(_padded(leaf, length * width) for leaf in flat))


MAX_CHUNK_STEPS = 256  # the most steps one chunk program runs (the block its rows and outputs fill)


class Layout(NamedTuple):
  """Where a chunk's inputs carry a sweep's lanes: the ``jax.vmap`` axis of each, ``None`` if shared.

  Attributes:
    lanes: the step is vmapped over stacked lanes (a sweep).
    data: the task's examples: ``0`` stacked per lane, ``None`` shared.
    replay: the replay memory: ``0`` per lane, ``None`` shared or absent.
    rows: each step's rows: ``0`` per lane, ``None`` shared.
  """

  lanes: bool = False
  data: int | None = None
  replay: int | None = None
  rows: int | None = None


class Block(NamedTuple):
  """The arguments of one chunk call after the state: examples, rows, memory rows."""

  data: Examples
  replay: Examples | None
  rows: np.ndarray
  replay_rows: np.ndarray | None


class TaskFeed(NamedTuple):
  """A task's inputs for every lane of the loop: its examples, where they live, every step's rows.

  The lanes of a sweep that draw the same batches (same seed and data) form one *group*; each
  group has its examples and rows.

  Attributes:
    layout: the :class:`Layout` of the chunk calls' inputs.
    groups: each group's examples on the host: the task's, and the replay memory's (or ``None``).
    rows: each group's :class:`TaskRows`.
    device: the examples on the device (stacked over the groups where they differ), or ``None``:
      over the budget, each chunk's batches are gathered on the host (:func:`gathered`).
    block_steps: ``S``, the steps one chunk call holds rows for.
  """

  layout: Layout
  groups: list[tuple[Examples, Examples | None]]
  rows: list[TaskRows]
  device: tuple[Examples, Examples | None] | None
  block_steps: int

  def block(self, start: int, count: int) -> Block:
    """The chunk call's inputs for steps ``start .. start + count`` (``count <= block_steps``)."""
    size = self.block_steps
    if self.device is not None:
      def window(which: int) -> np.ndarray | None:
        if self.rows[0][which] is None:
          return None
        parts = [_padded(rows[which][start:start + count], size) for rows in self.rows]
        return parts[0] if self.layout.rows is None else np.stack(parts, axis=1)

      return Block(*self.device, window(0), window(1))
    batches = [gathered(data, replay, rows, start, count, size) for (data, replay), rows in zip(self.groups, self.rows)]
    data = batches[0] if self.layout.data is None else Examples(*(np.stack(leaves) for leaves in zip(*batches)))
    width = len(batches[0].y) // size
    return Block(data, None, np.arange(size * width, dtype=np.int32).reshape(size, width), None)


def task_feed(
    plans: Sequence[methods_lib.BatchPlan], rows: Sequence[TaskRows], *, lanes: bool, budget: int, placement: Any = None
) -> TaskFeed:
  """The :class:`TaskFeed` of a task: on the device when its examples fit in ``budget`` bytes.

  Args:
    plans: each group's batch plan (one when every lane draws the same batches).
    rows: each group's :func:`task_rows`.
    lanes: the loop's step is vmapped over lanes (a sweep).
    budget: the most bytes of examples placed on the device for the task (the groups' task
      examples, counted once when they are the same arrays, and their replay memories).
    placement: ``None`` (the default device) or the sharding of the examples (a mesh's replicated one).

  Returns:
    The feed.
  """
  groups = [examples(plan) for plan in plans]
  shared = all(p.data is plans[0].data and p.task_ids is plans[0].task_ids for p in plans)
  with_replay = groups[0][1] is not None
  size = groups[0][0].nbytes * (1 if shared else len(groups)) + sum(replay.nbytes for _, replay in groups if replay is not None)
  several = len(groups) > 1
  if size <= budget:
    layout = Layout(lanes, None if shared or not several else 0, 0 if several and with_replay else None, 0 if several else None)
    if not several or shared:
      data = on_device(groups[0][0], placement)
    else:
      data = on_device(stacked([data for data, _ in groups]), placement, pad=False)
    replay = None
    if with_replay:
      replay = on_device(groups[0][1], placement) if not several else on_device(
          stacked([memory for _, memory in groups]), placement, pad=False)
    return TaskFeed(layout, groups, list(rows), (data, replay), MAX_CHUNK_STEPS)
  data = groups[0][0]
  per_example = data.nbytes // max(1, len(data.y))
  batch = rows[0].data.shape[1] + (0 if rows[0].replay is None else rows[0].replay.shape[1])
  block = int(np.clip(budget // max(1, per_example * batch * len(groups)), 1, MAX_CHUNK_STEPS))
  return TaskFeed(Layout(lanes, 0 if several else None, None, None), groups, list(rows), None, block)
