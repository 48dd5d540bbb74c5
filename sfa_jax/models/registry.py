"""Models by name, for configs and the command line."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from sfa_jax import _validation
from sfa_jax.models.cnn import SmallCNN
from sfa_jax.models.mlp import MLP
from sfa_jax.models.resnet import ResNet18

_MODELS: dict[str, type[nn.Module]] = {'mlp': MLP, 'cnn': SmallCNN, 'resnet18': ResNet18}


def make_model(name: str, num_outputs: int, num_heads: int = 1, **kwargs: Any) -> nn.Module:
  """Builds the model registered under ``name``.

  Every model is called the same way, ``model.apply(variables, x, task_id=t, train=b)``.

  Args:
    name: ``'mlp'`` (:class:`MLP`), ``'cnn'`` (:class:`SmallCNN`) or ``'resnet18'``
      (:class:`ResNet18`).
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
  if name not in _MODELS:
    raise ValueError(f'Unknown model {name!r}; the registered models are {sorted(_MODELS)}.')
  _validation.check_int('num_outputs', num_outputs)
  _validation.check_int('num_heads', num_heads)
  return _MODELS[name](num_outputs=num_outputs, num_heads=num_heads, **kwargs)
