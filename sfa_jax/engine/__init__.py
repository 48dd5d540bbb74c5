"""The engine: continual-learning runs, sweeps, meshes and language-model runs over the core transforms.

A run trains a method on a stream of tasks and evaluates every task after each::

  from sfa_jax import engine, tasks

  stream = tasks.make_stream('mnist-pair')
  method = engine.make_method('sfa', p=0.25)
  result = engine.run_sequence(stream, method, engine.TrainConfig())
  result.accuracy_matrix  # R[i][j]: accuracy on task j after training on task i

One module per idea:

* :mod:`~sfa_jax.engine.methods`: the :class:`~sfa_jax.engine.methods.Method` classes and their
  registry (:func:`~sfa_jax.engine.methods.make_method`);
* :mod:`~sfa_jax.engine.config`: :class:`~sfa_jax.engine.config.TrainConfig`, how each task trains;
* :mod:`~sfa_jax.engine.run`: one run (:func:`~sfa_jax.engine.run.run_sequence`);
* :mod:`~sfa_jax.engine.sweep`: many configurations as one vectorised program;
* :mod:`~sfa_jax.engine.grids`: grids of runs (methods × seeds): built, trained one after another
  or as sweeps, summed up over seeds;
* :mod:`~sfa_jax.engine.loop`: the one training loop that runs and sweeps share, with
  :mod:`~sfa_jax.engine.steps` (the model's variables, train step, score and Fisher),
  :mod:`~sfa_jax.engine.programs` (their compiled programs, kept and compiled in the background),
  :mod:`~sfa_jax.engine.feed` (batches on the device) and :mod:`~sfa_jax.engine.fused` (fused
  chunks of steps);
* :mod:`~sfa_jax.engine.objectives` (loss and metric), :mod:`~sfa_jax.engine.callbacks` (events and
  loggers), :mod:`~sfa_jax.engine.checkpoint` (orbax checkpoints and resume),
  :mod:`~sfa_jax.engine.distributed` (meshes and several processes),
  :mod:`~sfa_jax.engine.compile_cache` (the persistent compilation cache);
* :mod:`~sfa_jax.engine.lm`: the same loop on language models;
* :mod:`~sfa_jax.engine.tunix`: task after task in a Tunix trainer, and the Fisher of LoRA leaves;
* :mod:`~sfa_jax.engine.budget`: sizing an experiment's steps per task for SFA's ``p`` grid.

Importing this package loads nothing: each name loads its module when first used.
"""

from sfa_jax import _lazy

# Every name users write as ``engine.NAME``, and its module, imported when first used (PEP 562).
_EXPORTS = {
    'Method': 'methods',
    'make_method': 'methods',
    'TrainConfig': 'config',
    'SequenceResult': 'run',
    'run_sequence': 'run',
    'check_configurations': 'sweep',
    'run_sweep': 'sweep',
    'grid': 'grids',
    'run_grid': 'grids',
    'summarize_runs': 'grids',
    'Checkpointer': 'checkpoint',
    'CheckpointError': 'checkpoint',
    'DivergedError': 'loop',
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
