"""One process of the two-process runs of ``tests/test_multiprocess.py``.

Run as ``python _multiprocess_worker.py PHASE PROCESS_ID PORT FOLDER`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the process joins a JAX cluster of
:data:`NUM_PROCESSES` processes whose coordinator listens on ``localhost:PORT`` (CPU collectives:
Gloo, JAX's default), builds one mesh over the devices of all of them and trains :data:`METHOD` on
the MNIST pair (scikit-learn's digits) with the library's public API only: ``make_stream``,
``make_method``, ``TrainConfig``, ``make_mesh``, ``run_sequence(..., mesh=, checkpointer=)``,
``Checkpointer``. Each phase writes what it saw to ``FOLDER/PHASE.PROCESS_ID.json``:

* ``'kill'``: a run checkpointed every :data:`EVERY_STEPS` steps, killed with ``SIGKILL`` as soon
  as the checkpoint of step :data:`KILL_AFTER_SAVE` (in task 1) is written (the output just before
  that checkpoint);
* ``'resume'``: the killed run resumed from its checkpoints (``FOLDER/killed``; process 1 fails to
  read the arrays of step :data:`UNREADABLE_IN_PROCESS_1`), then the same run
  from scratch without interruption (``FOLDER/uninterrupted``); then the final checkpoint of the
  run of one process (``FOLDER/one-process``) restored onto the mesh of both.

At every save the checkpointer also records, for every large leaf of the run's arrays and of the
SFA anchor, which part of it this process holds: the evidence that they are sharded across the
processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
MESH = 'fsdp=4'  # every large leaf split over the 4 devices of both processes
METHOD = 'sfa'
CONFIG = {'epochs_per_task': 1, 'batch_size': 32, 'learning_rate': 1e-2, 'model_kwargs': (('hidden', (32,)),)}
EVERY_STEPS = 4
KILL_AFTER_SAVE = 32  # global step: task 1's step 10 of 22, between two SFA averages (28 and 34)
UNREADABLE_IN_PROCESS_1 = 24  # on resuming, process 1 alone fails to read this checkpoint's arrays


def stream_method_config():
  """The run's stream, method and :class:`~sfa_jax.engine.config.TrainConfig`, as the test builds them too."""
  from sfa_jax import engine
  from sfa_jax import tasks

  stream = tasks.make_stream('mnist-pair', source='digits')
  return stream, engine.make_method(METHOD), engine.TrainConfig(**CONFIG)


def placement(tree) -> dict:
  """``{path: {...}}``: where this process holds each leaf of ``tree`` that FSDP shards (the large ones)."""
  import jax

  from sfa_jax.engine import distributed

  return {
      jax.tree_util.keystr(path): {
          'fully_addressable': leaf.is_fully_addressable,
          'fully_replicated': leaf.is_fully_replicated,
          'processes': sorted({device.process_index for device in leaf.sharding.device_set}),
          'local_shards': sorted({str(shard.index) for shard in leaf.addressable_shards}),
      }
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
      if leaf.size >= distributed.FSDP_MIN_SIZE
  }


def main(phase: str, process_id: int, port: int, folder: str) -> None:
  import jax

  jax.distributed.initialize(
      coordinator_address=f'localhost:{port}', num_processes=NUM_PROCESSES, process_id=process_id,
      initialization_timeout=120,
  )
  from sfa_jax import SFAState
  from sfa_jax import engine
  from sfa_jax.engine import distributed
  from sfa_jax import find_state
  from sfa_jax.engine.checkpoint import Checkpointer

  assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == DEVICES_PER_PROCESS, jax.devices()
  out: dict = {'saves': {}}

  def write():
    with open(os.path.join(folder, f'{phase}.{process_id}.json'), 'w') as file:
      json.dump(out, file)
      file.flush()
      os.fsync(file.fileno())

  class Inspecting(Checkpointer):
    """A checkpointer that notes where the run's arrays live at each save (and can be killed after one)."""

    def __init__(self, directory, *, kill_after=None, **kwargs):
      super().__init__(directory, **kwargs)
      self.kill_after = kill_after

    def save(self, step, arrays, record, *, force=False):
      anchor = find_state(arrays, SFAState).anchor
      out['saves'][str(step)] = {'arrays': placement(arrays), 'anchor': placement(anchor)}
      self.last_saved = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), arrays)
      if step == self.kill_after:  # written now: once one process is killed, the other may abort
        out['killed_after_save'] = step
        write()
      super().save(step, arrays, record, force=force)
      if step == self.kill_after:  # saved by both: a save ends with a barrier of all processes
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as a pre-empted job

  stream, method, config = stream_method_config()
  mesh = distributed.make_mesh(MESH)
  if phase == 'kill':
    checkpointer = Inspecting(
        os.path.join(folder, 'killed'), every_steps=EVERY_STEPS, max_to_keep=4, kill_after=KILL_AFTER_SAVE)
    engine.run_sequence(stream, method, config, mesh=mesh, checkpointer=checkpointer)
    raise AssertionError(f'the run was to be killed after its checkpoint of step {KILL_AFTER_SAVE}')

  assert phase == 'resume', phase
  if process_id == 1:
    _fail_to_read_arrays(os.path.join(folder, 'killed'), UNREADABLE_IN_PROCESS_1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    resumed = engine.run_sequence(
        stream, method, config, mesh=mesh, checkpointer=Inspecting(os.path.join(folder, 'killed')))
  out['warnings'] = [str(warning.message) for warning in caught if 'checkpoint' in str(warning.message)]
  out['resumed'] = _summary(resumed)
  uninterrupted_checkpointer = Inspecting(os.path.join(folder, 'uninterrupted'))
  out['uninterrupted'] = _summary(
      engine.run_sequence(stream, method, config, mesh=mesh, checkpointer=uninterrupted_checkpointer))
  # A checkpoint of one process (SHA-256 checksums) restores onto the mesh, its checksums verified.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    arrays, record = Checkpointer(os.path.join(folder, 'one-process')).restore_latest(
        uninterrupted_checkpointer.last_saved, fingerprint=engine.run.fingerprint(stream, method, config))
  out['one_process_restored'] = {'position': record['position'], 'arrays': placement(arrays)}
  write()


def _fail_to_read_arrays(directory: str, step: int) -> None:
  """Makes Orbax fail, in this process only, to read the arrays of checkpoint ``step`` in ``directory``
  (as a flaky disk or a network file system might)."""
  import errno

  import orbax.checkpoint as ocp

  restore = ocp.CheckpointManager.restore

  def failing_restore(self, at_step, *args, **kwargs):
    items = kwargs.get('args')
    if at_step == step and os.fspath(self.directory) == directory and items is not None and 'arrays' in items.keys():
      raise OSError(errno.EIO, os.strerror(errno.EIO))
    return restore(self, at_step, *args, **kwargs)

  ocp.CheckpointManager.restore = failing_restore


def _summary(result) -> dict:
  return {name: getattr(result, name) for name in ('accuracy_matrix', 'steps_per_task', 'averaging_steps')}


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
