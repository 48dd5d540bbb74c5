"""What the training loop reports, and the loggers that listen: console progress, JSONL, TensorBoard.

The loop calls every callback with one event at a time; a callback is any callable of one
argument, so ``callbacks=[print]`` works. The events are small NamedTuples:

================= ============================================================================
event             when
================= ============================================================================
StepEvent         for every optimizer step (loss and accuracy are NumPy values), emitted when
                  the fused chunk of steps it belongs to ends (see below)
EvaluationEvent   after every evaluation of one configuration (a point of its curve)
AverageEvent      after a step on which a configuration's method averaged
TaskEndEvent      after a task's end-of-task rules and evaluation, per configuration
CheckpointEvent   after a checkpoint was written
ResumeEvent       when a run resumed from a checkpoint
================= ============================================================================

In a sweep ``configuration`` is the index of the configuration and a step's loss and accuracy
hold one value per configuration; in a single run ``configuration`` is 0.

The loop runs the steps between two points where the host acts (an evaluation, a checkpoint, a
task's end) as fused chunks of about half a second each (:mod:`sfa_jax.engine.fused`), and emits
their step and average events when the chunk ends, in order; evaluations, checkpoints and task
ends come exactly after the step they follow. A callback that must see each step as it ends (to
time it, say) sets an ``every_step = True`` attribute: the loop then runs one step per dispatch.

Example:
  >>> from sfa_jax import engine, tasks
  >>> from sfa_jax.engine import callbacks
  >>> ends = []
  >>> def task_ends(event):
  ...   if isinstance(event, callbacks.TaskEndEvent):
  ...     ends.append(event.task)
  >>> stream = tasks.make_stream('mnist-pair', source='digits')
  >>> config = engine.TrainConfig(epochs_per_task=1)
  >>> method = engine.make_method('sfa')
  >>> _ = engine.run_sequence(stream, method, config, callbacks=[task_ends])
  >>> ends
  [0, 1]
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

__all__ = [
    'StepEvent', 'EvaluationEvent', 'AverageEvent', 'TaskEndEvent', 'CheckpointEvent',
    'ResumeEvent', 'ConsoleProgress', 'JsonlLogger', 'TensorBoardLogger',
]

Callback = Callable[[Any], None]


class StepEvent(NamedTuple):
  """One optimizer step: ``step`` of ``steps`` in ``task``; ``global_step`` counts every task.

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> losses = []
    >>> def record(event):  # a callback: any callable of one event
    ...   if isinstance(event, callbacks.StepEvent):
    ...     losses.append(float(event.loss))
    >>> event = callbacks.StepEvent(task=0, step=1, steps=10, global_step=1, loss=2.5,
    ...                             accuracy=0.1)
    >>> record(event)
    >>> losses
    [2.5]
  """

  task: int
  step: int
  steps: int
  global_step: int
  loss: Any
  accuracy: Any


class EvaluationEvent(NamedTuple):
  """Accuracy on every task of configuration ``configuration`` (a :class:`sfa_jax.engine.loop.CurvePoint`).

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> from sfa_jax.engine.loop import CurvePoint
    >>> point = CurvePoint(step=20, task=1, accuracies=(0.9, 0.5))
    >>> event = callbacks.EvaluationEvent(0, point)
    >>> event.point.accuracies[0]  # task 0, while task 1 trains
    0.9
  """

  configuration: int
  point: Any


class AverageEvent(NamedTuple):
  """Configuration ``configuration``'s method averaged after ``global_step``.

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> def announce(event):
    ...   if isinstance(event, callbacks.AverageEvent):
    ...     print(f'task {event.task}: averaged after step {event.global_step}')
    >>> announce(callbacks.AverageEvent(configuration=0, task=1, global_step=78))
    task 1: averaged after step 78
  """

  configuration: int
  task: int
  global_step: int


class TaskEndEvent(NamedTuple):
  """Task ``task`` ended for configuration ``configuration``: its row of the accuracy matrix.

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> event = callbacks.TaskEndEvent(configuration=0, task=1, accuracies=(0.62, 0.97))
    >>> event.accuracies[event.task]  # the task just trained
    0.97
  """

  configuration: int
  task: int
  accuracies: tuple[float, ...]


class CheckpointEvent(NamedTuple):
  """A checkpoint of the run after ``global_step`` was written to ``directory``.

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> callbacks.CheckpointEvent(global_step=50, directory='outputs/run').global_step
    50
  """

  global_step: int
  directory: str


class ResumeEvent(NamedTuple):
  """The run resumed from its checkpoint after ``global_step``.

  Example:
    >>> from sfa_jax.engine import callbacks
    >>> callbacks.ResumeEvent(global_step=50)
    ResumeEvent(global_step=50)
  """

  global_step: int


def as_callbacks(callbacks: Callback | Sequence[Callback] | None) -> Callback:
  """One callable that passes each event to every callback, in order.

  Raises:
    TypeError: when a callback is not callable.
  """
  if callbacks is None:
    callbacks = ()
  elif callable(callbacks):
    callbacks = (callbacks,)
  callbacks = tuple(callbacks)
  for i, callback in enumerate(callbacks):
    if not callable(callback):
      raise TypeError(f'callbacks[{i}] must be callable (a function of one event); got {callback!r}.')

  def emit(event: Any) -> None:
    for callback in callbacks:
      callback(event)

  return emit


def wants_every_step(callbacks: Callback | Sequence[Callback] | None) -> bool:
  """Whether a callback has a true ``every_step`` attribute: it must see each :class:`StepEvent` as its
  step ends (the loop then runs one step per dispatch instead of fused chunks)."""
  if callbacks is None:
    return False
  return any(getattr(callback, 'every_step', False) for callback in ((callbacks,) if callable(callbacks) else callbacks))


class ConsoleProgress:
  """A progress bar per task on the console (tqdm), with the mean loss and accuracy.

  On a terminal the bar redraws in place (at most ten times a second). Elsewhere (output redirected
  to a file or a pipe) it is quiet by default, as tqdm with ``disable=None``; asked for
  (``disable=False``), it prints a line in tqdm's format every 10 % of each task. A resumed run is
  said in one line either way. Loss and accuracy are fetched from the device only when they are
  drawn, so the other steps run asynchronously.

  Args:
    label: what the bar is of, e.g. ``'sfa seed 0'``.
    file: where to draw (default: standard error).
    disable: as tqdm's: ``None`` draws on a terminal only, ``False`` everywhere (lines in a log
      file), ``True`` nothing at all.

  Raises:
    ValueError: when ``disable`` is not ``None``, ``False`` or ``True``.

  Example:
    >>> import io
    >>> from sfa_jax.engine import callbacks
    >>> progress = callbacks.ConsoleProgress('sfa seed 0', file=io.StringIO(),
    ...                                      disable=False)
    >>> progress(callbacks.StepEvent(task=0, step=1, steps=10, global_step=1, loss=2.5,
    ...                              accuracy=0.1))
    >>> progress.file.getvalue().startswith('sfa seed 0')
    True

    In a run: ``engine.run_sequence(stream, method, config, callbacks=[progress])``.
  """

  def __init__(self, label: str = '', file: TextIO | None = None, disable: bool | None = None):
    if disable is not None and not isinstance(disable, bool):
      raise ValueError(f'disable must be None, False or True; got {disable!r}.')
    self.label = label
    self.file = file or sys.stderr
    self.disable = disable
    self._bar = None
    self._started = 0.0
    self._shown = 0.0

  def __call__(self, event: Any) -> None:
    if self.disable:
      return
    if isinstance(event, ResumeEvent):
      print(f'{self.label}: resumed at step {event.global_step}', file=self.file, flush=True)
    if not isinstance(event, StepEvent):
      return
    tty = hasattr(self.file, 'isatty') and self.file.isatty()
    if not tty and self.disable is None:
      return
    now = time.monotonic()
    if event.step == 1 or not self._started:
      self._started = now
    done = event.step == event.steps
    due = done or (now - self._shown >= 0.1 if tty else event.step % max(1, event.steps // 10) == 0)
    postfix = None
    if due:
      import numpy as np

      self._shown = now
      postfix = f'loss {float(np.mean(event.loss)):.3f} acc {float(np.mean(event.accuracy)):.3f}'
    desc = f'{self.label} task {event.task}'
    if tty:
      self._draw(event, desc, postfix, done)
    elif due:
      from tqdm import tqdm

      line = tqdm.format_meter(event.step, event.steps, now - self._started, prefix=desc, postfix=postfix, ascii=True)
      print(line, file=self.file, flush=True)
    if done:
      self._started = 0.0

  def _draw(self, event: StepEvent, desc: str, postfix: str | None, done: bool) -> None:
    from tqdm import tqdm

    if self._bar is None or self._bar.desc != desc:
      if self._bar is not None:
        self._bar.close()
      self._bar = tqdm(total=event.steps, initial=event.step - 1, desc=desc, file=self.file, mininterval=0.1,
                       dynamic_ncols=True, leave=True)
    if postfix is not None:
      self._bar.set_postfix_str(postfix, refresh=False)
    self._bar.update(event.step - self._bar.n)
    if done:
      self._bar.close()
      self._bar = None


class JsonlLogger:
  """Writes every event as one JSON line (steps every ``every_steps`` steps), flushed as it goes.

  Args:
    path: the file; its folder is created. An existing file is appended to.
    every_steps: log a step event every this many global steps (0: no step events).

  Example:
    >>> import json, os, tempfile
    >>> from sfa_jax.engine import callbacks
    >>> path = os.path.join(tempfile.mkdtemp(), 'events.jsonl')
    >>> logger = callbacks.JsonlLogger(path)
    >>> logger(callbacks.AverageEvent(configuration=0, task=1, global_step=78))
    >>> logger.close()
    >>> json.loads(open(path).read())
    {'event': 'AverageEvent', 'configuration': 0, 'task': 1, 'global_step': 78}
  """

  def __init__(self, path: str | os.PathLike[str], every_steps: int = 1):
    if every_steps < 0:
      raise ValueError(f'every_steps must be >= 0; got {every_steps}.')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = os.fspath(path)
    self.every_steps = every_steps
    self._file = open(self.path, 'a')

  def __call__(self, event: Any) -> None:
    if isinstance(event, StepEvent) and (not self.every_steps or event.global_step % self.every_steps):
      return
    self._file.write(json.dumps({'event': type(event).__name__, **_plain(event._asdict())}) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardLogger:
  """Writes TensorBoard event files (with ``tensorboardX``: ``pip install 'sfa-jax[tensorboard]'``).

  Scalars: ``train/loss`` and ``train/accuracy`` every ``every_steps`` steps (the mean over a
  sweep's configurations), ``eval/task_<j>`` at every evaluation and ``average`` at each average,
  under one run per configuration (``<logdir>/<configuration>``).

  Args:
    logdir: the folder of the event files.
    every_steps: log the training scalars every this many global steps.

  Example:
    >>> import os, tempfile
    >>> from sfa_jax.engine import callbacks
    >>> logdir = tempfile.mkdtemp()
    >>> logger = callbacks.TensorBoardLogger(logdir)
    >>> logger(callbacks.AverageEvent(configuration=0, task=1, global_step=78))
    >>> logger.close()
    >>> os.listdir(logdir)
    ['0']
  """

  def __init__(self, logdir: str | os.PathLike[str], every_steps: int = 10):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as error:
      raise ImportError("TensorBoardLogger needs tensorboardX: pip install 'sfa-jax[tensorboard]'") from error
    self._writer_class = SummaryWriter
    self.logdir = os.fspath(logdir)
    self.every_steps = max(1, every_steps)
    self._writers: dict[int, Any] = {}

  def _writer(self, configuration: int):
    if configuration not in self._writers:
      self._writers[configuration] = self._writer_class(os.path.join(self.logdir, str(configuration)))
    return self._writers[configuration]

  def __call__(self, event: Any) -> None:
    import numpy as np

    if isinstance(event, StepEvent):
      if event.global_step % self.every_steps == 0:
        writer = self._writer(0)
        writer.add_scalar('train/loss', float(np.mean(event.loss)), event.global_step)
        writer.add_scalar('train/accuracy', float(np.mean(event.accuracy)), event.global_step)
    elif isinstance(event, EvaluationEvent):
      writer = self._writer(event.configuration)
      for j, accuracy in enumerate(event.point.accuracies):
        writer.add_scalar(f'eval/task_{j}', accuracy, event.point.step)
    elif isinstance(event, AverageEvent):
      self._writer(event.configuration).add_scalar('average', 1.0, event.global_step)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def _plain(value: Any) -> Any:
  """``value`` as JSON values (device scalars and arrays become numbers and lists)."""
  if isinstance(value, dict):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, tuple) and hasattr(value, '_asdict'):
    return _plain(value._asdict())
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  import numpy as np

  return np.asarray(value).tolist()
