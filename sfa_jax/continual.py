"""One continual-learning run: a method trained on a stream of tasks, every task evaluated after each.

The methods (finetune, sfa, l2, ewc, replay, wise-ft, task-arithmetic, ties, joint, adaptive-sfa,
multi-anchor-sfa, and yours) are the classes of :mod:`sfa_jax.engine.methods`; the loop is
:func:`sfa_jax.engine.loop.train_stream`, which :mod:`sfa_jax.sweep` shares. This module holds
what a user writes: :class:`TrainConfig`, :func:`run_sequence` and its :class:`SequenceResult`.

The optimizer state (e.g. Adam's moments) is re-initialised at the start of every task by default
(``TrainConfig.reset_optimizer``); SFA keeps it across its averaging steps within a task.

Non-parameter model state (ResNet18's BatchNorm statistics) is trained as usual and is not touched
by SFA, L2 or EWC; the merges (WiSE-FT, task arithmetic, TIES) apply to it like to the params (see
:mod:`sfa_jax.models.state`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from sfa_jax import _validation
from sfa_jax import metrics
from sfa_jax import models
from sfa_jax import tasks as tasks_lib
from sfa_jax.checkpoint import Checkpointer
from sfa_jax.checkpoint import array_checksums
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import loop
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib

Method = methods_lib.Method
make_method = methods_lib.make_method
CurvePoint = loop.CurvePoint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How each task is trained and evaluated.

  Attributes:
    model: a name of :func:`sfa_jax.models.make_model` (``'mlp'``, ``'cnn'``, ``'resnet18'``), or
      your Flax Linen module (its output sized for the stream; it may take ``task_id=`` and
      ``train=`` keywords, see :func:`sfa_jax.engine.loop.initializer`).
    model_kwargs: extra attributes of a named model, as ``(name, value)`` pairs, e.g.
      ``(('hidden', (256,)),)``.
    epochs_per_task: passes over each task's training data.
    batch_size: examples per training batch (one static shape for the whole run).
    learning_rate: the optimizer's learning rate.
    optimizer: ``'adam'``, ``'adamw'`` or ``'sgd'`` at ``learning_rate``; or a function of the
      learning rate returning an ``optax.GradientTransformation``; or the transformation itself
      (schedules, clipping, masked or partitioned optimizers; ``learning_rate`` is then unused).
    seed: seeds the model's initialisation, the data order and the replay memory.
    eval_every: also evaluate every task every this many steps, and (SFA) just before and after
      each averaging step (0: only at task ends).
    eval_batch_size: examples per evaluation batch.
    reset_optimizer: re-initialise the optimizer state (e.g. Adam's moments) at each task start.
    objective: the loss trained on and the metric of the accuracy matrix
      (:mod:`sfa_jax.engine.objectives`; default: cross-entropy and accuracy).
    steps_per_task: train each task for this many optimizer steps (one number, or one per task),
      the batches drawn from shuffled epochs over its data, the last cut where the budget ends;
      ``None``: ``epochs_per_task`` whole epochs.
    fisher_examples: EWC's Fisher from at most this many of a task's training examples
      (``None``: all of them).
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
    _validation.check_in_interval('learning_rate', self.learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    if self.steps_per_task is not None:
      if isinstance(self.steps_per_task, tuple) and not self.steps_per_task:
        raise ValueError('steps_per_task must be a number of steps or one per task; got an empty tuple.')
      for value in self.steps_per_task if isinstance(self.steps_per_task, tuple) else (self.steps_per_task,):
        _validation.check_int('steps_per_task', value)
    if self.fisher_examples is not None:
      _validation.check_int('fisher_examples', self.fisher_examples)
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
      if self.optimizer not in _OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {sorted(_OPTIMIZERS)}; got {self.optimizer!r}.')
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
      >>> from sfa_jax.continual import TrainConfig
      >>> schedule = optax.cosine_decay_schedule(1e-3, decay_steps=100)
      >>> config = TrainConfig(optimizer=lambda lr: optax.adamw(schedule, weight_decay=1e-4))
      >>> isinstance(config.make_optimizer(), optax.GradientTransformation)
      True
    """
    if isinstance(self.optimizer, str):
      return _OPTIMIZERS[self.optimizer](self.learning_rate)
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

_OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    'adam': optax.adam,
    'adamw': optax.adamw,
    'sgd': optax.sgd,
}


@dataclasses.dataclass
class SequenceResult:
  """What a run of one method on a stream measured.

  Attributes:
    stream: the stream's name.
    setting: its evaluation setting.
    method: the method's label.
    task_names: the stream's task names.
    accuracy_matrix: ``R[i][j]``, the accuracy on task ``j`` after training on task ``i``.
    curve: accuracies on every task every ``eval_every`` steps and at each task end.
    steps_per_task: optimizer steps taken on each task.
    averaging_steps: for SFA, the global steps after which it averaged.
    seconds: wall time of the training, evaluation, and of the whole run.
  """

  stream: str
  setting: str
  method: str
  task_names: list[str]
  accuracy_matrix: list[list[float]]
  curve: list[CurvePoint]
  steps_per_task: list[int]
  averaging_steps: list[int]
  seconds: dict[str, float]

  @classmethod
  def of(cls, stream: tasks_lib.TaskStream, method: Method, all_tasks: Sequence[tasks_lib.Task],
         record: loop.LaneRecord, seconds: dict[str, float]) -> SequenceResult:
    """The result of one lane of :func:`sfa_jax.engine.loop.train_stream`."""
    return cls(
        stream=stream.name, setting=stream.setting, method=method.label, task_names=[t.name for t in all_tasks],
        accuracy_matrix=record.matrix, curve=record.curve, steps_per_task=record.steps_per_task,
        averaging_steps=record.averaging_steps, seconds=seconds,
    )

  def summary(self) -> dict[str, float]:
    """Average accuracy, forgetting and backward transfer of the accuracy matrix."""
    return metrics.summarize(np.asarray(self.accuracy_matrix))

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict of everything, with the metrics."""
    data = dataclasses.asdict(self)
    data['curve'] = [p._asdict() | {'accuracies': list(p.accuracies)} for p in self.curve]
    data['metrics'] = self.summary()
    return data


# ------------------------------------------------------------------------------------------------
# A run.


def build_model(stream: tasks_lib.TaskStream, config: TrainConfig):
  """The Flax model for ``stream``: ``config.model`` if it is a module, else the named one (one head
  per task in the task-incremental setting)."""
  if not isinstance(config.model, str):
    return config.model
  num_heads = len(stream) if stream.setting == tasks_lib.TASK_INCREMENTAL else 1
  return models.make_model(config.model, stream.num_classes, num_heads=num_heads, **dict(config.model_kwargs))


def describe_stream(stream: tasks_lib.TaskStream) -> dict[str, Any]:
  """What decides a stream's data, as JSON values: name, setting, source, seed, and every task."""
  return {
      'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'seed': stream.seed,
      'num_classes': stream.num_classes, 'input_shape': list(stream.input_shape),
      'tasks': list(stream.task_names), 'task_classes': [list(c) for c in stream.task_classes],
  }


def describe_method(method: Method) -> dict[str, Any]:
  """A method as JSON values: its name and its exact hyper-parameters (a label rounds them)."""
  return {'name': method.name, 'class': f'{type(method).__module__}:{type(method).__qualname__}', 'hyperparams': method.values}


def describe_config(config: TrainConfig) -> dict[str, Any]:
  """A config as JSON values; a module is described by its ``repr`` (its attributes), a function or
  an optax transformation by its qualified name, the objective by its name."""

  def describe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
      return value
    if isinstance(value, objectives_lib.Objective):
      return value.name
    if isinstance(value, optax.GradientTransformation):
      return f'optax transformation {value.init.__qualname__}'
    if callable(value) and not hasattr(value, 'apply'):
      return f'{getattr(value, "__module__", "")}.{getattr(value, "__qualname__", repr(value))}'
    if isinstance(value, tuple):
      return [describe(item) for item in value]
    return repr(value)

  return {field.name: describe(getattr(config, field.name)) for field in dataclasses.fields(config)
          if field.name not in _PLACEMENT_ONLY}


_PLACEMENT_ONLY = frozenset({'device_data_bytes'})  # TrainConfig fields that change where data lives, not the numbers


def initial_checksum(initial: Any) -> str:
  """One SHA-256 of ``initial``: every array's checksum (:func:`sfa_jax.checkpoint.array_checksums`),
  dtype and shape, by path: what a run started from."""
  layout = {jax.tree_util.keystr(path): [str(leaf.dtype), list(np.shape(leaf))]
            for path, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]}
  described = {path: [checksum, *layout[path]] for path, checksum in array_checksums(initial).items()}
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def fingerprint(stream: tasks_lib.TaskStream, method: Method, config: TrainConfig, initial_sum: str | None = None) -> str:
  """A JSON string of everything that decides a run's numbers; checkpoints must match it.

  It holds :func:`describe_stream`, :func:`describe_method` and every :class:`TrainConfig` field
  (the model and its attributes, optimizer, learning rate, epochs, batch sizes, seed, evaluation
  schedule), and ``initial_sum``, the :func:`initial_checksum` of the variables a run starts
  from, when it does not start from the model's initialisation.

  Example:
    >>> import json
    >>> from sfa_jax import continual, tasks
    >>> run = json.loads(continual.fingerprint(tasks.make_stream('mnist-pair', source='digits'),
    ...                                         continual.make_method('sfa'), continual.TrainConfig()))
    >>> run['stream']['tasks'], run['method']['hyperparams'], run['config']['learning_rate']
    (['mnist-pair/even', 'mnist-pair/odd'], {'beta': 0.25, 'p': 0.25}, 0.001)
  """
  run = {
      'stream': describe_stream(stream), 'method': describe_method(method), 'config': describe_config(config),
      'checkpoint_format': loop.CHECKPOINT_FORMAT,
  }
  if initial_sum is not None:
    run['initial'] = initial_sum
  return json.dumps(run, sort_keys=True, default=repr)


def check_run_arguments(stream: Any, method: Any, config: Any) -> None:
  """Raises ``TypeError`` naming the argument unless ``stream``, ``method`` and ``config`` are a
  :class:`~sfa_jax.tasks.TaskStream`, a :class:`Method` instance and a :class:`TrainConfig`."""
  if not isinstance(stream, tasks_lib.TaskStream):
    raise TypeError(f'stream must be a sfa_jax.tasks.TaskStream (tasks.make_stream or tasks.stream_of); got {type(stream).__name__}.')
  if isinstance(method, type) and issubclass(method, Method):
    raise TypeError(f'method must be a Method instance; got the class {method.__name__}: call it, e.g. {method.__name__}().')
  if not isinstance(method, Method):
    raise TypeError(f'method must be a sfa_jax.engine.methods.Method (e.g. continual.make_method({method!r})); got {type(method).__name__}.')
  if not isinstance(config, TrainConfig):
    raise TypeError(f'config must be a sfa_jax.continual.TrainConfig; got {type(config).__name__}.')


def run_sequence(
    stream: tasks_lib.TaskStream,
    method: Method,
    config: TrainConfig = TrainConfig(),
    *,
    callbacks: callbacks_lib.Callback | Sequence[callbacks_lib.Callback] | None = None,
    checkpointer: Checkpointer | None = None,
    mesh: jax.sharding.Mesh | None = None,
    initial: tuple[Any, Any] | None = None,
) -> SequenceResult:
  """Trains ``method`` on the tasks of ``stream`` in order and evaluates every task after each.

  Args:
    stream: the tasks, e.g. ``sfa_jax.tasks.make_stream('mnist-pair')``.
    method: a :class:`~sfa_jax.engine.methods.Method`, e.g. from :func:`make_method`.
    config: training and evaluation settings.
    callbacks: a callable, or several, called with every event of the loop (steps, evaluations,
      averages, task ends, checkpoints, resumption; :mod:`sfa_jax.engine.callbacks`), e.g.
      ``ConsoleProgress('sfa')``, ``JsonlLogger('run.jsonl')``, ``TensorBoardLogger('tb')``.
    checkpointer: saves the run every ``checkpointer.every_steps`` steps and at each task end; if
      it holds a checkpoint of this configuration, the run resumes from it (on CPU the results are
      then bit for bit those of an uninterrupted run).
    mesh: train on these devices (:func:`sfa_jax.distributed.make_mesh`): batches split over the
      mesh, params and optimizer state (anchors included) FSDP-sharded; ``None``: one device.
    initial: ``(params, model_state)`` to start from (a pretrained backbone with its new head,
      another run's end) instead of the model's initialisation with ``config.seed``; the seed
      still orders the data. Their checksum joins the run's fingerprint.

  Returns:
    The :class:`SequenceResult`.

  Raises:
    TypeError: when ``stream`` is not a :class:`~sfa_jax.tasks.TaskStream`, ``method`` not a
      :class:`Method` instance or ``config`` not a :class:`TrainConfig`.
    ValueError: when a ``steps_per_task`` tuple does not have one entry per task.
    CheckpointError: when the checkpointer holds a checkpoint of another configuration, or
      checkpoints of which none is usable (a corrupt one is skipped for the previous one, with a
      :class:`~sfa_jax.checkpoint.CheckpointWarning`).

  Example:
    >>> from sfa_jax import continual, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = continual.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> result = continual.run_sequence(stream, continual.make_method('sfa', p=0.5), config)
    >>> len(result.accuracy_matrix), len(result.accuracy_matrix[0])
    (2, 2)
  """
  check_run_arguments(stream, method, config)
  all_tasks = [stream[i] for i in range(len(stream))]
  run_id = fingerprint(stream, method, config, None if initial is None else initial_checksum(initial))
  records, seconds = loop.train_stream(
      all_tasks, [(method, config)], model=build_model(stream, config), fingerprint=run_id,
      stacked=False, callbacks=callbacks, checkpointer=checkpointer, mesh=mesh, initial=initial,
  )
  return SequenceResult.of(stream, method, all_tasks, records[0], seconds)
