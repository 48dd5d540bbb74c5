"""Tests of sfa_jax.engine.tunix: the Fisher of an NNX model's LoRA leaves, and task after task in a Tunix trainer.

The trainer tests run Tunix's ``PeftTrainer`` on a small NNX model with ``nnx.LoRALinear`` layers
(LoRA as qwix gives it: ``nnx.LoRAParam`` leaves beside frozen ones) and compare it with the same
optimizer stepped by hand with ``nnx.Optimizer``. They skip without ``google-tunix``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sfa_jax
from sfa_jax.engine.tunix import nnx_fisher
from sfa_jax.engine.tunix import train_task

STEPS = 4  # optimizer steps per task


class Net(nnx.Module):
  """Two LoRA layers over frozen weights."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.hidden = nnx.LoRALinear(3, 8, lora_rank=2, rngs=rngs)
    self.out = nnx.LoRALinear(8, 2, lora_rank=2, rngs=rngs)
    # LoRA's B starts at zero: make it nonzero, so every LoRA leaf has a gradient.
    for layer in (self.hidden, self.out):
      layer.lora.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), layer.lora.lora_b.shape)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def batches(seed, count, size=4):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(3, 2)).astype(np.float32)
  x = rng.normal(size=(count * size, 3)).astype(np.float32)
  return [{'x': x[i:i + size], 'y': x[i:i + size] @ w} for i in range(0, count * size, size)]


def lora_values(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


# -- nnx_fisher -------------------------------------------------------------------------------------


def per_example_reference(model, data, wrt):
  """mean_i g_i², one nnx.grad per example (a batch of one), in float64."""
  grad = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt)))
  squares = [jax.tree.map(lambda g: np.asarray(g, np.float64) ** 2, nnx.to_pure_dict(grad(model, x[i:i + 1], y[i:i + 1])))
             for x, y in ((b['x'], b['y']) for b in data) for i in range(len(x))]
  return jax.tree.map(lambda *s: np.mean(s, axis=0), *squares)


def test_nnx_fisher_is_the_mean_squared_per_example_gradient_of_the_lora_leaves():
  model = Net()
  data = batches(0, 1, size=3) + batches(1, 1, size=5)  # batches of unequal sizes: 8 examples
  fisher = nnx_fisher(model, loss_fn, data)
  got = nnx.to_pure_dict(fisher)
  assert jax.tree.structure(got) == jax.tree.structure(lora_values(model))  # the LoRA leaves only
  chex.assert_trees_all_close(got, per_example_reference(model, data, nnx.LoRAParam), rtol=1e-5)
  assert all(np.all(np.asarray(leaf) > 0) for leaf in jax.tree.leaves(got))


def test_nnx_fisher_of_another_filter_and_of_a_loss_with_aux():
  model = Net()
  data = batches(0, 2)
  with_aux = lambda model, x, y: (loss_fn(model, x, y), {'unused': jnp.zeros(())})
  fisher = nnx_fisher(model, with_aux, data, wrt=nnx.Param, has_aux=True)
  want = per_example_reference(model, data, nnx.Param)
  chex.assert_trees_all_close(nnx.to_pure_dict(fisher), want, rtol=1e-5)
  assert 'kernel' in nnx.to_pure_dict(fisher)['hidden']  # nnx.Param takes the LoRA leaves and the base


def test_nnx_fisher_goes_into_ewc_and_reanchor_of_an_nnx_optimizer():
  model = Net()
  fisher = nnx_fisher(model, loss_fn, batches(0, 2))
  optimizer = nnx.Optimizer(model, optax.chain(sfa_jax.ewc(fisher, 10.0), optax.sgd(0.1)), wrt=nnx.LoRAParam)
  optimizer.update(model, nnx.grad(lambda m: loss_fn(m, **batches(1, 1)[0]), argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
  doubled = jax.tree.map(lambda f: 2 * f, fisher)
  sfa_jax.reanchor(optimizer, model, fisher=doubled)
  state = sfa_jax.find_state(optimizer)
  chex.assert_trees_all_close(nnx.to_pure_dict(state.fisher), nnx.to_pure_dict(doubled))
  chex.assert_trees_all_close(nnx.to_pure_dict(state.anchor), lora_values(model))


def test_nnx_fisher_refuses_a_model_without_lora_leaves_and_no_examples():
  with pytest.raises(ValueError, match='no leaf that wrt'):
    nnx_fisher(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), loss_fn, batches(0, 1))
  with pytest.raises(ValueError, match='no example'):
    nnx_fisher(Net(), loss_fn, [])


# -- train_task in a Tunix PeftTrainer ---------------------------------------------------------------


@pytest.fixture
def peft_trainer():
  return pytest.importorskip('tunix.sft.peft_trainer', reason='google-tunix is not installed: pip install sfa-jax[tunix]')


def make_trainer(peft_trainer, tx, *, accumulation=None, root=None):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  options = ocp.CheckpointManagerOptions(save_interval_steps=2, enable_async_checkpointing=False) if root else None
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**6, gradient_accumulation_steps=accumulation,
                                       checkpoint_root_directory=root, checkpointing_options=options)
  return peft_trainer.PeftTrainer(Net(), tx, config).with_loss_fn(loss_fn)


def sfa_adam(wait_for_anchor=True):
  return optax.chain(optax.adam(0.05), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=1, wait_for_anchor=wait_for_anchor))


TASKS = [batches(10, STEPS), batches(11, STEPS)]


def run_tasks(trainer, tasks=TASKS, **kwargs):
  for k, data in enumerate(tasks):
    train_task(trainer, data, STEPS, start=k * STEPS, **kwargs)
  trainer.close()
  return trainer


def by_hand(tx, tasks=TASKS, *, restart=False, accumulation=1):
  """The same sequence with nnx.Optimizer stepped by hand: T set, re-anchored (or restarted) between tasks."""
  model = Net()
  tx = optax.MultiSteps(tx, accumulation) if accumulation > 1 else tx
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  grad = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
  step = nnx.jit(lambda model, optimizer, batch: optimizer.update(model, grad(model, **batch)))
  for k, data in enumerate(tasks):
    if k == 0:
      sfa_jax.set_hyperparams(optimizer, total_steps=STEPS)
    elif restart:
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
      sfa_jax.reanchor(optimizer, model, total_steps=STEPS)
    else:
      sfa_jax.reanchor(optimizer, model, total_steps=STEPS)
    for batch in data:
      step(model, optimizer, batch)
  return model, optimizer


@pytest.mark.parametrize('wait_for_anchor', [True, False], ids=['from the second task', 'from the first task'])
def test_a_sequence_in_one_trainer_lands_where_the_optimizer_stepped_by_hand_does(peft_trainer, wait_for_anchor):
  trainer = run_tasks(make_trainer(peft_trainer, sfa_adam(wait_for_anchor)))
  model, optimizer = by_hand(sfa_adam(wait_for_anchor))
  chex.assert_trees_all_close(lora_values(trainer.model), lora_values(model), rtol=1e-5, atol=1e-6)
  state = sfa_jax.find_state(trainer.optimizer)
  assert (int(state.count), int(state.total_steps), bool(state.active), bool(state.averaged)) == (STEPS, STEPS, True, True)
  assert trainer.train_steps == 2 * STEPS


def test_restart_optimizer_is_a_fresh_optimizer_at_each_task(peft_trainer):
  trainer = run_tasks(make_trainer(peft_trainer, sfa_adam()), restart_optimizer=True)
  restarted, _ = by_hand(sfa_adam(), restart=True)
  kept, _ = by_hand(sfa_adam())
  chex.assert_trees_all_close(lora_values(trainer.model), lora_values(restarted), rtol=1e-5, atol=1e-6)
  assert not np.allclose(lora_values(restarted)['out']['lora']['lora_b'], lora_values(kept)['out']['lora']['lora_b'])


def test_with_gradient_accumulation_sfa_counts_optimizer_steps(peft_trainer):
  tasks = [batches(10, 2 * STEPS), batches(11, 2 * STEPS)]  # two micro-batches a step
  trainer = run_tasks(make_trainer(peft_trainer, sfa_adam(), accumulation=2), tasks)
  model, _ = by_hand(sfa_adam(), tasks, accumulation=2)
  chex.assert_trees_all_close(lora_values(trainer.model), lora_values(model), rtol=1e-5, atol=1e-6)
  state = sfa_jax.find_state(trainer.optimizer)
  assert (int(state.count), int(state.total_steps), bool(state.averaged)) == (STEPS, STEPS, True)


class Stopped(Exception):
  """The process stops here (a crash, a preemption)."""


def stop_after(data, count):
  yield from data[:count]
  raise Stopped


def test_resuming_from_tunix_checkpoints_continues_the_sequence_exactly(peft_trainer, tmp_path):
  reference = run_tasks(make_trainer(peft_trainer, sfa_adam()))
  root = str(tmp_path / 'checkpoints')
  first = make_trainer(peft_trainer, sfa_adam(), root=root)
  train_task(first, TASKS[0], STEPS, start=0)
  with pytest.raises(Stopped):
    train_task(first, stop_after(TASKS[1], 2), STEPS, start=STEPS)  # stopped after step 6 of 8
  assert first.train_steps == STEPS + 2
  resumed = make_trainer(peft_trainer, sfa_adam(), root=root)  # restores step 6: params and optimizer state
  assert resumed.train_steps == STEPS + 2 and int(sfa_jax.find_state(resumed.optimizer).count) == 2
  assert [train_task(resumed, data, STEPS, start=k * STEPS) for k, data in enumerate(TASKS)] == [False, True]
  resumed.close()
  chex.assert_trees_all_close(lora_values(resumed.model), lora_values(reference.model), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(sfa_jax.find_state(resumed.optimizer), sfa_jax.find_state(reference.optimizer), rtol=1e-6)


def test_ewc_gets_the_fisher_when_a_task_begins_only(peft_trainer, tmp_path):
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(Net(), nnx.LoRAParam))
  ewc_sgd = lambda: optax.chain(sfa_jax.ewc(zeros, 10.0, wait_for_anchor=True), optax.sgd(0.05))
  trainer = make_trainer(peft_trainer, ewc_sgd(), root=str(tmp_path))
  calls = []

  def fisher():
    calls.append(trainer.train_steps)
    return nnx_fisher(trainer.model, loss_fn, TASKS[0])

  train_task(trainer, TASKS[0], STEPS, start=0, fisher=fisher)
  want = nnx.to_pure_dict(fisher())
  with pytest.raises(Stopped):
    train_task(trainer, stop_after(TASKS[1], 2), STEPS, start=STEPS, fisher=fisher)
  resumed = make_trainer(peft_trainer, ewc_sgd(), root=str(tmp_path))
  train_task(resumed, TASKS[1], STEPS, start=STEPS, fisher=fisher)  # resumed into the task: no new Fisher
  resumed.close()
  assert calls == [STEPS, STEPS]  # the check above, then the task's start
  chex.assert_trees_all_close(nnx.to_pure_dict(sfa_jax.find_state(resumed.optimizer).fisher), want)


def test_train_task_refuses_a_short_data_set_and_a_trainer_before_the_task(peft_trainer):
  trainer = make_trainer(peft_trainer, sfa_adam())
  with pytest.raises(ValueError, match='before this task'):
    train_task(trainer, TASKS[1], STEPS, start=STEPS)
  with pytest.raises(ValueError, match='ran out at optimizer step 3'):
    train_task(trainer, TASKS[0][:3], STEPS, start=0)
  with pytest.raises(ValueError, match='steps'):
    train_task(trainer, TASKS[0], 0, start=0)

