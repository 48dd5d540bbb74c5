"""Compiled programs and traced facts kept on disk, so that a process that ran a configuration before neither traces nor compiles.

JAX's persistent compilation cache saves the compile, but a new process still traces and lowers
every program before it can ask the cache (about a second for a small run). The engine keeps
its compiled programs (serialized XLA executables) and the facts it traces (the shapes of a
model's variables, an update's digest) in a folder, under a key of what decides them: a stable
description of the model, method, optimizer and objective (their classes, fields and the
source of the modules that define them), the arguments' tree, shapes and dtypes, the device
kind and the versions of Python, jax, jaxlib, flax, optax, NumPy and of ``sfa_jax``'s own
source. An entry is verified on load (its checksum and its full description) and rebuilt when
anything differs. What cannot be described stably (an object whose ``repr`` holds a memory
address) is never stored: it is traced and compiled as before.

:func:`sfa_jax.engine.compile_cache.enable_compilation_cache` turns the store on (its folder's
``programs/``); the command line and the experiments do. The store is trusted code, as the
compilation cache is: a folder that another user owns or that others may write to is not used
(a warning says so).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import platform
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from sfa_jax import _lazy

__all__ = ['StoredProgram', 'remembered', 'set_directory', 'directory', 'describe', 'environment', 'Unstable']

_FORMAT = 1
_state = {'directory': None, 'warned': set(), 'fresh': 0, 'restore': False}
_lock = threading.Lock()
_FACTS: dict[str, Any] = {}


def set_directory(folder: str | None) -> None:
  """Keeps compiled programs and traced facts in ``folder`` (created if missing); ``None`` keeps none.

  The core's jitted helpers (:mod:`sfa_jax._lazy`) are kept there too.

  Example:
    >>> import tempfile
    >>> from sfa_jax.engine import stored
    >>> stored.set_directory(tempfile.mkdtemp())
    >>> stored.directory() is not None
    True
    >>> stored.set_directory(None)
  """
  if folder is not None:
    os.makedirs(folder, mode=0o700, exist_ok=True)
  _state['directory'] = folder
  _lazy.install(None if folder is None else _core_program)


def _core_program(function: Callable[..., Any], jitted: Any, static_argnums: tuple[int, ...],
                  static_argnames: tuple[str, ...], compiler_options: dict[str, Any]) -> StoredProgram:
  """A helper of the core (:func:`sfa_jax._lazy.jit`: the Fisher's chunk sums, the finite checks...) kept in the store."""
  return StoredProgram(('core', function), lambda: jitted, static_argnums, compiler_options, static_argnames)


def directory() -> str | None:
  """The store's folder, or ``None`` when it is off or not trusted (another owner, or writable by others)."""
  folder = _state['directory']
  if folder is None:
    return None
  info = os.stat(folder)
  if (hasattr(os, 'getuid') and info.st_uid != os.getuid()) or info.st_mode & 0o022:
    if folder not in _state['warned']:
      _state['warned'].add(folder)
      warnings.warn(f'{folder} is not used to store compiled programs: another user owns it or others may write to '
                    'it, and what it holds would run as your code. Make it yours alone (chmod go-w).', stacklevel=3)
    return None
  return folder


# ------------------------------------------------------------------------------------------------
# Stable descriptions.


class Unstable(Exception):
  """Raised by :func:`describe` for an object that has no description stable across processes."""


def describe(obj: Any) -> str:
  """A text that is the same in every process exactly when ``obj`` decides a program the same way.

  Numbers, strings, containers, dataclasses and named tuples by their fields, functions by their
  qualified name, code and closure, classes and Flax modules by their name and ``repr``; each
  class and function also by the source file of the module defining it.

  Raises:
    Unstable: for an object described only by its memory address, or defined where no source file
      tells when it changes (a notebook, ``python -c``).
  """
  sources: set[str] = set()
  text = _describe(obj, sources, 0)
  digests = {name: _file_digest(name) for name in sorted(sources)}
  unknown = [name for name, digest in digests.items() if digest == '-' and name != 'builtins']
  if unknown:
    raise Unstable(f'{unknown[0]} has no source file to tell when it changes')
  return text + ''.join(f'\n{name}:{digest}' for name, digest in digests.items())


def _describe(obj: Any, sources: set[str], depth: int) -> str:
  if depth > 40:
    raise Unstable('nested too deeply')
  again = lambda value: _describe(value, sources, depth + 1)
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
    return f'{type(obj).__name__}:{obj!r}'
  if isinstance(obj, (np.generic, np.dtype)):
    return f'{type(obj).__name__}:{obj!r}'
  if isinstance(obj, jax.Array):
    obj = np.asarray(obj)
  if isinstance(obj, np.ndarray):
    return f'ndarray:{obj.dtype}{obj.shape}:{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}'
  if isinstance(obj, jax.ShapeDtypeStruct):
    return f'ShapeDtypeStruct:{obj.dtype}{obj.shape}:{getattr(obj, "weak_type", False)}'
  if isinstance(obj, type):
    sources.add(obj.__module__)
    return f'class:{obj.__module__}.{obj.__qualname__}'
  if isinstance(obj, functools.partial):
    return f'partial({again(obj.func)},{again(obj.args)},{again(sorted(obj.keywords.items()))})'
  if isinstance(obj, types.MethodType):
    return f'method({again(obj.__self__)}.{obj.__func__.__name__},{again(obj.__func__)})'
  if isinstance(obj, types.FunctionType):
    sources.add(obj.__module__)
    cells = tuple(cell.cell_contents for cell in obj.__closure__ or ())
    return (f'function:{obj.__module__}.{obj.__qualname__}:{_code_digest(obj.__code__)}:'
            f'{again(cells)}:{again(obj.__defaults__)}:{again(sorted((obj.__kwdefaults__ or {}).items()))}')
  if isinstance(obj, (tuple, list)) and not hasattr(obj, '_fields'):
    return f'{type(obj).__name__}[' + ','.join(again(item) for item in obj) + ']'
  if isinstance(obj, (frozenset, set)):
    return f'{type(obj).__name__}{{' + ','.join(sorted(again(item) for item in obj)) + '}'
  if isinstance(obj, dict):
    return '{' + ','.join(f'{again(k)}:{again(v)}' for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + '}'
  sources.add(type(obj).__module__)
  name = f'{type(obj).__module__}.{type(obj).__qualname__}'
  if hasattr(obj, '_fields'):  # a named tuple
    return f'{name}(' + ','.join(f'{field}={again(getattr(obj, field))}' for field in obj._fields) + ')'
  if isinstance(obj, jax.sharding.Mesh):
    return f'Mesh({obj.axis_names},{obj.devices.shape},{[d.id for d in obj.devices.flat]})'
  if dataclasses.is_dataclass(obj) and not _is_flax_module(obj):
    return f'{name}(' + ','.join(f'{f.name}={again(getattr(obj, f.name))}' for f in dataclasses.fields(obj)) + ')'
  text = repr(obj)
  if ' at 0x' in text or type(obj).__repr__ is object.__repr__:
    raise Unstable(f'a {name} is described only by its address')
  return f'{name}:{text}'


def _is_flax_module(obj: Any) -> bool:
  return any(base.__module__ == 'flax.linen.module' and base.__name__ == 'Module' for base in type(obj).__mro__)


def _code_digest(code: types.CodeType) -> str:
  digest = hashlib.sha256(code.co_code)
  for const in code.co_consts:
    digest.update((_code_digest(const) if isinstance(const, types.CodeType) else repr(const)).encode())
  digest.update(repr(code.co_names).encode())
  return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _file_digest(module_name: str) -> str:
  """The digest of the source file of ``module_name`` (``-`` when it has none, a built-in)."""
  path = getattr(sys.modules.get(module_name), '__file__', None)
  if not path or not os.path.exists(path):
    return '-'
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def environment() -> str:
  """What decides every program besides its own key: versions, ``sfa_jax``'s source, the devices, JAX's flags."""
  flags = [(name, getattr(jax.config, name, None)) for name in (
      'jax_enable_x64', 'jax_default_matmul_precision', 'jax_default_prng_impl', 'jax_threefry_partitionable')]
  devices = jax.devices()
  return '\n'.join([_installation(), f'backend={jax.default_backend()}', f'devices={len(devices)}x{devices[0].device_kind}',
                    f'flags={flags}', f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")}'])


@functools.lru_cache(maxsize=1)
def _installation() -> str:
  """The format, Python's and the packages' versions and the digest of ``sfa_jax``'s source (read once)."""
  versions = []
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'numpy'):
    try:
      versions.append(f'{package}={importlib.metadata.version(package)}')
    except importlib.metadata.PackageNotFoundError:
      versions.append(f'{package}=-')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  source = hashlib.sha256()
  for folder, subfolders, files in sorted(os.walk(root)):
    subfolders.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        with open(os.path.join(folder, name), 'rb') as f:
          source.update(os.path.relpath(os.path.join(folder, name), root).encode() + f.read())
  return '\n'.join([f'format={_FORMAT}', f'python={platform.python_version()}', *versions, f'sfa_jax={source.hexdigest()}'])


# ------------------------------------------------------------------------------------------------
# Entries on disk.


def _path(kind: str, text: str) -> str | None:
  folder = directory()
  if folder is None:
    return None
  return os.path.join(folder, hashlib.sha256(text.encode()).hexdigest() + '.' + kind)


def _read(path: str, text: str) -> Any:
  """The payload stored at ``path`` for the description ``text``, or ``None`` when it is missing,
  damaged or another description's."""
  try:
    with open(path, 'rb') as f:
      checksum, body = f.read(64), f.read()[1:]
  except OSError:
    return None
  if hashlib.sha256(body).hexdigest().encode() != checksum:
    return None
  try:
    entry = pickle.loads(body)
  except Exception:  # pylint: disable=broad-except
    return None
  if not isinstance(entry, dict) or entry.get('description') != text:
    return None
  return entry.get('payload')


def _write(path: str, text: str, payload: Any) -> None:
  """Writes the entry whole or not at all (a temporary file renamed over); a failure leaves no entry.

  A payload that pickle cannot write (its tree holds a class of a module that cannot be imported,
  such as one defined in code run by ``exec``) is not stored: it stays in this process's memory.
  """
  try:
    body = pickle.dumps({'description': text, 'payload': payload}, protocol=pickle.HIGHEST_PROTOCOL)
  except (pickle.PicklingError, AttributeError, TypeError):
    return
  folder = os.path.dirname(path)
  try:
    handle, temporary = tempfile.mkstemp(dir=folder, prefix='.writing-')
    with os.fdopen(handle, 'wb') as f:
      f.write(hashlib.sha256(body).hexdigest().encode() + b'\n' + body)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as error:
    warnings.warn(f'could not store a compiled program in {folder}: {error}', stacklevel=3)


def remembered(key: Any, compute: Callable[[], Any], *, in_memory: bool = True) -> Any:
  """``compute()``, kept for this process and on disk under ``key`` (a picklable value, e.g. traced shapes).

  Computed afresh when the store is off or ``key`` has no stable description. With ``in_memory=False``
  the process keeps nothing (each call reads the disk): for values too large to hold for every key.

  Example:
    >>> from sfa_jax.engine import stored
    >>> stored.remembered(('example', 2), lambda: 2 * 21)
    42
  """
  try:
    text = describe(key) + '\n' + environment()
  except Unstable:
    return compute()
  if text in _FACTS:
    return _FACTS[text]
  path = _path('fact', text)
  value = _read(path, text) if path else None
  if value is None:
    value = compute()
    if path:
      _write(path, text, value)
  if in_memory:
    _FACTS[text] = value
  return value


class StoredProgram:
  """A jitted function whose compiled programs are kept on disk, so that a later process neither traces nor compiles it.

  Called like the jitted function. Each call's signature (the arguments' tree, shapes, dtypes and
  static values) selects a compiled program: this process's, else the store's (verified), else
  one lowered and compiled now and then stored. With the store off, arguments placed on several
  devices, or a ``key`` without a stable description, it calls the jitted function itself (or,
  with ``compiler_options``, compiles it ahead of time for this process alone).

  Args:
    key: what decides the function besides its arguments (the model, transform, objective...).
    build: makes the ``jax.jit`` function (called at most once, when first needed); any other
      callable it makes is called as it is.
    static_argnums: the positions of the static arguments, as given to ``jax.jit``.
    static_argnames: the names of the static keyword arguments, as given to ``jax.jit``.
    compiler_options: XLA options for its compilation, e.g. a lower optimisation level for a
      program that runs once (its results must not depend on them).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.engine.stored import StoredProgram
    >>> double = StoredProgram(('double',), lambda: jax.jit(lambda x: 2 * x))
    >>> double(jnp.arange(3)).tolist()
    [0, 2, 4]
  """

  def __init__(self, key: Any, build: Callable[[], Any], static_argnums: Sequence[int] = (),
               compiler_options: dict[str, Any] | None = None, static_argnames: Sequence[str] = ()):
    self._key, self._build, self._static = key, build, tuple(static_argnums)
    self._static_names = tuple(static_argnames)
    self._options = dict(compiler_options or {})
    self._jitted = None
    self._compiled: dict[Any, Any] = {}
    self._pending: dict[Any, tuple[concurrent.futures.Future, Sequence[Any], bool]] = {}
    self._text: str | None | bool = False  # not described yet
    self._static_texts: dict[int, tuple[Any, str]] = {}  # id -> (static argument, its description)

  @property
  def jitted(self) -> Any:
    """The ``jax.jit`` function."""
    if self._jitted is None:
      self._jitted = self._build()
    return self._jitted

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    signature = self._signature(args, kwargs)
    if signature is None:
      return self.jitted(*args, **kwargs)
    compiled = self._compiled.get(signature)
    if compiled is None:
      pending, *_ = self._pending.pop(signature, (None,))
      try:
        compiled = pending.result() if pending is not None else None
      except Exception:  # pylint: disable=broad-except  (compiled again here, where the error is reported)
        compiled = None
      if compiled is None:
        compiled = self._load_or_compile(signature, args, kwargs)
    return compiled(*self._dynamic(args), **self._dynamic_kwargs(kwargs))

  def prepare(self, *args: Any) -> None:
    """Loads or compiles the program for these arguments (shapes suffice: ``jax.ShapeDtypeStruct``) without running it."""
    signature = self._signature(args)
    if signature is not None and signature not in self._compiled:
      self._load_or_compile(signature, args)

  def prepare_in_background(self, executor: concurrent.futures.Executor, *args: Any, later: bool = False) -> bool:
    """:meth:`prepare` in ``executor``; a later call with these shapes waits for it. ``False`` when
    the program is not compiled ahead (nothing was submitted). What is needed ``later`` is left to
    ``executor``: :meth:`prepare_queued_here` does not take it."""
    signature = self._signature(args)
    if signature is None:
      return False
    if signature not in self._compiled and signature not in self._pending:
      self._pending[signature] = executor.submit(self._load_or_compile, signature, args), args, later
    return True

  def prepare_queued_here(self) -> None:
    """Loads or compiles, in the calling thread, what :meth:`prepare_in_background` queued and its
    executor has not started: a thread that would otherwise wait for the executor does it instead."""
    for signature, (future, args, later) in list(self._pending.items()):
      if not later and future.cancel():
        del self._pending[signature]
        self._load_or_compile(signature, args)

  def _cache_size(self) -> int:
    """How many programs this function holds compiled (as ``jax.jit``'s ``_cache_size``)."""
    return len(self._compiled) + (self._jitted._cache_size() if self._jitted is not None else 0)

  def _description(self) -> str | None:
    """The key's description with the environment's, or ``None`` when it has none (never stored)."""
    if self._text is False:
      try:
        self._text = describe(self._key) + '\n' + environment()
      except Unstable:
        self._text = None
    return self._text

  def _dynamic(self, args: Sequence[Any]) -> list[Any]:
    return [arg for i, arg in enumerate(args) if i not in self._static]

  def _dynamic_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in kwargs.items() if name not in self._static_names}

  def _signature(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Any:
    """What selects a compiled program among this function's, or ``None`` to call the jitted function."""
    if not self._options and (directory() is None or self._description() is None):
      return None
    if not hasattr(self.jitted, 'lower'):
      return None  # ``build`` made another callable (a wrapper): it is called as it is
    kwargs = kwargs or {}
    leaves, tree = jax.tree.flatten([self._dynamic(args), self._dynamic_kwargs(kwargs)])
    shapes = []
    for leaf in leaves:
      if isinstance(leaf, jax.core.Tracer):
        return None  # called inside a transformation: the jitted function is traced into it
      sharding = getattr(leaf, 'sharding', None)
      if sharding is not None and len(sharding.device_set) > 1:
        return None  # placed on several devices: the jitted function places and compiles
      if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
        shapes.append((tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, 'weak_type', False))))
      else:
        shapes.append(type(leaf).__name__)  # a Python scalar: weakly typed
    try:
      statics = tuple(self._describe_static(args[i]) for i in self._static if i < len(args))
      statics += tuple(f'{name}={self._describe_static(kwargs[name])}' for name in sorted(kwargs) if name in self._static_names)
    except Unstable:
      return None
    return (str(tree), tuple(shapes), statics)

  def _describe_static(self, value: Any) -> str:
    """:func:`describe` of a static argument, once per object (``jax.jit`` too tells a static
    callable by its identity): a function whose closure holds arrays is not hashed at every call."""
    known = self._static_texts.get(id(value))
    if known is not None and known[0] is value:
      return known[1]
    text = describe(value)
    if len(self._static_texts) >= 64:
      self._static_texts.clear()
    self._static_texts[id(value)] = (value, text)
    return text

  def _load_or_compile(self, signature: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Any:
    if signature in self._compiled:
      return self._compiled[signature]
    description = self._description()
    text = None if description is None else description + '\n' + repr(signature) + f'\noptions={sorted(self._options.items())}'
    path = _path('program', text) if text is not None else None
    compiled = None
    payload = _read(path, text) if path else None
    if payload is not None:
      try:
        compiled = serialize_executable.deserialize_and_load(*payload)
      except Exception:  # pylint: disable=broad-except  (another jaxlib's bytes, a damaged entry: rebuilt)
        compiled = None
    if compiled is None:
      with _fresh_compilation() if path else contextlib.nullcontext():
        compiles = _compiles_here()
        compiled = self.jitted.lower(*args, **(kwargs or {})).compile(compiler_options=self._options or None)
        # JAX hands back an executable it holds in memory without compiling; one it loaded from its
        # persistent cache earlier in the process would serialize without some kernels. Store only
        # what this call compiled (a later process stores the rest).
        compiled_here = _compiles_here() > compiles
      if path and compiled_here:
        try:
          payload = serialize_executable.serialize(compiled)
        except Exception:  # pylint: disable=broad-except  (a program XLA cannot serialize: kept in memory only)
          payload = None
        if payload is not None:
          _write(path, text, payload)
    self._compiled[signature] = compiled
    return compiled


_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_backend_compiles: dict[int, int] = {}  # thread ident -> XLA compilations run in that thread


def _count_backend_compile(event: str, duration: float, **kwargs: Any) -> None:
  del duration, kwargs
  if event == _BACKEND_COMPILE_EVENT:
    thread = threading.get_ident()
    _backend_compiles[thread] = _backend_compiles.get(thread, 0) + 1


jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def _compiles_here() -> int:
  """How many programs XLA has compiled (or JAX read from its persistent cache) in this thread."""
  return _backend_compiles.get(threading.get_ident(), 0)


@contextlib.contextmanager
def _fresh_compilation():
  """JAX's persistent compilation cache off while programs compile for the store.

  An executable that XLA:CPU loaded from JAX's cache serializes without some of its kernels (a
  later process fails to run it: "Function ... not found"), so stored programs compile afresh.
  """
  with _lock:
    _state['fresh'] += 1
    if _state['fresh'] == 1 and jax.config.jax_enable_compilation_cache:
      jax.config.update('jax_enable_compilation_cache', False)
      compilation_cache.reset_cache()
      _state['restore'] = True
  try:
    yield
  finally:
    with _lock:
      _state['fresh'] -= 1
      if _state['fresh'] == 0 and _state['restore']:
        _state['restore'] = False
        jax.config.update('jax_enable_compilation_cache', True)
        compilation_cache.reset_cache()
