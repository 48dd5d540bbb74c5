"""The names and ranges the command line checks before it imports JAX.

``sfa-jax --help`` and every argument error must answer at once, so the command line checks its
arguments against these constants, which import nothing but the standard library, and loads JAX,
the data and Orbax only for a command that will run. They mirror the registries:
:func:`sfa_jax.models.make_model` (models), :class:`sfa_jax.continual.TrainConfig` (optimizers) and
:func:`sfa_jax.tasks.make_stream` (streams, sources, settings); ``tests/test_cli.py`` checks that
they agree. The methods, their hyper-parameters, defaults and ranges need no copy here: their
registry, :mod:`sfa_jax.engine.methods`, imports only the standard library.
"""

from __future__ import annotations


MODELS = ('mlp', 'cnn', 'resnet18')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
STREAMS = ('mnist-pair', 'split-mnist', 'permuted-mnist', 'split-fashion-mnist', 'split-cifar100', 'split-food101')
SOURCES = ('offline', 'digits', 'tfds')
SETTINGS = ('class-incremental', 'task-incremental', 'domain-incremental')
