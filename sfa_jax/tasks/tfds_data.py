"""Image data sets prepared by TensorFlow Datasets (tfds), read without TensorFlow.

Without TensorFlow, tfds reads only data sets prepared in the ``array_record`` file format, through
``builder.as_data_source`` (random access, NumPy out). This module finds such a data set under a
user's ``data_dir`` (``<data_dir>/<name>/<version>/``, the newest version when there are several),
and reads it one class subset at a time:

1. the first time a split is used, every label of it is read (images are read as bytes and skipped,
   not decoded);
2. each ``load(classes)`` then decodes only the images of those classes, with Pillow.

So a split-Food-101 task decodes its own 5 classes, about 3750 training images, and never the
whole data set; only the labels of a split are kept between tasks.

Images are decoded with Pillow (needed here, and by tfds itself for images without TensorFlow).
With ``image_size`` set, each image is center-cropped to a square and resized to ``image_size x
image_size`` (``PIL.ImageOps.fit``, bilinear; JPEGs are first decoded at a reduced scale when that
stays above the target size, which makes Food-101 several times faster to read).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from sfa_jax.tasks.source import DataSource
from sfa_jax.tasks.stream import Split

__all__ = ['tfds_source']

try:
  from PIL import Image, ImageOps
except ImportError:  # checked by tfds_source, the only user
  Image = ImageOps = None

_READ_CHUNK = 1024
_MODES = {1: 'L', 3: 'RGB'}


def _how_to_prepare(name: str, data_dir: str) -> str:
  """The instructions, for an error message, to prepare tfds data set ``name`` in ``data_dir``."""
  return (
      f'No tfds data set {name!r} prepared in the array_record format under {data_dir} (looked '
      f'for {os.path.join(data_dir, name, "<version>", "dataset_info.json")}). Without '
      f'TensorFlow, tfds reads only array_record data. Prepare it once where TensorFlow and the '
      f'network are available (then copy {os.path.join(data_dir, name)} here):\n'
      f'  tfds build {name} --file_format=array_record --data_dir={data_dir}\n'
      f'or, in Python:\n'
      f"  tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
      f'.download_and_prepare()\n'
      f'A copy already prepared as tfrecord converts with (TensorFlow needed there too):\n'
      f'  tfds convert_format --dataset_dir=OLD_DATA_DIR/{name} --out_file_format=array_record '
      f'--out_dir={os.path.join(data_dir, name)}'
  )


def find_prepared(name: str, data_dir: str | os.PathLike[str]) -> str:
  """The folder of the newest prepared version of tfds data set ``name`` under ``data_dir``.

  Args:
    name: the tfds name, e.g. ``'mnist'``.
    data_dir: the tfds data folder (the one passed to ``tfds build --data_dir``).

  Returns:
    ``<data_dir>/<name>/<version>``, the newest version holding a ``dataset_info.json``.

  Raises:
    FileNotFoundError: nothing prepared there; the message says how to prepare it.
  """
  data_dir = os.fspath(data_dir)
  root = os.path.join(data_dir, name)
  versions = []
  if os.path.isdir(root):
    for entry in os.listdir(root):
      if tfds.core.Version.is_valid(entry) and os.path.isfile(
          os.path.join(root, entry, 'dataset_info.json')
      ):
        versions.append(tfds.core.Version(entry))
  if not versions:
    raise FileNotFoundError(_how_to_prepare(name, data_dir))
  return os.path.join(root, str(max(versions)))


def _decode(data: bytes, channels: int, image_size: int | None) -> np.ndarray:
  """Decodes an encoded image to a uint8 array ``(H, W, channels)``, resized when asked."""
  with Image.open(io.BytesIO(data)) as image:
    if image_size is not None:
      image.draft(_MODES[channels], (image_size, image_size))
    image = image.convert(_MODES[channels])
    if image_size is not None:
      image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image)
  return array.reshape(array.shape[0], array.shape[1], channels)


def _read(source: Sequence[dict], indices: np.ndarray) -> Iterator[dict]:
  """Yields the examples of ``source`` at ``indices``, read a chunk at a time."""
  for start in range(0, len(indices), _READ_CHUNK):
    yield from source.__getitems__(indices[start : start + _READ_CHUNK].tolist())


def tfds_source(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    test_split: str = 'test',
    image_size: int | None = None,
) -> DataSource:
  """A :class:`DataSource` over a tfds image classification data set prepared as array_record.

  The data set must have an ``'image'`` feature (one or three channels) and a ``'label'`` class
  label (CIFAR-100's ``'label'`` is its 100 fine classes), and splits ``'train'`` and
  ``test_split``.

  Args:
    name: the tfds name: ``'mnist'``, ``'fashion_mnist'``, ``'cifar100'``, ``'food101'``, ...
    data_dir: the tfds data folder holding ``<name>/<version>/``.
    test_split: the split used as test set (Food-101 has ``'validation'``, no ``'test'``).
    image_size: resize every image to ``image_size x image_size`` (center crop, then bilinear);
      ``None`` keeps the stored size, which must then be fixed.

  Returns:
    A :class:`DataSource`; its ``load`` reads and decodes the asked classes only.

  Raises:
    ValueError: no ``data_dir``, data not in array_record format, or variable-size images without
      ``image_size``.
    FileNotFoundError: nothing prepared under ``data_dir``; the message says how to prepare it.
    ModuleNotFoundError: Pillow is missing (its ``name`` is ``'PIL'``, as Python's own).
  """
  if data_dir is None:
    raise ValueError(
        f"source='tfds' reads a prepared data set from disk: pass data_dir=<tfds data folder>, "
        f'the one holding {name}/<version>/.'
    )
  if Image is None:
    raise ModuleNotFoundError('reading tfds images needs Pillow: pip install pillow', name='PIL')
  builder = tfds.builder_from_directory(find_prepared(name, data_dir))
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'{builder.data_dir} holds {builder.info.file_format.value} files, which only TensorFlow '
        f'reads.\n' + _how_to_prepare(name, os.fspath(data_dir))
    )
  for split in ('train', test_split):
    if split not in builder.info.splits:
      raise ValueError(f'{name} has splits {list(builder.info.splits)}; {split!r} is missing.')
  height, width, channels = builder.info.features['image'].shape
  if image_size is None and None in (height, width):
    raise ValueError(f'{name} images vary in size: pass image_size=<side in pixels>.')
  shape = (height, width, channels) if image_size is None else (image_size, image_size, channels)
  skip_images = {'image': tfds.decode.SkipDecoding()}

  @functools.cache
  def split_data(split: str) -> tuple[Sequence[dict], np.ndarray]:
    source = builder.as_data_source(split, decoders=skip_images)
    labels = [example['label'] for example in _read(source, np.arange(len(source)))]
    return source, np.asarray(labels, np.int32)

  def load_split(split: str, classes: Sequence[int]) -> Split:
    source, labels = split_data(split)
    indices = np.flatnonzero(np.isin(labels, np.asarray(classes)))
    images = [_decode(e['image'], channels, image_size) for e in _read(source, indices)]
    x = np.stack(images) if images else np.zeros((0, *shape), np.uint8)
    return Split(x.astype(np.float32) / 255.0, labels[indices])

  return DataSource(
      name=f'{name} (tfds, {builder.data_dir})',
      num_classes=builder.info.features['label'].num_classes,
      input_shape=shape,
      load=lambda classes: (load_split('train', classes), load_split(test_split, classes)),
  )
