"""Orbax checkpoints of a sequence run, so that a killed run resumes where it stopped.

A checkpoint holds two items: the arrays (params, model state, the full optimizer state with SFA's,
L2's or EWC's anchor, the task's starting point, the Fisher, the merge bases) as an Orbax pytree,
and a JSON record of everything else: where the run is (task, epoch, batch, steps), the results so
far, a fingerprint of the run's configuration, and a checksum of every saved array (SHA-256, or
:func:`fold64_checksum` for an array spread over several processes). The data
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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sfa_jax.engine import distributed

__all__ = ['CheckpointError', 'CheckpointWarning', 'Checkpointer']

_CHECKSUMS = 'array_checksums'  # the record's key for the arrays' checksums


class _Orbax:
  """``orbax.checkpoint``, imported on first use: a run without checkpoints does not pay its import (~0.3 s)."""

  def __getattr__(self, name: str) -> Any:
    import orbax.checkpoint  # pylint: disable=import-outside-toplevel
    return getattr(orbax.checkpoint, name)


ocp = _Orbax()


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used to resume this run, or cannot be saved.

  Example:
    >>> from sfa_jax import engine
    >>> try:  # what a run says when its folder holds another configuration's checkpoint
    ...   raise engine.CheckpointError('the checkpoint in outputs/run is of another run')
    ... except RuntimeError as error:
    ...   print(type(error).__name__, error)
    CheckpointError the checkpoint in outputs/run is of another run
  """


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
    >>> from sfa_jax.engine.checkpoint import Checkpointer
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

    With several processes every process must call it; each reads its own shards, and a checkpoint
    that any process cannot read, or that fails its checksums, is skipped by all of them alike.

    Args:
      like: a pytree with the structure, shapes and dtypes of the saved arrays, or a function of a
        checkpoint's record returning one (when what was saved depends on where the run was).
      fingerprint: the configuration the checkpoint must have been saved with.

    Raises:
      CheckpointError: when the newest readable checkpoint is of another configuration, or when
        checkpoints exist but none is usable.
    """
    skipped: list[str] = []
    reader = self._reader()
    try:
      for step in sorted(self._manager.all_steps(), reverse=True):
        record, arrays, problem = self._read(reader, step, like, fingerprint)
        # A read can fail in one process only: all decide on what any of them found.
        kind, reason = _agreed(problem)
        if kind == _WRONG_RUN:
          raise CheckpointError(reason)
        if kind is None:
          reason = _checksum_problem(arrays, record[_CHECKSUMS])  # the same answer in every process
        if reason is not None:
          skipped.append(f'{self._where(step)} ({reason})')
          continue
        if skipped:
          for newer in [s for s in self._manager.all_steps() if s > step]:
            self._manager.delete(newer)
          message = f'skipped and deleted the unusable checkpoint {"; ".join(skipped)}; resumed from step {step}'
          warnings.warn(CheckpointWarning(message), stacklevel=2)
        return arrays, {key: value for key, value in record.items() if key != _CHECKSUMS}
    finally:
      reader.close()
    if skipped:
      raise CheckpointError(f'no usable checkpoint in {self.directory}: {"; ".join(skipped)}. Delete it to start afresh.')
    return None

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def _where(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _reader(self) -> ocp.CheckpointManager:
    """A read-only manager of this process alone: it waits for no other process.

    Orbax ends every restore with a barrier of all processes; a process whose read fails would
    skip it, and the barriers of the processes would pair up wrongly from then on. Reading alone,
    the processes meet only in :func:`_agreed`, once each has its answer.
    """
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    notes = _ReadOnlyNotes()  # Orbax warns that a read-only manager will not save: we know
    logging.getLogger('absl').addFilter(notes)
    try:
      options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=alone)
      return ocp.CheckpointManager(self.directory, options=options, item_names=('arrays', 'record'))
    finally:
      logging.getLogger('absl').removeFilter(notes)

  def _read(
      self, reader: ocp.CheckpointManager, step: int, like: Any, fingerprint: str
  ) -> tuple[dict[str, Any] | None, Any, tuple[int, str] | None]:
    """``(record, arrays, problem)`` of checkpoint ``step`` as this process reads it.

    ``problem`` is ``None``, or ``(kind, reason)``: :data:`_UNUSABLE` for a checkpoint that cannot
    be read, :data:`_WRONG_RUN` for one of another configuration (a :class:`CheckpointError`).
    """
    try:
      record = self._record(reader, step)
      self._check_fingerprint(step, record, fingerprint)
      if not isinstance(record.get(_CHECKSUMS), dict):
        raise _Unusable('its record holds no checksums of the arrays')
      template = like(record) if callable(like) else like
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
      try:
        arrays = reader.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))['arrays']
      except Exception as error:  # orbax raises many types for unreadable files
        raise _Unusable(f'cannot restore the arrays: {_reason(error)}') from error
      arrays = jax.tree.map(_placed_like, template, arrays)
    except CheckpointError as error:
      return None, None, (_WRONG_RUN, str(error))
    except _Unusable as problem:
      return None, None, (_UNUSABLE, str(problem))
    return record, arrays, None

  def _record(self, reader: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The record of checkpoint ``step``; ``_Unusable`` if it cannot be read."""
    try:
      record = reader.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
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


_UNUSABLE, _WRONG_RUN = 1, 2  # the kinds of problem a process can find in a checkpoint, by severity
_AGREED_BYTES = 1024  # of a problem's reason, shared between the processes


def _agreed(problem: tuple[int, str] | None) -> tuple[int | None, str | None]:
  """The gravest problem any process found (the first such process's), the same in every process.

  With one process, ``problem`` itself (or ``(None, None)``). With several, one all-gather of a
  small byte array: every process must call it, once it has read the checkpoint.
  """
  if jax.process_count() == 1:
    return problem or (None, None)
  encoded = np.zeros(_AGREED_BYTES + 1, np.uint8)
  if problem is not None:
    text = problem[1].encode()[:_AGREED_BYTES]
    encoded[0], encoded[1:1 + len(text)] = problem[0], np.frombuffer(text, np.uint8)
  found = np.asarray(multihost_utils.process_allgather(encoded))
  index = int(np.argmax(found[:, 0]))  # the first of the gravest
  if found[index, 0] == 0:
    return None, None
  reason = bytes(found[index, 1:]).rstrip(b'\0').decode(errors='replace')
  return int(found[index, 0]), reason if found[index, 0] == _WRONG_RUN else f'process {index}: {reason}'


def _checksum_problem(arrays: Any, checksums: dict[str, str]) -> str | None:
  """Why ``arrays`` fail the ``checksums`` saved with them, or ``None`` (collective across processes)."""
  found = array_checksums(arrays, like=checksums)
  differ = [path for path in found if checksums.get(path) != found[path]] + sorted(set(checksums) - set(found))
  if not differ:
    return None
  more = f' and {len(differ) - 1} more' if len(differ) > 1 else ''
  return f'corrupt: the checksum of {differ[0]}{more} differs'


def _placed_like(template: Any, restored: Any) -> Any:
  """``restored`` uncommitted where ``template`` is (Orbax commits what it restores,
  :func:`sfa_jax.engine.distributed.uncommitted`); an array placed on purpose (a mesh's) stays."""
  if isinstance(template, jax.Array) and not template.committed:
    return distributed.uncommitted(restored)
  return restored


class _Unusable(Exception):
  """A checkpoint to skip: it cannot be read, or its arrays fail their checksums."""


def array_checksums(arrays: Any, *, like: dict[str, str] | None = None) -> dict[str, str]:
  """A checksum of every array in ``arrays``, by its path, e.g. ``{"['w']": '3b8…'}``.

  An array this process holds whole gets the SHA-256 of its bytes (64 hex digits). An array
  spread over several processes (not fully addressable: FSDP-sharded or replicated over the
  devices of every process) gets :func:`fold64_checksum`, which each process computes from its
  own shards and every process receives whole: all processes hold the same checksums, so a
  corrupt checkpoint is skipped by all of them alike.

  Args:
    arrays: a pytree of arrays.
    like: checksums to compare with (a checkpoint's): an array whose entry there starts with
      ``'fold64:'`` gets :func:`fold64_checksum`, one with a SHA-256 there gets the SHA-256 (of
      its gathered value if it spans processes), so that a checkpoint saved by several processes
      verifies in one, and the other way round. ``None``: each array's own kind, as above.

  Returns:
    The checksum of every array, by its path (``jax.tree_util.keystr``).

  Example:
    >>> import numpy as np
    >>> from sfa_jax.engine.checkpoint import array_checksums
    >>> checksums = array_checksums({'w': np.zeros(3, np.float32)})
    >>> list(checksums), len(checksums["['w']"])
    (["['w']"], 64)
    >>> array_checksums({'w': np.zeros(3, np.float32)}, like={"['w']": 'fold64:'})["['w']"][:7]
    'fold64:'
  """
  leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]]

  def folded(name: str, leaf: Any) -> bool:
    if like is not None and name in like:
      return str(like[name]).startswith(_FOLD64)
    return not getattr(leaf, 'is_fully_addressable', True)

  fold = [(name, leaf) for name, leaf in leaves if folded(name, leaf)]
  hashed = [(name, leaf) for name, leaf in leaves if not folded(name, leaf)]
  checksums = dict(zip([name for name, _ in fold], fold64_checksum([leaf for _, leaf in fold]))) if fold else {}
  values = jax.device_get([_whole(leaf) for _, leaf in hashed])  # one transfer for all
  checksums.update(
      (name, hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest())
      for (name, _), value in zip(hashed, values)
  )
  return {name: checksums[name] for name, _ in leaves}


def _whole(leaf: Any) -> Any:
  """``leaf``, gathered from every process if it spans several (every process must call this)."""
  if getattr(leaf, 'is_fully_addressable', True):
    return leaf
  return multihost_utils.process_allgather(leaf, tiled=True)


_FOLD64 = 'fold64:'
_FOLD_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # one per 32-bit half of the checksum


def fold64_checksum(arrays: Sequence[Any]) -> list[str]:
  """A 64-bit checksum of each array that does not depend on how the array is sharded.

  Each element's bits (32-bit words: two for a 64-bit type) are hashed together with their
  position in the array, and the hashes are summed modulo ``2**32``, twice with different seeds:
  a sum is computed shard by shard, where the shards are, and equals that of the whole array
  exactly, so an array split over several processes needs no gather and every process receives
  the same checksum. A change of any one element always changes it; it detects corruption, not
  tampering (use SHA-256 for that).

  Args:
    arrays: arrays (``jax.Array`` on any devices, or NumPy arrays); every process of a
      multi-process run must pass the same arrays.

  Returns:
    ``'fold64:'`` and 16 hex digits for each array.

  Example:
    >>> import numpy as np
    >>> from sfa_jax.engine.checkpoint import fold64_checksum
    >>> a, b = fold64_checksum([np.zeros(3, np.float32), np.array([0, 0, 1], np.float32)])
    >>> a != b, a[:7], len(a)
    (True, 'fold64:', 23)
  """
  placed = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for leaf in arrays]
  sums = jax.device_get(_fold_sums(placed))
  return [f'{_FOLD64}{int(lanes[0]):08x}{int(lanes[1]):08x}' for lanes in sums]


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection, every input bit flips about half the output bits."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(leaf: jax.Array) -> jax.Array:
  """The bits of ``leaf`` as uint32: one word an element, two (a trailing axis) for 64-bit types."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if leaf.dtype == jnp.bool_:
    return leaf.astype(np.uint32)
  if jnp.iscomplexobj(leaf):
    leaf = jnp.stack([leaf.real, leaf.imag], axis=-1)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[leaf.dtype.itemsize]
  return jax.lax.bitcast_convert_type(leaf, unsigned).astype(np.uint32)


@jax.jit
def _fold_sums(leaves: list[jax.Array]) -> list[jax.Array]:
  """``[uint32[2]]``: the two seeded position-and-bits hash sums of each leaf (see :func:`fold64_checksum`)."""
  sums = []
  for leaf in leaves:
    words = _words(leaf)
    position = jnp.zeros(words.shape, np.uint32)  # the flat (C order) index, modulo 2**32
    stride = 1
    for axis in reversed(range(words.ndim)):
      position = position + jax.lax.broadcasted_iota(np.uint32, words.shape, axis) * np.uint32(stride % 2**32)
      stride *= words.shape[axis]
    sums.append(jnp.stack([
        jnp.sum(_mix32(_mix32(position ^ np.uint32(seed)) ^ words), dtype=np.uint32) for seed in _FOLD_SEEDS
    ]))
  return sums


def describe_difference(saved: Any, current: Any, path: str = '') -> str | None:
  """The first place where two JSON values differ, for a message; ``None`` when they are equal.

  Args:
    saved: the value a checkpoint holds (decoded JSON: dicts, lists, strings, numbers).
    current: the value of this run.
    path: where the values sit, as a prefix of the answer.

  Example:
    >>> from sfa_jax.engine.checkpoint import describe_difference
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
  text = ' '.join(str(error).split()).split(' See full TensorStore details')[0]  # not its whole spec
  return text or type(error).__name__


class _ReadOnlyNotes(logging.Filter):
  """Drops Orbax's warnings that a read-only checkpoint manager will neither save nor create."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('read_only=True' in message or message.startswith('Given directory is read only'))


class _OrbaxFailureLogs(logging.Filter):
  """Drops the errors logged from Orbax's code, or about an exception raised there or in TensorStore."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    if _from_tensorstore(error):  # set on an asyncio future from C++: it may carry no traceback
      return False
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return not any(path.startswith(os.path.dirname(ocp.__file__)) for path in [record.pathname, *(frame.filename for frame in frames)])


def _from_tensorstore(error: BaseException | None) -> bool:
  """Whether ``error`` is TensorStore's report of a failed read or write ("... [os_error_code=...]")."""
  text = str(error) if isinstance(error, ValueError) else ''
  return 'os_error_code=' in text or 'OCDBT database' in text or 'TensorStore' in text


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
