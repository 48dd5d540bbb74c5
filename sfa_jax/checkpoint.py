"""Orbax checkpoints of a sequence run, so that a killed run resumes where it stopped.

A checkpoint holds two items: the arrays (params, model state, the full optimizer state with SFA's,
L2's or EWC's anchor, the task's starting point, the Fisher, the merge bases) as an Orbax pytree,
and a JSON record of everything else: where the run is (task, epoch, batch, steps), the results so
far, and a fingerprint of the run's configuration. The data order and the replay memory are
functions of the seed and the position, so they need no saving; the model's initial key is used
once, before the first checkpoint.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
while saving leaves the previous checkpoint intact. Restoring a checkpoint of another
configuration, or one that cannot be read, raises :class:`CheckpointError`: never a silent restart.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used to resume this run."""


class Checkpointer:
  """Saves a run every ``every_steps`` optimizer steps and at task ends; restores the latest.

  Args:
    directory: the folder of this run's checkpoints (created if missing).
    every_steps: save after every this many global steps (0: only at task ends).
    max_to_keep: the number of most recent checkpoints kept on disk.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from sfa_jax.checkpoint import Checkpointer
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), every_steps=10)
    >>> ckpt.save(10, {'w': jnp.ones(2)}, {'fingerprint': 'a', 'step': 10}, force=True)
    >>> arrays, record = ckpt.restore_latest({'w': jnp.zeros(2)}, fingerprint='a')
    >>> arrays['w'].tolist(), record['step']
    ([1.0, 1.0], 10)
    >>> ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike[str], *, every_steps: int = 0, max_to_keep: int = 2):
    if every_steps < 0:
      raise ValueError(f'every_steps must be >= 0; got {every_steps}.')
    self.directory = os.path.abspath(os.fspath(directory))
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('arrays', 'record'))

  def due(self, global_step: int) -> bool:
    """Whether a periodic checkpoint is due after ``global_step``."""
    return self.every_steps > 0 and global_step % self.every_steps == 0

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or ``None``."""
    return self._manager.latest_step()

  def save(self, step: int, arrays: Any, record: dict[str, Any], *, force: bool = False) -> None:
    """Writes a checkpoint numbered ``step`` (a later save of the same step replaces nothing).

    Args:
      step: a number that grows over the run (the global step).
      arrays: a pytree of arrays.
      record: a JSON-serialisable dict; it must hold the run's ``'fingerprint'``.
      force: save even if a checkpoint of this step exists (it is then kept as it is).
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(
        step,
        args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)),
        force=force,
    )
    self._manager.wait_until_finished()

  def restore_record(self, *, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint's JSON record, or ``None`` if there is none.

    Args:
      fingerprint: the configuration the checkpoint must have been saved with.

    Raises:
      CheckpointError: when the checkpoint is of another configuration, or cannot be read.
    """
    step = self.latest_step()
    if step is None:
      return None
    where = os.path.join(self.directory, str(step))
    try:
      record = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
    except Exception as error:  # orbax raises many types for unreadable files
      raise CheckpointError(f'cannot read the checkpoint at {where}: {error}. Delete it to start afresh.') from error
    if not isinstance(record, dict) or record.get('fingerprint') != fingerprint:
      saved = record.get('fingerprint') if isinstance(record, dict) else record
      raise CheckpointError(
          f'the checkpoint at {where} belongs to another run configuration ({saved}); this run is '
          f'{fingerprint}. Use another checkpoint folder, or delete it to start afresh.'
      )
    return record

  def restore_latest(self, like: Any, *, fingerprint: str) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint's ``(arrays, record)``, or ``None`` if there is none.

    Args:
      like: a pytree with the structure, shapes and dtypes of the saved arrays.
      fingerprint: the configuration the checkpoint must have been saved with.

    Raises:
      CheckpointError: when the checkpoint is of another configuration, or cannot be read.
    """
    record = self.restore_record(fingerprint=fingerprint)
    if record is None:
      return None
    step = self.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))['arrays']
    except Exception as error:
      where = os.path.join(self.directory, str(step))
      raise CheckpointError(
          f'cannot restore the arrays of the checkpoint at {where}: {error}. Delete it to start afresh.'
      ) from error
    return arrays, record

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
