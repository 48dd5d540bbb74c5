"""The optimizers :class:`~sfa_jax.engine.config.TrainConfig` names, each by its optax function.

Standard library only at import: the command line checks ``--optimizer`` against
:data:`OPTIMIZERS` before it loads JAX, and a config imports the function when it makes the
optimizer.

Example:
  >>> from sfa_jax.engine.optimizers import OPTIMIZERS
  >>> OPTIMIZERS['adamw']
  'optax:adamw'
"""

OPTIMIZERS = {
    'adam': 'optax:adam',
    'adamw': 'optax:adamw',
    'sgd': 'optax:sgd',
}
"""``{name: 'module:function'}``: each optimizer's function of the learning rate, returning an
``optax.GradientTransformation``."""
