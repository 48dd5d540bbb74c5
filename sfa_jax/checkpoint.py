"""Orbax checkpoints of a sequence run, so that a killed run resumes where it stopped.

A checkpoint holds two items: the arrays (params, model state, the full optimizer state with SFA's,
L2's or EWC's anchor, the task's starting point, the Fisher, the merge bases) as an Orbax pytree,
and a JSON record of everything else: where the run is (task, epoch, batch, steps), the results so
far, a fingerprint of the run's configuration, and the SHA-256 of every saved array. The data
order and the replay memory are functions of the seed and the position, so they need no saving;
the model's initial key is used once, before the first checkpoint.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
while saving leaves the previous checkpoint intact. On restore, a checkpoint that cannot be read or
whose arrays no longer match their checksums (a corrupted file) is skipped for the previous one,
with a :class:`CheckpointWarning`, and deleted once an older one has restored; a checkpoint of
another configuration, or none usable at all, raises :class:`CheckpointError`: never a silent
restart, never wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_CHECKSUMS = 'array_checksums'  # the record's key for the arrays' checksums
_ORBAX_DIR = os.path.dirname(ocp.__file__)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used to resume this run, or cannot be saved."""


class CheckpointWarning(UserWarning):
  """A corrupt or unreadable checkpoint was skipped for an older one."""


class Checkpointer:
  """Saves a run every ``every_steps`` optimizer steps and at task ends; restores the latest good one.

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

  def save(self, step: int, arrays: Any, record: dict[str, Any], *, force: bool = False) -> None:
    """Writes a checkpoint numbered ``step`` (a later save of the same step replaces nothing).

    Args:
      step: a number that grows over the run (the global step).
      arrays: a pytree of arrays; their checksums (:func:`array_checksums`) join the record.
      record: a JSON-serialisable dict; it must hold the run's ``'fingerprint'``.
      force: save even if a checkpoint of this step exists (it is then kept as it is).

    Raises:
      CheckpointError: when the checkpoint cannot be written (a full disk, say); the message gives
        the operating system's reason.
    """
    if step in self._manager.all_steps():
      return
    record = record | {_CHECKSUMS: array_checksums(arrays)}
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(record)),
          force=force,
      )
      self._manager.wait_until_finished()
    except (OSError, ValueError) as error:  # TensorStore reports I/O errors as ValueError
      raise CheckpointError(f'cannot save the checkpoint at {self._where(step)}: {_reason(error)}') from error

  def restore_latest(
      self, like: Any | Callable[[dict[str, Any]], Any], *, fingerprint: str
  ) -> tuple[Any, dict[str, Any]] | None:
    """The newest usable checkpoint's ``(arrays, record)``, or ``None`` if there is none.

    A checkpoint that cannot be read, or whose arrays differ from the checksums saved with them, is
    skipped for the one before it. When an older one restores, the skipped ones are deleted (a
    later save may reuse their steps) and a :class:`CheckpointWarning` names them.

    Args:
      like: a pytree with the structure, shapes and dtypes of the saved arrays, or a function of a
        checkpoint's record returning one (when what was saved depends on where the run was).
      fingerprint: the configuration the checkpoint must have been saved with.

    Raises:
      CheckpointError: when the newest readable checkpoint is of another configuration, or when
        checkpoints exist but none is usable.
    """
    skipped: list[str] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        record = self._record(step)
        self._check_fingerprint(step, record, fingerprint)
        arrays = self._arrays(step, like(record) if callable(like) else like, record.get(_CHECKSUMS))
      except _Unusable as problem:
        skipped.append(f'{self._where(step)} ({problem})')
        continue
      if skipped:
        for newer in [s for s in self._manager.all_steps() if s > step]:
          self._manager.delete(newer)
        warnings.warn(
            CheckpointWarning(f'skipped and deleted the unusable checkpoint {"; ".join(skipped)}; resumed from step {step}'),
            stacklevel=2,
        )
      return arrays, {key: value for key, value in record.items() if key != _CHECKSUMS}
    if skipped:
      raise CheckpointError(f'no usable checkpoint in {self.directory}: {"; ".join(skipped)}. Delete it to start afresh.')
    return None

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def _where(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _record(self, step: int) -> dict[str, Any]:
    """The record of checkpoint ``step``; ``_Unusable`` if it cannot be read."""
    try:
      record = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
    except Exception as error:  # orbax raises many types for unreadable files
      raise _Unusable(f'cannot read the checkpoint: {_reason(error)}') from error
    if not isinstance(record, dict):
      raise _Unusable(f'its record is a {type(record).__name__}, not a dict')
    return record

  def _check_fingerprint(self, step: int, record: dict[str, Any], fingerprint: str) -> None:
    if record.get('fingerprint') != fingerprint:
      difference = describe_difference(_decoded(record.get('fingerprint')), _decoded(fingerprint))
      raise CheckpointError(
          f'the checkpoint at {self._where(step)} belongs to another run configuration ({difference}). '
          'Use another checkpoint folder, or delete it to start afresh.'
      )

  def _arrays(self, step: int, like: Any, checksums: Any) -> Any:
    """The arrays of checkpoint ``step``; ``_Unusable`` if unreadable or unequal to ``checksums``."""
    if not isinstance(checksums, dict):
      raise _Unusable('its record holds no checksums of the arrays')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))['arrays']
    except Exception as error:
      raise _Unusable(f'cannot restore the arrays: {_reason(error)}') from error
    found = array_checksums(arrays)
    differ = [path for path in found if checksums.get(path) != found[path]] + sorted(set(checksums) - set(found))
    if differ:
      more = f' and {len(differ) - 1} more' if len(differ) > 1 else ''
      raise _Unusable(f'corrupt: the checksum of {differ[0]}{more} differs')
    return arrays


class _Unusable(Exception):
  """A checkpoint to skip: it cannot be read, or its arrays fail their checksums."""


def array_checksums(arrays: Any) -> dict[str, str]:
  """The SHA-256 of the bytes of every array in ``arrays``, by its path, e.g. ``{"['w']": '3b8…'}``.

  Arrays spread over several processes (not fully addressable here) are left out: a process sees
  only its own part of them.

  Example:
    >>> import numpy as np
    >>> from sfa_jax.checkpoint import array_checksums
    >>> checksums = array_checksums({'w': np.zeros(3, np.float32)})
    >>> list(checksums), len(checksums["['w']"])
    (["['w']"], 64)
  """
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]
            if getattr(leaf, 'is_fully_addressable', True)]
  values = jax.device_get([leaf for _, leaf in leaves])  # one transfer for all
  return {
      jax.tree_util.keystr(path): hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
      for (path, _), value in zip(leaves, values)
  }


def describe_difference(saved: Any, current: Any, path: str = '') -> str | None:
  """The first place where two JSON values differ, for a message; ``None`` when they are equal.

  Args:
    saved: the value a checkpoint holds (decoded JSON: dicts, lists, strings, numbers).
    current: the value of this run.
    path: where the values sit, as a prefix of the answer.

  Example:
    >>> from sfa_jax.checkpoint import describe_difference
    >>> describe_difference({'method': {'name': 'sfa'}, 'seed': 0}, {'method': {'name': 'l2'}, 'seed': 0})
    'method.name: "sfa" in the checkpoint, "l2" now'
  """
  if isinstance(saved, dict) and isinstance(current, dict) and saved.keys() == current.keys():
    parts = ((f'{path}.{key}' if path else str(key), saved[key], current[key]) for key in saved)
  elif isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
    parts = ((f'{path}[{i}]', a, b) for i, (a, b) in enumerate(zip(saved, current)))
  else:
    return None if saved == current else f'{path or "the run"}: {_short(saved)} in the checkpoint, {_short(current)} now'
  return next((d for d in (describe_difference(a, b, p) for p, a, b in parts) if d is not None), None)


def _short(value: Any, limit: int = 80) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _decoded(fingerprint: Any) -> Any:
  """A fingerprint as JSON values (a fingerprint that is not JSON stays a string)."""
  try:
    return json.loads(fingerprint)
  except (TypeError, ValueError):
    return fingerprint


def _reason(error: BaseException) -> str:
  """One line saying why an I/O call of Orbax or TensorStore failed: the OS error's text if any."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='?(\d+)", str(error))  # TensorStore: "... [os_error_code='28']"
  if code:
    return os.strerror(int(code.group(1)))
  return ' '.join(str(error).split()) or type(error).__name__


class _OrbaxFailureLogs(logging.Filter):
  """Drops the errors logged from Orbax's code, or about an exception raised there."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return not any(path.startswith(_ORBAX_DIR) for path in [record.pathname, *(frame.filename for frame in frames)])


class _SkipClosedLoopErrors:
  """An unraisable-exception hook that drops the "Event loop is closed" errors of a failed write.

  They come from TensorStore callbacks that fire after Orbax closed the event loop of a save that
  failed; every other unraisable exception goes to the previous hook.
  """

  def __init__(self, previous: Callable[[Any], None]):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      self.previous(unraisable)


def silence_orbax_failure_reports() -> None:
  """Keeps Orbax from printing the tracebacks of a failed save or restore on stderr, in this process.

  When a write fails (a full disk, say), Orbax logs the error of each of its writer threads with
  its traceback (absl), asyncio logs the same errors again as never retrieved, and TensorStore
  callbacks left behind print "Event loop is closed" errors, or warn at exit that their write
  coroutines were never awaited; the :class:`CheckpointError` raised
  to the caller already says what failed. For programs that report
  errors themselves, such as the command line. Calling it again changes nothing.
  """
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxFailureLogs) for f in logger.filters):
      logger.addFilter(_OrbaxFailureLogs())
  warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  if not isinstance(sys.unraisablehook, _SkipClosedLoopErrors):
    sys.unraisablehook = _SkipClosedLoopErrors(sys.unraisablehook)
