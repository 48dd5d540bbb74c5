"""Packages whose public names import their modules when first used (PEP 562).

``import sfa_jax``, ``sfa_jax.tasks`` or ``sfa_jax.models`` then loads nothing heavy: the command
line reads its names from the registries (standard library only) and answers ``--help`` and its
argument errors without loading JAX, NumPy or the data.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
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
