"""The ``sfa-jax`` command: :mod:`~sfa_jax.cli.command` (its parser, checks and runs), with
:mod:`~sfa_jax.cli.presets` (the demo's settings), :mod:`~sfa_jax.cli.report` (tables of results) and
:mod:`~sfa_jax.cli.plots` (their figures).

Importing this package loads neither JAX nor the data: ``sfa-jax --help`` answers at once.
"""

from sfa_jax.cli.command import main

__all__ = ['main']
