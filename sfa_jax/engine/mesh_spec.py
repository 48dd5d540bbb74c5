"""Device-mesh descriptions such as ``'data=2,fsdp=4'``: parsed and checked without JAX.

The command line checks ``--mesh`` before it imports JAX (argument errors answer at once);
:func:`sfa_jax.engine.distributed.make_mesh` builds the mesh from the same description.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping

DATA = 'data'
FSDP = 'fsdp'
AXES = (DATA, FSDP)


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses a mesh description such as ``'data=2,fsdp=4'`` into ``{'data': 2, 'fsdp': 4}``.

  Args:
    spec: comma-separated ``axis=size`` pairs; axes among ``'data'`` and ``'fsdp'``, sizes ≥ 1.

  Returns:
    The axis sizes, in the order given.

  Raises:
    ValueError: on a malformed pair, an unknown or repeated axis, or a size below 1.

  Example:
    >>> from sfa_jax.engine.distributed import parse_mesh_spec
    >>> parse_mesh_spec('data=2,fsdp=4')
    {'data': 2, 'fsdp': 4}
  """
  axes: dict[str, int] = {}
  for part in spec.split(','):
    match = re.fullmatch(r'\s*(\w+)\s*=\s*(\d+)\s*', part)
    if match is None:
      raise ValueError(f"mesh must look like 'data=2,fsdp=4'; got {spec!r}.")
    name, size = match.group(1), int(match.group(2))
    if name in axes:
      raise ValueError(f'mesh names the axis {name!r} twice: {spec!r}.')
    axes[name] = size
  check_axes(axes)
  return axes


def check_axes(axes: Mapping[str, int]) -> None:
  """Raises ``ValueError`` unless ``axes`` names some of :data:`AXES`, each with an integer size ≥ 1."""
  unknown = sorted(set(axes) - set(AXES))
  if unknown or not axes:
    raise ValueError(f'mesh axes must be among {AXES}; got {sorted(axes)}.')
  for name, size in axes.items():
    try:
      ok = not isinstance(size, bool) and operator.index(size) >= 1
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f'mesh axis {name!r} must have a size >= 1; got {size!r}.')
