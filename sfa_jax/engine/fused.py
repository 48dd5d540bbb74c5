"""Many steps per dispatch: the fused train chunk and one program that evaluates every task.

The loop calls the device once per *chunk*, the steps between two points where the host must
act (an evaluation, a checkpoint, a task's end, an average it must see), not once per step.
:func:`make_chunk` turns the train step into ``chunk(state, data, replay, rows, replay_rows,
count)``: a ``jax.lax.while_loop`` over the first ``count`` rows of a fixed-size block of steps,
each step gathering its batch from examples already on the device (:mod:`sfa_jax.engine.feed`)
and writing its loss, metric and averaging flag into stacked outputs. ``count`` is a traced
value: one compilation serves every chunk length up to the block size, so the number of programs
does not grow with the number of tasks or with where the host's events fall. The loop's body is
the step itself, so a run computes the same numbers in chunks of any length (on XLA:CPU bit for
bit; a resumed run starts its chunks elsewhere and ends the same). On XLA's CPU backend a step
that convolves runs several times slower inside a loop (:func:`loops_slowly`): the engine builds
its chunk unlooped (``looped=False``, one step a call) and keeps the data on the device.

:func:`make_scorer` evaluates a model on the test sets of all tasks at once: a scan over their
batches adding each batch's score to its task's total, in the batches' order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import tasks as tasks_lib
from sfa_jax.engine.feed import Examples
from sfa_jax.engine.feed import Layout

__all__ = ['make_chunk', 'make_scorer']

def make_chunk(
    step: Callable[..., Any],
    layout: Layout = Layout(),
    *,
    averaged: Callable[[Any], Any] | None = None,
    stop_on_average: bool = False,
    batch_sharding: Any = None,
    looped: bool = True,
) -> Callable[..., Any]:
  """A jitted ``chunk(state, data, replay, rows, replay_rows, count)`` running ``count`` train steps.

  Args:
    step: ``(params, model_state, opt_state, step_state, x, y, mask, task_ids, memory) ->
      (params, model_state, opt_state, step_state, loss, metric)``, unjitted
      (:func:`sfa_jax.engine.steps.make_method_step`); ``memory`` is ``None`` unless the layout
      keeps the memory's examples apart (:attr:`Layout.apart`).
    layout: the lanes' :class:`Layout`.
    averaged: ``averaged(opt_state)``, whether the latest update averaged (a method whose averages
      are decided on the device); ``None``: never (the flags come back False).
    stop_on_average: end the chunk after the first step on which a lane averaged (the host
      evaluates around it).
    batch_sharding: a sharding each gathered batch is constrained to (a mesh's batch sharding).
    looped: run the steps in a ``while_loop``; ``False``: the program is one step, unlooped (call
      it with ``count=1``), for a step that XLA compiles much slower inside a loop
      (:func:`loops_slowly`).

  Returns:
    ``chunk``: ``state`` is ``(params, model_state, opt_state, step_state)`` (donated; the step
    state of :meth:`~sfa_jax.engine.methods.Method.init_step_state`, ``None`` for most methods); ``data`` and
    ``replay`` are :class:`sfa_jax.engine.feed.Examples` on the device (``replay`` may be
    ``None``); ``rows`` is int32 ``(S, ...)``, the rows of ``S`` steps into ``data`` (``S`` the
    block size, rows past ``count`` unused), ``replay_rows`` the same into ``replay`` or
    ``None``; ``count`` the steps to run. It returns ``(state, losses, metrics, flags, done)``:
    the stacked ``(S, ...)`` losses, metrics and averaging flags (valid for the first ``done``),
    and ``done``, the steps run (``count``, or fewer after an average with ``stop_on_average``).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sfa_jax.engine import feed, fused
    >>> def step(w, s, o, m, x, y, mask, ids, memory):  # a sum; loss: the mean
    ...   return w + x.sum(), s, o, m, x.mean(), y.mean()
    >>> examples = feed.Examples(np.arange(8.0), np.zeros(8), np.zeros(8, np.int32))
    >>> data = feed.on_device(examples)
    >>> chunk = fused.make_chunk(step)
    >>> rows = np.array([[0, 1], [2, 3], [0, 0]], np.int32)
    >>> state = (jnp.float32(0), {}, {}, None)
    >>> (w, _, _, _), losses, _, _, done = chunk(state, data, None, rows, None, 2)
    >>> float(w), losses[:2].tolist(), int(done)
    (6.0, [0.5, 2.5], 2)
  """
  lane_step = functools.partial(_lane_step, step, batch_sharding, layout.apart)
  if layout.lanes:
    lane_step = jax.vmap(lane_step, in_axes=(0, 0, 0, 0, layout.data, layout.replay, layout.rows, layout.replay_rows))

  def one_step(state, data, replay, rows, replay_rows):
    return lane_step(*state, data, replay, rows, replay_rows)

  def chunk(state, data, replay, rows, replay_rows, count):
    size = rows.shape[0]
    at = lambda block, i: None if block is None else block[i]
    shapes = jax.eval_shape(one_step, state, data, replay, at(rows, 0), at(replay_rows, 0))
    loss_shape, metric_shape = shapes[4], shapes[5]

    def flag_of(opt_state):
      if averaged is None:
        return jnp.zeros(loss_shape.shape, bool)
      return jnp.reshape(jnp.asarray(averaged(opt_state), bool), loss_shape.shape)

    def body(carry):
      i, state, losses, metrics, flags, _ = carry
      params, model_state, opt_state, step_state, loss, metric = one_step(state, data, replay, at(rows, i),
                                                                          at(replay_rows, i))
      flag = flag_of(opt_state)
      stop = jnp.any(flag) if stop_on_average else jnp.bool_(False)
      return (i + 1, (params, model_state, opt_state, step_state), losses.at[i].set(loss), metrics.at[i].set(metric),
              flags.at[i].set(flag), stop)

    def more(carry):
      i, *_, stop = carry
      return (i < count) & ~stop

    start = (jnp.int32(0), tuple(state), jnp.zeros((size,) + loss_shape.shape, loss_shape.dtype),
             jnp.zeros((size,) + metric_shape.shape, metric_shape.dtype), jnp.zeros((size,) + loss_shape.shape, bool),
             jnp.bool_(False))
    if not looped:  # one step, whatever count says (the loop dispatches these one by one)
      _, state, losses, metrics, flags, _ = body(start)
      return state, losses, metrics, flags, jnp.int32(1)
    done, state, losses, metrics, flags, _ = jax.lax.while_loop(more, body, start)
    return state, losses, metrics, flags, done

  return jax.jit(chunk, donate_argnums=(0,))


def _lane_step(step, batch_sharding, apart, params, model_state, opt_state, step_state, data, replay, rows, replay_rows):
  """One lane's step on the batch its rows gather: the task's examples, then the memory's (its
  last ``apart`` examples a batch of their own, when the memory is kept apart)."""
  x, y, ids = data.x[rows], data.y[rows], data.ids[rows]
  if replay is not None:
    x = jnp.concatenate([x, replay.x[replay_rows]])
    y = jnp.concatenate([y, replay.y[replay_rows]])
    ids = jnp.concatenate([ids, replay.ids[replay_rows]])
  memory = None
  if apart:
    memory = Examples(x[-apart:], y[-apart:], ids[-apart:])
    x, y, ids = x[:-apart], y[:-apart], ids[:-apart]
  if batch_sharding is not None:
    x, y, ids = (jax.lax.with_sharding_constraint(leaf, batch_sharding) for leaf in (x, y, ids))
  return step(params, model_state, opt_state, step_state, x, y, jnp.ones(len(ids), bool), ids, memory)


class TestBatches(NamedTuple):
  """The test sets of a stream's tasks as one stack of batches of one shape.

  Attributes:
    x, y, mask, ids: ``(num_batches, batch_size, ...)``: each task's test set in its order, padded
      to whole batches (``mask`` False on the padding), its task index as the task id.
    task: int32 ``(num_batches,)``, the task of each batch.
  """

  x: Any
  y: Any
  mask: Any
  ids: Any
  task: Any


def test_batches(splits: Sequence[tasks_lib.Split], indices: Sequence[int], batch_size: int) -> TestBatches:
  """Every split of ``splits`` cut into batches (:func:`sfa_jax.tasks.eval_batches`), stacked.

  Args:
    splits: the tasks' test sets.
    indices: each task's index (its task id).
    batch_size: examples per batch.

  Returns:
    :class:`TestBatches` of NumPy arrays.
  """
  parts = [tasks_lib.eval_batches(split, batch_size) for split in splits]
  task = np.concatenate([np.full(len(p.y), k, np.int32) for k, p in enumerate(parts)])
  ids = np.concatenate([np.full(p.mask.shape, index, np.int32) for p, index in zip(parts, indices)])
  return TestBatches(*(np.concatenate(leaves) for leaves in zip(*((p.x, p.y, p.mask) for p in parts))), ids, task)


def make_scorer(score: Callable[..., Any], *, stacked: bool = False) -> Callable[..., Any]:
  """A jitted ``totals(params, model_state, batches, num_tasks)``: each task's summed score.

  Args:
    score: ``score(params, model_state, x, y, mask, task_ids) -> sum`` over one batch.
    stacked: params and model state carry a leading axis of lanes (a sweep); the totals then have
      one row per lane.

  Returns:
    The function; ``batches`` is a :class:`TestBatches` (on the device or NumPy) and ``num_tasks``
    static. The totals are ``(num_tasks,)`` (or ``(lanes, num_tasks)``), each the sum of its
    task's batch scores in their order.

  Example:
    >>> import numpy as np
    >>> from sfa_jax import tasks
    >>> from sfa_jax.engine import fused
    >>> splits = [tasks.Split(np.ones((3, 1), np.float32), np.zeros(3, np.int32))] * 2
    >>> batches = fused.test_batches(splits, [0, 1], batch_size=2)
    >>> score = lambda p, s, x, y, mask, ids: (x[:, 0] * mask * (ids + 1)).sum()
    >>> totals = fused.make_scorer(score)
    >>> totals(None, None, batches, 2).tolist()
    [3.0, 6.0]
  """

  def one_lane(params, model_state, batches, num_tasks):
    shape = jax.eval_shape(score, params, model_state, batches.x[0], batches.y[0], batches.mask[0], batches.ids[0])

    def add(totals, batch):
      x, y, mask, ids, task = batch
      return totals.at[task].add(score(params, model_state, x, y, mask, ids)), None

    return jax.lax.scan(add, jnp.zeros(num_tasks, shape.dtype), tuple(batches))[0]

  lanes = jax.vmap(one_lane, in_axes=(0, 0, None, None)) if stacked else one_lane
  return jax.jit(lanes, static_argnums=3)


def loops_slowly(step: Callable[..., Any], *args: Any) -> bool:
  """Whether ``step(*args)`` (shapes suffice) convolves on XLA's CPU backend, which runs a
  convolution inside a loop several times slower than alone (measured: a SmallCNN step 1.98 ms
  alone, 14.9 ms in a ``scan`` or ``while_loop``, 2.45 ms unrolled; ResNet-18 0.36 s and 1.47 s). The
  engine then dispatches such a step unlooped, one a call, on the data already on the device.
  """
  if jax.default_backend() != 'cpu':
    return False

  def convolves(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        return True
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', value)
        if hasattr(inner, 'eqns') and convolves(inner):
          return True
    return False

  return convolves(jax.make_jaxpr(step)(*args).jaxpr)

