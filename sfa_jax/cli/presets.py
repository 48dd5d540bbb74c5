"""Settings shared by the command line and the experiment scripts: the offline demo's.

Standard library only at import, like the registries the command line checks its arguments
against: ``sfa-jax --help`` reads them before JAX is loaded. ``DEMO_DEFAULTS``
(:func:`demo_defaults`) is :data:`DEMO` with ``'config'`` as a
:class:`~sfa_jax.engine.config.TrainConfig`; it is built when read (a TrainConfig imports JAX).

Example:
  >>> from sfa_jax.cli import presets
  >>> presets.DEMO['stream'], presets.DEMO_DEFAULTS['config'].batch_size
  ('mnist-pair', 64)
"""

from __future__ import annotations

from typing import Any

# The offline demo: the paper's MNIST task pair (even digits, then odd digits, one shared head).
# Hyper-parameters from the sweep in experiments/mnist_pair_sweep.py (mean accuracy over both tasks
# after the sequence, 3 seeds; see the README). ``quick`` overrides the config and seeds for
# ``demo --quick`` (a smoke test: one seed, one epoch, fewer evaluations). ``DEMO_DEFAULTS`` is
# this with ``config`` as a TrainConfig.
DEMO: dict[str, Any] = {
    'stream': 'mnist-pair',
    'source': 'offline',
    'methods': (
        ('finetune', {}),
        ('sfa', {'p': 0.25, 'beta': 0.25}),
        ('l2', {'strength': 1.0}),
        ('ewc', {'strength': 1e4}),
        ('replay', {'fraction': 0.1}),
    ),
    'config': {'model': 'mlp', 'epochs_per_task': 2, 'batch_size': 64, 'learning_rate': 1e-3, 'eval_every': 10},
    'seeds': (0, 1, 2),
    'quick': {'seeds': (0,), 'epochs_per_task': 1, 'eval_every': 20},
}


def demo_defaults() -> dict[str, Any]:
  """The offline demo's settings, with ``'config'`` as a :class:`~sfa_jax.engine.config.TrainConfig`."""
  from sfa_jax.engine.config import TrainConfig

  return DEMO | {'config': TrainConfig(**DEMO['config'])}


def __getattr__(name: str) -> Any:
  """``DEMO_DEFAULTS`` (:func:`demo_defaults`), built when read."""
  if name == 'DEMO_DEFAULTS':
    return demo_defaults()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
