"""How each task of a run is trained and evaluated: :class:`TrainConfig`.

One frozen dataclass holds every setting a run, a sweep, a mesh run or a language-model run
shares: the model, the optimizer and its learning rate, the batches, the step budget, the
evaluation schedule, which params train, and where the data lives. It validates every field when
it is made, so a bad setting fails before anything is built.

Example:
  >>> from sfa_jax import engine
  >>> config = engine.TrainConfig(model='mlp', epochs_per_task=1, batch_size=32)
  >>> config.make_optimizer().__class__.__name__
  'GradientTransformationExtraArgs'
"""

from __future__ import annotations

import dataclasses
import math
import pkgutil
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

from sfa_jax import _validation
from sfa_jax.engine import objectives as objectives_lib
from sfa_jax.engine.optimizers import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How each task is trained and evaluated.

  Attributes:
    model: a name of :func:`sfa_jax.models.make_model` (``'mlp'``, ``'cnn'``, ``'resnet18'``), or
      your Flax Linen module (its output sized for the stream; it may take ``task_id=`` and
      ``train=`` keywords, see :func:`sfa_jax.engine.steps.initializer`).
    model_kwargs: extra attributes of a named model, as ``(name, value)`` pairs, e.g.
      ``(('hidden', (256,)),)``.
    epochs_per_task: passes over each task's training data.
    batch_size: examples per training batch (one static shape for the whole run).
    learning_rate: the optimizer's learning rate.
    optimizer: a name of :data:`~sfa_jax.engine.optimizers.OPTIMIZERS` (``'adam'``, ``'adamw'``,
      ``'sgd'``) at ``learning_rate``; or a function of the learning rate returning an
      ``optax.GradientTransformation``; or the transformation itself (schedules, clipping, masked
      or partitioned optimizers; ``learning_rate`` is then unused).
    seed: seeds the model's initialisation, the data order and the replay memory.
    eval_every: also evaluate every task every this many steps, and (SFA) just before and after
      each averaging step (0: only at task ends).
    eval_batch_size: examples per evaluation batch, at most (no larger than the largest test set:
      a test set that fits in one batch is scored without padding).
    reset_optimizer: re-initialise the optimizer state (e.g. Adam's moments) at each task start.
    objective: the loss trained on and the metric of the accuracy matrix
      (:mod:`sfa_jax.engine.objectives`; default: cross-entropy and accuracy).
    steps_per_task: train each task for this many optimizer steps (one number, or one per task),
      the batches drawn from shuffled epochs over its data, the last cut where the budget ends;
      ``None``: ``epochs_per_task`` whole epochs.
    fisher_examples: EWC's Fisher (and MAS's importance) from at most this many of a task's
      training examples (``None``: all of them).
    trainable: train (and anchor) only the params whose paths match these patterns (one or a
      tuple of regular expressions, as :func:`sfa_jax.partial.path_mask` reads them, e.g.
      ``('top_layers', 'norm')`` for a Llama split by
      :func:`sfa_jax.models.llama.train_top_layers`); ``None``: every param. The optimizer state
      (its moments, SFA's, L2's and EWC's anchors, EWC's Fisher) then holds the trainable leaves
      alone, the train step forms no gradient for the frozen ones
      (:func:`sfa_jax.partial.trainable_value_and_grad`), and EWC's Fisher is estimated for the
      trainable leaves only (zero on the frozen ones).
    skip_anchor_between_averages: whether a single run of SFA trains the steps between its
      averages with ``tx.update(..., may_average=False)`` (:func:`sfa_jax.sfa`: the anchor is
      not read, one pass over a params-sized tree less per step; each average then runs as its
      own dispatch). ``None`` (the default): when the trainable params take at least
      :data:`SKIP_ANCHOR_MIN_BYTES`, where that pass is measurable; smaller models keep the
      branchless update, which computes bit for bit what ``optax.chain(opt, sfa(...))`` does in a
      loop of your own (skipping rounds ``θ + u`` with one fused multiply-add less, and a long
      run's numbers drift apart at that rounding).
    device_data_bytes: a task's training examples (with the replay memory, for every lane of a
      sweep) up to this many bytes are put on the device once, at the task's start, and every
      batch is gathered there; larger ones stay on the host and each chunk of steps gathers and
      ships its own batches (:mod:`sfa_jax.engine.feed`; ``0``: always). The test sets likewise.
      Either way the numbers are the same, so it is not part of a run's fingerprint.
  """

  model: str = 'mlp'
  model_kwargs: tuple[tuple[str, Any], ...] = ()
  epochs_per_task: int = 2
  batch_size: int = 64
  learning_rate: float = 1e-3
  optimizer: str | optax.GradientTransformation | Callable[[float], optax.GradientTransformation] = 'adam'
  seed: int = 0
  eval_every: int = 0
  eval_batch_size: int = 500
  reset_optimizer: bool = True
  objective: objectives_lib.Objective = objectives_lib.CLASSIFICATION
  steps_per_task: int | tuple[int, ...] | None = None
  fisher_examples: int | None = None
  trainable: str | tuple[str, ...] | None = None
  skip_anchor_between_averages: bool | None = None
  device_data_bytes: int = 2**30

  def __post_init__(self):
    for name in ('epochs_per_task', 'batch_size', 'eval_batch_size'):
      _validation.check_int(name, getattr(self, name))
    _validation.check_int('device_data_bytes', self.device_data_bytes, low=0, high=2**62)
    _validation.check_int('eval_every', self.eval_every, low=0)
    _validation.check_int('seed', self.seed, low=0, high=2**32 - 1)
    for name in ('epochs_per_task', 'batch_size', 'eval_batch_size', 'device_data_bytes', 'eval_every', 'seed'):
      object.__setattr__(self, name, int(getattr(self, name)))  # a NumPy integer would wrap in task seeds
    _validation.check_in_interval('learning_rate', self.learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    if self.steps_per_task is not None:
      if isinstance(self.steps_per_task, tuple) and not self.steps_per_task:
        raise ValueError('steps_per_task must be a number of steps or one per task; got an empty tuple.')
      for value in self.steps_per_task if isinstance(self.steps_per_task, tuple) else (self.steps_per_task,):
        _validation.check_int('steps_per_task', value)
      steps = tuple(map(int, self.steps_per_task)) if isinstance(self.steps_per_task, tuple) else int(self.steps_per_task)
      object.__setattr__(self, 'steps_per_task', steps)
    if self.fisher_examples is not None:
      _validation.check_int('fisher_examples', self.fisher_examples)
      object.__setattr__(self, 'fisher_examples', int(self.fisher_examples))
    if not isinstance(self.reset_optimizer, (bool, np.bool_)):
      raise TypeError(f'reset_optimizer must be True or False; got {self.reset_optimizer!r}.')
    if self.skip_anchor_between_averages is not None and not isinstance(self.skip_anchor_between_averages, (bool, np.bool_)):
      raise TypeError(f'skip_anchor_between_averages must be None, True or False; got {self.skip_anchor_between_averages!r}.')
    if self.trainable is not None and not (
        isinstance(self.trainable, str)
        or (isinstance(self.trainable, tuple) and self.trainable and all(isinstance(t, str) for t in self.trainable))):
      raise TypeError(f'trainable must be None, a path pattern or a non-empty tuple of them; got {self.trainable!r}.')
    if not isinstance(self.model, str) and not (hasattr(self.model, 'init') and hasattr(self.model, 'apply')):
      raise TypeError(f'model must be a name or a Flax Linen module; got {self.model!r}.')
    if not isinstance(self.model, str) and self.model_kwargs:
      raise ValueError('model_kwargs configure a named model; set the attributes of your module instead.')
    if not isinstance(self.objective, objectives_lib.Objective):
      raise TypeError(f'objective must be a sfa_jax.engine.objectives.Objective; got {self.objective!r}.')
    if isinstance(self.optimizer, str):
      if self.optimizer not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {sorted(OPTIMIZERS)}; got {self.optimizer!r}.')
    elif not (isinstance(self.optimizer, optax.GradientTransformation) or callable(self.optimizer)):
      raise TypeError(
          'optimizer must be a name, an optax.GradientTransformation or a function of the learning rate '
          f'returning one; got {self.optimizer!r}.'
      )

  def make_optimizer(self) -> optax.GradientTransformation:
    """The optimizer this config names or holds.

    Raises:
      TypeError: when a function given as ``optimizer`` does not return a GradientTransformation.

    Example:
      >>> import optax
      >>> from sfa_jax.engine import TrainConfig
      >>> schedule = optax.cosine_decay_schedule(1e-3, decay_steps=100)
      >>> config = TrainConfig(optimizer=lambda lr: optax.adamw(schedule, weight_decay=1e-4))
      >>> isinstance(config.make_optimizer(), optax.GradientTransformation)
      True
    """
    if isinstance(self.optimizer, str):
      return pkgutil.resolve_name(OPTIMIZERS[self.optimizer])(self.learning_rate)
    if isinstance(self.optimizer, optax.GradientTransformation):
      return self.optimizer
    made = self.optimizer(self.learning_rate)
    if not isinstance(made, optax.GradientTransformation):
      raise TypeError(f'optimizer({self.learning_rate}) must return an optax.GradientTransformation; got {made!r}.')
    return made

  def optimizer_key(self) -> Any:
    """What identifies the optimizer for reusing a compiled step across runs of one process."""
    return (self.optimizer, self.learning_rate)


SKIP_ANCHOR_MIN_BYTES = 2**24
"""Trainable params of at least this many bytes (16 MiB, 4M float32 params) make a single SFA run skip
reading its anchor between averages, when ``TrainConfig.skip_anchor_between_averages`` is ``None``."""
