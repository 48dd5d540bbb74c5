"""Continual fine-tuning in a Tunix trainer: one task after another, and EWC's Fisher on LoRA leaves.

`Tunix <https://github.com/google/tunix>`_'s ``PeftTrainer`` trains a Flax NNX model with any
Optax optimizer, so SFA, L2 and EWC go into it as they are
(``optax.chain(optax.adam(lr), sfa_jax.sfa(...))``); with LoRA (qwix), its optimizer holds the
``nnx.LoRAParam`` leaves only, and so do the anchors. What a sequence of tasks adds:

* :func:`train_task`: one task in a trainer that is kept from task to task: it sets SFA's ``T``
  to the task's optimizer steps (not its micro-batches: Tunix wraps the optimizer in
  ``optax.MultiSteps`` for gradient accumulation), re-anchors at every task but the first, trains
  exactly the task's steps (Tunix would skip a data set's first batches on a second
  ``train``) and, after a resume from Tunix's checkpoints, skips the tasks already done, does not
  re-anchor the task in progress and skips its batches already trained;
* :func:`nnx_fisher`: the empirical diagonal Fisher of an NNX model's ``nnx.LoRAParam`` leaves
  (or any other filter's) for EWC, with Tunix's loss function and model inputs.

Neither imports Tunix: the trainer is used through its public attributes.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sfa_jax import _validation
from sfa_jax import anchors
from sfa_jax import transforms


def train_task(
    trainer: Any,
    train_ds: Iterable[Any],
    steps: int,
    *,
    start: int,
    eval_ds: Iterable[Any] | None = None,
    fisher: Any = None,
    restart_optimizer: bool = False,
) -> bool:
  """Trains one task of a sequence in a Tunix ``PeftTrainer``: optimizer steps ``start`` to ``start + steps``.

  The trainer is kept from task to task (its metrics, hooks and checkpoints run through the
  whole sequence), and its ``train_steps`` count the optimizer steps of all tasks so far: a task
  begins where the earlier ones end, ``start = sum of their steps``. When the trainer stands at
  ``start`` (the task begins), SFA's ``T`` becomes ``steps`` and, for every task but the one at
  step 0, the anchored states of its optimizer (SFA, L2, EWC: see :func:`sfa_jax.find_states`)
  are re-anchored at the model's current params (``reanchor(trainer.optimizer, trainer.model)``:
  the optimizer's own ``wrt`` leaves, the LoRA ones under LoRA). Then the trainer trains until
  ``train_steps == start + steps``, on ``train_ds`` from its first batch.

  After a restart from Tunix's checkpoints (a new trainer on the same
  ``checkpoint_root_directory`` restores its ``train_steps``, params and optimizer state, SFA's
  anchor and step counter with it), calling this for every task again resumes the sequence
  exactly: a finished task is skipped, and the task in progress is not re-anchored and skips
  the batches it trained (``train_ds`` must give the same batches in the same order).

  The trainer is set ``is_managed_externally`` (Tunix's own ``train`` would otherwise skip the
  first ``train_steps`` batches of every data set after the first, and close the trainer): call
  ``trainer.close()`` after the last task.

  Args:
    trainer: a ``tunix.sft.peft_trainer.PeftTrainer`` (or a subclass).
    train_ds: the task's batches, as ``trainer.train`` takes them: ``steps`` optimizer steps'
      worth (times ``gradient_accumulation_steps``), or more.
    steps: the task's optimizer steps, at least 1.
    start: the trainer's ``train_steps`` at the task's start, at least 0.
    eval_ds: evaluation batches, passed to ``trainer.train``.
    fisher: for EWC, its new Fisher (a tree like the optimizer's params, e.g. from
      :func:`nnx_fisher`), or a function of no arguments that returns it, called only when the
      task begins (not after a resume into it) and the optimizer holds an EWC state (so one loop
      serves every method); ``None`` keeps the state's.
    restart_optimizer: at the task's start (not the first task's), reset the whole optimizer
      state as a new trainer's would be (moments, step counts, schedules) before re-anchoring;
      EWC's Fisher is then ``fisher``, or the transform's own initial one.

  Returns:
    Whether it trained: ``False`` when the trainer had finished the task already (a resume).

  Raises:
    ValueError: when ``steps`` or ``start`` is not a valid count, the trainer stands before
      ``start`` (an earlier task is unfinished), ``train_ds`` ran out before the task's end, or
      from :func:`sfa_jax.reanchor` (e.g. a ``fisher`` without an EWC state).

  Example:
    >>> from sfa_jax.engine.tunix import train_task
    >>> start = 0
    >>> for train_ds, steps in [(math_batches, 32), (law_batches, 16)]:  # doctest: +SKIP
    ...   train_task(trainer, train_ds, steps, start=start)
    ...   start += steps
    >>> trainer.close()  # doctest: +SKIP
  """
  _validation.check_int('steps', steps)
  _validation.check_int('start', start, low=0)
  end, done = start + steps, trainer.train_steps
  if done >= end:
    return False
  if done < start:
    raise ValueError(f'the trainer stands at optimizer step {done}, before this task\'s start {start}: '
                     'train the earlier tasks first (start is the sum of their steps).')
  if done == start:
    _begin_task(trainer, steps, first=start == 0, fisher=fisher, restart_optimizer=restart_optimizer)
  trainer.is_managed_externally = True
  trainer.config.max_steps = end
  accumulation = trainer.config.gradient_accumulation_steps or 1
  trainer.train(itertools.islice(train_ds, (done - start) * accumulation, None), eval_ds)
  if trainer.train_steps < end:
    raise ValueError(f'train_ds ran out at optimizer step {trainer.train_steps} of this task\'s {start} to {end}: '
                     f'it must give {steps * accumulation} batches ({steps} steps of {accumulation}); SFA\'s last '
                     'average, at its step T, did not happen.')
  return True


def _begin_task(trainer: Any, steps: int, *, first: bool, fisher: Any, restart_optimizer: bool) -> None:
  """The optimizer at a task's start: SFA's ``T``, and for a later task the anchors (and a restart)."""
  optimizer, model = trainer.optimizer, trainer.model
  states = anchors.find_states(optimizer)
  has_total_steps = any('total_steps' in state._fields for state in states)
  if first:
    if has_total_steps:
      anchors.set_hyperparams(optimizer, total_steps=steps)
    return
  if callable(fisher):
    fisher = fisher() if any(isinstance(state, transforms.EWCState) for state in states) else None
  if restart_optimizer:
    _restart(optimizer, model)
  if states:
    anchors.reanchor(optimizer, model, fisher=fisher, total_steps=steps if has_total_steps else None)


def _restart(optimizer: Any, model: Any) -> None:
  """Resets an ``nnx.Optimizer``'s state in place to a new one's on ``model`` (its Variables kept,
  so a trainer's cached train step sees the change)."""
  fresh = nnx.Optimizer(model, optimizer.tx, wrt=optimizer.wrt)
  nnx.update(optimizer, nnx.state(fresh, nnx.optimizer.OptState))


def nnx_fisher(
    model: Any,
    loss_fn: Callable[..., Any],
    batches: Iterable[Mapping[str, Any]],
    *,
    wrt: Any = None,
    has_aux: bool = False,
) -> Any:
  r"""The empirical diagonal Fisher of an NNX model's ``wrt`` leaves (its LoRA params by default).

  :math:`F = \frac{1}{N}\sum_i g_i^2`, with :math:`g_i` the gradient of example :math:`i`'s loss,
  ``loss_fn(model, **example)`` on that one example (a batch of one: each row of every array of a
  batch), with respect to the leaves ``wrt`` selects; :math:`N` counts every row of every batch.
  With Tunix's default loss (the mean token loss of the masked targets) this is the Fisher of
  each sequence's mean token loss, one gradient per sequence, as the engine's language-model
  runs compute it (:mod:`sfa_jax.engine.lm`). Only the ``wrt`` leaves are differentiated: under
  LoRA the frozen base weights never are. The sums are float32 and cast back to each leaf's dtype.
  Memory: one batch's per-example gradients of the ``wrt`` leaves (``rows × leaves``), so pass
  batches sized for that.

  Args:
    model: an ``nnx.Module``.
    loss_fn: ``loss_fn(model, **inputs)`` returns the mean loss of a batch (Tunix's
      ``trainer.loss_fn``), or ``(loss, aux)`` with ``has_aux``.
    batches: the examples, as dicts of keyword inputs to ``loss_fn`` whose arrays share a leading
      batch axis (e.g. ``map(trainer.gen_model_input_fn, data)``); other values (``None``) are
      passed as they are.
    wrt: an NNX filter of the leaves (``None``: ``nnx.LoRAParam``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    An ``nnx.State`` like ``nnx.state(model, wrt)`` (its Variables holding non-negative values):
    the Fisher that ``sfa_jax.ewc`` and ``sfa_jax.reanchor(..., fisher=...)`` take for an
    ``nnx.Optimizer`` with the same ``wrt``, and that ``sfa_jax.online_fisher`` adds to another
    of these (not to ``sfa_jax.find_state(optimizer).fisher``, which holds bare values).

  Raises:
    ValueError: when ``model`` has no leaf that ``wrt`` selects, or ``batches`` no example.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sfa_jax.engine.tunix import nnx_fisher
    >>> model = nnx.LoRALinear(2, 1, lora_rank=1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> batch = {'x': jnp.ones((4, 2)), 'y': jnp.ones((4, 1))}
    >>> fisher = nnx_fisher(model, loss_fn, [batch])
    >>> sorted(fisher['lora']), fisher['lora']['lora_b'].shape
    (['lora_a', 'lora_b'], (1, 1))
  """
  wrt = nnx.LoRAParam if wrt is None else wrt
  params = nnx.state(model, wrt)
  if not jax.tree.leaves(params):
    raise ValueError(f'the model has no leaf that wrt={wrt!r} selects: no LoRA params? (apply LoRA first, '
                     'or pass wrt=nnx.Param for the whole model).')
  total, count = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params), 0
  for batch in batches:
    squares = _squared_gradients(model, dict(batch), wrt=wrt, loss_fn=loss_fn, has_aux=bool(has_aux))
    total = jax.tree.map(jnp.add, total, squares)
    count += len(jax.tree.leaves(batch)[0])
  if not count:
    raise ValueError('batches holds no example: the Fisher is a mean over examples.')
  return jax.tree.map(lambda t, p: (t / count).astype(p.dtype), total, params)


@functools.partial(nnx.jit, static_argnames=('wrt', 'loss_fn', 'has_aux'))
def _squared_gradients(model: Any, batch: dict[str, Any], *, wrt: Any, loss_fn: Callable[..., Any], has_aux: bool) -> Any:
  """The sum over a batch's rows of each row's squared gradient of the ``wrt`` leaves (float32),
  compiled once per model structure, filter, loss function and batch shape."""
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def example_loss(params, example):
    out = loss_fn(nnx.merge(graphdef, params, rest), **jax.tree.map(lambda x: x[None], example))
    return out[0] if has_aux else out

  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)
  return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)
