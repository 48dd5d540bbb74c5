"""The IDX file format of MNIST and Fashion-MNIST, and Fashion-MNIST from Debian's package.

Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``) installs the
full data set, 60000 training and 10000 test images of 10 clothing classes, as gzipped IDX files
under ``/usr/share/datasets/fashion-mnist/``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from sfa_jax.tasks.source import DataSource, in_memory_source
from sfa_jax.tasks.stream import Split

__all__ = ['FASHION_MNIST_DIR', 'read_idx', 'fashion_mnist_source']

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
"""Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files: the default data folder."""

_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
_FASHION_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def parse_idx(data: bytes) -> np.ndarray:
  """Decodes the bytes of an IDX file into an array of its shape and element type.

  The layout: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C``
  int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, each dimension as a
  big-endian uint32, then the values in C order, big-endian.

  Args:
    data: the file's content, uncompressed.

  Returns:
    A NumPy array in native byte order.

  Example:
    >>> parse_idx(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])).tolist()
    [[1, 2, 3], [4, 5, 6]]
  """
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f'not an IDX file: it starts with {data[:4]!r}.')
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f'IDX file of shape {shape} should hold {expected} bytes; got {len(data)}.')
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file, gzipped (detected from its first bytes) or not.

  Args:
    path: the file.

  Returns:
    The array it holds, see :func:`parse_idx`.
  """
  with open(path, 'rb') as file:
    data = file.read()
  if data[:2] == b'\x1f\x8b':
    data = gzip.decompress(data)
  return parse_idx(data)


def _find(data_dir: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  return None


def fashion_mnist_missing(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
  """The IDX files of Fashion-MNIST that ``data_dir`` lacks (each may be gzipped, ``.gz``, or not).

  Args:
    data_dir: the folder; ``None`` means Debian's :data:`FASHION_MNIST_DIR`.

  Returns:
    The missing files' names, without ``.gz``, in the order of the train then test images and labels.

  Example:
    >>> import tempfile
    >>> fashion_mnist_missing(tempfile.mkdtemp())[:2]
    ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte']
  """
  folder = os.fspath(FASHION_MNIST_DIR if data_dir is None else data_dir)
  return [stem for stems in _FASHION_FILES.values() for stem in stems if _find(folder, stem) is None]


def fashion_mnist_source(data_dir: str | os.PathLike[str] | None = None) -> DataSource:
  """Fashion-MNIST read from its four IDX files, the official 60000/10000 train/test split.

  Args:
    data_dir: the folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
      ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not;
      ``None`` means Debian's :data:`FASHION_MNIST_DIR`.

  Returns:
    A :class:`DataSource` with 10 classes and images of shape ``(28, 28, 1)`` in ``[0, 1]``.

  Raises:
    FileNotFoundError: a file is missing; the message says how to install the data.
  """
  data_dir = os.fspath(FASHION_MNIST_DIR if data_dir is None else data_dir)
  missing = fashion_mnist_missing(data_dir)
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST not found in {data_dir}: missing {missing} (.gz or not). Install Debian\'s '
        f'package, which puts the files in {FASHION_MNIST_DIR}:\n'
        f'  apt-get install dataset-fashion-mnist\n'
        f"or pass data_dir= a folder holding the four IDX files, or use source='tfds' with a "
        f'prepared fashion_mnist data set.'
    )
  paths = {stem: _find(data_dir, stem) for stems in _FASHION_FILES.values() for stem in stems}
  train, test = (
      Split(
          (read_idx(paths[images]).astype(np.float32) / 255.0)[..., None],
          read_idx(paths[labels]).astype(np.int32),
      )
      for images, labels in _FASHION_FILES.values()
  )
  return in_memory_source('fashion-mnist (IDX files)', train, test, num_classes=10)
