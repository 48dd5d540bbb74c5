"""JAX's persistent compilation cache, on by default for the command line and the experiments.

Small continual-learning jobs spend most of their first run compiling; with the cache, a second run
of the same configuration loads the compiled programs from disk instead. The engine's own programs
go further: they are kept whole in the folder's ``programs/`` (:mod:`sfa_jax.engine.stored`), so a
later process neither traces nor lowers them.

The cache is trusted code: whoever can write to its folder can make JAX run their programs. Keep
it in a folder only you can write to (the default is under your home; a ``programs/`` folder that
others may write to is not used).
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from sfa_jax.engine import stored

_CACHE_DIR_ENV = 'SFA_JAX_CACHE_DIR'
"""The environment variable that moves the persistent compilation cache."""


def default_cache_dir() -> str:
  """``$SFA_JAX_CACHE_DIR`` if set, else ``~/.cache/sfa_jax/jax``."""
  return os.environ.get(_CACHE_DIR_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'sfa_jax', 'jax')


def enable_compilation_cache(directory: str | None = None) -> str:
  """Stores every compiled program in ``directory`` and reuses it in later processes.

  Every program is cached, however small or quick to compile
  (``jax_persistent_cache_min_compile_time_secs = 0``, ``jax_persistent_cache_min_entry_size_bytes
  = -1``): a continual-learning run compiles a handful of small programs, and each second counts.
  It takes effect from the next compilation, also when JAX has compiled before the call or used
  another cache folder. The engine's compiled programs and traced shapes are kept in the
  folder's ``programs/`` (:func:`sfa_jax.engine.stored.set_directory`).

  Args:
    directory: the cache folder; ``None`` means :func:`default_cache_dir`. Created if missing.

  Returns:
    The folder used.

  Example:
    >>> import tempfile
    >>> from sfa_jax.engine.compile_cache import enable_compilation_cache
    >>> folder = enable_compilation_cache(tempfile.mkdtemp())  # doctest: +SKIP
  """
  directory = directory or default_cache_dir()
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  compilation_cache.reset_cache()  # JAX opens its cache once: a cache already open would keep its folder.
  stored.set_directory(os.path.join(directory, 'programs'))
  return directory
