"""Compile once: the programs of a run, kept for the process's later runs and compiled in the background.

A jitted function made anew for every run traces, lowers and (without the persistent compilation
cache) compiles anew. :func:`reused` keeps what a run builds under a key of what decides it, so
the runs of one process share their compiled programs. Two transforms share a train program when
their update is one program (:func:`update_program`: the hyper-parameters read from the optimizer
state, not baked into the update); a sweep's lanes must (:func:`check_one_update_rule`).

:class:`ChunkPrograms` holds a run's fused chunks of train steps (:mod:`sfa_jax.engine.fused`), one
per feed layout and variant, and compiles them in a background thread while the caller compiles
the model's initialisation (:func:`compile_in_background`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from sfa_jax import tasks as tasks_lib
from sfa_jax.engine import config as config_lib
from sfa_jax.engine import distributed
from sfa_jax.engine import feed as feed_lib
from sfa_jax.engine import fused
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import steps
from sfa_jax.engine import stored

__all__ = ['reused']

_REUSED: dict[Any, Any] = {}
_REUSED_LIMIT = 64  # compiled programs (and update digests) kept; the oldest is dropped beyond


def reused(key: tuple, build: Callable[[], Any]) -> Any:
  """``build()``, kept under ``key`` for later runs of this process (built afresh if unhashable).

  A jitted function made anew for every run traces, lowers and (without the persistent
  compilation cache) compiles anew: ~0.5 s a run for the MLP, several seconds cold. At most
  ``_REUSED_LIMIT`` are kept (each holds its compiled programs).

  Example:
    >>> from sfa_jax.engine import programs
    >>> first = programs.reused(('example', 1), lambda: object())
    >>> programs.reused(('example', 1), lambda: object()) is first
    True
  """
  try:
    hash(key)
  except TypeError:  # a model or optimizer with an unhashable field
    return build()
  if key not in _REUSED:
    if len(_REUSED) >= _REUSED_LIMIT:
      del _REUSED[next(iter(_REUSED))]
    _REUSED[key] = build()
  return _REUSED[key]


def update_program(tx: optax.GradientTransformation, opt_state: Any, params: Any) -> str:
  """A digest of the program ``tx.update`` runs on states and params of these shapes (jaxpr and constants).

  Two transforms with one digest update alike from the same state: their hyper-parameters are
  read from the state, not baked into the update. Traced abstractly (nothing runs).
  """
  abstract = lambda tree: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype), tree)
  shapes = abstract(params)
  closed = jax.make_jaxpr(tx.update)(shapes, abstract(opt_state), shapes)
  digest = hashlib.sha256(str(closed.jaxpr).encode())
  for const in closed.consts:
    const = np.asarray(const)
    digest.update(f'{const.dtype}{const.shape}'.encode() + np.ascontiguousarray(const).tobytes())
  return digest.hexdigest()


def check_one_update_rule(methods: Sequence[methods_lib.Method], txs: Sequence[optax.GradientTransformation],
                          opt_states: Sequence[Any], params: Any, *, optimizer_key: Any = None) -> None:
  """Raises unless every lane's transform updates by one program, its hyper-parameters read from its state.

  A sweep advances all lanes with the first lane's update: a method whose transform bakes a
  hyper-parameter into its update function (a Python number in a closure, not a field of the
  state) would silently train every lane with the first lane's value.

  Args:
    methods: the lanes' methods.
    txs: their transforms.
    opt_states: their optimizer states.
    params: the trained params (shapes suffice).
    optimizer_key: what decides the optimizer (:meth:`~sfa_jax.engine.TrainConfig.optimizer_key`):
      with it, each digest is remembered in the program store (:func:`sfa_jax.engine.stored.remembered`).

  Raises:
    ValueError: naming the method and the first lane whose update program differs.
  """
  def digest(i: int) -> str:
    compute = lambda: update_program(txs[i], opt_states[i], params)
    if optimizer_key is None:
      return compute()
    shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype), (opt_states[i], params))
    return stored.remembered(('update_program_of_lane', methods[i], optimizer_key, shapes), compute)

  reference, seen = digest(0), {methods[0]}
  for i in range(1, len(methods)):
    if methods[i] in seen:
      continue
    seen.add(methods[i])
    if digest(i) != reference:
      raise ValueError(
          f'{methods[i].label} (configuration {i}) updates by another program than {methods[0].label}: its '
          'transform bakes a hyper-parameter into its update. Keep hyper-parameters in the optimizer state '
          '(as sfa_jax.sfa does) to sweep them, or run the configurations one by one.'
      )


_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='sfa_jax-compile')


def compile_in_background(function: Callable[..., Any], shapes: Any, *args: Any) -> concurrent.futures.Future:
  """Compiles ``function`` for these shapes in a background thread, by calling it on zeros shaped like ``shapes``.

  XLA compiles without holding Python's lock, so a second core compiles while the caller compiles
  something else (the model's initialisation). Shapes it cannot make zeros of (PRNG keys) and any
  error are left to the first real call, which compiles and reports.
  """
  return _COMPILER.submit(_zeros_call, function, shapes, *args)


def prepare_in_background(program: Any, *args: Any, later: bool = False) -> bool:
  """Loads or compiles a :class:`~sfa_jax.engine.stored.StoredProgram` for these shapes in the
  background thread of :func:`compile_in_background` (its next call waits for it); ``False`` when
  ``program`` is not stored (the store off, or its key without a stable description). A program
  needed ``later`` (after the first task) is left to that thread: :func:`prepare_queued_here`
  does not take it."""
  if not isinstance(program, stored.StoredProgram):
    return False
  if program.prepare_in_background(_COMPILER, *args, later=later):
    _QUEUED.append(program)
    return True
  return False


_QUEUED: list[stored.StoredProgram] = []
"""The programs given to :func:`prepare_in_background` since the last :func:`prepare_queued_here`."""


def prepare_queued_here() -> None:
  """Loads or compiles here, in order, the programs queued by :func:`prepare_in_background` that the
  background thread has not started, so that a caller that is about to wait for them works meanwhile:
  on two cores, the second compiles beside the background thread instead of after it."""
  while _QUEUED:
    _QUEUED.pop(0).prepare_queued_here()


def _zeros_call(function: Callable[..., Any], shapes: Any, *args: Any) -> None:
  """``function(zeros shaped like shapes, *args)``, for its compilation alone."""
  if any(not isinstance(leaf.dtype, np.dtype) for leaf in jax.tree.leaves(shapes)):
    return
  try:
    jax.block_until_ready(function(jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes), *args))
  except Exception:  # pylint: disable=broad-except
    pass


class ChunkPrograms:
  """A run's fused chunks of train steps (:func:`sfa_jax.engine.fused.make_chunk`), each built when first asked for.

  One program per feed layout and variant: ``skip``, steps known not to average (the update runs
  with ``may_average=False``); ``on_device``, the method decides its averages on the device (their
  flags come back); ``stop_on_average``, a chunk ends after the first step that averaged. A single
  run's programs are kept for the process's later runs (:func:`reused`); a sweep's are its own.

  Args:
    model: the Flax module.
    tx: the first lane's transform; every lane updates by its program.
    method: the first lane's method.
    config: the lanes' shared settings.
    trainable: the mask of the trained params (:func:`sfa_jax.engine.steps.trainable_mask`), or ``None``.
    abstract: one lane's :class:`~sfa_jax.engine.loop.RunState` as shapes, its ``extras`` those of
      the method's step state (:meth:`~sfa_jax.engine.methods.Method.init_step_state`, ``None``
      for most).
    task: the first task (the shapes of its examples).
    count: the number of lanes.
    stacked: whether the lanes are stacked (a sweep).
    mesh: the mesh the (single) lane trains on, or ``None``.

  Attributes:
    abstract: the run state's shapes, the lanes stacked on a leading axis in a sweep.
    lane: one lane's state's shapes (``abstract`` itself outside a sweep).
    looped: whether a chunk loops over its steps (``False``: one step a call,
      :func:`sfa_jax.engine.fused.loops_slowly`).
    skips_between_averages: whether the steps between averages run with ``may_average=False``
      (a single run of a method whose averaging schedule is exact, the anchor large enough or
      ``TrainConfig.skip_anchor_between_averages``), each average as its own dispatch.
  """

  def __init__(self, model: Any, tx: optax.GradientTransformation, method: methods_lib.Method, config: Any,
               trainable: Any, abstract: Any, task: tasks_lib.Task, *, count: int, stacked: bool, mesh: Any):
    self._model, self._tx, self._objective, self._trainable = model, tx, config.objective, trainable
    self._method, self._averaged = method, method.averaged
    sample = task.train.x
    self.lane = abstract
    trained = steps.trainable_part(abstract.params, trainable)
    # XLA's CPU backend runs a convolution in a loop several times slower: such steps go one a call.
    # Whether the model convolves: its forward pass tells (traced once, then remembered).
    slow_key = ('loops_slowly', model, sample.shape[1:], str(sample.dtype), config.batch_size)
    x, _, _, task_ids = _abstract_batch(task, config.batch_size)
    self.looped = not reused(slow_key, lambda: stored.remembered(slow_key, lambda: fused.loops_slowly(
        steps.training_forward(model), abstract.params, abstract.model_state, x, task_ids)))
    if stacked:
      # A sweep's programs are its own (not shared with the process's other runs), kept in the
      # store under the first lane's method: every lane updates by its program.
      self._key = ('sweep_step', model, config.optimizer_key(), config.objective, config.trainable, method, count)
      self.abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((count,) + leaf.shape, leaf.dtype), abstract)
    else:
      # Runs of one process share compiled programs when their updates are one program (the
      # hyper-parameters in the state); a method that bakes them into its update gets its own.
      digest_key = ('update_program', method, config.optimizer_key(), config.trainable, model, sample.shape[1:],
                    str(sample.dtype))
      digest = reused(digest_key, lambda: stored.remembered(
          digest_key, lambda: update_program(tx, abstract.opt_state, trained)))
      # A method with train-step hooks computes its own steps: its programs are its own.
      hooks = method if methods_lib.has_step_hooks(method) else None
      self._key = ('train_step', model, config.optimizer_key(), config.objective, config.trainable, digest, mesh, hooks)
      self.abstract = abstract
    # A single run of a method whose averaging schedule is exact may run the steps between its
    # averages without the averaging arithmetic (``may_average=False``) and each average alone.
    self.skips_between_averages = not stacked and method.schedule_is_exact and _skips_anchor(config, trained)
    self._batch_sharding = None if mesh is None else distributed.batch_sharding(mesh)
    self._programs: dict[Any, Any] = {}
    self._warming: dict[Any, concurrent.futures.Future] = {}

  def chunk(self, layout: feed_lib.Layout, skip: bool, on_device: bool, stop_on_average: bool) -> Callable[..., Any]:
    """The fused steps for this layout and variant (waiting for its background compilation, if any)."""
    key = (layout, skip, on_device, stop_on_average)
    program = self._program(key)
    if key in self._warming:  # compiling in the background: wait for it rather than compile it twice
      self._warming.pop(key).result()
    return program

  def warm(self, layout: feed_lib.Layout, skip: bool, on_device: bool, stop_on_average: bool, block: feed_lib.Block,
           *, later: bool = False) -> None:
    """Compiles the program for ``block``'s shapes in the background, by running it on zeros for no step
    (an unlooped program runs its one step on them); :meth:`chunk` waits for it. ``later``: a later
    task's program, left to the background thread and compiled ahead only when it is kept in the
    store (:func:`prepare_in_background`), whose calls wait for their own shapes and which
    compiles shapes it holds or is compiling (a later task of the same inputs) no second time."""
    key = (layout, skip, on_device, stop_on_average)
    program = self._program(key)
    state = (self.abstract.params, self.abstract.model_state, self.abstract.opt_state, self.abstract.extras)
    if not prepare_in_background(program, state, *block, np.int32(0), later=later) and not later:
      self._warming[key] = compile_in_background(program, state, *block, np.int32(0))

  def _program(self, key: tuple[Any, ...]) -> Callable[..., Any]:
    """The program of ``key`` (layout and variant), built when first asked for."""
    if key not in self._programs:
      layout, skip, on_device, stop_on_average = key
      build = lambda: fused.make_chunk(
          steps.make_method_step(self._model, self._tx, self._objective, self._trainable, method=self._method,
                                 may_average=not skip), layout,
          averaged=self._averaged if on_device else None, stop_on_average=stop_on_average,
          batch_sharding=self._batch_sharding, looped=self.looped)
      program = lambda: stored.StoredProgram(self._key + key, build)
      self._programs[key] = program() if self._key[0] == 'sweep_step' else reused(self._key + key, program)
    return self._programs[key]


def _abstract_batch(task: tasks_lib.Task, batch_size: int) -> tuple[Any, ...]:
  """The shapes of a train step's ``(x, y, mask, task_ids)`` for ``task``'s examples."""
  shape = lambda array, dtype=None: jax.ShapeDtypeStruct((batch_size,) + np.shape(array)[1:], dtype or array.dtype)
  return (shape(task.train.x), shape(task.train.y), jax.ShapeDtypeStruct((batch_size,), bool),
          jax.ShapeDtypeStruct((batch_size,), np.int32))


def _skips_anchor(config: Any, trainable_params: Any) -> bool:
  """``config.skip_anchor_between_averages``, or (``None``) whether the trainable params are large
  enough for the anchor's pass over memory to matter (``SKIP_ANCHOR_MIN_BYTES``, read at each call)."""
  if config.skip_anchor_between_averages is not None:
    return bool(config.skip_anchor_between_averages)
  size = sum(int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(trainable_params) if hasattr(leaf, 'dtype'))
  return size >= config_lib.SKIP_ANCHOR_MIN_BYTES
