"""The one training loop: a stream of tasks, one or many configurations, checkpointed, on a mesh.

:func:`train_stream` trains every configuration ``(method, config)`` on the tasks of a stream in
order and evaluates every task after each. The configurations are *lanes* of one loop: a single
run is one lane (:func:`sfa_jax.engine.run.run_sequence`); a sweep stacks N lanes on a leading
axis and advances them with one ``jax.vmap``-ed step (:func:`sfa_jax.engine.sweep.run_sweep`). The loop
knows no method by name: it calls the :class:`~sfa_jax.engine.methods.Method` hooks at every task
boundary (per lane, on that lane's :class:`RunState`), takes the batches from
:meth:`~sfa_jax.engine.methods.Method.batch_plan`, and records the averages that
:meth:`~sfa_jax.engine.methods.Method.averaging_schedule` lists ahead or that the state reports.

The device runs whole chunks of steps. At a task's start the loop draws every step's batch rows
on the host and puts the task's examples on the device once (:mod:`sfa_jax.engine.feed`); the
steps between two points where the host must act (an evaluation, a checkpoint, the task's end, an
average it must see) run as fused chunks of about half a second each, one dispatch per chunk
(:mod:`sfa_jax.engine.fused`), and their step events are emitted from the stacked losses after
each: a loss that is NaN or infinite stops the run there (:class:`DivergedError`), as does a model
that is at a task's end or a checkpoint. All tasks' test sets are evaluated by one program. A single SFA run trains the steps
between its averages without reading the anchor (``may_average=False``, :func:`sfa_jax.sfa`).

Compile once. The chunk program is one ``jax.jit`` function per (model, method class,
optimizer): anchors, Fisher and hyper-parameters live in the optimizer state, the task id is an
array argument, the chunk's length is a traced count, and every batch has one static shape (the
ragged end of each shuffled epoch is dropped; evaluation pads and masks). Cold, the train
programs compile in a background thread while the model's initialisation compiles
(:mod:`sfa_jax.engine.programs`). The functions the programs are made of come from the model
(:mod:`sfa_jax.engine.steps`).

A checkpoint is the run state (params, model state, optimizer state, the method's extras; stacked
in a sweep) and a JSON record (position, accuracy matrices, curves); it restores into the state of
a fresh start, whose structure never changes during a run. On CPU a resumed run is bit for bit an
uninterrupted one.

:func:`train_stream` reads as its steps: ``_TaskPreparer`` prepares a task's batches, ``_Lanes``
holds the lanes' state and calls the methods' hooks at task boundaries, ``_TaskRunner`` trains a
task in chunks and reports their events, ``_Evaluator`` scores every task, and ``_Record`` keeps
the results and the position, and saves and restores the checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import _lazy
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import distributed
from sfa_jax.engine import feed as feed_lib
from sfa_jax.engine import fused
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import programs
from sfa_jax.engine import steps
from sfa_jax.engine import stored

__all__ = ['DivergedError', 'RunState', 'CurvePoint', 'train_stream']

CHECKPOINT_FORMAT = 3  # the layout of a checkpoint's arrays and record; part of every fingerprint


class DivergedError(FloatingPointError, ValueError):
  """A run diverged: a step's loss, or the model where the host looks at it, is NaN or infinite.

  The run stops at the first such step, before it records or checkpoints anything past it: the
  checkpoints saved before it stay as they were, and a resume goes on from the latest of them. A
  ``FloatingPointError``; also a ``ValueError``, as a setting (a learning rate too high) is its
  usual cause, so that the command line reports it in one line.

  Args:
    message: what diverged, and where.
    task: the task being trained.
    step: the step of the task (counted from 1, as :class:`~sfa_jax.engine.callbacks.StepEvent`'s)
      whose loss is not finite, or after which the model is not.
    global_step: that step counted over every task.
    configurations: the lanes that diverged there: indices of a sweep's configurations, ``(0,)``
      for a single run.
  """

  def __init__(self, message: str, task: int, step: int, global_step: int, configurations: tuple[int, ...]):
    super().__init__(message)
    self.task, self.step, self.global_step, self.configurations = task, step, global_step, configurations

  def __reduce__(self):
    return type(self), (self.args[0], self.task, self.step, self.global_step, self.configurations)


class RunState(NamedTuple):
  """Everything a run holds on the device: the pytree the loop advances and a checkpoint saves.

  Attributes:
    params: the model's trainable parameters.
    model_state: its other variables (BatchNorm statistics), ``{}`` for most models.
    opt_state: the state of the method's chain around the optimizer.
    extras: what the method keeps across tasks (:meth:`Method.init_extras`), e.g. EWC's Fisher,
      and the arrays its train step reads and updates (:meth:`Method.init_step_state`: DER++'s
      buffer), which go through every chunk of steps with the params.
  """

  params: Any
  model_state: Any
  opt_state: Any
  extras: Any


class CurvePoint(NamedTuple):
  """Accuracy on every task at one step of the run.

  Attributes:
    step: global optimizer steps done so far.
    task: the task being trained.
    accuracies: accuracy on every task of the stream.
  """

  step: int
  task: int
  accuracies: tuple[float, ...]


class LaneRecord(NamedTuple):
  """What one configuration measured: the lists of :class:`sfa_jax.engine.run.SequenceResult`."""

  matrix: list[list[float]]
  curve: list[tuple[int, int, tuple[float, ...]]]
  steps_per_task: list[int]
  averaging_steps: list[int]
  extra: list[Any]


def train_stream(
    tasks: Sequence[tasks_lib.Task],
    configurations: Sequence[tuple[methods_lib.Method, Any]],
    *,
    model: Any,
    fingerprint: str,
    stacked: bool,
    callbacks: callbacks_lib.Callback | Sequence[callbacks_lib.Callback] | None = None,
    checkpointer: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    initial: Any = None,
    evaluate_state: Callable[[RunState], Any] | None = None,
) -> tuple[list[LaneRecord], dict[str, float]]:
  """Trains every configuration on ``tasks`` in order; evaluates every task after each.

  Args:
    tasks: the tasks, built once (``list(stream)``: a stream builds a task each time it is indexed).
    configurations: ``(method, config)`` lanes: one of them (``stacked=False``) or several of one
      method class whose configs differ only in the seed (checked by :mod:`sfa_jax.engine.sweep`).
    model: the Flax module, built for the stream.
    fingerprint: what decides the numbers; a checkpoint must carry the same.
    stacked: vectorise the lanes (a sweep); with ``False`` there is exactly one lane.
    callbacks: called with each event of :mod:`sfa_jax.engine.callbacks`.
    checkpointer: a :class:`sfa_jax.engine.checkpoint.Checkpointer`: save every ``every_steps`` steps
      and at each task end, resume from its latest checkpoint of this ``fingerprint``.
    mesh: train the (single) lane on these devices: batches split over the mesh, params and
      optimizer state FSDP-sharded.
    initial: ``(params, model_state)`` every lane starts from (a pretrained model, another run's
      end) instead of the model's initialisation with the lane's seed; copied, never donated.
    evaluate_state: ``evaluate_state(state, after_task)``, a further evaluation of one lane's
      state (JSON values, e.g. held-out losses and exact match of a language model), before the
      first task (``after_task=None``) and after every task end (its index); kept in
      :attr:`LaneRecord.extra` and in the checkpoints. Unstacked runs only.

  Returns:
    One :class:`LaneRecord` per configuration, and the seconds spent training, evaluating, in
    the Fisher, and in all.

  Raises:
    DivergedError: when a step's loss is NaN or infinite, or the params or model state are at a
      task's end or a periodic checkpoint (the lane, task and step are named). The losses are
      checked as the chunks' events are reported, the model where the host stops anyway.
    TypeError, ValueError: when a method's averaging schedule is not a boolean array of the
      task's steps + 2 (:func:`sfa_jax.engine.methods.checked_schedule`), before the task's first step.
  """
  start_time = time.perf_counter()
  emit = callbacks_lib.as_callbacks(callbacks)
  all_tasks = check_lanes(tasks, configurations, stacked=stacked, evaluate_state=evaluate_state)
  shared = configurations[0][1]
  placement = None if mesh is None else distributed.replicated(mesh)
  lanes = _Lanes(configurations, all_tasks, model, stacked=stacked, mesh=mesh, initial=initial)
  chunks = _chunk_programs(model, lanes, all_tasks[0], mesh)
  prepare = _TaskPreparer(all_tasks, lanes.methods, lanes.configs, stacked=stacked, placement=placement)
  evaluator = _Evaluator(model, all_tasks, shared, stacked=stacked, placement=placement)
  record = _Record(fingerprint, lanes.count, checkpointer, emit, evaluate_state)
  boundaries = _Boundaries(model, all_tasks, shared, lanes.trainable, record)
  # A later task's programs compile ahead only into the store, whose calls wait for their own shapes.
  ahead = mesh is None and len(all_tasks) > 1 and stored.directory() is not None
  second = prepare.shapes_ahead(1) if ahead else None
  lanes.state = _fresh_state(lanes, chunks, prepare.ahead(0), second, evaluator, boundaries, warm=mesh is None)
  lanes.state = record.start(lanes.state)
  runner = _TaskRunner(lanes, chunks, evaluator, record, shared, every_step=callbacks_lib.wants_every_step(callbacks),
                       emit=emit)
  while record.position.task < len(all_tasks):
    k = record.position.task
    prepared = prepare(k)
    at = boundaries.of(k, prepared.total_steps)
    if record.position.step_in_task == 0:
      lanes.start_task(at)
    runner.train(k, prepared)
    lanes.end_task(at)
    accuracies = runner.evaluate(k, range(lanes.count))
    record.end_task(k, accuracies, lanes.state)
    record.save(lanes.state, force=True)
  return record.results(start_time)


def check_batch_size(tasks: Sequence[tasks_lib.Task], batch_size: int) -> None:
  """Raises ``ValueError`` unless every task's training set makes at least one batch of ``batch_size``.

  :func:`train_stream` checks it before the first step (a run does not train the first tasks and
  then fail at a smaller one); the command line checks it before it writes anything.
  """
  smallest = min(tasks, key=lambda task: len(task.train.y))
  if tasks_lib.num_batches(len(smallest.train.y), batch_size) == 0:
    raise ValueError(f'{batch_size} is more than the {len(smallest.train.y)} training examples of the smallest '
                     f'task ({smallest.name}); lower batch_size.')


def check_lanes(tasks: Sequence[tasks_lib.Task], configurations: Sequence[tuple[methods_lib.Method, Any]], *,
                stacked: bool, evaluate_state: Any = None) -> list[tasks_lib.Task]:
  """The tasks as a list, once the lanes are checked against them (before anything is built).

  :func:`train_stream` runs these checks first; :func:`sfa_jax.engine.grids.run_grid` runs them
  for every configuration before its first run.

  Args:
    tasks: the stream's tasks.
    configurations: the lanes' ``(method, config)`` pairs.
    stacked: whether the lanes run as one sweep (else there must be exactly one).
    evaluate_state: :func:`train_stream`'s further evaluation, if any (one run only).

  Returns:
    The tasks, as a list.

  Raises:
    ValueError: on several lanes unstacked, ``evaluate_state`` in a sweep, a batch larger than the
      smallest task (:func:`check_batch_size`), or a ``steps_per_task`` tuple without one entry per task.
  """
  configs = [config for _, config in configurations]
  if not stacked and len(configs) != 1:
    raise ValueError(f'an unstacked run has one configuration; got {len(configs)}.')
  if stacked and evaluate_state is not None:
    raise ValueError('evaluate_state evaluates one run: it is not available in a sweep.')
  all_tasks = list(tasks)
  check_batch_size(all_tasks, configs[0].batch_size)
  for config in configs:
    if isinstance(config.steps_per_task, tuple) and len(config.steps_per_task) != len(all_tasks):
      raise ValueError(f'steps_per_task has {len(config.steps_per_task)} entries for {len(all_tasks)} tasks: give one per task.')
  return all_tasks


def task_steps(plan: methods_lib.BatchPlan, config: Any, task_index: int) -> int:
  """The optimizer steps of task ``task_index`` trained on ``plan``'s examples under ``config``.

  ``config.steps_per_task`` (one number, or this task's entry), or ``epochs_per_task`` whole epochs
  of the task's share of each batch (``batch_size`` less the plan's replayed examples, unless it
  keeps them apart; the ragged end of each epoch dropped).

  Args:
    plan: the method's :class:`~sfa_jax.engine.methods.BatchPlan` for the task.
    config: the run's :class:`~sfa_jax.engine.config.TrainConfig`.
    task_index: the task's index in the stream.

  Returns:
    The number of steps.

  Raises:
    ValueError: when the task's examples make no batch.
  """
  num_examples, batch_size = len(plan.data.y), plan.task_share(config.batch_size)
  per_epoch = tasks_lib.num_batches(num_examples, batch_size)
  if per_epoch == 0:
    raise ValueError(f'{num_examples} training examples make no batch of {batch_size}: lower batch_size.')
  return _budgeted_steps(config, per_epoch, task_index)


def _most_steps(plan: methods_lib.BatchPlan, config: Any, largest: int) -> int:
  """The most steps a task of the run takes with ``plan``'s batches: :func:`task_steps` of a task
  of ``largest`` examples, or the largest of ``config.steps_per_task``."""
  per_epoch = tasks_lib.num_batches(largest, plan.task_share(config.batch_size))
  return max(1, _budgeted_steps(config, per_epoch, None))


def _budgeted_steps(config: Any, per_epoch: int, task_index: int | None) -> int:
  """``config.epochs_per_task`` epochs of ``per_epoch`` steps, or ``config.steps_per_task`` (its
  entry for ``task_index``, its largest for ``None``)."""
  budget = config.steps_per_task
  if budget is None:
    return per_epoch * config.epochs_per_task
  if isinstance(budget, tuple):
    return max(budget) if task_index is None else budget[task_index]
  return budget


# ------------------------------------------------------------------------------------------------
# A task's inputs.


class _PreparedTask(NamedTuple):
  """A task's step count and feed, prepared before it starts."""

  task: int
  total_steps: int
  feed: feed_lib.TaskFeed


class _TaskPreparer:
  """Prepares a task's inputs for every lane: its step count, every step's batch rows, its examples on the device.

  The lanes of a sweep that draw the same batches (one seed, one data plan) share one group:
  their rows are drawn and their examples gathered once.
  """

  def __init__(self, all_tasks: Sequence[tasks_lib.Task], methods: Sequence[methods_lib.Method], configs: Sequence[Any],
               *, stacked: bool, placement: Any):
    self._tasks, self._methods, self._configs = all_tasks, methods, configs
    self._stacked, self._placement = stacked, placement
    one_group = not stacked or len({(config.seed, method.data_key()) for method, config in zip(methods, configs)}) == 1
    self._groups = range(1 if one_group else len(configs))
    self._largest = max(len(task.train.y) for task in all_tasks)  # examples on the device: one shape for all
    self._ahead: _PreparedTask | None = None

  def ahead(self, k: int) -> _PreparedTask:
    """Task ``k``'s inputs, prepared ahead (to compile its programs) and kept for its start."""
    self._ahead = self._prepare(k)
    return self._ahead

  def __call__(self, k: int) -> _PreparedTask:
    """Task ``k``'s inputs: those prepared ahead if they are this task's, else prepared now."""
    ahead, self._ahead = self._ahead, None
    return ahead if ahead is not None and ahead.task == k else self._prepare(k)

  def shapes_ahead(self, k: int) -> _PreparedTask:
    """Task ``k``'s inputs with its examples left as shapes (``task_feed``'s ``place=False``), to
    compile its programs ahead without a second copy of examples on the device."""
    return self._prepare(k, place=False)

  def _prepare(self, k: int, place: bool = True) -> _PreparedTask:
    shared, configs = self._configs[0], self._configs
    plans = [self._methods[i].batch_plan(self._tasks, k, configs[i].batch_size, configs[i].seed) for i in self._groups]
    total_steps = task_steps(plans[0], shared, k)
    rows = [feed_lib.task_rows(plans[i], configs[i].batch_size, methods_lib.task_seed(configs[i].seed, k), total_steps)
            for i in self._groups]
    task_feed = feed_lib.task_feed(plans, rows, lanes=self._stacked, budget=shared.device_data_bytes,
                                   min_rows=self._largest, placement=self._placement, place=place,
                                   max_steps=_most_steps(plans[0], shared, self._largest))
    return _PreparedTask(k, total_steps, task_feed)


# ------------------------------------------------------------------------------------------------
# The lanes' state and the methods' hooks.


def _stacked(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _unstacked(tree: Any, count: int) -> list[Any]:
  return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(count)]


_stack = stored.StoredProgram(('stack',), lambda: jax.jit(_stacked))
_unstack = stored.StoredProgram(('unstack',), lambda: jax.jit(_unstacked, static_argnums=1), static_argnums=(1,))


class _Lanes:
  """The lanes' :class:`RunState` (stacked on a leading axis in a sweep) and their methods' hooks at task boundaries.

  Attributes:
    methods: each lane's method.
    configs: each lane's config.
    count: the number of lanes.
    stacked: whether the lanes are stacked (a sweep).
    trainable: the mask of the trained params (``TrainConfig.trainable``), or ``None`` for all.
    txs: each lane's transform around the optimizer.
    init_opt: each lane's ``init_opt(params)``, its optimizer state for the trainable params.
    state: the run state the loop advances.
  """

  def __init__(self, configurations: Sequence[tuple[methods_lib.Method, Any]], all_tasks: Sequence[tasks_lib.Task],
               model: Any, *, stacked: bool, mesh: Any, initial: Any):
    self.methods = [method for method, _ in configurations]
    self.configs = [config for _, config in configurations]
    self.count, self.stacked, self._num_tasks = len(configurations), stacked, len(all_tasks)
    shared, sample = self.configs[0], all_tasks[0].train.x[:1]
    if initial is None:
      self._init = steps.initializer(model, sample, mesh)
    else:
      self._init = steps.starting_point(model, sample, initial, mesh)
    self.spec = None  # what a method's step state is shaped by, found on lane 0's initial model
    if type(self.methods[0]).init_step_state is not methods_lib.Method.init_step_state:
      self.spec = steps.step_spec(model, *self._init(self.configs[0].seed), all_tasks, shared.batch_size, 0)
    self.trainable = steps.trainable_mask(model, sample, shared.trainable)
    optimizer = shared.make_optimizer()
    self.txs = [method.transform(optimizer) for method in self.methods]
    self.init_opt = _optimizer_inits(self.txs, self.trainable, model, shared, self.methods[0], stacked=stacked)
    self.state: RunState | None = None

  def fresh(self) -> RunState:
    """The lanes' starting state, each lane's from its seed (or the initial variables), stacked in a sweep.

    Raises:
      ValueError: when a sweep's lanes do not update by one program
        (:func:`sfa_jax.engine.programs.check_one_update_rule`).
    """
    fresh = [self._fresh_lane(i) for i in range(self.count)]
    if not self.stacked:
      return fresh[0]
    programs.check_one_update_rule(self.methods, self.txs, [lane.opt_state for lane in fresh],
                                   steps.trainable_part(fresh[0].params, self.trainable),
                                   optimizer_key=self.configs[0].optimizer_key())
    return _stack(fresh)

  def _fresh_lane(self, i: int) -> RunState:
    params, model_state = self._init(self.configs[i].seed)
    extras = self.methods[i].init_extras(params, model_state, self._num_tasks)
    step_state = self.init_step_state(i, params, model_state)
    if step_state is not None:
      extras = methods_lib.with_step_state(extras, step_state)
    return RunState(params, model_state, self.init_opt[i](params), extras)

  def init_step_state(self, i: int, params: Any, model_state: Any) -> Any:
    """Lane ``i``'s :meth:`~sfa_jax.engine.methods.Method.init_step_state` (``None`` for a method without one)."""
    if self.spec is None:
      return None
    return self.methods[i].init_step_state(params, model_state, self.spec._replace(seed=self.configs[i].seed))

  def start_task(self, at: methods_lib.Boundary) -> None:
    """Each lane's :meth:`~sfa_jax.engine.methods.Method.start_task`, optimizer reset and
    :meth:`~sfa_jax.engine.methods.Method.prepare_optimizer`."""
    started = []
    for i, lane in enumerate(self._split()):
      lane = self.methods[i].start_task(lane, at)
      if self.configs[i].reset_optimizer:
        lane = lane._replace(opt_state=self.init_opt[i](lane.params))
      started.append(lane._replace(opt_state=self.methods[i].prepare_optimizer(lane.opt_state, lane, at)))
    self._join(started)

  def end_task(self, at: methods_lib.Boundary) -> None:
    """Each lane's :meth:`~sfa_jax.engine.methods.Method.end_task`."""
    self._join([self.methods[i].end_task(lane, at) for i, lane in enumerate(self._split())])

  def advance(self, program: Callable[..., Any], block: feed_lib.Block, n: int) -> list[Any]:
    """Runs ``n`` steps of the chunk ``program`` on ``block``; its outputs ``[losses, metrics, flags, done]``.

    The method's step state (:func:`~sfa_jax.engine.methods.step_state` of the extras) goes
    through the steps with the params and comes back into the extras.
    """
    state = self.state
    step_state = methods_lib.step_state(state.extras)
    (params, model_state, opt_state, step_state), *outputs = program(
        (state.params, state.model_state, state.opt_state, step_state), *block, np.int32(n))
    extras = state.extras if step_state is None else methods_lib.with_step_state(state.extras, step_state)
    self.state = state._replace(params=params, model_state=model_state, opt_state=opt_state, extras=extras)
    return outputs

  def _split(self) -> list[RunState]:
    return _unstack(self.state, self.count) if self.stacked else [self.state]

  def _join(self, states: list[RunState]) -> None:
    self.state = _stack(states) if self.stacked else states[0]


def _optimizer_inits(txs: Sequence[Any], trainable: Any, model: Any, config: Any, method: methods_lib.Method, *,
                     stacked: bool) -> list[Callable[[Any], Any]]:
  """Each lane's ``init_opt(params)``: its transform's state for the trainable leaves of ``params``.

  One transform per lane for its initial state (its constructor's hyper-parameters); the lanes
  share one update rule, which reads them from the state. A sweep's inits run eagerly (zeros and
  copies): jitting each would compile it once per configuration. A single run's is jitted and kept
  for the process's later runs. The optimizer state holds the trainable leaves alone.
  """
  if stacked:
    return [lambda params, tx=tx: tx.init(steps.trainable_part(params, trainable)) for tx in txs]
  tx, key = txs[0], ('opt_init', method, config.optimizer_key(), model, config.trainable)
  # Zeros and copies, once a task: compiled quickly, the same values (as the model's init).
  return [programs.reused(key, lambda: stored.StoredProgram(
      key, lambda: jax.jit(lambda params: tx.init(steps.trainable_part(params, trainable))),
      compiler_options=_lazy.RUNS_ONCE))]


def _chunk_programs(model: Any, lanes: _Lanes, task: tasks_lib.Task, mesh: Any) -> programs.ChunkPrograms:
  """The lanes' chunk programs, for the shapes of their state (traced once per process: the jitted
  init and optimizer init); the state's ``extras`` are the step state's shapes."""
  variables = steps.variable_shapes(model, task.train.x[:1])
  config = lanes.configs[0]
  step_state = stored.remembered(('step_state_shapes', lanes.methods[0], lanes.spec, variables),
                                 lambda: jax.eval_shape(functools.partial(lanes.init_step_state, 0), *variables))
  opt_state = stored.remembered(('opt_state_shapes', lanes.methods[0], config.optimizer_key(), config.trainable, variables),
                                lambda: jax.eval_shape(lanes.init_opt[0], variables[0]))
  abstract = RunState(*variables, opt_state, step_state)
  return programs.ChunkPrograms(model, lanes.txs[0], lanes.methods[0], lanes.configs[0], lanes.trainable, abstract, task,
                                count=lanes.count, stacked=lanes.stacked, mesh=mesh)


def _fresh_state(lanes: _Lanes, chunks: programs.ChunkPrograms, first: _PreparedTask, second: _PreparedTask | None,
                 evaluator: _Evaluator, boundaries: _Boundaries, *, warm: bool) -> RunState:
  """The lanes' starting state; with ``warm``, the run's programs compile (or load) meanwhile.

  Cold, compiling is most of a small run: the first task's train programs, then the evaluation,
  the finite check, the estimates the method takes at task ends (its Fisher) and the second
  task's train programs when its inputs change them (a replay memory: ``second``, prepared as
  shapes), compile in the background while the model's initialisation compiles here; once it is
  done, this thread compiles the stored programs the background thread has not started.
  """
  warmed_init = None
  if warm and not lanes.stacked:  # the optimizer's init is needed first, right after the model's
    if not programs.prepare_in_background(lanes.init_opt[0], chunks.abstract.params):
      warmed_init = programs.compile_in_background(lanes.init_opt[0], chunks.abstract.params)
  if warm:
    _warm_chunks(lanes, chunks, first, first.feed.block(0, 1), later=False)
    evaluator.warm(chunks.abstract)
    programs.prepare_in_background(_FINITE_LEAVES, (chunks.abstract.params, chunks.abstract.model_state), lanes.stacked)
    boundaries.warm(type(lanes.methods[0]).boundary_uses, chunks.lane)  # estimated lane by lane
    block = None if second is None else _block_like(second.feed, first.feed)
    if block is not None:
      _warm_chunks(lanes, chunks, second, block, later=True)
  if warmed_init is not None:
    warmed_init.result()
  state = lanes.fresh()
  programs.prepare_queued_here()  # the model's init is done: this thread takes what waits behind the train programs
  return state


def _warm_chunks(lanes: _Lanes, chunks: programs.ChunkPrograms, task: _PreparedTask, block: feed_lib.Block, *,
                 later: bool) -> None:
  """Compiles, in the background, the chunk programs ``task`` trains with and the run has not
  asked for yet (:meth:`~sfa_jax.engine.programs.ChunkPrograms.warm`, ``later`` for a task after
  the first), by the first lane's schedule. A later task's refused schedule compiles nothing
  here: that task's start reports it."""
  try:
    on_device = methods_lib.checked_schedule(lanes.methods[0], task.task, task.total_steps) is None
  except (TypeError, ValueError):
    if not later:
      raise
    return
  variants = [True, False] if chunks.skips_between_averages and not on_device else [False]
  stop_on_average = on_device and bool(lanes.configs[0].eval_every)
  for skip in variants:
    chunks.warm(task.feed.layout, skip, on_device, stop_on_average, block, later=later)


def _block_like(shapes: feed_lib.TaskFeed, placed: feed_lib.TaskFeed) -> feed_lib.Block | None:
  """The first chunk call's inputs of the feed ``shapes`` (its examples left as shapes), with
  ``placed``'s examples on the device in their place (the values do not matter to a compilation);
  ``None`` when their shapes differ (joint training's growing union)."""
  block = shapes.block(0, 1)
  if shapes.device is None:
    return block
  if placed.device is None:
    return None
  same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, shapes.device, placed.device)
  return block._replace(data=placed.device) if all(jax.tree.leaves(same)) else None


@dataclasses.dataclass(frozen=True)
class _Boundaries:
  """The :class:`~sfa_jax.engine.methods.Boundary` of each task, with the Fisher its methods may ask for (timed)."""

  model: Any
  tasks: Sequence[tasks_lib.Task]
  config: Any
  trainable: Any
  record: _Record
  _warming: dict[str, concurrent.futures.Future] = dataclasses.field(default_factory=dict)

  def of(self, k: int, total_steps: int) -> methods_lib.Boundary:
    """Task ``k``'s boundary; its ``fisher(lane)`` and ``mas_importance(lane)`` are the lane's Fisher
    and MAS importance on the task's training examples."""

    def estimate(name: str, lane: RunState) -> Any:
      with self.record.timed('fisher'):
        if name in self._warming:  # compiling in the background: wait for it rather than trace it twice
          self._warming.pop(name).result()
        return self._estimate(name, k, lane.params, lane.model_state)

    fisher = functools.partial(estimate, 'fisher')
    mas_importance = functools.partial(estimate, 'mas_importance')

    return methods_lib.Boundary(k, len(self.tasks), total_steps, fisher, mas_importance)

  def warm(self, uses: frozenset[str], abstract: RunState) -> None:
    """Compiles, in the background, the programs of the estimates a method ``uses``
    (:attr:`~sfa_jax.engine.methods.Method.boundary_uses`) for one lane's shapes, on zeros."""
    one_chunk = self._examples(0, limit=self.config.eval_batch_size)  # the programs' shapes, one chunk's work
    for name in sorted(uses & {'fisher', 'mas_importance'}):
      self._warming[name] = programs.compile_in_background(
          lambda variables, name=name: self._estimate(name, 0, *variables, examples=one_chunk),
          (abstract.params, abstract.model_state))

  def _estimate(self, name: str, k: int, params: Any, model_state: Any, examples: tasks_lib.Split | None = None) -> Any:
    """The Fisher (``name='fisher'``) or MAS's importance of ``params`` on task ``k``'s examples."""
    examples = self._examples(k) if examples is None else examples
    if name == 'fisher':
      return steps.task_fisher(self.model, params, model_state, examples, k, self.config.eval_batch_size,
                               self.config.objective, self.trainable)
    return steps.task_mas_importance(self.model, params, model_state, examples, k, self.config.eval_batch_size,
                                     self.trainable)

  def _examples(self, k: int, limit: int | None = None) -> tasks_lib.Split:
    """Task ``k``'s training examples, at most ``fisher_examples`` (and ``limit``) of them."""
    split = self.tasks[k].train
    limit = min(n for n in (self.config.fisher_examples, limit, len(split.y)) if n is not None)
    return split if limit == len(split.y) else tasks_lib.Split(split.x[:limit], split.y[:limit])


# ------------------------------------------------------------------------------------------------
# A task's training: fused chunks, their events, the evaluations between them.


class _TaskPlan(NamedTuple):
  """Where the host acts among a task's steps, and how its chunks run.

  Attributes:
    total_steps: the task's steps.
    averages: ``(lanes, total_steps + 2)`` bools: after which steps each lane's method averages,
      as its schedule lists them ahead (none for a method that decides on the device).
    host_stop: ``(total_steps + 1,)`` bools: the steps after which the host must act, whatever
      the device decides.
    on_device: whether a lane's method decides its averages on the device.
    skip_between_averages: whether the steps between averages run with ``may_average=False``
      (each average then runs alone).
    stop_on_average: whether a chunk ends after a step on which a lane averaged on the device.
  """

  total_steps: int
  averages: np.ndarray
  host_stop: np.ndarray
  on_device: bool
  skip_between_averages: bool
  stop_on_average: bool


def _plan_task(methods: Sequence[methods_lib.Method], k: int, total_steps: int, position: _Position, config: Any,
               checkpoint_every: int, skips_between_averages: bool) -> _TaskPlan:
  """Task ``k``'s plan, from the methods' averaging schedules, the evaluations and the checkpoints."""
  schedules = [methods_lib.checked_schedule(method, k, total_steps) for method in methods]
  on_device = any(schedule is None for schedule in schedules)
  averages = np.stack([np.zeros(total_steps + 2, bool) if s is None else s for s in schedules])
  # The steps after which the host must act, whatever the device decides: evaluations (with
  # curves on: also just before and after each known average), checkpoints, the task's end.
  after = np.arange(total_steps + 1)
  global_after = position.global_step - position.step_in_task + after
  host_stop = after == total_steps
  if config.eval_every:
    host_stop |= (global_after % config.eval_every == 0) | averages[:, after].any(0) | averages[:, after + 1].any(0)
  if checkpoint_every:
    host_stop |= global_after % checkpoint_every == 0
  return _TaskPlan(total_steps, averages, host_stop, on_device, skips_between_averages and not on_device,
                   on_device and bool(config.eval_every))


class _TaskRunner:
  """Trains the lanes on a task in fused chunks of steps; evaluates and checkpoints where the host acts.

  Args:
    lanes: the lanes it advances.
    chunks: their chunk programs.
    evaluator: scores every task.
    record: where the results and the position go.
    config: the lanes' shared settings (``eval_every``).
    every_step: one step per dispatch (a callback must see each step as it ends).
    emit: the callbacks.
  """

  def __init__(self, lanes: _Lanes, chunks: programs.ChunkPrograms, evaluator: _Evaluator, record: _Record, config: Any,
               *, every_step: bool, emit: Callable[[Any], None]):
    self._lanes, self._chunks, self._evaluator, self._record, self._config = lanes, chunks, evaluator, record, config
    self._every_step, self._emit = every_step, emit
    self._pace = _Pace()
    self._names = _lane_names(lanes)

  def evaluate(self, k: int, which: Sequence[int]) -> np.ndarray:
    """Every lane's accuracy on every task (``(lanes, tasks)``); a point of the curves of the lanes ``which``."""
    with self._record.timed('evaluate'):
      accuracies = self._evaluator(self._lanes.state)
    self._record.add_points(k, accuracies, which)
    return accuracies

  def train(self, k: int, prepared: _PreparedTask) -> None:
    """Trains task ``k`` from the record's position to its end, emitting every step's events."""
    position, config = self._record.position, self._config
    plan = _plan_task(self._lanes.methods, k, prepared.total_steps, position, config, self._record.checkpoint_every,
                      self._chunks.skips_between_averages)
    reporter = _Reporter(k, plan, self._names, self._record, self._emit)
    self._pace.start(position.step_in_task)
    begin = time.perf_counter()
    while position.step_in_task < plan.total_steps:
      averaged = self._run_chunk(plan, prepared.feed, reporter)
      if averaged is None:
        continue
      due = (position.global_step % max(config.eval_every, 1) == 0) | averaged | plan.averages[:, position.step_in_task + 1]
      if config.eval_every and due.any():
        self._record.seconds['train'] += time.perf_counter() - begin
        self.evaluate(k, np.flatnonzero(due))
        begin = time.perf_counter()
      if self._record.checkpoint_due():
        self._check_finite(k)
        self._record.save(self._lanes.state, force=False)
    self._record.seconds['train'] += time.perf_counter() - begin
    self._check_finite(k)

  def _check_finite(self, k: int) -> None:
    """Raises :class:`DivergedError` when a lane's params or model state hold a NaN or infinite
    entry at the position (in task ``k``): a divergence of the latest step, whose loss no step shows yet."""
    state = self._lanes.state
    finite = np.asarray(_FINITE_LEAVES((state.params, state.model_state), self._lanes.stacked))
    if finite.all():
      return
    paths = _float_leaf_paths((state.params, state.model_state), ('params', 'model_state'))
    diverged = tuple(int(i) for i in np.flatnonzero(~finite.all(0)))
    leaf = paths[int(np.argmin(finite[:, diverged[0]]))]
    position = self._record.position
    raise DivergedError(
        f'{_which(self._names, diverged)} diverged in task {k}: after its step {position.step_in_task} (global step '
        f'{position.global_step}), {leaf} holds NaN or infinite entries. {_KEPT}', k, position.step_in_task,
        position.global_step, diverged)

  def _run_chunk(self, plan: _TaskPlan, task_feed: feed_lib.TaskFeed, reporter: _Reporter) -> np.ndarray | None:
    """Dispatches the next chunk; which lanes averaged on its last step if the host acts after it
    before the task's end, else ``None``."""
    position = self._record.position
    t = position.step_in_task
    averages_next = plan.skip_between_averages and plan.averages[0, t + 1]
    n = 1 if averages_next or self._every_step or not self._chunks.looped else self._chunk_length(plan, t, task_feed)
    program = self._chunks.chunk(task_feed.layout, plan.skip_between_averages and not averages_next, plan.on_device,
                                 plan.stop_on_average)
    outputs = self._lanes.advance(program, task_feed.block(t, n), n)
    reporter.add(t, position.global_step, outputs)
    # Without early stops every chunk runs its n steps, so the host goes on: it dispatches the
    # next chunk before it waits for this one's events (at most one chunk ahead of them).
    done = int(outputs[-1]) if plan.stop_on_average else n
    position.step_in_task += done
    position.global_step += done
    acts = plan.host_stop[position.step_in_task] or plan.stop_on_average or self._every_step
    if not acts and len(reporter) == 1:
      return None
    averaged = reporter.report(keep_last=not acts)
    self._pace.reached(position.step_in_task - (0 if acts else done))
    return averaged if acts and position.step_in_task < plan.total_steps else None

  def _chunk_length(self, plan: _TaskPlan, t: int, task_feed: feed_lib.TaskFeed) -> int:
    """The steps from step ``t`` to the next host stop (or known average, when each runs alone), at
    most a block's and about :data:`CHUNK_SECONDS` of them."""
    n = int(np.argmax(plan.host_stop[t + 1:])) + 1
    ahead = plan.averages[0, t + 1:plan.total_steps + 1]
    if plan.skip_between_averages and ahead.any():
      n = min(n, int(np.argmax(ahead)))
    return min(n, task_feed.block_steps, self._pace.steps())


class _Reporter:
  """A task's dispatched chunks whose events are not emitted yet; emits them in order, up to a
  step whose loss is not finite (:class:`DivergedError`).

  Args:
    k: the task.
    plan: the task's plan.
    names: each lane's name, for the errors.
    record: where the averages go.
    emit: the callbacks.
  """

  def __init__(self, k: int, plan: _TaskPlan, names: Sequence[str], record: _Record, emit: Callable[[Any], None]):
    self._k, self._plan, self._names, self._record, self._emit = k, plan, names, record, emit
    self._count = len(names)
    self._pending: list[tuple[int, int, Any]] = []

  def __len__(self) -> int:
    return len(self._pending)

  def add(self, first_step: int, first_global_step: int, outputs: Any) -> None:
    """A chunk dispatched after ``first_step`` of the task (``first_global_step`` in all)."""
    self._pending.append((first_step, first_global_step, outputs))

  def report(self, keep_last: bool = False) -> np.ndarray:
    """Emits the pending chunks' step and average events in order (all but the newest chunk, if
    ``keep_last``: it runs while the host waits for the others); the last step's averages.

    Raises:
      DivergedError: at the first step whose loss is NaN or infinite in a lane, once the events
        of the steps before it are emitted.
    """
    averaged = np.zeros(self._count, bool)
    reporting = self._pending[:-1] if keep_last else list(self._pending)
    for first, start_global, outputs in reporting:
      losses, metrics, flags, done = jax.device_get(outputs)
      finite = _finite_losses(losses, int(done), self._count)
      healthy = int(np.argmin(finite.all(1))) if not finite.all() else int(done)
      for j in range(healthy):
        step, global_step = first + j + 1, start_global + j + 1
        averaged = self._plan.averages[:, step] | np.reshape(flags[j], self._count)
        for i in np.flatnonzero(averaged):
          self._record.add_average(int(i), self._k, global_step)
        self._emit(callbacks_lib.StepEvent(self._k, step, self._plan.total_steps, global_step, losses[j], metrics[j]))
      if healthy < int(done):
        raise self._diverged(first + healthy + 1, start_global + healthy + 1, losses[healthy], finite[healthy])
    del self._pending[:len(reporting)]
    return averaged

  def _diverged(self, step: int, global_step: int, loss: Any, finite: np.ndarray) -> DivergedError:
    """The error of the lanes whose loss at ``step`` is not ``finite``."""
    diverged = tuple(int(i) for i in np.flatnonzero(~finite))
    values = np.reshape(loss, -1)[list(diverged)]
    return DivergedError(
        f'{_which(self._names, diverged)} diverged at step {step} of task {self._k} (global step {global_step}): '
        f"loss {', '.join(str(v) for v in values)}. {_KEPT}", self._k, step, global_step, diverged)


_KEPT = 'The run stopped there; the checkpoints saved before it are kept.'


def _finite_losses(losses: Any, done: int, count: int) -> np.ndarray:
  """``(done, count)`` bools: whether each of the first ``done`` steps' loss of each lane is finite."""
  return np.isfinite(np.reshape(np.asarray(losses[:done], np.float64), (done, count)))


def _lane_names(lanes: _Lanes) -> list[str]:
  """Each lane's name in an error: the method's label, with its index and seed in a sweep."""
  if not lanes.stacked:
    return [lanes.methods[0].label]
  return [f'configuration {i} ({method.label}, seed {config.seed})'
          for i, (method, config) in enumerate(zip(lanes.methods, lanes.configs))]


def _which(names: Sequence[str], lanes: Sequence[int]) -> str:
  """The lanes ``lanes`` by name."""
  return ' and '.join(names[i] for i in lanes)


@functools.partial(jax.jit, static_argnums=1)
def _finite_leaves(tree: Any, stacked: bool) -> jax.Array:
  """``(floating leaves, lanes)`` bools: whether each floating leaf of each lane of ``tree`` is finite."""
  flags = [jnp.isfinite(leaf).reshape(leaf.shape[0] if stacked else 1, -1).all(1)
           for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.stack(flags) if flags else jnp.ones((0, 1), bool)


# Booleans, exact at any optimisation level: compiled several times faster.
_FINITE_LEAVES = stored.StoredProgram(('finite_leaves',), lambda: _finite_leaves, static_argnums=(1,),
                                      compiler_options=_lazy.EXACT)


def _float_leaf_paths(tree: Any, names: Sequence[str]) -> list[str]:
  """The paths of the floating leaves of the tuple ``tree``, in :func:`_finite_leaves`' order, its
  entries called ``names``."""
  return [names[path[0].idx] + jax.tree_util.keystr(path[1:])
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if jnp.issubdtype(leaf.dtype, jnp.inexact)]


class _Pace:
  """How many steps the next chunk runs: about :data:`CHUNK_SECONDS` of the latest measured step time.

  A chunk's events (a progress bar's) come when it ends, so chunks stay short enough that the host
  reports at least every second; the first chunk, which may compile, runs few steps.
  """

  def __init__(self):
    self._per_step = None
    self._since = (0, time.perf_counter())

  def steps(self) -> int:
    if self._per_step is None:
      return 8
    return max(1, int(CHUNK_SECONDS / max(self._per_step, 1e-9)))

  def start(self, step: int) -> None:
    """Measures from ``step``, now (a task's start)."""
    self._since = (step, time.perf_counter())

  def reached(self, step: int) -> None:
    """The steps up to ``step`` have been reported: the time per step since the last measure."""
    now = time.perf_counter()
    before, then = self._since
    self._per_step = (now - then) / max(step - before, 1)
    self._since = (step, now)


CHUNK_SECONDS = 0.5  # a fused chunk's target duration


# ------------------------------------------------------------------------------------------------
# Evaluation and the record.


class _Evaluator:
  """Every lane's accuracy on every task's test set, by one program (:func:`sfa_jax.engine.fused.make_scorer`)."""

  def __init__(self, model: Any, all_tasks: Sequence[tasks_lib.Task], config: Any, *, stacked: bool, placement: Any):
    objective = config.objective
    key = ('scorer', model, objective, stacked)
    self._scorer = programs.reused(key, lambda: stored.StoredProgram(
        key, lambda: fused.make_scorer(steps.make_score(model, objective), stacked=stacked), static_argnums=(3,)))
    self._sizes = np.array([len(t.test.y) for t in all_tasks])
    # No batch larger than the largest test set: the same batches per task, no padding scored.
    batch_size = min(config.eval_batch_size, max(len(t.test.y) for t in all_tasks))
    batches = fused.test_batches([t.test for t in all_tasks], [t.index for t in all_tasks], batch_size)
    self._groups = _test_groups(batches, config.device_data_bytes, placement)

  def warm(self, abstract: RunState) -> None:
    """Compiles (or loads) the scorer for these shapes in the background, if it is stored."""
    for group in self._groups[:1]:  # the groups share their shapes but the last one's
      programs.prepare_in_background(self._scorer, abstract.params, abstract.model_state, group, len(self._sizes))

  def __call__(self, state: RunState) -> np.ndarray:
    """The ``(lanes, tasks)`` accuracies of ``state`` (one row for a single run)."""
    totals = sum(np.asarray(self._scorer(state.params, state.model_state, group, len(self._sizes))) for group in self._groups)
    return np.atleast_2d(totals / self._sizes)


def _test_groups(batches: fused.TestBatches, budget: int, placement: Any) -> list[fused.TestBatches]:
  """The test batches on the device (one group) if they fit in ``budget`` bytes, else host groups
  of as many batches as fit (shipped at each evaluation)."""
  size = sum(leaf.nbytes for leaf in batches)
  if size <= budget:
    put = jax.device_put if placement is None else (lambda leaf: distributed.place(leaf, placement))
    return [fused.TestBatches(*(put(leaf) for leaf in batches))]
  per_batch = max(1, size // len(batches.task))
  step = max(1, budget // per_batch)
  return [fused.TestBatches(*(leaf[i:i + step] for leaf in batches)) for i in range(0, len(batches.task), step)]


@dataclasses.dataclass
class _Position:
  """Where a run is: ``step_in_task`` steps of task ``task`` done, ``global_step`` in all."""

  task: int = 0
  step_in_task: int = 0
  global_step: int = 0


class _Record:
  """What a run measured and where it is: the JSON record a checkpoint saves beside the run state.

  Args:
    fingerprint: what decides the run's numbers; its checkpoints carry it.
    count: the number of lanes.
    checkpointer: a :class:`sfa_jax.engine.checkpoint.Checkpointer`, or ``None``.
    emit: the callbacks.
    evaluate_state: the further evaluation of the (single) lane's state, or ``None``.

  Attributes:
    position: where the run is.
  """

  def __init__(self, fingerprint: str, count: int, checkpointer: Any, emit: Callable[[Any], None],
               evaluate_state: Callable[[RunState, int | None], Any] | None):
    self._data: dict[str, Any] = {
        'fingerprint': fingerprint,
        'position': dataclasses.asdict(_Position()),
        'lanes': [{'matrix': [], 'curve': [], 'steps_per_task': [], 'averaging_steps': [], 'extra': []} for _ in range(count)],
        'seconds': {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0},
    }
    self._checkpointer, self._emit, self._evaluate_state = checkpointer, emit, evaluate_state
    self.position = _Position()

  @property
  def seconds(self) -> dict[str, float]:
    """The seconds spent training, evaluating and in the Fisher (over every start of the run)."""
    return self._data['seconds']

  @property
  def checkpoint_every(self) -> int:
    """The steps between periodic checkpoints (0: only at task ends)."""
    return 0 if self._checkpointer is None else self._checkpointer.every_steps

  @contextlib.contextmanager
  def timed(self, key: str) -> Iterator[None]:
    """Adds the seconds the ``with`` block takes to ``seconds[key]``."""
    begin = time.perf_counter()
    yield
    self.seconds[key] += time.perf_counter() - begin

  def start(self, state: RunState) -> RunState:
    """The state to go on from: the checkpointer's latest of this run (this record then its), or ``state``.

    A run that has not trained yet evaluates its starting point first (``evaluate_state``).
    """
    if self._checkpointer is not None:
      restored = self._checkpointer.restore_latest(state._asdict(), fingerprint=self._data['fingerprint'])
      if restored is not None:
        arrays, self._data = restored
        self.position = _Position(**self._data['position'])
        state = RunState(**arrays)
        self._emit(callbacks_lib.ResumeEvent(self.position.global_step))
    if self.position.global_step == 0 and not self._data['lanes'][0]['extra']:
      self._evaluate_extra(state, None)  # before any training: the starting point's row
    return state

  def add_average(self, lane: int, k: int, global_step: int) -> None:
    """Lane ``lane``'s method averaged after ``global_step``, in task ``k``."""
    self._data['lanes'][lane]['averaging_steps'].append(global_step)
    self._emit(callbacks_lib.AverageEvent(lane, k, global_step))

  def add_points(self, k: int, accuracies: np.ndarray, which: Sequence[int]) -> None:
    """A point of the curves of the lanes ``which``, during task ``k``, from the ``(lanes, tasks)`` accuracies."""
    for i in which:
      point = (self.position.global_step, k, tuple(float(a) for a in accuracies[i]))
      self._data['lanes'][i]['curve'].append(list(point))
      self._emit(callbacks_lib.EvaluationEvent(i, _curve_point(point)))

  def end_task(self, k: int, accuracies: np.ndarray, state: RunState) -> None:
    """Task ``k`` ended with these ``(lanes, tasks)`` accuracies: each lane's steps and row of its
    matrix, the further evaluation of ``state``; the position moves to the next task."""
    for i, row in enumerate(accuracies):
      lane = self._data['lanes'][i]
      lane['steps_per_task'].append(self.position.step_in_task)
      lane['matrix'].append([float(a) for a in row])
      self._emit(callbacks_lib.TaskEndEvent(i, k, tuple(lane['matrix'][-1])))
    self._evaluate_extra(state, k)
    self.position.task, self.position.step_in_task = k + 1, 0

  def checkpoint_due(self) -> bool:
    """Whether a periodic checkpoint is due at the position."""
    return self._checkpointer is not None and self._checkpointer.due(self.position.global_step)

  def save(self, state: RunState, force: bool) -> None:
    """Checkpoints ``state`` with this record, at the position (if there is a checkpointer)."""
    if self._checkpointer is not None:
      self._data['position'] = dataclasses.asdict(self.position)
      self._checkpointer.save(self.position.global_step, state._asdict(), self._data, force=force)
      self._emit(callbacks_lib.CheckpointEvent(self.position.global_step, self._checkpointer.directory))

  def results(self, start_time: float) -> tuple[list[LaneRecord], dict[str, float]]:
    """Every lane's :class:`LaneRecord`, and the seconds (``'total'`` counted from ``start_time``)."""
    self.seconds['total'] = self.seconds.get('total', 0.0) + time.perf_counter() - start_time
    return [
        LaneRecord(lane['matrix'], [_curve_point(p) for p in lane['curve']], lane['steps_per_task'], lane['averaging_steps'],
                   lane['extra'])
        for lane in self._data['lanes']
    ], dict(self.seconds)

  def _evaluate_extra(self, state: RunState, after_task: int | None) -> None:
    if self._evaluate_state is not None:
      with self.timed('evaluate'):
        self._data['lanes'][0]['extra'].append(self._evaluate_state(state, after_task))


def _curve_point(point: Sequence[Any]) -> CurvePoint:
  step, task, accuracies = point
  return CurvePoint(step, task, tuple(accuracies))
