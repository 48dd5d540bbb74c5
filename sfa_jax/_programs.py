"""How the core's jitted helpers compile: by ``jax.jit``, or by a program store that a caller installs.

The core (the transforms, the Fisher estimators, the checks) jits its helpers with :func:`jit`
instead of ``jax.jit``. By default the two are the same. A layer above the core (the engine's
store of compiled programs, :mod:`sfa_jax.engine.stored`) may install a factory with
:func:`install` that wraps each helper, e.g. in a program kept on disk, so that a later process
neither traces nor compiles it. The core never imports that layer: it only calls what was
installed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax

__all__ = ['jit', 'install', 'Factory']

# ``factory(function, jitted, static_argnums, static_argnames, compiler_options) -> callable``: called
# once per helper the first time it runs with this factory installed; the callable replaces ``jitted``.
Factory = Callable[[Callable[..., Any], Any, tuple[int, ...], tuple[str, ...], dict[str, Any]], Callable[..., Any]]

_installed: dict[str, Factory | None] = {'factory': None}


def install(factory: Factory | None) -> None:
  """Makes ``factory`` wrap every helper jitted by :func:`jit`; ``None`` restores plain ``jax.jit``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import _programs
    >>> calls = []
    >>> def counting(function, jitted, static_argnums, static_argnames, compiler_options):
    ...   calls.append(function.__name__)
    ...   return jitted
    >>> double = _programs.jit(lambda x: 2 * x)
    >>> _programs.install(counting)
    >>> double(jnp.ones(2)).tolist(), calls
    ([2.0, 2.0], ['<lambda>'])
    >>> _programs.install(None)
  """
  _installed['factory'] = factory


def jit(function: Callable[..., Any] | None = None, *, static_argnums: Sequence[int] | int = (),
        static_argnames: Sequence[str] | str = (), donate_argnums: Sequence[int] | int = (),
        compiler_options: dict[str, Any] | None = None) -> Any:
  """``jax.jit`` for the core's helpers, compiled by the installed factory when there is one.

  Used as a decorator, bare or with arguments (those of ``jax.jit``).

  Args:
    function: the function to jit.
    static_argnums: the positions of its static arguments.
    static_argnames: the names of its static keyword arguments.
    donate_argnums: the positions of the arguments whose buffers it may reuse.
    compiler_options: XLA options for its compilation.

  Returns:
    A callable like ``jax.jit(function, ...)``; its ``lower`` and other attributes are the jitted
    function's.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import _programs
    >>> @_programs.jit(static_argnums=1)
    ... def scaled(x, factor):
    ...   return factor * x
    >>> scaled(jnp.arange(3), 2).tolist()
    [0, 2, 4]
  """
  if function is None:
    return functools.partial(jit, static_argnums=static_argnums, static_argnames=static_argnames,
                             donate_argnums=donate_argnums, compiler_options=compiler_options)
  static_argnums, static_argnames = _static(function, _tuple(static_argnums), _tuple(static_argnames))
  return _Helper(function, static_argnums, static_argnames, _tuple(donate_argnums), dict(compiler_options or {}))


def _tuple(value: Any) -> tuple:
  return (value,) if isinstance(value, (int, str)) else tuple(value)


def _static(function: Callable[..., Any], numbers: tuple[int, ...], names: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """Both the positions and the names of the static arguments, each completed from the other as ``jax.jit`` does."""
  positional = [parameter.name for parameter in inspect.signature(function).parameters.values()
                if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
  numbers = tuple(sorted({*numbers, *(positional.index(name) for name in names if name in positional)}))
  names = tuple(dict.fromkeys([*names, *(positional[i] for i in numbers if i < len(positional))]))
  return numbers, names


class _Helper:
  """A jitted core helper that the installed factory, if any, compiles."""

  def __init__(self, function: Callable[..., Any], static_argnums: tuple[int, ...], static_argnames: tuple[str, ...],
               donate_argnums: tuple[int, ...], compiler_options: dict[str, Any]):
    self._function, self._static_argnums, self._static_argnames = function, static_argnums, static_argnames
    self._options = compiler_options
    self._jitted = jax.jit(function, static_argnums=static_argnums, static_argnames=static_argnames,
                           donate_argnums=donate_argnums or None, compiler_options=compiler_options or None)
    self._wrapped: tuple[Factory, Callable[..., Any]] | None = None
    functools.update_wrapper(self, function)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    factory = _installed['factory']
    if factory is None:
      return self._jitted(*args, **kwargs)
    wrapped = self._wrapped
    if wrapped is None or wrapped[0] is not factory:
      wrapped = self._wrapped = (factory, factory(self._function, self._jitted, self._static_argnums,
                                                  self._static_argnames, dict(self._options)))
    return wrapped[1](*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._jitted, name)
