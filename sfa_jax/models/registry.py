"""Models by name, for configs and the command line.

Standard library only at import: :data:`MODELS` names each model's class by its import path and
:func:`make_model` imports the class when it builds one, so the command line checks ``--model``
against :data:`MODELS` before it loads Flax.
"""

from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  import flax.linen as nn

MODELS = {
    'mlp': 'sfa_jax.models.mlp:MLP',
    'cnn': 'sfa_jax.models.cnn:SmallCNN',
    'resnet18': 'sfa_jax.models.resnet:ResNet18',
}
"""``{name: 'module:Class'}`` of every model :func:`make_model` builds."""


def make_model(name: str, num_outputs: int, num_heads: int = 1, **kwargs: Any) -> nn.Module:
  """Builds the model registered under ``name``.

  Every model is called the same way, ``model.apply(variables, x, task_id=t, train=b)``.

  Args:
    name: a key of :data:`MODELS`: ``'mlp'`` (:class:`~sfa_jax.models.MLP`), ``'cnn'``
      (:class:`~sfa_jax.models.SmallCNN`) or ``'resnet18'`` (:class:`~sfa_jax.models.ResNet18`).
    num_outputs: logits per head.
    num_heads: ``1`` for a shared head, ``T`` for one head per task.
    **kwargs: the model's other attributes, such as ``hidden=(100, 100)`` for the MLP.

  Returns:
    An unbound Flax Linen module.

  Raises:
    ValueError: on an unknown name, or if ``num_outputs`` or ``num_heads`` is not an integer >= 1.
    TypeError: on a keyword argument that the model does not have.

  Example:
    >>> from sfa_jax.models import make_model
    >>> make_model('mlp', num_outputs=2, num_heads=5, hidden=(100,))
    MLP(
        # attributes
        hidden = (100,)
        num_outputs = 2
        num_heads = 5
    )
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; the registered models are {sorted(MODELS)}.')
  from sfa_jax import _validation  # JAX, loaded when a model is built

  _validation.check_int('num_outputs', num_outputs)
  _validation.check_int('num_heads', num_heads)
  return pkgutil.resolve_name(MODELS[name])(num_outputs=num_outputs, num_heads=num_heads, **kwargs)
