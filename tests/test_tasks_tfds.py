"""The tfds source, offline: tiny data sets built here in the array_record format, read back.

Building needs no TensorFlow as long as the generator yields already encoded images (PNG or JPEG
bytes, from Pillow): tfds would otherwise encode NumPy images with TensorFlow.
"""

import io
import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sfa_jax import tasks
from sfa_jax.tasks import tfds_data

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2


def _encode(array, image_format):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


def _mnist_like_image(label, k, split):
  """A 28x28 grey image unique to (label, k, split), losslessly stored as PNG."""
  rng = np.random.default_rng([label, k, split == 'test'])
  return rng.integers(0, 256, (28, 28), dtype=np.uint8)


class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """An MNIST look-alike: the real one's name, version, features and splits, with a few images."""

  name = 'mnist'
  VERSION = tfds.core.Version('3.0.1')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(28, 28, 1)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        'train': self._generate_examples('train', TRAIN_PER_CLASS),
        'test': self._generate_examples('test', TEST_PER_CLASS),
    }

  def _generate_examples(self, split, per_class):
    for label in range(10):
      for k in range(per_class):
        image = _encode(_mnist_like_image(label, k, split), 'PNG')
        yield f'{split}-{label}-{k}', {'image': image, 'label': label}


class FakeFood101(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A Food-101 look-alike: 101 classes, JPEG colour images of varying sizes, a validation split."""

  name = 'food101'
  VERSION = tfds.core.Version('2.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {'image': tfds.features.Image(), 'label': tfds.features.ClassLabel(num_classes=101)}
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(2), 'validation': self._generate_examples(1)}

  def _generate_examples(self, per_class):
    rng = np.random.default_rng(per_class)
    for label in range(101):
      for k in range(per_class):
        height, width = rng.integers(20, 70, 2)
        mode = 'L' if (label + k) % 7 == 0 else 'RGB'  # a few grey images, as in the real data
        shape = (height, width) if mode == 'L' else (height, width, 3)
        image = _encode(rng.integers(0, 256, shape, dtype=np.uint8), 'JPEG')
        yield f'{label}-{k}', {'image': image, 'label': label}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  for builder_class in (FakeMnist, FakeFood101):
    builder_class(data_dir=str(root), file_format='array_record').download_and_prepare()
  return root


def _expected_images(classes, split, per_class):
  return {
      (_mnist_like_image(c, k, split).astype(np.float32) / 255.0).tobytes(): c
      for c in classes
      for k in range(per_class)
  }


def test_fake_data_set_is_array_record(data_dir):
  assert sorted(p.name for p in (data_dir / 'mnist' / '3.0.1').glob('*.array_record*')) == [
      'mnist-test.array_record-00000-of-00001',
      'mnist-train.array_record-00000-of-00001',
  ]


def test_split_mnist_through_tfds_reads_exactly_the_stored_images(data_dir):
  stream = tasks.make_stream('split-mnist', source='tfds', data_dir=data_dir)
  assert len(stream) == 5 and stream.input_shape == (28, 28, 1) and stream.num_classes == 10
  for task in stream:
    for split, data in (('train', task.train), ('test', task.test)):
      per_class = TRAIN_PER_CLASS if split == 'train' else TEST_PER_CLASS
      assert data.x.shape == (2 * per_class, 28, 28, 1) and data.x.dtype == np.float32
      assert data.y.dtype == np.int32
      expected = _expected_images(task.classes, split, per_class)
      got = {x[..., 0].tobytes(): int(y) for x, y in zip(data.x, data.y)}
      assert got == expected


def test_tfds_stream_task_incremental_and_mnist_pair(data_dir):
  stream = tasks.make_stream(
      'mnist-pair', source='tfds', data_dir=data_dir, setting='task-incremental'
  )
  odd = stream[1]
  assert odd.classes == (1, 3, 5, 7, 9) and stream.num_classes == 5
  assert sorted(set(odd.train.y.tolist())) == [0, 1, 2, 3, 4]
  assert len(odd.train.y) == 5 * TRAIN_PER_CLASS


def test_permuted_mnist_through_tfds(data_dir):
  stream = tasks.make_stream('permuted-mnist', source='tfds', data_dir=data_dir, num_tasks=2)
  plain, permuted = stream
  perm = tasks.pixel_permutations(2, 784, seed=0)[1]
  assert permuted.labels == tuple(range(10, 20)) and stream.num_classes == 20
  expected = _expected_images(range(10), 'train', TRAIN_PER_CLASS)
  assert {x[..., 0].tobytes() for x in plain.train.x} == set(expected)
  unpermuted = permuted.train.x.reshape(-1, 784)[:, np.argsort(perm)]
  assert {row.astype(np.float32).tobytes() for row in unpermuted} == set(expected)


def test_split_food101_resizes_and_leaves_out_the_last_class(data_dir):
  stream = tasks.make_stream('split-food101', source='tfds', data_dir=data_dir, image_size=16)
  assert len(stream) == 20 and stream.input_shape == (16, 16, 3) and stream.num_classes == 101
  assert stream.task_classes[-1] == (95, 96, 97, 98, 99)
  assert all(100 not in classes for classes in stream.task_classes)
  task = stream[19]
  assert task.train.x.shape == (10, 16, 16, 3) and task.test.x.shape == (5, 16, 16, 3)
  assert set(task.test.y.tolist()) == {95, 96, 97, 98, 99}
  assert 0.0 <= task.train.x.min() < task.train.x.max() <= 1.0


def test_split_food101_default_image_size_is_64(data_dir):
  stream = tasks.make_stream('split-food101', source='tfds', data_dir=data_dir, num_tasks=101)
  assert stream.input_shape == (64, 64, 3) and stream[7].train.x.shape == (2, 64, 64, 3)


def test_variable_size_images_need_an_image_size(data_dir):
  with pytest.raises(ValueError, match='vary in size: pass image_size'):
    tfds_data.tfds_source('food101', data_dir, test_split='validation')


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
  (tmp_path / 'cifar100' / 'incomplete.ABC_3.0.2').mkdir(parents=True)
  with pytest.raises(FileNotFoundError) as error:
    tasks.make_stream('split-cifar100', source='tfds', data_dir=tmp_path)
  message = str(error.value)
  assert f'tfds build cifar100 --file_format=array_record --data_dir={tmp_path}' in message
  assert f"tfds.builder('cifar100', data_dir='{tmp_path}', file_format='array_record')" in message
  with pytest.raises(FileNotFoundError, match='tfds build mnist'):
    tasks.make_stream('split-mnist', source='tfds', data_dir=tmp_path / 'does-not-exist')


def test_tfrecord_data_is_refused_with_instructions(data_dir, tmp_path):
  copy = tmp_path / 'mnist' / '3.0.1'
  shutil.copytree(data_dir / 'mnist' / '3.0.1', copy)
  info_path = copy / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match='holds tfrecord files, which only TensorFlow reads'):
    tasks.make_stream('split-mnist', source='tfds', data_dir=tmp_path)


def test_newest_version_is_read(data_dir, tmp_path):
  for version in ('2.0.0', '3.0.1', '10.0.0'):
    shutil.copytree(data_dir / 'mnist' / '3.0.1', tmp_path / 'mnist' / version)
  (tmp_path / 'mnist' / '10.0.0' / 'dataset_info.json').unlink()  # unfinished: ignored
  (tmp_path / 'mnist' / 'incomplete.XYZ_11.0.0').mkdir()  # tfds's temporary folder: ignored
  assert tfds_data.find_prepared('mnist', tmp_path).endswith('3.0.1')


def test_the_catalog_has_the_class_counts_of_the_tfds_data_sets(tmp_path):
  """The task counts the command line checks come from the catalog: they match the real data sets."""
  from sfa_jax.tasks import catalog

  for dataset in catalog.DATASETS.values():
    info = tfds.builder(dataset.tfds_name, data_dir=tmp_path).info
    assert info.features['label'].num_classes == dataset.num_classes, dataset.tfds_name


def test_without_pillow_the_command_line_says_so_in_one_line(data_dir, monkeypatch, capsys):
  from sfa_jax import cli

  monkeypatch.setattr(tfds_data, 'Image', None)
  with pytest.raises(ModuleNotFoundError, match='needs Pillow') as caught:
    tfds_data.tfds_source('mnist', data_dir)
  assert caught.value.name == 'PIL'
  argv = ['run', '--method', 'finetune', '--stream', 'split-mnist', '--source', 'tfds', '--data-dir', str(data_dir), '--out', str(data_dir / 'out')]
  assert cli.main(argv) == 2
  assert capsys.readouterr().err.splitlines() == [
      "sfa-jax: error: Pillow is not installed: the command line runs the engine, which pip install 'sfa-jax[engine]' installs"
  ]
