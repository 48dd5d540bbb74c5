"""Two processes, for real: one run on a mesh spanning both, checkpointed, killed and resumed.

Two Python processes on this machine join one JAX cluster (``jax.distributed.initialize`` with a
coordinator on a free localhost port, Gloo CPU collectives, 2 simulated devices each) and train
SFA on the MNIST pair over a 4-device FSDP mesh (``tests/_multiprocess_worker.py``). The test
checks that

* the accuracy matrix equals that of one process on one device (see :data:`ACCURACY_TOLERANCE`),
  and so do the final params (:data:`PARAMS_TOLERANCE`);
* the params and SFA's anchor are sharded across the processes: each process holds its own half of
  every large leaf;
* both processes write the Orbax checkpoint, with a checksum for every array;
* a run killed (``SIGKILL``, both processes) after a checkpoint resumes in two fresh processes, which
  skip alike three unusable checkpoints (with data files cut short, with a wrong checksum, and one
  that process 1 alone fails to read), and ends bit for bit where the uninterrupted run ends;
* a checkpoint of two processes restores in one, and one of one process onto the mesh of two.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest
from _checkpoint_helpers import steps
import _multiprocess_worker as worker

from sfa_jax import engine
from sfa_jax.engine.checkpoint import Checkpointer

WORKER = pathlib.Path(__file__).with_name('_multiprocess_worker.py')
TIMEOUT_S = 300  # per phase; a hung collective fails the test instead of blocking CI

# An accuracy is a count of correct predictions over the test set (178 and 181 examples): equal
# predictions give bit-equal ratios, and one prediction that differs moves an entry by >= 1/181.
# The tolerance only allows for the float formatting of equal ratios, not for a changed prediction.
ACCURACY_TOLERANCE = 1e-6
# The gradients of the 4-device mesh are summed over devices (and across the processes by Gloo) in
# another order than on one device, so float32 rounding differs in the last bit and 44 Adam steps
# carry it on: the final params and optimizer state differ from those of one device by at most
# 1.2e-7 (measured; 7 of the 23 leaves are bit-equal). 1e-5 (absolute and relative) leaves a margin
# of ~100x and still catches a real divergence: a wrong shard, or a step lost or repeated, moves the
# params by about the learning rate, 1e-2.
PARAMS_TOLERANCE = 1e-5


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _launch(phase: str, folder: pathlib.Path) -> list[int]:
  """Runs ``phase`` of the worker in :data:`worker.NUM_PROCESSES` processes; their return codes."""
  env = dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={worker.DEVICES_PER_PROCESS}'
  )
  port = _free_port()
  logs = [open(folder / f'{phase}.{i}.log', 'w') for i in range(worker.NUM_PROCESSES)]
  processes = [
      subprocess.Popen([sys.executable, str(WORKER), phase, str(i), str(port), str(folder)], env=env,
                       stdout=log, stderr=subprocess.STDOUT)
      for i, log in enumerate(logs)
  ]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f'phase {phase!r} ran past {TIMEOUT_S} s:\n{_logs(folder, phase)}')
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
    for log in logs:
      log.close()
  return [process.returncode for process in processes]


def _logs(folder: pathlib.Path, phase: str) -> str:
  return '\n'.join(f'--- process {i}:\n' + (folder / f'{phase}.{i}.log').read_text()[-3000:]
                   for i in range(worker.NUM_PROCESSES))


def _outputs(folder: pathlib.Path, phase: str) -> list[dict]:
  paths = [folder / f'{phase}.{i}.json' for i in range(worker.NUM_PROCESSES)]
  assert all(path.exists() for path in paths), _logs(folder, phase)
  return [json.loads(path.read_text()) for path in paths]


def _record(step_dir: pathlib.Path) -> dict:
  return json.loads((step_dir / 'record' / 'metadata').read_text())


class _KeepingLast(Checkpointer):
  """A checkpointer that keeps the arrays of its latest save."""

  def save(self, step, arrays, record, *, force=False):
    self.arrays = arrays
    super().save(step, arrays, record, force=force)


def _cut_the_files_of_process_1(step_dir: pathlib.Path) -> None:
  """Truncates the data files process 1 wrote: process 1 (and process 0 if it reads from them) fails."""
  for path in (step_dir / 'arrays' / 'ocdbt.process_1' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_the_checksum(step_dir: pathlib.Path, name: str) -> None:
  """Replaces the checksum of the array ``name`` in a checkpoint's record by a wrong one."""
  metadata = step_dir / 'record' / 'metadata'
  record = json.loads(metadata.read_text())
  record['array_checksums'][name] = 'fold64:' + '0' * 16
  metadata.write_text(json.dumps(record))


def _assert_written_by_both(step_dir: pathlib.Path) -> None:
  """Each process wrote the shards it holds: its own OCDBT files and array metadata."""
  arrays = step_dir / 'arrays'
  assert sorted(p.name for p in arrays.glob('ocdbt.process_*')) == ['ocdbt.process_0', 'ocdbt.process_1']
  assert sorted(p.name for p in (arrays / 'array_metadatas').iterdir()) == ['process_0', 'process_1']
  assert all(any((arrays / f'ocdbt.process_{i}' / 'd').iterdir()) for i in range(2))


def _assert_sharded_across_the_processes(saves: list[dict]) -> None:
  """At every save, each process held its own half of every large leaf (params, Adam's moments,
  the anchor), disjoint from the other's; none held all of one."""
  for step in saves[0]:
    for tree, at_least in (('arrays', 4), ('anchor', 1)):
      placed = [process_saves[step][tree] for process_saves in saves]
      assert placed[0].keys() == placed[1].keys() and len(placed[0]) >= at_least, (step, tree, placed[0].keys())
      assert tree == 'anchor' or any('params' in name and 'opt_state' not in name for name in placed[0])
      for name in placed[0]:
        ours, theirs = placed[0][name], placed[1][name]
        for p in (ours, theirs):
          assert not p['fully_addressable'] and not p['fully_replicated'] and p['processes'] == [0, 1], (step, name, p)
        assert ours['local_shards'] and not set(ours['local_shards']) & set(theirs['local_shards']), (step, name)


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_one_run(tmp_path):
  stream, method, config = worker.stream_method_config()
  run_id = engine.run.fingerprint(stream, method, config)

  # 0. The reference: this process, one device.
  assert jax.process_count() == 1 and jax.device_count() == 1
  reference_folder = tmp_path / 'one-process'
  reference_checkpointer = _KeepingLast(reference_folder)
  single = engine.run_sequence(stream, method, config, checkpointer=reference_checkpointer)
  reference = reference_checkpointer.arrays  # the run's final arrays (its last save is at its end)

  # 1. Both processes train, checkpoint every 4 steps, and are killed once step 32 (task 1) is saved.
  _launch('kill', tmp_path)
  killed = _outputs(tmp_path, 'kill')
  assert [out.get('killed_after_save') for out in killed] == [worker.KILL_AFTER_SAVE] * 2
  assert steps(tmp_path / 'killed') == [22, 24, 28, 32]
  newest = tmp_path / 'killed' / str(worker.KILL_AFTER_SAVE)
  _assert_written_by_both(newest)
  checksums = _record(newest)['array_checksums']  # one for every array, those spread over both too
  assert sorted(checksums) == sorted(_record(reference_folder / '22')['array_checksums'])
  assert all(value.startswith('fold64:') for value in checksums.values())
  _assert_sharded_across_the_processes([out['saves'] for out in killed])

  # 2. The three newest checkpoints are unusable: 32 has the data files of process 1 cut short, 28
  # a wrong checksum, and on resuming process 1 alone fails to read 24. Two fresh processes skip all
  # three alike, resume from 22 (the end of task 0) and finish; then they run the same configuration afresh.
  _cut_the_files_of_process_1(newest)
  _break_the_checksum(tmp_path / 'killed' / '28', "['params']['Dense_0']['kernel']")
  assert _launch('resume', tmp_path) == [0, 0], _logs(tmp_path, 'resume')
  outputs = _outputs(tmp_path, 'resume')
  (warning,) = outputs[0]['warnings']
  assert outputs[1]['warnings'] == [warning]  # every process decides alike on what any of them found
  killed_dir = tmp_path / 'killed'
  # Process 1 cannot read its shards; process 0 fails too when it reads an array process 1 wrote.
  assert re.search(re.escape(f'{newest} (process ') + '[01]: cannot restore the arrays: ', warning), warning
  assert f"{killed_dir / '28'} (corrupt: the checksum of ['params']['Dense_0']['kernel'] differs); " in warning, warning
  assert warning.endswith(f"{killed_dir / '24'} (process 1: cannot restore the arrays: Input/output error); "
                          'resumed from step 22'), warning
  for out in outputs:
    assert out['resumed'] == out['uninterrupted'] == outputs[0]['resumed']  # every process holds the results
    assert all(not p['fully_addressable'] for save in out['saves'].values() for p in save['arrays'].values())
  # Bit for bit: the final checkpoints of the resumed and the uninterrupted run hold equal arrays.
  final = str(sum(outputs[0]['uninterrupted']['steps_per_task']))
  resumed_end, uninterrupted_end = (_record(tmp_path / run / final) for run in ('killed', 'uninterrupted'))
  assert resumed_end['array_checksums'] == uninterrupted_end['array_checksums']

  # The checkpoint of one process restored onto the mesh of both (checksums verified) is sharded.
  for out in outputs:
    assert out['one_process_restored']['position'] == _record(reference_folder / final)['position']
    assert out['one_process_restored']['arrays'].keys() == outputs[0]['saves'][final]['arrays'].keys()
    assert not any(p['fully_addressable'] for p in out['one_process_restored']['arrays'].values())

  # 3. Against one process on one device: the same accuracy matrix, the same params to float tolerance.
  multi = outputs[0]['uninterrupted']
  np.testing.assert_allclose(multi['accuracy_matrix'], single.accuracy_matrix, atol=ACCURACY_TOLERANCE, rtol=0)
  assert (multi['steps_per_task'], multi['averaging_steps']) == (single.steps_per_task, single.averaging_steps)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # the two-process checkpoint restores on one device, checksums verified
    restored, record = Checkpointer(tmp_path / 'uninterrupted').restore_latest(reference, fingerprint=run_id)
  assert record['position'] == _record(reference_folder / final)['position']
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=PARAMS_TOLERANCE, atol=PARAMS_TOLERANCE)

