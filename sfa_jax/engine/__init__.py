"""The engine above the core: methods (:mod:`~sfa_jax.engine.methods`), the one training loop
(:mod:`~sfa_jax.engine.loop`) and its events and loggers (:mod:`~sfa_jax.engine.callbacks`).

:mod:`sfa_jax.continual` (a run), :mod:`sfa_jax.sweep` (vectorised runs) and the command line are
built on it. Importing this package loads nothing; import its modules.
"""
