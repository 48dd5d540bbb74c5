"""JAX's persistent compilation cache, on by default for the command line and the experiments.

Small continual-learning jobs spend most of their first run compiling; with the cache, a second run
of the same configuration loads the compiled programs from disk instead.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR_ENV = 'SFA_JAX_CACHE_DIR'


def default_cache_dir() -> str:
  """``$SFA_JAX_CACHE_DIR`` if set, else ``~/.cache/sfa_jax/jax``."""
  return os.environ.get(DEFAULT_DIR_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'sfa_jax', 'jax')


def enable_compilation_cache(directory: str | None = None) -> str:
  """Stores every compiled program in ``directory`` and reuses it in later processes.

  Args:
    directory: the cache folder; ``None`` means :func:`default_cache_dir`. Created if missing.

  Returns:
    The folder used.

  Example:
    >>> import tempfile
    >>> from sfa_jax.compile_cache import enable_compilation_cache
    >>> folder = enable_compilation_cache(tempfile.mkdtemp())  # doctest: +SKIP
  """
  directory = directory or default_cache_dir()
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory
