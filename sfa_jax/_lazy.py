"""What the package defers to first use: its public names' modules, and how the core's helpers compile.

Packages whose public names import their modules when first used (PEP 562, :func:`exports`):
``import sfa_jax``, ``sfa_jax.tasks`` or ``sfa_jax.models`` then loads nothing heavy: the command
line reads its names from the registries (standard library only) and answers ``--help`` and its
argument errors without loading JAX, NumPy or the data.

The core's jitted helpers (the Fisher's chunk sums, the finite checks, the TIES trims) are jitted
with :func:`jit` instead of ``jax.jit``. By default the two are the same. A layer above the core
(the engine's store of compiled programs, :mod:`sfa_jax.engine.stored`) may install a factory with
:func:`install` that wraps each helper when it first runs, e.g. in a program kept on disk, so that
a later process neither traces nor compiles it. The core never imports that layer: it only calls
what was installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """The module-level ``__getattr__`` and ``__dir__`` of a package that imports each name on first use.

  Args:
    package: the package's ``__name__``.
    names: ``{public name: the module that defines it, relative to the package}``.

  Returns:
    ``(__getattr__, __dir__)``. ``__getattr__`` imports a public name from its module, or a
    submodule, and keeps it in the package, so the next use finds it there; any other name raises
    ``AttributeError``. ``__dir__`` lists the public names with what the package already holds.

  Example:
    >>> getattr_, dir_ = exports('xml.etree', {'XML': 'ElementTree'})
    >>> getattr_('XML').__module__, 'XML' in dir_()
    ('xml.etree.ElementTree', True)
  """

  def __getattr__(name: str) -> Any:
    if name in names:
      value = getattr(importlib.import_module(f'{package}.{names[name]}'), name)
    elif importlib.util.find_spec(f'{package}.{name}') is not None:
      value = importlib.import_module(f'{package}.{name}')
    else:
      raise AttributeError(f'module {package!r} has no attribute {name!r}')
    setattr(sys.modules[package], name, value)
    return value

  def __dir__() -> list[str]:
    return sorted(set(vars(sys.modules[package])) | set(names))

  return __getattr__, __dir__


# XLA options for a program that runs once or rarely (a model's or optimizer's initialisation):
# level 1 and XLA:CPU's older loop emitters compile it 2.5-4x faster, to the same values bit for bit
# (tests/test_stored.py). Not for a program whose speed matters: train steps run up to 1.3x slower so.
RUNS_ONCE = {'xla_backend_optimization_level': 1, 'xla_cpu_use_fusion_emitters': False}
# For a program whose values no optimisation can change (zeros, copies, boolean checks, a single
# correctly rounded operation per entry): level 0 with the older emitters, up to 8x faster to compile.
EXACT = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}

# ``factory(function, jitted, static_argnums, static_argnames, compiler_options) -> callable``: called
# once per helper the first time it runs with this factory installed; the callable replaces ``jitted``
# (jitted without the options: the factory applies them where it compiles a top-level program).
Factory = Callable[[Callable[..., Any], Any, tuple[int, ...], tuple[str, ...], dict[str, Any]], Callable[..., Any]]

_installed: dict[str, Factory | None] = {'factory': None}


def install(factory: Factory | None) -> None:
  """Makes ``factory`` wrap every helper jitted by :func:`jit`; ``None`` restores plain ``jax.jit``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import _lazy
    >>> calls = []
    >>> def counting(function, jitted, static_argnums, static_argnames, compiler_options):
    ...   calls.append(function.__name__)
    ...   return jitted
    >>> double = _lazy.jit(lambda x: 2 * x)
    >>> _lazy.install(counting)
    >>> double(jnp.ones(2)).tolist(), calls
    ([2.0, 2.0], ['<lambda>'])
    >>> _lazy.install(None)
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
    compiler_options: XLA options for its compilation as a top-level program (a call on traced
      arguments is traced in plainly).

  Returns:
    A callable like ``jax.jit(function, ...)``; its ``lower`` and other attributes are the jitted
    function's.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax import _lazy
    >>> @_lazy.jit(static_argnums=1)
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
    import jax  # when a helper is defined: the core's modules import JAX, ``import sfa_jax`` does not

    self._function, self._static_argnums, self._static_argnames = function, static_argnums, static_argnames
    self._options = compiler_options
    jit = functools.partial(jax.jit, function, static_argnums=static_argnums, static_argnames=static_argnames,
                            donate_argnums=donate_argnums or None)
    self._jitted = jit()
    # JAX takes compiler options on a top-level program only: with options, a call on concrete
    # arguments runs as one (also inside a user's jit, as check_finite_tree does), a traced one plainly.
    self._top_level = jit(compiler_options=compiler_options) if compiler_options else None
    self._jax = jax
    self._wrapped: tuple[Factory, Callable[..., Any]] | None = None
    functools.update_wrapper(self, function)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    factory = _installed['factory']
    if factory is None:
      jax = self._jax
      if self._top_level is not None and not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
        with jax.ensure_compile_time_eval():
          return self._top_level(*args, **kwargs)
      return self._jitted(*args, **kwargs)
    wrapped = self._wrapped
    if wrapped is None or wrapped[0] is not factory:
      wrapped = self._wrapped = (factory, factory(self._function, self._jitted, self._static_argnums,
                                                  self._static_argnames, dict(self._options)))
    return wrapped[1](*args, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._jitted, name)
