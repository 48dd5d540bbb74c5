"""Continual-learning methods: one class per method, one registry.

A method is an Optax chain around the user's optimizer (:meth:`Method.transform`) plus, at most,
rules at the task boundaries (:meth:`Method.start_task`, :meth:`Method.prepare_optimizer`,
:meth:`Method.end_task`), a rule on the batches (:meth:`Method.batch_plan`: replay, joint), the
arrays it keeps across tasks (:meth:`Method.init_extras`), and what the compiled train step
computes beside the loss (:meth:`Method.step_loss`, :meth:`Method.reference_loss`,
:meth:`Method.after_step`, on the arrays of :meth:`Method.init_step_state`: LwF, DER++, A-GEM).
The engine (:mod:`sfa_jax.engine.run`, :mod:`sfa_jax.engine.sweep`, :mod:`sfa_jax.engine.lm`,
the command line) calls only these hooks: it never asks a method's name.

================ ========================================================================================
method           what happens on task ``k`` (tasks counted from 0; task 0 is always plain training)
================ ========================================================================================
finetune         train from the end of task ``k-1``.
sfa              ``chain(optimizer, sfa(anchor=θ_{k-1}, p, beta, total_steps=T_k))``.
l2               ``chain(l2(strength, anchor=θ_{k-1}), optimizer)``.
ewc              ``chain(ewc(F, strength, anchor=θ_{k-1}), optimizer)``, ``F`` the online Fisher
                 ``γ·F_old + F_{k-1}`` of the past tasks' training data (per-example, empirical).
replay           each batch mixes ``batch_size - r`` examples of task ``k`` with ``r = round(ratio ·
                 batch_size)`` examples of the memory: ``fraction`` of each past task's training set,
                 stratified by class. Task 0 (empty memory) uses whole batches of its own data.
er               each step trains on ``batch_size`` examples of task ``k`` and ``m = round(memory_ratio ·
                 batch_size)`` more of the same memory beside them (Chaudhry et al.'s experience replay).
wise-ft          fine-tune, then at the task's end ``θ_k ← interpolate(θ_{k-1}, θ_k, beta)``.
task-arithmetic  the model after task 0 is the base ``θ_b``. Task ``k ≥ 1`` is trained from ``θ_b``
                 into ``θ_k``; the model evaluated after task ``k`` is ``θ_b + scaling·Σ_{j≤k}(θ_j − θ_b)``.
ties             as task-arithmetic, merged with TIES (``density``, ``scaling``).
joint            cumulative joint training: stage ``k`` trains on the union of tasks ``0..k``.
adaptive-sfa     ``chain(optimizer, adaptive_sfa(anchor=θ_{k-1}, threshold, beta, min_p, total_steps=T_k))``.
multi-anchor-sfa SFA whose anchor is the running mean ``(1/k)·Σ_{j<k} θ_j`` of the past tasks' ends
                 (averaging toward each with weight ``β/k`` is averaging toward their mean with ``β``).
magmax           as task-arithmetic, but task ``k ≥ 1`` trains from ``θ_{k-1}`` as trained (sequential
                 fine-tuning); the model evaluated after task ``k`` is ``θ_b + scaling·τ_max``, per entry
                 ``τ_max`` the ``θ_j − θ_b`` (``j ≤ k``) of largest magnitude.
cofima           fine-tune from the previous merge ``θ*_{k-1}``, then ``θ*_k ← fisher_merge([θ*_{k-1},
                 θ_k], [F*, F_k], weights=(beta, 1 − beta))`` and ``F* ← gamma·F* + F_k``.
si               ``chain(si(strength, damping), optimizer)``: ``strength/2·Σ Ω·(θ − θ_{k-1})²``, ``Ω`` the
                 past tasks' path integrals of ``−g·Δθ`` over their squared travel ``+ damping``.
mas              ``chain(ewc(Ω, strength, anchor=θ_{k-1}), optimizer)``, ``Ω`` the sum over past tasks of
                 the mean per-example ``|∂‖f(x)‖²/∂θ|`` on their training inputs.
ewc-offline      ``chain(ewc(S, strength, anchor=θ̄), optimizer)``: one penalty per past task, ``S = Σ_j F_j``
                 and ``θ̄`` the ``F``-weighted mean of their ends ``θ_j``.
lwf              the loss adds ``alpha`` times the distillation of ``θ_{k-1}``'s softened outputs on
                 the batch (temperature ``T``).
derpp            the loss adds ``alpha·MSE`` to the logits and ``beta·CE`` to the labels of two draws
                 from a reservoir buffer of ``buffer_size`` examples, filled in the step.
agem             ``chain(agem(), optimizer)``: each gradient projected against the gradient of a
                 reference batch from ``memory_per_task`` examples of every past task.
================ ========================================================================================

A method of your own is a subclass with a ``name``, its ``hyperparams`` and the hooks it needs;
:func:`register_method` adds it to the registry, and :func:`make_method` also takes an import path
``'package.module:Class'`` (the command line's ``--method`` does too). This module imports only the
standard library at load time, so the command line checks method names and ranges without loading
JAX; the hooks import what they use.

Example:
  >>> import optax
  >>> from sfa_jax.engine import methods
  >>> class SmoothedUpdates(methods.Method):
  ...   '''The optimizer's updates smoothed by an exponential moving average.'''
  ...   name = 'smoothed-updates'
  ...   decay = methods.Hyperparam(0.9, methods.Interval(0.0, 1.0, high_open=True))
  ...   hyperparams = {'decay': decay}
  ...   def transform(self, optimizer):
  ...     return optax.chain(optimizer, optax.ema(self['decay']))
  >>> SmoothedUpdates(decay=0.5).label
  'smoothed-updates(decay=0.5)'
  >>> methods.make_method('sfa', p=0.5)
  SFA(beta=0.25, p=0.5)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
  import numpy as np
  import optax

  from sfa_jax import tasks as tasks_lib

__all__ = [
    'Interval', 'UNIT', 'UNIT_OPEN_LOW', 'NON_NEGATIVE', 'Hyperparam', 'Boundary', 'BatchPlan',
    'Method', 'Finetune', 'SFA', 'MultiAnchorSFA', 'AdaptiveSFA', 'L2', 'EWC', 'Replay', 'ExperienceReplay', 'Joint',
    'WiseFT', 'TaskArithmetic', 'TIES', 'MagMax', 'CoFiMA', 'register_method', 'registered', 'method_class',
    'make_method', 'SI', 'MAS', 'EWCOffline',
    'StepBatch', 'StepModel', 'StepSpec', 'step_state', 'with_step_state', 'has_step_hooks', 'LwF', 'DERpp',
    'AGEM',
]


@dataclasses.dataclass(frozen=True)
class Interval:
  """The values a hyper-parameter may take: from ``low`` to ``high``, each end open or closed.

  Example:
    >>> p = Interval(0.0, 1.0, low_open=True)
    >>> str(p), 0.0 in p, 1.0 in p, float('nan') in p
    ('(0, 1]', False, True, False)
  """

  low: float
  high: float
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below  # both False for NaN

  def __str__(self) -> str:
    return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


UNIT = Interval(0.0, 1.0)
UNIT_OPEN_LOW = Interval(0.0, 1.0, low_open=True)
NON_NEGATIVE = Interval(0.0, math.inf, high_open=True)
"""Common ranges of hyper-parameters: ``[0, 1]``, ``(0, 1]`` and ``[0, ∞)``."""


@dataclasses.dataclass(frozen=True)
class Hyperparam:
  """A hyper-parameter of a method: its default, its range, and whether a sweep may vary it.

  Attributes:
    default: the value when none is given.
    interval: the values allowed.
    sweepable: ``False`` when the configurations of one sweep must share it (it changes the
      number of steps or the shapes of the run, as replay's ``ratio`` does).
    doc: a short description for help texts.

  Example:
    >>> from sfa_jax.engine import methods
    >>> below_one = methods.Interval(0.0, 1.0, high_open=True)
    >>> decay = methods.Hyperparam(0.9, below_one, doc='EMA decay')
    >>> decay.default, str(decay.interval), decay.sweepable
    (0.9, '[0, 1)', True)
  """

  default: float
  interval: Interval
  sweepable: bool = True
  doc: str = ''


class Boundary(NamedTuple):
  """What a method's task-boundary hooks know about the task.

  Attributes:
    task_index: the task (0-based).
    num_tasks: the stream's length.
    total_steps: the task's number of optimizer steps (SFA's ``T``).
    fisher: ``fisher(state) -> tree``, the empirical diagonal Fisher of ``state.params`` on this
      task's training data, computed by the engine with its model and loss (EWC uses it).
    mas_importance: ``mas_importance(state) -> tree``, MAS's importance of ``state.params`` on this
      task's training inputs (:func:`sfa_jax.fisher.mas_importance`), computed by the engine with
      its model (MAS uses it); ``None`` where none is given.

  Example:
    >>> from sfa_jax.engine import methods
    >>> boundary = methods.Boundary(task_index=1, num_tasks=5, total_steps=62, fisher=None)
    >>> boundary.task_index + 1 == boundary.num_tasks  # the last task?
    False
  """

  task_index: int
  num_tasks: int
  total_steps: int
  fisher: Callable[[Any], Any]
  mas_importance: Callable[[Any], Any] | None = None


class BatchPlan(NamedTuple):
  """The data a task trains on: its examples and, for replay, a memory mixed into every batch.

  Attributes:
    data: the task's examples (:class:`sfa_jax.tasks.Split`) with the task id of each.
    task_ids: int32 array, one task id per example of ``data``.
    replay: the memory's examples, or ``None``.
    replay_ids: the memory's task ids, or ``None``.
    replay_size: how many examples of each batch come from the memory (0 without one).
    memory_apart: the memory's ``replay_size`` examples are a batch of their own, drawn beside the
      task's whole batch (A-GEM's reference batch), not a share of it: the step gets them as
      :attr:`StepBatch.memory` and trains on ``batch_size`` examples of the task.
    memory_added: the memory's ``replay_size`` examples are drawn beside the task's whole batch
      and trained on with it: each step trains on ``batch_size + replay_size`` examples
      (:class:`ExperienceReplay`). At most one of ``memory_apart`` and ``memory_added``.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import methods
    >>> data = tasks.Split(np.zeros((6, 2), np.float32), np.arange(6) % 2)
    >>> plan = methods.BatchPlan(data, task_ids=np.zeros(6, np.int32))  # task 0's own data
    >>> plan.replay is None, plan.replay_size
    (True, 0)
  """

  data: Any
  task_ids: Any
  replay: Any = None
  replay_ids: Any = None
  replay_size: int = 0
  memory_apart: bool = False
  memory_added: bool = False

  def task_share(self, batch_size: int) -> int:
    """How many of the task's examples each step of ``batch_size`` trains on.

    Raises:
      ValueError: when the plan both keeps its memory apart and adds it to the batch.
    """
    if self.memory_apart and self.memory_added:
      raise ValueError('a BatchPlan keeps its memory apart (memory_apart) or trains on it with the batch '
                       '(memory_added), not both.')
    return batch_size if self.memory_apart or self.memory_added else batch_size - self.replay_size


class StepBatch(NamedTuple):
  """A train step's batch as a method's step hooks see it (:meth:`Method.step_loss`).

  Attributes:
    x: the inputs the step trains on.
    y: their targets.
    mask: bool, the valid examples.
    task_ids: int32, each example's task.
    memory: ``(x, y, task_ids)`` of the memory's batch drawn beside it when the method's
      :class:`BatchPlan` keeps its memory apart (A-GEM's reference batch), else ``None``.

  Example:
    >>> import numpy as np
    >>> from sfa_jax.engine import methods
    >>> batch = methods.StepBatch(np.zeros((4, 2)), np.zeros(4, np.int32), np.ones(4, bool),
    ...                           np.zeros(4, np.int32))
    >>> batch.memory is None
    True
  """

  x: Any
  y: Any
  mask: Any
  task_ids: Any
  memory: Any = None


class StepModel(NamedTuple):
  """The model and the objective as pure functions, for a method's step hooks.

  Attributes:
    apply: ``apply(params, x, task_ids) -> outputs``: the model in training mode with the step's
      model state (what it would update, BatchNorm's statistics, is dropped).
    evaluate: ``evaluate(params, model_state, x, task_ids) -> outputs``: the model in evaluation
      mode (another model's outputs: LwF's previous one).
    loss: the objective's ``loss(outputs, targets, mask) -> (loss, metric)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods, objectives
    >>> linear = lambda params, x, ids: x @ params
    >>> model = methods.StepModel(linear, None, objectives.CLASSIFICATION.loss)
    >>> outputs = model.apply(jnp.eye(2), jnp.array([[3.0, 0.0]]), None)
    >>> round(float(model.loss(outputs, jnp.array([0]), jnp.ones(1, bool))[0]), 4)
    0.0486
  """

  apply: Callable[..., Any]
  evaluate: Callable[..., Any]
  loss: Callable[..., Any]


class StepSpec(NamedTuple):
  """What :meth:`Method.init_step_state` knows of a run: the shapes of its data and outputs.

  Attributes:
    x: one example's input (a ``jax.ShapeDtypeStruct``, without the batch axis).
    y: one example's target.
    outputs: the model's output for one example.
    task_labels: each task's labels (:attr:`sfa_jax.tasks.Task.labels`; empty where a task has
      none, e.g. text).
    task_heads: whether the model's outputs depend on the task id (one head per task, the
      task-incremental setting), as found on the initial model.
    batch_size: examples per batch.
    seed: the run's seed (a sweep's lane's).

  Example:
    >>> import jax
    >>> from sfa_jax.engine import methods
    >>> x = jax.ShapeDtypeStruct((8,), 'float32')   # one example's input
    >>> y = jax.ShapeDtypeStruct((), 'int32')       # its label
    >>> outputs = jax.ShapeDtypeStruct((4,), 'float32')
    >>> labels = ((0, 1), (2, 3))                   # two tasks of two classes
    >>> spec = methods.StepSpec(x, y, outputs, labels, False, batch_size=32, seed=0)
    >>> len(spec.task_labels), spec.outputs.shape
    (2, (4,))
  """

  x: Any
  y: Any
  outputs: Any
  task_labels: tuple[tuple[int, ...], ...]
  task_heads: bool
  batch_size: int
  seed: int


STEP_STATE = 'step_state'
"""The key of a method's extras (a dict) that holds its step state (:meth:`Method.init_step_state`)."""


def step_state(extras: Any) -> Any:
  """The step state kept in a method's ``extras`` (:data:`STEP_STATE`), or ``None``.

  Example:
    >>> step_state({'fisher': 1.0}), step_state({'fisher': 1.0, 'step_state': 2.0})
    (None, 2.0)
  """
  return extras.get(STEP_STATE) if isinstance(extras, Mapping) else None


def with_step_state(extras: Any, state: Any) -> dict[str, Any]:
  """``extras`` with its step state replaced by ``state``.

  Raises:
    TypeError: when ``extras`` is not a dict (a method with a step state keeps its extras in one).

  Example:
    >>> with_step_state({'fisher': 1.0}, 2.0)
    {'fisher': 1.0, 'step_state': 2.0}
  """
  if not isinstance(extras, Mapping):
    raise TypeError(f'a method with a step state keeps its extras in a dict; got {type(extras).__name__}.')
  return {**extras, STEP_STATE: state}


def has_step_hooks(method: Method) -> bool:
  """Whether ``method`` overrides a train-step hook (its steps are its own program).

  Example:
    >>> has_step_hooks(Finetune()), has_step_hooks(LwF())
    (False, True)
  """
  hooks = ('init_step_state', 'step_loss', 'reference_loss', 'after_step')
  return any(getattr(type(method), hook) is not getattr(Method, hook) for hook in hooks)


def _hyperparam_signature(hyperparams: Mapping[str, Hyperparam]) -> inspect.Signature:
  """The signature of a method's constructor: one keyword per hyper-parameter, with its default.

  Each :class:`Method` subclass gets it as ``__signature__``, so ``help()``, an editor and the
  API reference show ``SFA(*, p=0.25, beta=0.25)`` rather than ``SFA(**values)``.

  Args:
    hyperparams: a method's ``hyperparams``.

  Returns:
    The signature, keyword-only parameters in the order of ``hyperparams``.

  Example:
    >>> _hyperparam_signature({'p': Hyperparam(0.25, UNIT_OPEN_LOW), 'beta': Hyperparam(0.5, UNIT)})
    <Signature (*, p: float = 0.25, beta: float = 0.5)>
  """
  return inspect.Signature([  # a spec that is no Hyperparam is refused by register_method
      inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=float,
                        default=getattr(spec, 'default', inspect.Parameter.empty))
      for key, spec in hyperparams.items()
  ])


class Method:
  """Base class of a continual-learning method: hyper-parameters, a transform, boundary hooks.

  Subclasses set ``name`` and ``hyperparams`` and override the hooks they need; every hook has a
  default that does nothing (plain fine-tuning). Instances are immutable, compare equal when the
  class and the values are, and hash, so they key caches and sweeps. The hooks are pure: they
  return a new state. The engine donates the state's arrays to the next train step, so a hook
  that keeps an array beyond its call keeps a copy (``jnp.copy``, ``np.asarray``).

  Args:
    **values: hyper-parameter values; the others take their defaults. Each is checked against
      its :class:`Interval`.

  Raises:
    TypeError: when a value is not a real number.
    ValueError: on an unknown hyper-parameter or a value out of its range (both named).

  Example:
    >>> import optax
    >>> from sfa_jax.engine import methods
    >>> class Clipped(methods.Method):
    ...   '''The optimizer after gradient clipping.'''
    ...   name = 'clipped'
    ...   hyperparams = {'max_norm': methods.Hyperparam(1.0, methods.NON_NEGATIVE)}
    ...   def transform(self, optimizer):
    ...     return optax.chain(optax.clip_by_global_norm(self['max_norm']), optimizer)
    >>> method = Clipped(max_norm=0.5)
    >>> method.label, method.values, method.replace(max_norm=2.0)
    ('clipped(max_norm=0.5)', {'max_norm': 0.5}, Clipped(max_norm=2))
    >>> Clipped(max_norm=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: max_norm must lie in [0, inf); got -1.0.
  """

  name: ClassVar[str] = ''
  hyperparams: ClassVar[Mapping[str, Hyperparam]] = {}
  schedule_is_exact: ClassVar[bool] = False
  """True when :meth:`averaging_schedule` lists exactly the steps on which the :meth:`transform`
  averages: a single run then trains the other steps with ``tx.update(..., may_average=False)``
  (:func:`sfa_jax.sfa` skips reading its anchor). Leave it False unless that holds."""
  boundary_uses: ClassVar[frozenset[str]] = frozenset()
  """The estimates of :class:`Boundary` that the hooks call (``'fisher'``, ``'mas_importance'``): the
  engine compiles their programs while the first task trains. A method that calls one it does not
  name gets the same values, its first call compiling them."""

  def __init_subclass__(cls, **kwargs: Any):
    super().__init_subclass__(**kwargs)
    cls.__signature__ = _hyperparam_signature(cls.hyperparams)

  def __init__(self, **values: float):
    unknown = sorted(set(values) - set(self.hyperparams))
    if unknown:
      allowed = ', '.join(self.hyperparams) or 'none'
      raise ValueError(f'method {self.name!r} takes no hyper-parameter {unknown}; it takes: {allowed}.')
    checked = {}
    for key, spec in self.hyperparams.items():
      value = values.get(key, spec.default)
      if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, '__float__'):
        raise TypeError(f'{key} must be a real number; got {value!r}.')
      value = float(value)
      if value not in spec.interval:
        raise ValueError(f'{key} must lie in {spec.interval}; got {value}.')
      checked[key] = value
    object.__setattr__(self, '_values', tuple(sorted(checked.items())))

  def __setattr__(self, key: str, value: Any) -> None:
    raise AttributeError(f'{type(self).__name__} is immutable: make a new one, e.g. with replace().')

  @property
  def values(self) -> dict[str, float]:
    """The hyper-parameters, by name."""
    return dict(self._values)

  def __getitem__(self, key: str) -> float:
    return self.values[key]

  def replace(self, **values: float) -> Method:
    """A copy with some hyper-parameters changed (and checked)."""
    return type(self)(**(self.values | values))

  @property
  def label(self) -> str:
    """A short readable label, e.g. ``'sfa(beta=0.25, p=0.25)'``."""
    if not self._values:
      return self.name
    return f"{self.name}({', '.join(f'{k}={v:g}' for k, v in self._values)})"

  def __eq__(self, other: object) -> bool:
    return type(other) is type(self) and other._values == self._values

  def __hash__(self) -> int:
    return hash((type(self), self._values))

  def __repr__(self) -> str:
    return f"{type(self).__name__}({', '.join(f'{k}={v:g}' for k, v in self._values)})"

  # -- hooks ---------------------------------------------------------------------------------

  def transform(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """The method's Optax chain around ``optimizer``; on task 0 it must act as ``optimizer``.

    Its hyper-parameters should be fields of the state (as :func:`sfa_jax.sfa` keeps them) so that
    the configurations of a sweep share one compiled step.
    """
    return optimizer

  def init_extras(self, params: Any, model_state: Any, num_tasks: int) -> Any:
    """The arrays the method keeps across tasks, with the structure they keep for the whole run.

    The engine checkpoints them with the run and restores them into this structure.
    """
    return {}

  def batch_plan(self, tasks: Sequence[tasks_lib.Task], task_index: int, batch_size: int, seed: int) -> BatchPlan:
    """The examples task ``task_index`` trains on (default: its own training set)."""
    return _own_data(tasks[task_index])

  def data_key(self) -> Any:
    """What, besides the seed and the shared settings, decides this method's batches (replay's memory)."""
    return None

  def start_task(self, state: Any, boundary: Boundary) -> Any:
    """The run state a task starts from, before the optimizer state is reset (default: unchanged)."""
    return state

  def prepare_optimizer(self, opt_state: Any, state: Any, boundary: Boundary) -> Any:
    """The optimizer state for the task, after its reset: anchors, ``T``, Fisher (default: unchanged)."""
    return opt_state

  def end_task(self, state: Any, boundary: Boundary) -> Any:
    """The run state after the task: the model evaluated and carried on (merges), the method's extras."""
    return state

  def averaging_schedule(self, task_index: int, total_steps: int) -> np.ndarray | None:
    """Whether the method averages after each step ``0 .. T + 1`` of a task, known ahead.

    A boolean array of ``total_steps + 2`` entries (:func:`checked_schedule` checks it before the
    task's first step). ``None`` means the averages are decided on the device: the engine reads
    :meth:`averaged` from the optimizer state after every step. The default never averages.
    """
    import numpy as np

    return np.zeros(total_steps + 2, bool)

  def averaged(self, opt_state: Any) -> Any:
    """Whether the latest update averaged, from the state (only called when the schedule is ``None``)."""
    raise NotImplementedError(f'{type(self).__name__} returns no averaging schedule, so it must define averaged().')

  # -- train-step hooks: what the compiled step computes beside the loss (LwF, DER++, A-GEM) ------
  # Traced once per program and shared by a sweep's lanes: the hyper-parameters they use are
  # arrays of the step state, never Python numbers of ``self``.

  def init_step_state(self, params: Any, model_state: Any, spec: StepSpec) -> Any:
    """The arrays the train step reads and updates, or ``None`` (the default: it reads none).

    Kept in the extras (:func:`step_state`, checkpointed with them, one structure for the whole
    run): the loop passes them into every compiled step and keeps what :meth:`after_step` returns.
    The boundary hooks may replace them (:func:`with_step_state`).
    """
    return None

  def step_loss(self, params: Any, outputs: Any, batch: StepBatch, step_state: Any, model: StepModel) -> Any:
    """A term added to the step's loss and differentiated with it, or ``None`` (the default).

    Args:
      params: the params being differentiated (all of them, the frozen ones merged in).
      outputs: the model's outputs on ``batch.x`` (a function of ``params``).
      batch: the step's :class:`StepBatch`.
      step_state: the step state.
      model: the :class:`StepModel`.

    The step reports the objective's loss on the batch alone, as for the penalties of the
    transforms (L2, EWC).
    """
    return None

  def reference_loss(self, params: Any, batch: StepBatch, step_state: Any, model: StepModel) -> Any:
    """A loss whose gradient reaches the transform as the extra argument ``reference_grads``, or
    ``None`` (the default: no extra argument). A-GEM's: the loss on the memory's batch."""
    return None

  def after_step(self, step_state: Any, batch: StepBatch, outputs: Any) -> Any:
    """The step state after the step; ``outputs`` are the batch's outputs before the update
    (DER++ stores them in its buffer). The default returns it unchanged."""
    return step_state


def checked_schedule(method: Method, task_index: int, total_steps: int) -> np.ndarray | None:
  """``method.averaging_schedule(task_index, total_steps)``, checked before the task's first step.

  Args:
    method: the method.
    task_index: the task.
    total_steps: the task's number of steps ``T``.

  Returns:
    ``None`` (the averages are decided on the device), or the schedule as a NumPy boolean array
    of shape ``(T + 2,)``.

  Raises:
    TypeError: when the schedule is not boolean (the method and the task are named).
    ValueError: when it does not have ``T + 2`` entries, one per step ``0 .. T + 1`` (the method,
      the task and the expected length are named).

  Example:
    >>> import numpy as np
    >>> class Short(Finetune):
    ...   def averaging_schedule(self, task_index, total_steps):
    ...     return np.zeros(total_steps, bool)
    >>> checked_schedule(Short(), 1, 10)
    Traceback (most recent call last):
    ...
    ValueError: finetune's averaging_schedule(1, 10) for task 1 has shape (10,); it must have 12 entries, one per step 0 .. T + 1 (T = 10).
  """
  import numpy as np

  schedule = method.averaging_schedule(task_index, total_steps)
  if schedule is None:
    return None
  where = f"{method.label}'s averaging_schedule({task_index}, {total_steps}) for task {task_index}"
  array = np.asarray(schedule)
  if array.dtype != np.bool_:
    raise TypeError(f'{where} must be a boolean array (or None); got {array.dtype} values.')
  if array.shape != (total_steps + 2,):
    raise ValueError(f'{where} has shape {array.shape}; it must have {total_steps + 2} entries, one per step '
                     f'0 .. T + 1 (T = {total_steps}).')
  return array


def _own_data(task: tasks_lib.Task) -> BatchPlan:
  import numpy as np

  return BatchPlan(task.train, np.full(len(task.train.y), task.index, np.int32))


def _concat(plans: Sequence[BatchPlan]) -> tuple[Any, Any]:
  import numpy as np

  from sfa_jax import tasks as tasks_lib

  data = tasks_lib.Split(np.concatenate([p.data.x for p in plans]), np.concatenate([p.data.y for p in plans]))
  return data, np.concatenate([p.task_ids for p in plans])


def _copy(tree: Any) -> Any:
  from sfa_jax import _validation  # imports JAX: only when a hook runs

  return _validation.copy_tree(tree)


def _zeros_like(tree: Any) -> Any:
  """Zeros like every leaf of ``tree``, by one program (not one per leaf shape)."""
  return _zeros_program()(tree)


@functools.cache
def _zeros_program() -> Callable[[Any], Any]:
  import jax  # imports JAX: only when a method's extras are made
  import jax.numpy as jnp

  from sfa_jax import _lazy
  from sfa_jax.engine import stored

  return stored.StoredProgram(('zeros_like',), lambda: jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree)),
                              compiler_options=_lazy.EXACT)


@functools.cache
def _schedule_program() -> Callable[..., Any]:
  """:func:`sfa_jax.is_averaging_step` as one program, not one per operation (``p`` is checked when the method is made)."""
  import jax

  from sfa_jax import transforms

  return jax.jit(transforms.is_averaging_step)


def task_seed(seed: int, task_index: int) -> int:
  """The seed of task ``task_index``'s data order and memory, for a run seeded ``seed``."""
  return seed * 1000 + task_index


# ------------------------------------------------------------------------------------------------
# The built-in methods.


class Finetune(Method):
  """Plain sequential fine-tuning: each task starts from the end of the previous one.

  No hyper-parameter: the optimizer alone, the lower bound every method is compared with.

  Example:
    >>> import optax
    >>> from sfa_jax.engine import methods
    >>> optimizer = optax.adam(1e-3)
    >>> methods.Finetune().transform(optimizer) is optimizer, methods.Finetune().label
    (True, 'finetune')
  """

  name = 'finetune'


class SFA(Method):
  """Sequential Fine-tuning with Averaging: every ``p·T`` steps ``θ ← β·θ_{k-1} + (1−β)·θ``.

  The chain ``optax.chain(optimizer, sfa_jax.sfa(p=p, beta=beta))``, re-anchored at each task's
  start on the end of the previous task (:func:`sfa_jax.reanchor`) with the task's ``T``.

  Args:
    p: the averaging period as a fraction of the task's steps ``T``, in ``(0, 1]`` (default
      0.25: four averages per task; 1: one, at the task's end).
    beta: the weight of the anchor ``θ_{k-1}`` in each average, in ``[0, 1]`` (default 0.25).

  Example:
    >>> from sfa_jax.engine import methods
    >>> method = methods.SFA(p=0.5, beta=0.5)
    >>> method, method.label
    (SFA(beta=0.5, p=0.5), 'sfa(beta=0.5, p=0.5)')
    >>> schedule = method.averaging_schedule(1, 4)  # task 1, of 4 steps
    >>> schedule.nonzero()[0].tolist()  # averages after steps 2 and 4
    [2, 4]

    Train it with :func:`~sfa_jax.engine.run_sequence` (or ``engine.make_method('sfa', p=0.5)``).

  References:
    Kleiman et al, `Soup to go: mitigating forgetting during continual learning with model
    averaging <https://arxiv.org/abs/2501.05559>`_, 2025
  """

  name = 'sfa'
  schedule_is_exact = True  # averaging_schedule is transforms.is_averaging_step of the transform's p and T
  hyperparams = {
      'p': Hyperparam(0.25, UNIT_OPEN_LOW, doc='averaging period, as a fraction of the task'),
      'beta': Hyperparam(0.25, UNIT, doc='weight of the anchor in each average'),
  }

  def transform(self, optimizer):
    import optax

    from sfa_jax import transforms

    return optax.chain(optimizer, transforms.sfa(p=self['p'], beta=self['beta'], total_steps=1, wait_for_anchor=True))

  def anchor(self, state: Any, boundary: Boundary) -> Any:
    """The params SFA pulls toward on this task: the end of the previous task."""
    return state.params

  def prepare_optimizer(self, opt_state, state, boundary):
    if boundary.task_index == 0:
      return opt_state
    from sfa_jax import anchors

    return anchors.reanchor(opt_state, self.anchor(state, boundary), total_steps=boundary.total_steps)

  def averaging_schedule(self, task_index, total_steps):
    import numpy as np

    steps = np.arange(total_steps + 2)
    if task_index == 0:
      return np.zeros(len(steps), bool)
    return np.asarray(_schedule_program()(steps, self['p'], total_steps))


class MultiAnchorSFA(SFA):
  """SFA toward the running mean of the checkpoints at the ends of all past tasks.

  Averaging toward each past end ``θ_j`` with weight ``β/k`` is averaging toward their mean with
  ``β``: the anchor of task ``k`` is ``(1/k)·Σ_{j<k} θ_j``, kept in the run's extras.

  Args:
    p: the averaging period as a fraction of the task's steps, in ``(0, 1]`` (default 0.25).
    beta: the weight of the mean anchor in each average, in ``[0, 1]`` (default 0.25).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.MultiAnchorSFA(p=0.5)
    >>> params = {'w': jnp.zeros(1)}
    >>> state = RunState(params, {}, None, method.init_extras(params, {}, 3))
    >>> for k, end in ((1, 3.0), (2, 5.0)):  # the ends of tasks 0 and 1: 3, then 5
    ...   boundary = methods.Boundary(k, num_tasks=3, total_steps=4, fisher=None)
    ...   state = state._replace(params={'w': jnp.full(1, end)})
    ...   state = method.start_task(state, boundary)
    >>> method.anchor(state, boundary)['w'].tolist()  # task 2 pulls toward (3 + 5) / 2
    [4.0]
  """

  name = 'multi-anchor-sfa'

  def init_extras(self, params, model_state, num_tasks):
    return {'mean_anchor': _copy(params)}

  def start_task(self, state, boundary):
    k = boundary.task_index
    if k == 0:
      return state
    from sfa_jax import merging

    previous = state.params if k == 1 else state.extras['mean_anchor']
    return state._replace(extras={'mean_anchor': merging.interpolate(previous, state.params, (k - 1) / k)})

  def anchor(self, state, boundary):
    return state.extras['mean_anchor']


class AdaptiveSFA(SFA):
  """SFA that averages when the drift from the anchor reaches ``threshold·‖θ_{k-1}‖`` (:mod:`sfa_jax.adaptive`).

  Args:
    threshold: the drift ``‖θ − θ_{k-1}‖`` that triggers an average, relative to ``‖θ_{k-1}‖``,
      at least 0 (default 0.1).
    beta: the weight of the anchor in each average, in ``[0, 1]`` (default 0.25).
    min_p: the fewest steps between two averages, as a fraction of the task, in ``(0, 1]``
      (default 0.1).

  Example:
    >>> from sfa_jax.engine import methods
    >>> method = methods.AdaptiveSFA(threshold=0.2)
    >>> method  # its averages are decided on the device, step by step
    AdaptiveSFA(beta=0.25, min_p=0.1, threshold=0.2)
    >>> method.averaging_schedule(1, 10) is None
    True
  """

  name = 'adaptive-sfa'
  schedule_is_exact = False  # its averages are decided on the device
  hyperparams = {
      'threshold': Hyperparam(0.1, Interval(0.0, math.inf), doc='relative drift that triggers an average'),
      'beta': Hyperparam(0.25, UNIT, doc='weight of the anchor in each average'),
      'min_p': Hyperparam(0.1, UNIT_OPEN_LOW, doc='fewest steps between two averages, as a fraction of the task'),
  }

  def transform(self, optimizer):
    import optax

    from sfa_jax import adaptive

    return optax.chain(optimizer, adaptive.adaptive_sfa(
        threshold=self['threshold'], beta=self['beta'], min_p=self['min_p'], total_steps=1, wait_for_anchor=True))

  def averaging_schedule(self, task_index, total_steps):
    return None

  def averaged(self, opt_state):
    from sfa_jax import adaptive
    from sfa_jax import anchors

    return anchors.find_state(opt_state, adaptive.AdaptiveSFAState).averaged


class L2(Method):
  """An L2 penalty ``strength/2·‖θ − θ_{k-1}‖²`` toward the end of the previous task.

  The chain ``optax.chain(sfa_jax.l2(strength), optimizer)``: the penalty's gradient is added
  before the optimizer sees the gradients; task 0 trains without it.

  Args:
    strength: λ of the penalty, at least 0 (default 1.0).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.L2(strength=0.1)
    >>> tx = method.transform(optax.sgd(1.0))
    >>> params = {'w': jnp.ones(2)}
    >>> boundary = methods.Boundary(task_index=1, num_tasks=2, total_steps=10, fisher=None)
    >>> end_of_task_0 = RunState({'w': jnp.zeros(2)}, {}, None, {})
    >>> opt_state = method.prepare_optimizer(tx.init(params), end_of_task_0, boundary)
    >>> updates, _ = tx.update({'w': jnp.zeros(2)}, opt_state, params)
    >>> [round(u, 6) for u in updates['w'].tolist()]  # -lr·λ·(θ − θ_0)
    [-0.1, -0.1]
  """

  name = 'l2'
  hyperparams = {'strength': Hyperparam(1.0, NON_NEGATIVE, doc='λ of the penalty')}

  def transform(self, optimizer):
    import optax

    from sfa_jax import transforms

    return optax.chain(transforms.l2(self['strength'], wait_for_anchor=True), optimizer)

  def prepare_optimizer(self, opt_state, state, boundary):
    if boundary.task_index == 0:
      return opt_state
    from sfa_jax import anchors

    return anchors.reanchor(opt_state, state.params)


class _WeightedPenalty(Method):
  """The methods whose penalty is ``strength/2·Σ w·(θ − θ_a)²``, with ``w`` kept in the run's extras.

  From task 1 on, a task trains with ``chain(ewc(w, strength, anchor=θ_a), optimizer)``: ``w`` is
  the extras' :attr:`weights_key` tree (EWC's Fisher, MAS's importance, offline EWC's Fisher sum),
  filled by the subclass's ``end_task``, and ``θ_a`` is :meth:`_anchor` (the params at the task's
  start unless the subclass keeps another).
  """

  weights_key: ClassVar[str] = 'fisher'
  boundary_uses = frozenset({'fisher'})

  def transform(self, optimizer):
    import optax

    return optax.chain(_ewc_from_zero_fisher(self['strength']), optimizer)

  def init_extras(self, params, model_state, num_tasks):
    return {self.weights_key: _zeros_like(params)}

  def _anchor(self, state):
    return state.params

  def prepare_optimizer(self, opt_state, state, boundary):
    if boundary.task_index == 0:
      return opt_state
    from sfa_jax import anchors

    return anchors.reanchor(opt_state, self._anchor(state), fisher=state.extras[self.weights_key])


class EWC(_WeightedPenalty):
  """Online EWC: ``strength/2·Σ F·(θ − θ_{k-1})²`` with ``F ← γ·F + F_{k-1}`` after each task.

  ``F_{k-1}`` is the empirical diagonal Fisher (per-example squared gradients) of the task just
  trained, computed by the engine on its training data (at most
  :class:`~sfa_jax.engine.TrainConfig`'s ``fisher_examples`` of them).

  Args:
    strength: λ of the penalty, at least 0 (default 100.0).
    gamma: the decay ``γ`` of the past tasks' Fisher, in ``[0, 1]`` (default 1.0: no decay).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.EWC(strength=10.0, gamma=0.5)
    >>> params = {'w': jnp.ones(2)}
    >>> state = RunState(params, {}, None, method.init_extras(params, {}, 3))
    >>> fisher = lambda state: {'w': jnp.full(2, 2.0)}  # each task's Fisher is 2 here
    >>> for k in (0, 1):
    ...   boundary = methods.Boundary(k, num_tasks=3, total_steps=10, fisher=fisher)
    ...   state = method.end_task(state, boundary)
    >>> state.extras['fisher']['w'].tolist()  # 0.5·2 + 2
    [3.0, 3.0]

  References:
    Schwarz et al, `Progress & Compress: A scalable framework for continual learning
    <https://arxiv.org/abs/1805.06370>`_, 2018
  """

  name = 'ewc'
  hyperparams = {
      'strength': Hyperparam(100.0, NON_NEGATIVE, doc='λ of the penalty'),
      'gamma': Hyperparam(1.0, UNIT, doc='decay of the past Fisher'),
  }

  def end_task(self, state, boundary):
    k = boundary.task_index
    if k + 1 == boundary.num_tasks:  # the last task's Fisher has no use
      return state
    from sfa_jax import fisher as fisher_lib

    current = boundary.fisher(state)
    fisher = current if k == 0 else fisher_lib.online_fisher(state.extras['fisher'], current, self['gamma'])
    return state._replace(extras={'fisher': fisher})


def _ewc_from_zero_fisher(strength: float):
  """:func:`sfa_jax.ewc` whose Fisher starts at zero and then lives only in its state.

  ``init`` makes the zeros (no params-sized tree is held by the transform or baked into a compiled
  ``init`` as a constant); :meth:`EWC.prepare_optimizer` puts each task's Fisher into the state.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from sfa_jax import transforms

  def init(params):
    return transforms.ewc(jax.tree.map(jnp.zeros_like, params), strength, wait_for_anchor=True).init(params)

  def update(updates, state, params=None, **extra_args):
    return transforms.ewc(state.fisher, strength).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init, update)


class Replay(Method):
  """Experience replay: ``ratio`` of each batch from a memory of ``fraction`` of every past task.

  The memory of task ``k`` holds ``fraction`` of each past task's training set, stratified by
  class; each batch takes ``round(ratio·batch_size)`` examples from it (at least 1, at most
  ``batch_size - 1``) and the rest from task ``k``. Task 0 trains on whole batches of its own.

  Args:
    fraction: the share of each past task's training set kept, in ``(0, 1]`` (default 0.1).
    ratio: the share of each batch drawn from the memory, in ``(0, 1)`` (default 0.5); the
      configurations of one sweep share it.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import methods
    >>> split = tasks.Split(np.zeros((20, 2), np.float32), np.arange(20) % 2)
    >>> toy = [('a', split, split), ('b', split, split)]
    >>> stream = tasks.stream_of('toy', toy, num_outputs=2)
    >>> method = methods.Replay(fraction=0.5, ratio=0.25)
    >>> plan = method.batch_plan(list(stream), 1, batch_size=8, seed=0)  # task 1
    >>> len(plan.data.y), len(plan.replay.y)  # its 20 examples; 10 of task 0's 20 kept
    (20, 10)
    >>> plan.replay_size  # of each batch of 8
    2
  """

  name = 'replay'
  hyperparams = {
      'fraction': Hyperparam(0.1, UNIT_OPEN_LOW, doc="share of each past task's training set kept"),
      'ratio': Hyperparam(0.5, Interval(0.0, 1.0, low_open=True, high_open=True), sweepable=False,
                          doc='share of each batch taken from the memory'),
  }

  def batch_plan(self, tasks, task_index, batch_size, seed):
    plan = _own_data(tasks[task_index])
    if task_index == 0:
      return plan
    replay, replay_ids = _stratified_memory(tasks[:task_index], self['fraction'], seed)
    size = min(batch_size - 1, max(1, round(self['ratio'] * batch_size)))
    return plan._replace(replay=replay, replay_ids=replay_ids, replay_size=size)

  def data_key(self):
    return self['fraction']


class ExperienceReplay(Method):
  """Experience replay: each step trains on a whole batch of the task and a batch of the memory beside it.

  The memory of task ``k`` holds ``fraction`` of each past task's training set, stratified by
  class (as :class:`Replay`'s). Each step draws ``m = round(memory_ratio·batch_size)`` examples
  of it (at least 1) beside the task's ``batch_size`` and trains on the ``batch_size + m``
  together, so a task takes as many steps as fine-tuning does. With ``memory_ratio=1`` this is
  the experience replay of Chaudhry et al. and Avalanche's ``Replay`` strategy (a memory batch as
  large as the task's); :class:`Replay` gives the memory a share of each batch instead. Task 0
  trains on whole batches of its own.

  Args:
    fraction: the share of each past task's training set kept, in ``(0, 1]`` (default 0.1).
    memory_ratio: the memory batch's size over ``batch_size``, above 0 (default 1.0); it decides
      the step's shapes, so the configurations of one sweep share it.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import methods
    >>> split = tasks.Split(np.zeros((20, 2), np.float32), np.arange(20) % 2)
    >>> toy = [('a', split, split), ('b', split, split)]
    >>> stream = tasks.stream_of('toy', toy, num_outputs=2)
    >>> plan = methods.ExperienceReplay(fraction=0.5).batch_plan(list(stream), 1, batch_size=8, seed=0)
    >>> len(plan.replay.y), plan.replay_size, plan.task_share(8)  # 10 of task 0 kept; 8 beside 8
    (10, 8, 8)

  References:
    Chaudhry et al, `On Tiny Episodic Memories in Continual Learning
    <https://arxiv.org/abs/1902.10486>`_, 2019
  """

  name = 'er'
  hyperparams = {
      'fraction': Hyperparam(0.1, UNIT_OPEN_LOW, doc="share of each past task's training set kept"),
      'memory_ratio': Hyperparam(1.0, Interval(0.0, math.inf, low_open=True, high_open=True), sweepable=False,
                                 doc="the memory batch's size over the batch size"),
  }

  def batch_plan(self, tasks, task_index, batch_size, seed):
    plan = _own_data(tasks[task_index])
    if task_index == 0:
      return plan
    replay, replay_ids = _stratified_memory(tasks[:task_index], self['fraction'], seed)
    size = max(1, round(self['memory_ratio'] * batch_size))
    return plan._replace(replay=replay, replay_ids=replay_ids, replay_size=size, memory_added=True)

  def data_key(self):
    return self['fraction']


def _stratified_memory(past: Sequence[tasks_lib.Task], fraction: float, seed: int) -> tuple[Any, Any]:
  """The replay memory of the ``past`` tasks: ``fraction`` of each one's training set, stratified
  by class (:func:`sfa_jax.tasks.subsample`), and its task ids."""
  from sfa_jax import tasks as tasks_lib

  return _concat([_own_data(dataclasses.replace(t, train=tasks_lib.subsample(t.train, fraction, seed=task_seed(seed, t.index))))
                  for t in past])


class Joint(Method):
  """Cumulative joint training: stage ``k`` trains on the union of tasks ``0..k`` (the upper bound).

  No hyper-parameter. Stage ``k`` takes ``k + 1`` times the steps of a task's epochs.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import methods
    >>> split = tasks.Split(np.zeros((20, 2), np.float32), np.arange(20) % 2)
    >>> toy = [('a', split, split), ('b', split, split)]
    >>> stream = tasks.stream_of('toy', toy, num_outputs=2)
    >>> plan = methods.Joint().batch_plan(list(stream), 1, batch_size=8, seed=0)
    >>> len(plan.data.y), np.bincount(plan.task_ids).tolist()  # tasks 0 and 1 together
    (40, [20, 20])
  """

  name = 'joint'

  def batch_plan(self, tasks, task_index, batch_size, seed):
    data, ids = _concat([_own_data(t) for t in tasks[: task_index + 1]])
    return BatchPlan(data, ids)


class WiseFT(Method):
  """WiSE-FT at every task end: ``θ_k ← interpolate(θ_{k-1}, θ_k, beta)`` (SFA with ``p = 1``).

  Args:
    beta: the weight of the previous task's model ``θ_{k-1}``, in ``[0, 1]`` (default 0.5).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.WiseFT(beta=0.25)
    >>> boundary = methods.Boundary(task_index=1, num_tasks=2, total_steps=10, fisher=None)
    >>> end_of_task_0 = RunState({'w': jnp.zeros(2)}, {}, None, {})  # θ_0 = 0
    >>> state = method.start_task(end_of_task_0, boundary)
    >>> state = state._replace(params={'w': jnp.ones(2)})  # task 1 trained: θ = 1
    >>> method.end_task(state, boundary).params['w'].tolist()  # 0.25·θ_0 + 0.75·θ
    [0.75, 0.75]

  References:
    Wortsman et al, `Robust fine-tuning of zero-shot models <https://arxiv.org/abs/2109.01903>`_, 2022
  """

  name = 'wise-ft'
  hyperparams = {'beta': Hyperparam(0.5, UNIT, doc='weight of the previous task\'s model')}

  def init_extras(self, params, model_state, num_tasks):
    return {'start': _copy((params, model_state))}

  def start_task(self, state, boundary):
    return state._replace(extras={'start': _copy((state.params, state.model_state))})

  def end_task(self, state, boundary):
    if boundary.task_index == 0:
      return state
    from sfa_jax import merging

    params, model_state = merging.interpolate(state.extras['start'], (state.params, state.model_state), self['beta'])
    return state._replace(params=params, model_state=model_state)


class TaskArithmetic(Method):
  """Task arithmetic from the model after task 0: ``θ_b + scaling·Σ_j (θ_j − θ_b)``.

  Each task ``k ≥ 1`` is trained from the base ``θ_b``; the fine-tuned models are kept, one slot
  per task, from the start (the run state keeps one structure).

  Args:
    scaling: the weight of the summed task vectors, at least 0 (default 0.5).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> base = {'w': jnp.zeros(2)}
    >>> finetuned = [{'w': jnp.ones(2)}, {'w': jnp.array([1.0, -1.0])}]
    >>> method = methods.TaskArithmetic(scaling=0.5)
    >>> method.merge(base, finetuned)['w'].tolist()  # 0.5·(τ_1 + τ_2)
    [1.0, 0.0]

  References:
    Ilharco et al, `Editing models with task arithmetic <https://arxiv.org/abs/2212.04089>`_, 2023
  """

  name = 'task-arithmetic'
  hyperparams = {'scaling': Hyperparam(0.5, NON_NEGATIVE, doc='weight of the summed task vectors')}

  def init_extras(self, params, model_state, num_tasks):
    import jax
    import jax.numpy as jnp

    model = (params, model_state)
    slots = jax.tree.map(lambda leaf: jnp.zeros((max(num_tasks - 1, 0), *leaf.shape), leaf.dtype), model)
    return {'base': _copy(model), 'finetuned': slots}

  def start_task(self, state, boundary):
    if boundary.task_index == 0:
      return state
    params, model_state = _copy(state.extras['base'])
    return state._replace(params=params, model_state=model_state)

  def merge(self, base: Any, finetuned: Sequence[Any]) -> Any:
    """The evaluated model from the base and the fine-tuned models so far."""
    from sfa_jax import merging

    return merging.task_arithmetic(base, list(finetuned), self['scaling'])

  def end_task(self, state, boundary):
    import jax

    k = boundary.task_index
    trained = (state.params, state.model_state)
    if k == 0:
      return state._replace(extras={**state.extras, 'base': _copy(trained)})
    slots = jax.tree.map(lambda slot, leaf: slot.at[k - 1].set(leaf), state.extras['finetuned'], trained)
    finetuned = [jax.tree.map(lambda slot, j=j: slot[j], slots) for j in range(k)]
    params, model_state = self.merge(state.extras['base'], finetuned)
    return state._replace(params=params, model_state=model_state, extras={**state.extras, 'finetuned': slots})


class TIES(TaskArithmetic):
  """TIES-merging of the task vectors: trim to ``density``, elect signs, average the agreeing ones.

  Trained as :class:`TaskArithmetic`, merged with :func:`sfa_jax.ties`.

  Args:
    density: the share of each task vector's entries kept (the largest magnitudes), in
      ``(0, 1]`` (default 0.2).
    scaling: the weight of the merged task vector, at least 0 (default 0.5).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> base = {'w': jnp.zeros(2)}
    >>> finetuned = [{'w': jnp.array([1.0, 0.1])}, {'w': jnp.array([3.0, -2.0])}]
    >>> methods.TIES(density=0.5, scaling=1.0).merge(base, finetuned)['w'].tolist()
    [2.0, 0.0]

  References:
    Yadav et al, `TIES-Merging: Resolving Interference When Merging Models
    <https://arxiv.org/abs/2306.01708>`_, 2023
  """

  name = 'ties'
  hyperparams = {
      'density': Hyperparam(0.2, UNIT_OPEN_LOW, doc='share of each task vector kept'),
      'scaling': Hyperparam(0.5, NON_NEGATIVE, doc='weight of the merged task vector'),
  }

  def merge(self, base, finetuned):
    from sfa_jax import merging

    return merging.ties(base, list(finetuned), self['density'], self['scaling'])


class MagMax(TaskArithmetic):
  """MagMax at every task end: sequential fine-tuning, merged by the largest-magnitude task vectors.

  The model after task 0 is the base ``θ_b`` (the paper's pre-trained model). Task ``k ≥ 1`` is
  trained from the end of task ``k-1`` *as trained*, not from its merge (sequential fine-tuning,
  as in the paper: the merges are evaluated, never trained on); the model evaluated after task
  ``k`` is :func:`sfa_jax.magmax` ``(θ_b, [θ_1, ..., θ_k], scaling)``: per entry the task vector
  ``θ_j − θ_b`` of largest magnitude (the later task on ties), times ``scaling``, added to ``θ_b``.
  The trained models are kept, one slot per task, as for :class:`TaskArithmetic`.

  Args:
    scaling: ``λ``, the weight of the selected task vector, at least 0 (default 0.5, the
      paper's).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> base = {'w': jnp.zeros(2)}
    >>> finetuned = [{'w': jnp.array([3.0, -1.0])}, {'w': jnp.array([1.0, -4.0])}]
    >>> methods.MagMax(scaling=0.5).merge(base, finetuned)['w'].tolist()
    [1.5, -2.0]

  References:
    Marczak et al, `MagMax: Leveraging model merging for seamless continual learning
    <https://arxiv.org/abs/2407.06322>`_, 2024
  """

  name = 'magmax'
  hyperparams = {'scaling': Hyperparam(0.5, NON_NEGATIVE, doc='weight of the largest-magnitude task vector')}

  def start_task(self, state, boundary):
    k = boundary.task_index
    if k < 2:  # task 1 trains from the base, the end of task 0, which no merge changed
      return state
    import jax

    params, model_state = jax.tree.map(lambda slot: slot[k - 2], state.extras['finetuned'])  # slices: new arrays
    return state._replace(params=params, model_state=model_state)

  def merge(self, base, finetuned):
    from sfa_jax import merging

    return merging.magmax(base, list(finetuned), self['scaling'])


class CoFiMA(Method):
  """Continual Fisher-weighted model averaging: at every task end, the previous model and the trained
  one averaged with their Fishers.

  With ``θ*_{k-1}`` the model task ``k ≥ 1`` started from (the previous merge) and ``θ_k`` the
  trained one, the model evaluated after the task, and trained on by the next, is

  .. math::

    \\theta^*_k = \\frac{\\beta F^*_{k-1} \\odot \\theta^*_{k-1} + (1 - \\beta) F_k \\odot \\theta_k}
                       {\\beta F^*_{k-1} + (1 - \\beta) F_k}

  (:func:`sfa_jax.fisher_merge` of ``[θ*_{k-1}, θ_k]`` with weights ``(β, 1 − β)``, both Fishers
  floored at 1e-6: an entry without Fisher information takes the plain average
  ``β·θ*_{k-1} + (1 − β)·θ_k``, the paper's CoMA; ``β = 0`` keeps the trained model, up to
  rounding). ``F_k`` is the empirical diagonal Fisher of ``θ_k`` on task ``k``'s training data,
  computed by the engine as for :class:`EWC` (at most :class:`~sfa_jax.engine.TrainConfig`'s
  ``fisher_examples`` examples); the running Fisher ``F*_k = γ·F*_{k-1} + F_k`` (``F*_0 = F_0``)
  is kept in the run's extras. ``γ = 0``, as in CoFiMA, weighs the previous model by the previous
  task's Fisher alone; ``γ = 1`` by the sum over all past tasks (online EWC's Fisher). The model
  state (BatchNorm statistics), which has no Fisher, is interpolated with ``β``.

  CoFiMA's code writes ``α = 1 − β`` (``wt_alpha = 0.4``), squares mini-batch gradients for its
  Fisher and caps it at 1e-4, and floors no Fisher (``0/0`` where both vanish).

  Args:
    beta: the weight ``β`` of the previous model, in ``[0, 1]`` (default 0.6: CoFiMA's
      ``α = 0.4`` on the trained model).
    gamma: the decay ``γ`` of the past tasks' Fisher, in ``[0, 1]`` (default 0: the previous
      task's Fisher alone, as in CoFiMA).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.CoFiMA(beta=0.5)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = RunState(params, {}, None, method.init_extras(params, {}, 2))
    >>> fishers = iter([{'w': jnp.array([3.0, 1.0])}, {'w': jnp.array([1.0, 3.0])}])
    >>> fisher = lambda state: next(fishers)  # task 0's Fisher, then task 1's
    >>> for k, trained in ((0, 0.0), (1, 4.0)):  # θ_0 = 0, then θ_1 = 4
    ...   boundary = methods.Boundary(k, num_tasks=2, total_steps=10, fisher=fisher)
    ...   state = method.start_task(state, boundary)
    ...   state = state._replace(params={'w': jnp.full(2, trained)})
    ...   state = method.end_task(state, boundary)
    >>> state.params['w'].tolist()  # (3·0 + 1·4) / (3 + 1) and (1·0 + 3·4) / (1 + 3)
    [1.0, 3.0]

  References:
    Marouf et al, `Weighted ensemble models are strong continual learners
    <https://arxiv.org/abs/2312.08977>`_, 2024

    Matena & Raffel, `Merging models with Fisher-weighted averaging
    <https://arxiv.org/abs/2111.09832>`_, 2022
  """

  name = 'cofima'
  hyperparams = {
      'beta': Hyperparam(0.6, UNIT, doc="weight of the previous model (CoFiMA's 1 − α)"),
      'gamma': Hyperparam(0.0, UNIT, doc='decay of the past Fisher'),
  }
  boundary_uses = frozenset({'fisher'})

  def init_extras(self, params, model_state, num_tasks):
    return {'start': _copy((params, model_state)), 'fisher': _zeros_like(params)}

  def start_task(self, state, boundary):
    return state._replace(extras={**state.extras, 'start': _copy((state.params, state.model_state))})

  def merge(self, previous: Any, trained: Any, previous_fisher: Any, fisher: Any) -> Any:
    """The model after a task: the ``(params, model_state)`` pairs ``previous`` and ``trained``
    averaged, the params with their Fishers, the model state with ``beta``."""
    from sfa_jax import merging

    beta = self['beta']
    params = merging.fisher_merge([previous[0], trained[0]], [previous_fisher, fisher], [beta, 1.0 - beta],
                                  favor_first=False)
    return params, merging.interpolate(previous[1], trained[1], beta)

  def end_task(self, state, boundary):
    current = boundary.fisher(state)
    if boundary.task_index == 0:
      return state._replace(extras={**state.extras, 'fisher': current})
    from sfa_jax import fisher as fisher_lib

    previous_fisher = state.extras['fisher']
    params, model_state = self.merge(state.extras['start'], (state.params, state.model_state), previous_fisher, current)
    fisher = fisher_lib.online_fisher(previous_fisher, current, self['gamma'])
    return state._replace(params=params, model_state=model_state, extras={**state.extras, 'fisher': fisher})


# ------------------------------------------------------------------------------------------------
# Importance-weighted penalties: SI, MAS and offline EWC.


class SI(Method):
  """Synaptic Intelligence: ``strength/2·Σ Ω·(θ − θ_{k-1})²``, ``Ω`` the tasks' path integrals.

  The chain ``optax.chain(sfa_jax.si(strength, damping), optimizer)``: during each task the
  transform sums ``ω = −Σ_t g_t·(θ_{t+1} − θ_t)``, the gradient of the task's loss times the step
  the optimizer took; at the task's end ``Ω ← max(0, Ω + ω / ((θ_k − θ_{k-1})² + damping))``
  (:func:`sfa_jax.si`). Task 0 trains without the penalty. ``Ω`` is kept in the run's extras, so
  the optimizer's reset at each task start keeps it.

  Args:
    strength: λ of the penalty, at least 0 (default 2.0: the paper's ``c = 1``, as
      ``strength = 2c``).
    damping: ξ, which bounds Ω where a parameter hardly moved, above 0 (default 0.1).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.SI(strength=1.0, damping=0.1)
    >>> tx = method.transform(optax.sgd(0.5))
    >>> params = {'w': jnp.zeros(2)}
    >>> extras = method.init_extras(params, {}, 2)
    >>> state = RunState(params, {}, tx.init(params), extras)
    >>> for _ in range(2):  # task 0: two steps on the gradient 1
    ...   grads = {'w': jnp.ones(2)}
    ...   updates, opt_state = tx.update(grads, state.opt_state, state.params)
    ...   params = optax.apply_updates(state.params, updates)
    ...   state = state._replace(params=params, opt_state=opt_state)
    >>> boundary = methods.Boundary(0, num_tasks=2, total_steps=2, fisher=None)
    >>> state = method.end_task(state, boundary)
    >>> importance = state.extras['importance']['w']  # ω = 1, Δ = -1: 1 / 1.1
    >>> [round(x, 4) for x in importance.tolist()]
    [0.9091, 0.9091]

  References:
    Zenke, Poole and Ganguli, `Continual learning through synaptic intelligence
    <https://arxiv.org/abs/1703.04200>`_, 2017
  """

  name = 'si'
  hyperparams = {
      'strength': Hyperparam(2.0, NON_NEGATIVE, doc='λ of the penalty (2c of the paper)'),
      'damping': Hyperparam(0.1, Interval(0.0, math.inf, low_open=True, high_open=True),
                            doc='ξ, the damping of the importance'),
  }

  def transform(self, optimizer):
    import optax

    from sfa_jax import transforms

    return optax.chain(transforms.si(self['strength'], self['damping'], wait_for_anchor=True), optimizer)

  def init_extras(self, params, model_state, num_tasks):
    import jax
    import jax.numpy as jnp

    return {'importance': jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.promote_types(leaf.dtype, jnp.float32)),
                                       params)}

  def prepare_optimizer(self, opt_state, state, boundary):
    if boundary.task_index == 0:
      return opt_state
    from sfa_jax import anchors

    return anchors.reanchor(opt_state, state.params, importance=state.extras['importance'])

  def end_task(self, state, boundary):
    if boundary.task_index + 1 == boundary.num_tasks:  # the last task's importance has no use
      return state
    import jax
    import optax

    from sfa_jax import anchors
    from sfa_jax import transforms

    ended = anchors.find_state(anchors.reanchor(state.opt_state, state.params), transforms.SIState).importance
    is_masked = lambda node: isinstance(node, optax.MaskedNode)  # a frozen leaf (TrainConfig.trainable): zero
    importance = jax.tree.map(lambda zero, leaf: zero if is_masked(leaf) else leaf, state.extras['importance'], ended,
                              is_leaf=is_masked)
    return state._replace(extras={'importance': importance})


class MAS(_WeightedPenalty):
  """Memory Aware Synapses: ``strength/2·Σ Ω·(θ − θ_{k-1})²``, ``Ω`` summed over the past tasks.

  ``Ω_j`` is the mean per-example ``|∂‖f(x)‖²/∂θ|`` of the model's output on task ``j``'s training
  inputs at the task's end (:func:`sfa_jax.fisher.mas_importance`, computed by the engine as EWC's
  Fisher is, at most :class:`~sfa_jax.engine.TrainConfig`'s ``fisher_examples`` of them); the
  penalty is :func:`sfa_jax.ewc`'s with ``Ω`` in place of the Fisher. Task 0 trains without it.
  The paper writes ``λ·Σ Ω·(θ − θ*)²``: its ``λ`` is ``strength / 2``.

  Args:
    strength: λ of the penalty, at least 0 (default 2.0: the paper's ``λ = 1``).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.MAS(strength=1.0)
    >>> params = {'w': jnp.ones(2)}
    >>> state = RunState(params, {}, None, method.init_extras(params, {}, 3))
    >>> importance = lambda state: {'w': jnp.array([1.0, 0.5])}  # each task's Ω
    >>> for k in (0, 1):
    ...   boundary = methods.Boundary(k, num_tasks=3, total_steps=10, fisher=None,
    ...                               mas_importance=importance)
    ...   state = method.end_task(state, boundary)
    >>> state.extras['importance']['w'].tolist()  # summed over tasks 0 and 1
    [2.0, 1.0]

  References:
    Aljundi et al, `Memory Aware Synapses: Learning what (not) to forget
    <https://arxiv.org/abs/1711.09601>`_, 2018
  """

  name = 'mas'
  hyperparams = {'strength': Hyperparam(2.0, NON_NEGATIVE, doc='λ of the penalty (2λ of the paper)')}

  weights_key = 'importance'
  boundary_uses = frozenset({'mas_importance'})

  def end_task(self, state, boundary):
    if boundary.task_index + 1 == boundary.num_tasks:
      return state
    from sfa_jax import fisher as fisher_lib

    summed = fisher_lib.online_fisher(state.extras['importance'], boundary.mas_importance(state), 1.0)
    return state._replace(extras={'importance': summed})


class EWCOffline(_WeightedPenalty):
  """Offline EWC: ``strength/2·Σ_j F_j·(θ − θ_j)²``, one penalty per past task ``j``.

  ``F_j`` is the empirical diagonal Fisher of task ``j``'s training data at its end ``θ_j`` (as
  :class:`EWC`'s). The run keeps ``S = Σ_j F_j`` and the Fisher-weighted mean end ``θ̄``
  (:func:`sfa_jax.fisher.offline_fisher`), and task ``k`` trains with
  ``chain(ewc(S, strength, anchor=θ̄), optimizer)``: the same gradient ``strength·Σ_j F_j·(θ − θ_j)``,
  with two trees of the params' size whatever the number of tasks (:func:`sfa_jax.offline_ewc`).

  Args:
    strength: λ of the penalty, at least 0 (default 100.0).

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import methods
    >>> from sfa_jax.engine.loop import RunState
    >>> method = methods.EWCOffline(strength=10.0)
    >>> params = {'w': jnp.zeros(1)}
    >>> state = RunState(params, {}, None, method.init_extras(params, {}, 3))
    >>> fisher = lambda state: state.params  # F_j = θ_j here
    >>> for k, end in ((0, 1.0), (1, 3.0)):  # the ends of tasks 0 and 1
    ...   state = state._replace(params={'w': jnp.full(1, end)})
    ...   boundary = methods.Boundary(k, num_tasks=3, total_steps=10, fisher=fisher)
    ...   state = method.end_task(state, boundary)
    >>> state.extras['fisher']['w'].tolist()  # S = 1 + 3
    [4.0]
    >>> state.extras['anchor']['w'].tolist()  # θ̄ = (1·1 + 3·3) / 4
    [2.5]

  References:
    Kirkpatrick et al, `Overcoming catastrophic forgetting in neural networks
    <https://arxiv.org/abs/1612.00796>`_, 2017
  """

  name = 'ewc-offline'
  hyperparams = {'strength': Hyperparam(100.0, NON_NEGATIVE, doc='λ of the penalty')}

  def init_extras(self, params, model_state, num_tasks):
    return super().init_extras(params, model_state, num_tasks) | {'anchor': _copy(params)}

  def _anchor(self, state):
    return state.extras['anchor']

  def end_task(self, state, boundary):
    if boundary.task_index + 1 == boundary.num_tasks:
      return state
    from sfa_jax import fisher as fisher_lib

    extras = state.extras
    total, mean = fisher_lib.offline_fisher(extras['fisher'], extras['anchor'], boundary.fisher(state), state.params)
    return state._replace(extras={'fisher': total, 'anchor': mean})


# ------------------------------------------------------------------------------------------------
# Methods that train on outputs or memories inside the step (their arrays: sfa_jax.engine.rehearsal).


def _check_whole(method: Method, *names: str) -> None:
  """Raises ``ValueError`` naming the first of ``names`` whose value is not a whole number."""
  for name in names:
    if not float(method[name]).is_integer():
      raise ValueError(f'{name} must be a whole number; got {method[name]}.')


class LwF(Method):
  r"""Learning without Forgetting: distillation toward the previous task's model on the current batch.

  On task ``k ≥ 1`` the loss adds ``alpha`` times the cross-entropy of the model's outputs to the
  previous model's ``θ_{k-1}`` (at the end of task ``k-1``, in evaluation mode), both softened by
  the temperature ``T`` (:func:`sfa_jax.engine.rehearsal.distillation`):
  :math:`-\frac{1}{N}\sum_n \sum_c \mathrm{softmax}(z^{old}_n/T)_c \log
  \mathrm{softmax}(z_n/T)_c`, over the outputs of the past tasks' labels. With one head per task
  (the task-incremental setting) each past task's head is distilled under its task id and the
  losses are averaged over the past tasks. Task 0 trains without it.

  As the paper (and Mammoth's ``lwf``), without Hinton's ``T²`` factor; Avalanche's ``LwF`` takes
  the KL divergence, which differs by the old outputs' entropy (a constant: the same gradients),
  and sums the heads' losses where this averages them. van de Ven & Tolias's LwF
  (GMvandeVen/continual-learning) takes ``(1/k)·L_task + (1 − 1/k)·T²·L_old`` on task ``k``
  (counted from 1) and, with one shared head over all classes, the model's softmax over every class
  seen so far (the current task's included) against the previous model's over the past classes: a
  subclass that rewrites the step state's weights at each task's start
  (``experiments/three_scenarios.py``, ``VanDeVenLwF``). The previous model is kept in the step
  state; the paper's warm-up of the new head alone is not done.

  Args:
    alpha: the weight ``λ_o`` of the distillation loss, at least 0 (default 1.0, the paper's).
    temperature: ``T > 0`` (default 2.0, the paper's).

  Example:
    >>> from sfa_jax.engine import methods
    >>> method = methods.LwF(alpha=0.5)
    >>> method, methods.has_step_hooks(method)
    (LwF(alpha=0.5, temperature=2), True)

    Train it with :func:`~sfa_jax.engine.run_sequence` (or ``engine.make_method('lwf')``).

  References:
    Li & Hoiem, `Learning without Forgetting <https://arxiv.org/abs/1606.09282>`_, 2016
  """

  name = 'lwf'
  hyperparams = {
      'alpha': Hyperparam(1.0, NON_NEGATIVE, doc='weight of the distillation loss'),
      'temperature': Hyperparam(2.0, Interval(0.0, math.inf, low_open=True, high_open=True),
                                doc='temperature of the softened outputs'),
  }

  def init_step_state(self, params, model_state, spec):
    import jax.numpy as jnp
    import numpy as np

    num_tasks = len(spec.task_labels)
    classes = np.zeros((num_tasks, spec.outputs.shape[-1] if spec.outputs.shape else 1), bool)
    for k, labels in enumerate(spec.task_labels):
      classes[k, [label for label in labels if 0 <= label < classes.shape[1]]] = True
    state = {
        'previous': _copy((params, model_state)), 'alpha': jnp.float32(self['alpha']),
        'temperature': jnp.float32(self['temperature']), 'classes': jnp.asarray(classes if classes.any() else ~classes),
        'past': jnp.zeros(num_tasks, bool),
    }
    if spec.task_heads:
      state['heads'] = jnp.arange(num_tasks, dtype=jnp.int32)
    return state

  def start_task(self, state, boundary):
    if boundary.task_index == 0:
      return state
    import jax.numpy as jnp

    previous = _copy((state.params, state.model_state))
    past = jnp.arange(boundary.num_tasks) < boundary.task_index
    step = step_state(state.extras) | {'previous': previous, 'past': past}
    return state._replace(extras=with_step_state(state.extras, step))

  def step_loss(self, params, outputs, batch, step_state, model):
    from sfa_jax.engine import rehearsal

    return rehearsal.lwf_loss(params, outputs, batch, step_state, model)


class DERpp(Method):
  r"""Dark Experience Replay++: a reservoir of inputs, labels and logits replayed in every step.

  The loss adds ``alpha·MSE(f(x'), z')`` and ``beta·CE(f(x''), y'')`` on two independent draws
  from a buffer of ``buffer_size`` examples (each of the batch's size, without replacement),
  ``z'`` the logits stored with ``x'``. The buffer is filled by reservoir sampling inside the
  compiled step, as Mammoth's ``derpp`` does it after each step: every example of the stream
  (task 0 included) enters with probability ``buffer_size / (n + 1)`` (``n`` counted from 0),
  with its logits *at insertion* (the step's outputs, before its update); replay starts at the
  second step. Its arrays, a PRNG key from the run's seed and the count ``n`` live in the step
  state (:mod:`sfa_jax.engine.rehearsal`), so a resumed run draws what an uninterrupted one draws.

  Forward passes on the buffer run in training mode; their BatchNorm statistics are dropped
  (Mammoth's update them, the batch's own only here). Mammoth's ``minibatch_size`` is the
  batch's size here.

  Args:
    buffer_size: the buffer's examples, a whole number at least 1 (default 500); it decides the
      state's shapes, so the configurations of one sweep share it.
    alpha: the weight of the logits' MSE, at least 0 (default 0.2).
    beta: the weight of the labels' cross-entropy, in ``[0, 1]`` (default 0.5; the command line's
      ``--beta`` has one range for every method that takes it); ``beta = 0`` is DER.

  Defaults: Mammoth's best arguments for Seq-CIFAR-10 with 500 examples.

  Example:
    >>> from sfa_jax.engine import methods
    >>> methods.DERpp(buffer_size=200, alpha=0.1).label
    'derpp(alpha=0.1, beta=0.5, buffer_size=200)'

  References:
    Buzzega et al, `Dark Experience for General Continual Learning: a Strong, Simple Baseline
    <https://arxiv.org/abs/2004.07211>`_, 2020
  """

  name = 'derpp'
  hyperparams = {
      'buffer_size': Hyperparam(500.0, Interval(1.0, math.inf, high_open=True), sweepable=False,
                                doc="the buffer's examples"),
      'alpha': Hyperparam(0.2, NON_NEGATIVE, doc="weight of the logits' MSE"),
      'beta': Hyperparam(0.5, UNIT, doc="weight of the labels' cross-entropy"),
  }

  def __init__(self, **values: float):
    super().__init__(**values)
    _check_whole(self, 'buffer_size')

  def init_step_state(self, params, model_state, spec):
    import jax
    import jax.numpy as jnp

    size = int(self['buffer_size'])
    zeros = lambda like, dtype=None: jnp.zeros((size, *like.shape), dtype or like.dtype)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(spec.seed), 1))
    return {
        'x': zeros(spec.x), 'y': zeros(spec.y), 'task_ids': jnp.zeros(size, jnp.int32), 'logits': zeros(spec.outputs),
        'seen': jnp.int32(0), 'key': key, 'alpha': jnp.float32(self['alpha']), 'beta': jnp.float32(self['beta']),
    }

  def step_loss(self, params, outputs, batch, step_state, model):
    from sfa_jax.engine import rehearsal

    return rehearsal.derpp_loss(params, batch, step_state, model)

  def after_step(self, step_state, batch, outputs):
    from sfa_jax.engine import rehearsal

    return rehearsal.derpp_insert(step_state, batch, outputs)


class AGEM(Method):
  r"""Averaged GEM: each gradient projected so that it does not conflict with the memory's.

  The chain ``optax.chain(sfa_jax.agem(), optimizer)``. From task 1 on, every step draws a
  reference batch of ``reference_batch`` examples from an episodic memory of ``memory_per_task``
  random examples of each past task (beside the task's whole batch), and the gradient of the
  loss on it reaches :func:`sfa_jax.agem` as ``reference_grads``: the batch's gradient ``g`` is
  replaced by ``g − (g·g_ref / g_ref·g_ref)·g_ref`` when ``g·g_ref < 0``. Task 0 trains plainly.

  Mammoth's ``agem`` fills a buffer of a total size split evenly between the tasks (its
  ``buffer_size / n_tasks`` per task) and draws a reference batch of its ``minibatch_size``; the
  paper, as here, keeps a number of examples per task.

  Args:
    memory_per_task: the examples kept of each past task, a whole number at least 1 (default
      256); configurations of one sweep may differ in it.
    reference_batch: the reference batch's examples, a whole number at least 1 (default 256,
      the paper's); it decides the step's shapes, so the configurations of one sweep share it.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import methods
    >>> split = tasks.Split(np.zeros((20, 2), np.float32), np.arange(20) % 2)
    >>> toy = [('a', split, split), ('b', split, split)]
    >>> stream = tasks.stream_of('toy', toy, num_outputs=2)
    >>> method = methods.AGEM(memory_per_task=8, reference_batch=4)
    >>> plan = method.batch_plan(list(stream), 1, batch_size=8, seed=0)  # task 1
    >>> len(plan.replay.y), plan.replay_size, plan.task_share(8)  # 8 of task 0; 4 beside 8
    (8, 4, 8)

  References:
    Chaudhry et al, `Efficient Lifelong Learning with A-GEM <https://arxiv.org/abs/1812.00420>`_, 2019
  """

  name = 'agem'
  hyperparams = {
      'memory_per_task': Hyperparam(256.0, Interval(1.0, math.inf, high_open=True),
                                    doc='examples kept of each past task'),
      'reference_batch': Hyperparam(256.0, Interval(1.0, math.inf, high_open=True), sweepable=False,
                                    doc="the reference batch's examples"),
  }

  def __init__(self, **values: float):
    super().__init__(**values)
    _check_whole(self, 'memory_per_task', 'reference_batch')

  def transform(self, optimizer):
    import optax

    from sfa_jax import transforms

    return optax.chain(transforms.agem(), optimizer)

  def batch_plan(self, tasks, task_index, batch_size, seed):
    plan = _own_data(tasks[task_index])
    if task_index == 0:
      return plan
    memory = [_own_data(dataclasses.replace(t, train=_random_examples(t.train, int(self['memory_per_task']),
                                                                       task_seed(seed, t.index))))
              for t in tasks[:task_index]]
    replay, replay_ids = _concat(memory)
    return plan._replace(replay=replay, replay_ids=replay_ids, replay_size=int(self['reference_batch']),
                         memory_apart=True)

  def data_key(self):
    return self['memory_per_task']

  def reference_loss(self, params, batch, step_state, model):
    from sfa_jax.engine import rehearsal

    return rehearsal.memory_loss(params, batch, model)


def _random_examples(split: Any, count: int, seed: int) -> Any:
  """``count`` examples of ``split`` drawn uniformly without replacement (all if it has fewer),
  in their order."""
  import numpy as np

  from sfa_jax import tasks as tasks_lib

  n = len(split.y)
  kept = np.sort(np.random.default_rng(seed).choice(n, min(n, count), replace=False))
  return tasks_lib.Split(split.x[kept], split.y[kept])


# ------------------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
  """Adds a :class:`Method` subclass to the registry under its ``name`` (usable as a decorator).

  Raises:
    TypeError: when ``cls`` is not a :class:`Method` subclass.
    ValueError: when it has no name, or the name belongs to another class.

  Example:
    As a decorator, ``@register_method`` above ``class MyMethod(Method): name = 'mine'`` lets
    :func:`make_method` and the command line take ``'mine'``. A name is taken once:

    >>> from sfa_jax.engine import methods
    >>> methods.register_method(methods.SFA) is methods.SFA  # the same class: nothing to do
    True
    >>> methods.register_method(type('OtherSFA', (methods.Method,), {'name': 'sfa'}))
    Traceback (most recent call last):
    ...
    ValueError: a method named 'sfa' is registered already (SFA).
  """
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise TypeError(f'register_method takes a subclass of sfa_jax.engine.methods.Method; got {cls!r}.')
  if not cls.name:
    raise ValueError(f'{cls.__name__} has no name: set the class attribute name.')
  if _REGISTRY.get(cls.name, cls) is not cls:
    raise ValueError(f'a method named {cls.name!r} is registered already ({_REGISTRY[cls.name].__name__}).')
  for key, spec in cls.hyperparams.items():
    if not isinstance(spec, Hyperparam):
      raise TypeError(f'{cls.__name__}.hyperparams[{key!r}] must be a Hyperparam; got {spec!r}.')
  _REGISTRY[cls.name] = cls
  return cls


for _cls in (Finetune, SFA, L2, EWC, Replay, WiseFT, TaskArithmetic, TIES, Joint, AdaptiveSFA, MultiAnchorSFA,
             MagMax, CoFiMA, SI, MAS, EWCOffline, LwF, DERpp, AGEM, ExperienceReplay):
  register_method(_cls)


def registered() -> dict[str, type[Method]]:
  """The registered methods, by name, in registration order.

  Example:
    >>> from sfa_jax.engine import methods
    >>> list(methods.registered())[:4]
    ['finetune', 'sfa', 'l2', 'ewc']
  """
  return dict(_REGISTRY)


def method_class(spec: str | type[Method]) -> type[Method]:
  """The class of a method: a registered name, an import path ``'package.module:Class'``, or a class.

  Raises:
    ValueError: on an unknown name or an import path that does not lead to a :class:`Method` subclass.

  Example:
    >>> from sfa_jax.engine import methods
    >>> methods.method_class('sfa'), methods.method_class('sfa_jax.engine.methods:EWC')
    (<class 'sfa_jax.engine.methods.SFA'>, <class 'sfa_jax.engine.methods.EWC'>)
  """
  if isinstance(spec, type) and issubclass(spec, Method):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f'a method is a name, an import path or a Method subclass; got {spec!r}.')
  if spec in _REGISTRY:
    return _REGISTRY[spec]
  if ':' not in spec:
    raise ValueError(f'unknown method {spec!r}; known methods: {", ".join(_REGISTRY)} (or give package.module:Class).')
  module_name, _, attribute = spec.partition(':')
  try:
    found = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as error:
    raise ValueError(f'cannot import the method {spec!r}: {error}') from error
  if not (isinstance(found, type) and issubclass(found, Method)):
    raise ValueError(f'{spec!r} is not a subclass of sfa_jax.engine.methods.Method.')
  return found


def make_method(spec: str | type[Method], **hyperparams: float) -> Method:
  """A method with its defaults filled in and its hyper-parameters checked.

  Args:
    spec: a registered name (``'sfa'``, ``'l2'``, ...), an import path ``'package.module:Class'``
      of a :class:`Method` subclass, or the class itself.
    **hyperparams: the hyper-parameters to set; see each class's ``hyperparams``.

  Returns:
    The method.

  Raises:
    ValueError: on an unknown method, an unknown hyper-parameter for it, or a value out of range.

  Example:
    >>> from sfa_jax.engine.methods import make_method
    >>> make_method('sfa', p=0.5).label
    'sfa(beta=0.25, p=0.5)'
  """
  return method_class(spec)(**hyperparams)
