"""The arrays of the methods that train on outputs or memories inside the step: LwF, DER++, A-GEM.

Pure functions of arrays, traced into the compiled train step through the hooks of
:class:`~sfa_jax.engine.methods.Method` (:meth:`~sfa_jax.engine.methods.Method.step_loss`,
:meth:`~sfa_jax.engine.methods.Method.reference_loss`,
:meth:`~sfa_jax.engine.methods.Method.after_step`) of :class:`~sfa_jax.engine.methods.LwF`,
:class:`~sfa_jax.engine.methods.DERpp` and :class:`~sfa_jax.engine.methods.AGEM`:

* :func:`distillation`: LwF's cross-entropy between the softened outputs of two models;
* :func:`reservoir_slots` and :func:`draw`: DER++'s buffer, filled by reservoir sampling as the
  stream goes by and sampled without replacement, with the PRNG key of its state;
* :func:`lwf_loss`, :func:`derpp_loss`, :func:`derpp_insert`, :func:`memory_loss`: the hooks'
  bodies.

Each step's random numbers come from the buffer's key folded with the number of examples seen
so far, so a run resumed from a checkpoint draws what an uninterrupted one draws.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ['distillation', 'reservoir_slots', 'draw']


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``Σ w·v / max(Σ w, 1)`` over the batch axis, each example's values averaged first."""
  per_example = values.reshape(values.shape[0], -1).mean(axis=1)
  weights = weights.astype(per_example.dtype)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1)


def distillation(old: jax.Array, new: jax.Array, classes: jax.Array, temperature: Any, weights: jax.Array) -> jax.Array:
  r"""LwF's distillation loss: the cross-entropy of the new model's softened outputs to the old's.

  .. math::

    L = -\frac{1}{N}\sum_n \sum_{c \in C} q_{n,c} \log p_{n,c},\quad
    q = \mathrm{softmax}_C(z^{old}/T),\ p = \mathrm{softmax}_C(z^{new}/T)

  over the outputs ``C`` that ``classes`` selects (the softmax is taken over them alone), the
  mean over the examples ``weights`` selects (and over any further axes, e.g. a sequence's).

  Args:
    old: the previous model's outputs ``(N, ..., K)``.
    new: the model's outputs, the same shape.
    classes: bool ``(K,)``, the outputs distilled.
    temperature: ``T > 0``.
    weights: ``(N,)``, the examples counted (the batch's mask).

  Returns:
    The scalar loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine import rehearsal
    >>> z = jnp.array([[1.0, 2.0, 9.0]])
    >>> classes = jnp.array([True, True, False])  # the third output is left out
    >>> loss = rehearsal.distillation(z, z, classes, 1.0, jnp.ones(1))
    >>> round(float(loss), 4)  # the entropy of softmax([1, 2])
    0.5822
  """
  dtype = jnp.promote_types(new.dtype, jnp.float32)
  soften = lambda z: jax.nn.log_softmax(jnp.where(classes, z.astype(dtype) / temperature, -jnp.inf), axis=-1)
  q = jnp.exp(soften(old))
  cross = -jnp.sum(jnp.where(classes, q * soften(new), 0.0), axis=-1)
  return _weighted_mean(cross, weights)


def lwf_loss(params: Any, outputs: Any, batch: Any, state: dict[str, Any], model: Any) -> jax.Array:
  """LwF's term of the loss: ``alpha`` times :func:`distillation` toward the previous model.

  The previous model's outputs are taken in evaluation mode; the outputs distilled are those of
  the past tasks' labels (all outputs when the tasks have none). With one head per task
  (``state`` has ``'heads'``), each past task's head is distilled under its task id and the
  losses are averaged over the past tasks; else the batch's own outputs are.
  """
  previous_params, previous_state = state['previous']
  past = state['past']
  seen = jnp.any(state['classes'] & past[:, None], axis=0)
  seen = jnp.where(jnp.any(seen), seen, True)  # task 0: no past class, an inactive finite term
  temperature = state['temperature']
  if 'heads' not in state:
    old = jax.lax.stop_gradient(model.evaluate(previous_params, previous_state, batch.x, batch.task_ids))
    loss = distillation(old, outputs, seen, temperature, batch.mask)
  else:
    def head(j):
      ids = jnp.full_like(batch.task_ids, j)
      old = jax.lax.stop_gradient(model.evaluate(previous_params, previous_state, batch.x, ids))
      return distillation(old, model.apply(params, batch.x, ids), seen, temperature, batch.mask)

    losses = jax.vmap(head)(state['heads'])
    weights = past.astype(losses.dtype)
    loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1)
  return state['alpha'] * jnp.any(past).astype(loss.dtype) * loss


def reservoir_slots(key: jax.Array, seen: jax.Array, valid: jax.Array, size: int) -> jax.Array:
  """Where reservoir sampling puts each example of a batch in a buffer of ``size`` slots.

  Example ``i`` is the ``n``-th of the stream (``n = seen +`` the valid examples before it,
  from 0): it takes slot ``n`` while ``n < size``, then a slot drawn uniformly from ``0 .. n``
  (kept if below ``size``), so that every example seen so far is in the buffer with probability
  ``size / (n + 1)`` (Vitter's algorithm R, Mammoth's ``reservoir``). Two examples of the batch
  drawn into one slot: the later one stays, as when they are inserted in order.

  Args:
    key: a PRNG key.
    seen: int32, the examples seen before this batch.
    valid: bool ``(B,)``, the batch's examples that enter the stream.
    size: the buffer's slots.

  Returns:
    int32 ``(B,)`` slots, ``size`` for an example not stored (an out-of-bounds index that a
    ``.at[...].set(..., mode='drop')`` skips).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.engine import rehearsal
    >>> valid = jnp.ones(3, bool)
    >>> rehearsal.reservoir_slots(jax.random.key(0), jnp.int32(0), valid, 5).tolist()
    [0, 1, 2]
  """
  order = jnp.cumsum(valid.astype(jnp.int32)) - 1
  n = seen + order
  drawn = jax.random.randint(key, n.shape, 0, n + 1)
  slot = jnp.where(n < size, n, jnp.where(drawn < size, drawn, size))
  slot = jnp.where(valid, slot, size)
  index = jnp.arange(slot.shape[0])
  overwritten = jnp.any((slot[None, :] == slot[:, None]) & (index[None, :] > index[:, None]), axis=1)
  return jnp.where(overwritten, size, slot).astype(jnp.int32)


def draw(key: jax.Array, filled: jax.Array, size: int, count: int) -> tuple[jax.Array, jax.Array]:
  """``count`` rows drawn without replacement from the first ``filled`` of ``size`` (a buffer's).

  Args:
    key: a PRNG key.
    filled: int32, the rows that hold examples.
    size: the buffer's rows.
    count: the rows wanted (at most ``size``).

  Returns:
    ``(rows, valid)``: int32 ``(count,)`` rows, uniformly random distinct rows below ``filled``
    first; bool ``(count,)``, False for the rows beyond ``filled`` (fewer filled than wanted).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.engine import rehearsal
    >>> rows, valid = rehearsal.draw(jax.random.key(0), jnp.int32(2), 5, 3)
    >>> sorted(rows[:2].tolist()), valid.tolist()
    ([0, 1], [True, True, False])
  """
  scores = jnp.where(jnp.arange(size) < filled, jax.random.uniform(key, (size,)), 2.0)
  rows = jnp.argsort(scores)[:count].astype(jnp.int32)
  return rows, jnp.arange(count) < filled


def _step_keys(state: dict[str, Any]) -> jax.Array:
  """This step's three keys (two draws, the insertion): the buffer's key folded with ``seen``."""
  return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state['key']), state['seen']), 3)


def derpp_loss(params: Any, batch: Any, state: dict[str, Any], model: Any) -> jax.Array:
  """DER++'s terms: ``alpha·MSE(f(x'), z')`` and ``beta·CE(f(x''), y'')`` on two buffer draws.

  Each draw holds as many examples as the batch (fewer while the buffer holds fewer), taken
  without replacement; an empty buffer gives 0.
  """
  size = state['x'].shape[0]
  count = min(batch.x.shape[0], size)
  filled = jnp.minimum(state['seen'], size)
  first, second, _ = _step_keys(state)
  rows, valid = draw(first, filled, size, count)
  outputs = model.apply(params, state['x'][rows], state['task_ids'][rows])
  logits = state['logits'][rows].astype(outputs.dtype)
  mse = _weighted_mean(jnp.square(outputs - logits), valid)
  rows, valid = draw(second, filled, size, count)
  outputs = model.apply(params, state['x'][rows], state['task_ids'][rows])
  cross_entropy, _ = model.loss(outputs, state['y'][rows], valid)
  return state['alpha'] * mse + state['beta'] * cross_entropy


def derpp_insert(state: dict[str, Any], batch: Any, outputs: Any) -> dict[str, Any]:
  """The buffer after a step: the batch's examples, with ``outputs`` (before the update), put in by
  :func:`reservoir_slots`; ``seen`` counts them."""
  size = state['x'].shape[0]
  _, _, insert = _step_keys(state)
  slots = reservoir_slots(insert, state['seen'], batch.mask, size)
  put = lambda buffer, values: buffer.at[slots].set(values.astype(buffer.dtype), mode='drop')
  return {
      **state,
      'x': put(state['x'], batch.x), 'y': put(state['y'], batch.y), 'task_ids': put(state['task_ids'], batch.task_ids),
      'logits': put(state['logits'], outputs), 'seen': state['seen'] + jnp.sum(batch.mask, dtype=jnp.int32),
  }


def memory_loss(params: Any, batch: Any, model: Any) -> jax.Array | None:
  """A-GEM's reference loss: the objective's loss on the memory's batch (``None`` without one)."""
  if batch.memory is None:
    return None
  x, y, task_ids = batch.memory
  loss, _ = model.loss(model.apply(params, x, task_ids), y, jnp.ones(y.shape[0], bool))
  return loss
