"""Parameters versus model state, and how continual-learning methods treat each.

A Flax Linen variables dict holds the trainable ``'params'`` and, for some models, other
collections: ResNet18's BatchNorm running means and variances live in ``'batch_stats'``. Here the
``'params'`` collection is the *params* and every other collection together is the *model state*.

How the methods treat them:

* **SFA, L2 and EWC act on the params only.** They are Optax transforms, and an Optax transform only
  sees what the optimizer sees: the params and their gradients.
* **BatchNorm statistics are not averaged by SFA by default.** After an SFA average the running
  statistics are those the model gathered while training, which were computed with the unaveraged
  weights. To average them the same way at each averaging step, call
  ``sfa_jax.interpolate(anchor_state, model_state, beta)`` (the one interpolation, for params and
  model state alike) with the model state saved at the
  anchor (the start of the task); the mean of two running variances is an approximation of the
  variance of the averaged network, not its exact value. Re-estimating the statistics with a few
  forward passes in training mode after averaging is the other option.
* **Merges** (WiSE-FT, task arithmetic, TIES) are plain functions over pytrees, so they apply to the
  params alone or to the full variables dict, BatchNorm statistics included.

Models without state (MLP, SmallCNN) have an empty model state, so a trainer can treat every model
alike::

  params, state = split_variables(model.init(key, x))
  logits, new_state = model.apply(
      merge_variables(params, state), x, task_id=t, train=True, mutable=list(state))
"""

from __future__ import annotations

from typing import Any, Mapping

_PARAMS = 'params'


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """Splits a Linen variables dict into ``(params, model_state)``.

  Args:
    variables: what ``model.init`` returns: ``{'params': ..., 'batch_stats': ..., ...}``.

  Returns:
    ``variables['params']`` and a dict of every other collection (empty when there is none).

  Raises:
    ValueError: if ``variables`` has no ``'params'`` collection.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.models import ResNet18, split_variables
    >>> images = jnp.zeros((1, 8, 8, 3))
    >>> variables = jax.eval_shape(ResNet18().init, jax.random.key(0), images)
    >>> params, state = split_variables(variables)
    >>> list(state)
    ['batch_stats']
  """
  if _PARAMS not in variables:
    raise ValueError(
        f"variables must hold a 'params' collection; got the collections {sorted(variables)}."
    )
  state = {name: collection for name, collection in variables.items() if name != _PARAMS}
  return variables[_PARAMS], state


def merge_variables(params: Any, model_state: Mapping[str, Any]) -> dict[str, Any]:
  """The Linen variables dict ``{'params': params, **model_state}``: the inverse of the split.

  Args:
    params: the trainable parameters.
    model_state: the other collections, such as ``{'batch_stats': ...}``; may be empty.

  Returns:
    A dict to pass to ``model.apply``.

  Raises:
    ValueError: if ``model_state`` itself holds a ``'params'`` collection.

  Example:
    >>> from sfa_jax.models import merge_variables
    >>> sorted(merge_variables({'w': 1.0}, {'batch_stats': {'mean': 0.0}}))
    ['batch_stats', 'params']
  """
  if _PARAMS in model_state:
    raise ValueError("model_state must not hold a 'params' collection: pass the params separately.")
  return {_PARAMS: params, **model_state}
