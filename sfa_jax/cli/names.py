"""The names and ranges the command line checks before it imports JAX.

``sfa-jax --help`` and every argument error must answer at once, so the command line checks its
arguments against these constants, which import nothing but the standard library, and loads JAX,
the data and Orbax only for a command that will run. They mirror the registries:
:func:`sfa_jax.models.make_model` (models), :class:`sfa_jax.engine.config.TrainConfig` (optimizers) and
:func:`sfa_jax.tasks.make_stream` (streams, their sources and task counts, settings); ``tests/test_cli.py`` checks that
they agree. The methods, their hyper-parameters, defaults and ranges need no copy here: their
registry, :mod:`sfa_jax.engine.methods`, imports only the standard library.
"""

from __future__ import annotations


MODELS = ('mlp', 'cnn', 'resnet18')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
STREAMS = ('mnist-pair', 'split-mnist', 'permuted-mnist', 'split-fashion-mnist', 'split-cifar100', 'split-food101')
SOURCES = ('offline', 'digits', 'tfds')
SETTINGS = ('class-incremental', 'task-incremental', 'domain-incremental')

# Each stream's sources, and the task counts it takes: (fewest, most), None for no limit.
_MNIST_SOURCES = ('offline', 'digits', 'tfds')
STREAM_SOURCES = {
    'mnist-pair': _MNIST_SOURCES, 'split-mnist': _MNIST_SOURCES, 'permuted-mnist': _MNIST_SOURCES,
    'split-fashion-mnist': ('offline', 'tfds'), 'split-cifar100': ('tfds',), 'split-food101': ('tfds',),
}
STREAM_TASKS = {
    'mnist-pair': (2, 2), 'split-mnist': (1, 10), 'permuted-mnist': (1, None),
    'split-fashion-mnist': (1, 10), 'split-cifar100': (1, 100), 'split-food101': (1, 101),
}
