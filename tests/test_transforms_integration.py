"""The transforms inside real training loops: sharded over 8 simulated devices, Flax Linen, Flax NNX."""

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sfa_jax

_SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import sfa_jax

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(jax.devices(), ('x',))
    shardings = {'w': NamedSharding(mesh, P('x', None)), 'b': NamedSharding(mesh, P('x')),
                 'r': NamedSharding(mesh, P())}
    params = {'w': jnp.ones((16, 4)), 'b': jnp.arange(8.0), 'r': jnp.ones(3)}
    params = jax.device_put(params, shardings)
    fisher = jax.device_put(jax.tree.map(jnp.ones_like, params), shardings)
    for tx in (optax.chain(optax.adam(1e-2), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=2)),
               optax.chain(sfa_jax.l2(0.1), optax.adam(1e-2)),
               optax.chain(sfa_jax.ewc(fisher, 0.1), optax.adam(1e-2))):
      state = jax.jit(tx.init)(params)
      anchored = state[-1] if isinstance(state[-1], sfa_jax.SFAState) else state[0]
      for name in params:
        assert anchored.anchor[name].sharding.is_equivalent_to(shardings[name], 2 if name == 'w' else 1), name
      step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p), donate_argnums=(1,))
      hlo = step.lower(params, state).compile().as_text()
      assert 'all-gather' not in hlo and 'all-reduce' not in hlo, 'the transform step communicates'
      p = params
      for _ in range(3):  # crosses SFA's averaging step
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
      for name in params:
        ndim = params[name].ndim
        assert updates[name].sharding.is_equivalent_to(shardings[name], ndim), name
        assert p[name].sharding.is_equivalent_to(shardings[name], ndim), name
      state = sfa_jax.reanchor(state, p)
      anchored = state[-1] if isinstance(state[-1], sfa_jax.SFAState) else state[0]
      for name in params:
        assert anchored.anchor[name].sharding.is_equivalent_to(shardings[name], params[name].ndim), name
    print('SHARDING OK')
    """
)


def test_shardings_kept_over_8_simulated_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-c', _SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'SHARDING OK' in result.stdout


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _toy_data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
  return x, y


def test_flax_linen_loop_unchanged():
  """A plain Linen loop: with beta=1 and p=1 SFA returns to the anchor exactly at step T."""
  x, y = _toy_data()
  model = _LinenMLP()
  params = model.init(jax.random.key(0), x)['params']
  total_steps = 6
  tx = optax.chain(optax.adam(1e-2), sfa_jax.sfa(params, p=1.0, beta=1.0, total_steps=total_steps))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = params
  for step in range(1, total_steps + 1):
    params, state, _ = train_step(params, state)
    if step < total_steps:
      assert not np.allclose(params['Dense_0']['kernel'], start['Dense_0']['kernel'])
  chex.assert_trees_all_close(params, start, atol=1e-7)


class _NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_flax_nnx_optimizer_and_reanchor():
  """nnx.Optimizer drives SFA unchanged; reanchor(optimizer, model) re-anchors it in place."""
  x, y = _toy_data()
  model = _NNXMLP(nnx.Rngs(0))
  start = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  total_steps = 4
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=1.0, total_steps=total_steps)), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  train_step(model, optimizer)
  assert not np.allclose(model.hidden.kernel[...], start['hidden']['kernel'][...])
  train_step(model, optimizer)  # step 2 = k: beta = 1 lands on the anchor
  chex.assert_trees_all_close(nnx.state(model, nnx.Param), start, atol=1e-7)

  # Next task: anchor the params reached after one more step; the counter restarts.
  train_step(model, optimizer)
  moved = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  sfa_jax.reanchor(optimizer, model)
  assert int(sfa_jax.find_state(optimizer).count) == 0
  train_step(model, optimizer)
  train_step(model, optimizer)
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(moved), atol=1e-7)
