"""Transfer from a pretrained backbone: keep its trained layers, put a freshly initialised head on top."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def with_new_head(backbone: Mapping[str, Any], fresh: Mapping[str, Any], head: str = 'head') -> dict[str, Any]:
  """``fresh`` with every leaf outside its ``head`` subtree taken from ``backbone``.

  The continual stage of a pretrained model: the backbone (e.g. a SmallCNN trained on
  Fashion-MNIST with a 10-way head) keeps its layers, and the new task's head (another number of
  outputs, or one head per task) comes from the fresh model's initialisation. Works on params and
  on model state (e.g. ResNet-18's ``batch_stats``, which has no head entry: it is then the
  backbone's, checked against the fresh one's shapes). Leaves are copied (``np.array``), so the
  result may be donated to a training loop without touching either input.

  Args:
    backbone: the pretrained variables (a nested dict, e.g. ``params`` of the pretraining run).
    fresh: the new model's freshly initialised variables of the same collection; its ``head``
      entry (if any) is kept as it is.
    head: the top-level name of the head's subtree (``'head'`` in every built-in model).

  Returns:
    A nested dict with ``fresh``'s structure.

  Raises:
    ValueError: when a non-head entry is missing from either tree, or its shape or dtype differs
      (the message names the leaf's path).

  Example:
    >>> import numpy as np
    >>> backbone = {'conv': {'kernel': np.ones((3, 3))},
    ...             'head': {'kernel': np.ones((4, 10))}}
    >>> fresh = {'conv': {'kernel': np.zeros((3, 3))},
    ...          'head': {'kernel': np.zeros((5, 4, 2))}}
    >>> out = with_new_head(backbone, fresh)
    >>> float(out['conv']['kernel'].sum()), out['head']['kernel'].shape
    (9.0, (5, 4, 2))
  """
  missing = sorted(set(fresh) - set(backbone) - {head})
  extra = sorted(set(backbone) - set(fresh) - {head})
  if missing or extra:
    raise ValueError(f'the backbone and the new model differ outside {head!r}: missing from the backbone '
                     f'{missing}, only in the backbone {extra}.')
  out = {}
  for name, subtree in fresh.items():
    source = subtree if name == head else backbone[name]
    if name != head:
      _check_same(backbone[name], subtree, name)
    out[name] = jax.tree.map(np.array, source)
  return out


def _check_same(backbone: Any, fresh: Any, prefix: str) -> None:
  flat_backbone = dict(jax.tree_util.tree_flatten_with_path(backbone)[0])
  flat_fresh = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
  if flat_backbone.keys() != flat_fresh.keys():
    names = lambda keys: sorted(prefix + jax.tree_util.keystr(k) for k in keys)
    raise ValueError(f'the backbone and the new model differ under {prefix!r}: missing from the backbone '
                     f'{names(flat_fresh.keys() - flat_backbone.keys())}, only in the backbone '
                     f'{names(flat_backbone.keys() - flat_fresh.keys())}.')
  for path, leaf in flat_fresh.items():
    other = flat_backbone[path]
    if np.shape(other) != np.shape(leaf) or np.asarray(other).dtype != np.asarray(leaf).dtype:
      raise ValueError(f'{prefix}{jax.tree_util.keystr(path)}: the backbone has {np.asarray(other).dtype}'
                       f'{list(np.shape(other))}, the new model {np.asarray(leaf).dtype}{list(np.shape(leaf))}.')
