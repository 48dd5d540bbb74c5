"""Checkpoints: a checksum for every saved array, a corrupt checkpoint skipped for the one before it,
a fingerprint that names the whole run, and a failed write as one clear error."""

import dataclasses
import errno
import json
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _checkpoint_helpers import flip_bytes_in_arrays
from _checkpoint_helpers import steps

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine.checkpoint import CheckpointError
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.checkpoint import CheckpointWarning
from sfa_jax.engine.checkpoint import array_checksums
from sfa_jax.engine.checkpoint import fold64_checksum


def _arrays(step):
  return {'w': jax.random.normal(jax.random.key(step), (64, 64)), 'b': jnp.arange(5.0) + step}


LIKE = {'w': jnp.zeros((64, 64)), 'b': jnp.zeros(5)}


def _saved(folder, *save_steps):
  checkpointer = Checkpointer(folder, max_to_keep=len(save_steps))
  for step in save_steps:
    checkpointer.save(step, _arrays(step), {'fingerprint': 'run', 'step': step})
  checkpointer.close()
  return folder


def test_the_record_holds_the_sha256_of_every_array(tmp_path):
  _saved(tmp_path, 1)
  record = json.loads((tmp_path / '1' / 'record' / 'metadata').read_text())
  assert record['array_checksums'] == array_checksums(_arrays(1))
  assert sorted(record['array_checksums']) == ["['b']", "['w']"]
  assert array_checksums(_arrays(1)) != array_checksums(_arrays(2))
  arrays, record = Checkpointer(tmp_path).restore_latest(LIKE, fingerprint='run')
  assert record == {'fingerprint': 'run', 'step': 1}  # the checksums stay inside the checkpointer


def test_a_restore_logs_no_warning(tmp_path, caplog):
  _saved(tmp_path, 1)
  with caplog.at_level(logging.WARNING):
    Checkpointer(tmp_path).restore_latest(LIKE, fingerprint='run')
  assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one_and_deleted(tmp_path):
  _saved(tmp_path, 1, 2)
  flip_bytes_in_arrays(tmp_path / '2')
  with pytest.warns(CheckpointWarning) as caught:
    arrays, record = Checkpointer(tmp_path).restore_latest(lambda saved: LIKE, fingerprint='run')
  (warning,) = caught
  assert str(warning.message) == (
      f"skipped and deleted the unusable checkpoint {tmp_path / '2'} (corrupt: the checksum of ['w'] differs); "
      'resumed from step 1'
  )
  assert record['step'] == 1
  chex.assert_trees_all_equal(arrays, _arrays(1))
  assert steps(tmp_path) == [1]  # so that a resumed run saves step 2 afresh


def test_no_usable_checkpoint_is_an_error_and_deletes_nothing(tmp_path):
  _saved(tmp_path, 1, 2)
  for step in (1, 2):
    flip_bytes_in_arrays(tmp_path / str(step))
  with pytest.raises(CheckpointError, match=r'no usable checkpoint in .*: .*2 \(corrupt: .*\); .*1 \(corrupt: '):
    Checkpointer(tmp_path).restore_latest(LIKE, fingerprint='run')
  assert steps(tmp_path) == [1, 2]


def test_fold64_checksum_sees_every_element_and_where_it_is():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  nudged, swapped = x.copy(), x.copy()
  nudged[2, 3] = np.nextafter(nudged[2, 3], np.float32(np.inf))  # one bit
  swapped[0, 1], swapped[1, 0] = x[1, 0], x[0, 1]
  variants = [x, nudged, swapped, x.T.copy(), x.reshape(-1), -x]
  checksums = fold64_checksum(variants)
  assert len(set(checksums)) == len(variants) - 1  # a reshape keeps the elements' flat positions
  assert checksums[0] == checksums[4] and all(c.startswith('fold64:') and len(c) == 23 for c in checksums)
  assert fold64_checksum([jnp.asarray(x)]) == checksums[:1]  # a NumPy or a JAX array alike
  others = [jnp.ones(3, jnp.bfloat16), np.array([True, False]), np.arange(3, dtype=np.int32), jax.random.key(0),
            np.float32(1)]
  assert len(set(fold64_checksum(others))) == len(others)


def test_checksums_of_a_checkpoint_follow_the_kind_it_saved():
  arrays = _arrays(1)
  sha = array_checksums(arrays)
  assert array_checksums(arrays, like=sha) == sha
  folded = array_checksums(arrays, like={"['w']": 'fold64:0'})  # as saved by several processes
  assert folded == {"['b']": sha["['b']"], "['w']": fold64_checksum([arrays['w']])[0]}


def test_a_checkpoint_of_several_processes_restores_in_one_and_its_corruption_is_seen(tmp_path, monkeypatch):
  """Its arrays spanned the processes: fold64 checksums; one process verifies them on its own copy."""
  import sfa_jax.engine.checkpoint as checkpoint_lib

  sha256_checksums = checkpoint_lib.array_checksums
  monkeypatch.setattr(checkpoint_lib, 'array_checksums', lambda arrays, like=None: sha256_checksums(
      arrays, like=like or {name: 'fold64:' for name in sha256_checksums(arrays)}))
  _saved(tmp_path, 1, 2)
  monkeypatch.undo()
  saved = json.loads((tmp_path / '2' / 'record' / 'metadata').read_text())['array_checksums']
  assert all(value.startswith('fold64:') for value in saved.values())
  arrays, record = Checkpointer(tmp_path).restore_latest(LIKE, fingerprint='run')
  assert record['step'] == 2
  chex.assert_trees_all_equal(arrays, _arrays(2))
  flip_bytes_in_arrays(tmp_path / '2')
  with pytest.warns(CheckpointWarning, match=r"corrupt: the checksum of \['w'\] differs"):
    arrays, record = Checkpointer(tmp_path).restore_latest(LIKE, fingerprint='run')
  assert record['step'] == 1


def test_a_checkpoint_of_another_run_is_an_error_naming_the_difference(tmp_path):
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(1, _arrays(1), {'fingerprint': json.dumps({'method': {'name': 'sfa', 'p': 0.25}})})
  other = json.dumps({'method': {'name': 'sfa', 'p': 0.5}})
  with pytest.raises(CheckpointError, match=r'another run configuration \(method.p: 0.25 in the checkpoint, 0.5 now\)'):
    checkpointer.restore_latest(LIKE, fingerprint=other)


def test_the_fingerprint_names_the_tasks_and_every_exact_setting():
  two, three = (tasks.make_stream('split-mnist', source='digits', num_tasks=n) for n in (2, 3))
  sfa, near = engine.make_method('sfa', p=0.25), engine.make_method('sfa', p=0.2500001)
  assert sfa.label == near.label  # a label rounds
  config = engine.TrainConfig()
  run = engine.run.fingerprint(two, sfa, config)
  assert json.loads(run)['stream']['tasks'] == ['split-mnist/0', 'split-mnist/1']
  others = [
      engine.run.fingerprint(three, sfa, config),
      engine.run.fingerprint(tasks.make_stream('split-mnist', source='digits', num_tasks=2, setting='task-incremental'), sfa, config),
      engine.run.fingerprint(two, near, config),
      engine.run.fingerprint(two, engine.make_method('l2'), config),
      *(engine.run.fingerprint(two, sfa, dataclasses.replace(config, **change)) for change in (
          {'eval_every': 5}, {'learning_rate': 2e-3}, {'seed': 1}, {'epochs_per_task': 3}, {'batch_size': 32},
          {'optimizer': 'sgd'}, {'model': 'cnn'}, {'model_kwargs': (('hidden', (32,)),)}, {'reset_optimizer': False},
      )),
  ]
  assert run not in others and len(set(others)) == len(others)
  assert engine.run.fingerprint(two, engine.make_method('sfa', p=0.25), config) == run


@pytest.mark.parametrize(
    'error, reason',
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 'No space left on device'),
        (ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" ... [os_error_code=\'28\']'), 'No space left on device'),
        (ValueError('OUT_OF_RANGE: Error writing "w/0" ... [os_error_code=\'27\']'), 'File too large'),
        (ValueError('Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore details: '
                    "<bound method spec of TensorStore({'driver': 'zarr', ...})>"),
         'Encountered error while reading array index: (slice(0, 2, 1),).'),
    ],
)
def test_a_failed_save_is_one_checkpoint_error_with_the_os_reason(tmp_path, monkeypatch, error, reason):
  def fail(*args, **kwargs):
    raise error

  checkpointer = Checkpointer(tmp_path)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', fail)
  with pytest.raises(CheckpointError) as caught:
    checkpointer.save(3, _arrays(3), {'fingerprint': 'run'})
  assert str(caught.value) == f'cannot save the checkpoint at {tmp_path / "3"}: {reason}'


def test_silenced_failure_reports_hide_the_unawaited_write_coroutines_of_a_failed_save():
  """A failed TensorStore write can leave its coroutines unawaited; Python warns of them at exit."""
  import subprocess
  import sys
  import textwrap

  program = textwrap.dedent(
      """
      import gc
      from sfa_jax.engine.checkpoint import silence_orbax_failure_reports
      silence_orbax_failure_reports()
      async def write_fragment():
        pass
      write_fragment()
      gc.collect()
      """
  )
  result = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stderr == '', result.stderr


def test_silenced_failure_reports_hide_never_retrieved_tensorstore_errors_and_keep_others():
  """TensorStore sets its errors on asyncio futures from C++, so they carry no traceback into Orbax."""
  import subprocess
  import sys
  import textwrap

  program = textwrap.dedent(
      """
      import asyncio, gc, logging
      logging.basicConfig()
      from sfa_jax.engine.checkpoint import silence_orbax_failure_reports
      silence_orbax_failure_reports()
      loop = asyncio.new_event_loop()
      for text in ['OUT_OF_RANGE: Error writing "w/0" in OCDBT database [os_error_code=27]', 'a bug of the caller']:
        future = loop.create_future()
        future.set_exception(ValueError(text))
        del future
        gc.collect()
      loop.close()
      """
  )
  result = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=120)
  assert 'a bug of the caller' in result.stderr and 'os_error_code' not in result.stderr, result.stderr
