"""One continual-learning run: a method trained on a stream of tasks, every task evaluated after each.

The methods (finetune, sfa, l2, ewc, ewc-offline, si, mas, replay, lwf, derpp, agem, wise-ft,
task-arithmetic, ties, magmax, cofima, joint, adaptive-sfa, multi-anchor-sfa, and yours) are the
classes of :mod:`sfa_jax.engine.methods`; the loop is
:func:`sfa_jax.engine.loop.train_stream`, which :mod:`sfa_jax.engine.sweep` shares; the settings
are a :class:`~sfa_jax.engine.config.TrainConfig`. This module holds :func:`run_sequence`, its
:class:`SequenceResult`, and the fingerprint that ties a run to its checkpoints.

The optimizer state (e.g. Adam's moments) is re-initialised at the start of every task by default
(``TrainConfig.reset_optimizer``); SFA keeps it across its averaging steps within a task.

Non-parameter model state (ResNet18's BatchNorm statistics) is trained as usual and is not touched
by SFA, L2 or EWC; the merges (WiSE-FT, task arithmetic, TIES, MagMax) apply to it like to the
params, and CoFiMA, which has no Fisher for it, interpolates it (see :mod:`sfa_jax.models.state`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from sfa_jax import metrics
from sfa_jax import models
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.checkpoint import array_checksums
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import loop
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib
from sfa_jax.engine.config import TrainConfig

__all__ = ['SequenceResult', 'build_model', 'run_sequence']

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

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> result = engine.run_sequence(stream, engine.make_method('sfa', p=0.5), config)
    >>> result.method, result.task_names
    ('sfa(beta=0.25, p=0.5)', ['mnist-pair/even', 'mnist-pair/odd'])
    >>> sorted(result.summary())[:3]
    ['average_accuracy', 'average_accuracy_curve', 'backward_transfer']
  """

  stream: str
  setting: str
  method: str
  task_names: list[str]
  accuracy_matrix: list[list[float]]
  curve: list[loop.CurvePoint]
  steps_per_task: list[int]
  averaging_steps: list[int]
  seconds: dict[str, float]

  @classmethod
  def of(cls, stream: tasks_lib.TaskStream, method: methods_lib.Method, all_tasks: Sequence[tasks_lib.Task],
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


def describe_method(method: methods_lib.Method) -> dict[str, Any]:
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
  """One SHA-256 of ``initial``: every array's checksum (:func:`sfa_jax.engine.checkpoint.array_checksums`),
  dtype and shape, by path: what a run started from."""
  layout = {jax.tree_util.keystr(path): [str(leaf.dtype), list(np.shape(leaf))]
            for path, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]}
  described = {path: [checksum, *layout[path]] for path, checksum in array_checksums(initial).items()}
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def fingerprint(stream: tasks_lib.TaskStream, method: methods_lib.Method, config: TrainConfig, initial_sum: str | None = None) -> str:
  """A JSON string of everything that decides a run's numbers; checkpoints must match it.

  It holds :func:`describe_stream`, :func:`describe_method` and every :class:`TrainConfig` field
  (the model and its attributes, optimizer, learning rate, epochs, batch sizes, seed, evaluation
  schedule), and ``initial_sum``, the :func:`initial_checksum` of the variables a run starts
  from, when it does not start from the model's initialisation.

  Example:
    >>> import json
    >>> from sfa_jax import engine, tasks
    >>> run = json.loads(engine.run.fingerprint(tasks.make_stream('mnist-pair', source='digits'),
    ...                                         engine.make_method('sfa'), engine.TrainConfig()))
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
  :class:`~sfa_jax.tasks.TaskStream`, a :class:`~sfa_jax.engine.methods.Method` instance and a :class:`~sfa_jax.engine.config.TrainConfig`."""
  if not isinstance(stream, tasks_lib.TaskStream):
    raise TypeError(f'stream must be a sfa_jax.tasks.TaskStream (tasks.make_stream or tasks.stream_of); got {type(stream).__name__}.')
  if isinstance(method, type) and issubclass(method, methods_lib.Method):
    raise TypeError(f'method must be a Method instance; got the class {method.__name__}: call it, e.g. {method.__name__}().')
  if not isinstance(method, methods_lib.Method):
    raise TypeError(f'method must be a sfa_jax.engine.methods.Method (e.g. engine.make_method({method!r})); got {type(method).__name__}.')
  if not isinstance(config, TrainConfig):
    raise TypeError(f'config must be a sfa_jax.engine.config.TrainConfig; got {type(config).__name__}.')


def run_sequence(
    stream: tasks_lib.TaskStream,
    method: methods_lib.Method,
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
    method: a :class:`~sfa_jax.engine.methods.Method`, e.g. from :func:`~sfa_jax.engine.methods.make_method`.
    config: training and evaluation settings.
    callbacks: a callable, or several, called with every event of the loop (steps, evaluations,
      averages, task ends, checkpoints, resumption; :mod:`sfa_jax.engine.callbacks`), e.g.
      ``ConsoleProgress('sfa')``, ``JsonlLogger('run.jsonl')``, ``TensorBoardLogger('tb')``.
    checkpointer: saves the run every ``checkpointer.every_steps`` steps and at each task end; if
      it holds a checkpoint of this configuration, the run resumes from it (on CPU the results are
      then bit for bit those of an uninterrupted run).
    mesh: train on these devices (:func:`sfa_jax.engine.distributed.make_mesh`): batches split over the
      mesh, params and optimizer state (anchors included) FSDP-sharded; ``None``: one device.
    initial: ``(params, model_state)`` to start from (a pretrained backbone with its new head,
      another run's end) instead of the model's initialisation with ``config.seed``; the seed
      still orders the data. Their checksum joins the run's fingerprint.

  Returns:
    The :class:`SequenceResult`.

  Raises:
    TypeError: when ``stream`` is not a :class:`~sfa_jax.tasks.TaskStream`, ``method`` not a
      :class:`Method` instance or ``config`` not a :class:`~sfa_jax.engine.config.TrainConfig`.
    ValueError: when a ``steps_per_task`` tuple does not have one entry per task.
    TypeError, ValueError: when the method's averaging schedule of a task is not a boolean array
      of its steps + 2 (:func:`~sfa_jax.engine.methods.checked_schedule`), before that task's first step.
    CheckpointError: when the checkpointer holds a checkpoint of another configuration, or
      checkpoints of which none is usable (a corrupt one is skipped for the previous one, with a
      :class:`~sfa_jax.engine.checkpoint.CheckpointWarning`).
    DivergedError: (:class:`sfa_jax.engine.loop.DivergedError`, a ``FloatingPointError`` and a
      ``ValueError``) when the run diverges: a step's loss is NaN or infinite, or the params or
      model state are at a task's end or a periodic checkpoint. The run stops there, naming the
      task and the step (``error.task``, ``error.step``, ``error.global_step``); the checkpoints
      saved before it are kept, and none is written past it.

  Example:
    >>> from sfa_jax import engine, tasks
    >>> stream = tasks.make_stream('mnist-pair', source='digits')
    >>> config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
    >>> result = engine.run_sequence(stream, engine.make_method('sfa', p=0.5), config)
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
