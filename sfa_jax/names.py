"""The names and ranges the command line checks before it imports JAX.

``sfa-jax --help`` and every argument error must answer at once, so the command line checks its
arguments against these constants, which import nothing but the standard library, and loads JAX,
the data and Orbax only for a command that will run. They mirror the registries:
:func:`sfa_jax.models.make_model` (models), :class:`sfa_jax.continual.TrainConfig` (optimizers),
:func:`sfa_jax.tasks.make_stream` (streams, sources, settings) and
:func:`sfa_jax.continual.make_method` (methods, their hyper-parameters with defaults and ranges);
``tests/test_cli.py`` checks that they agree.
"""

from __future__ import annotations

import dataclasses
import math

MODELS = ('mlp', 'cnn', 'resnet18')
OPTIMIZERS = ('adam', 'sgd')
STREAMS = ('mnist-pair', 'split-mnist', 'permuted-mnist', 'split-fashion-mnist', 'split-cifar100', 'split-food101')
SOURCES = ('offline', 'digits', 'tfds')
SETTINGS = ('class-incremental', 'task-incremental', 'domain-incremental')

# Every method with its hyper-parameters' defaults (sfa_jax.continual.make_method reads them here).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    'finetune': {},
    'sfa': {'p': 0.25, 'beta': 0.25},
    'l2': {'strength': 1.0},
    'ewc': {'strength': 100.0, 'gamma': 1.0},
    'replay': {'fraction': 0.1, 'ratio': 0.5},
    'wise-ft': {'beta': 0.5},
    'task-arithmetic': {'scaling': 0.5},
    'ties': {'density': 0.2, 'scaling': 0.5},
    'joint': {},
    'adaptive-sfa': {'threshold': 0.1, 'beta': 0.25, 'min_p': 0.1},
    'multi-anchor-sfa': {'p': 0.25, 'beta': 0.25},
}
METHODS = tuple(METHOD_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class Interval:
  """The values a hyper-parameter may take: from ``low`` to ``high``, each end open or closed.

  Example:
    >>> p = Interval(0.0, 1.0, low_open=True)
    >>> str(p), 0.0 in p, 1.0 in p, float('nan') in p
    ('(0, 1]', False, True, False)
  """

  low: float
  high: float
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value: object) -> bool:
    if not isinstance(value, (int, float)):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below  # both False for NaN

  def __str__(self) -> str:
    return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The range of every hyper-parameter (make_method's checks); the command line's flags, in order.
HYPERPARAM_RANGES: dict[str, Interval] = {
    'p': Interval(0.0, 1.0, low_open=True),
    'beta': Interval(0.0, 1.0),
    'strength': Interval(0.0, math.inf, high_open=True),
    'gamma': Interval(0.0, 1.0),
    'fraction': Interval(0.0, 1.0, low_open=True),
    'ratio': Interval(0.0, 1.0, low_open=True, high_open=True),
    'scaling': Interval(0.0, math.inf, high_open=True),
    'density': Interval(0.0, 1.0, low_open=True),
    'threshold': Interval(0.0, math.inf),
    'min_p': Interval(0.0, 1.0, low_open=True),
}
HYPERPARAMS = tuple(HYPERPARAM_RANGES)
