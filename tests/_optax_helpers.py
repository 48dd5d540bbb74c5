"""Helpers shared by the transform tests: a quadratic problem, a plain Optax loop, a small tree."""

import jax.numpy as jnp
import numpy as np
import optax


def quadratic_problem(seed, size=5):
  """(curvature a, target c, start θ0, anchor): loss 0.5 * sum(a * (θ - c)^2), gradient a * (θ - c)."""
  rng = np.random.default_rng(seed)
  curvature = rng.uniform(0.5, 2.0, size)
  target = rng.normal(size=size)
  theta0 = rng.normal(size=size)
  anchor = rng.normal(size=size)
  return curvature, target, theta0, anchor


def run_optax(tx, params, grad_fn, num_steps, step_wrapper=lambda f: f, state=None):
  """The params and the optimizer state after each of ``num_steps`` steps of ``tx`` (from ``state``)."""
  state = tx.init(params) if state is None else state

  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  step = step_wrapper(step)
  trajectory, states = [], []
  for _ in range(num_steps):
    params, state = step(params, state)
    trajectory.append(params)
    states.append(state)
  return trajectory, states


def tree_params(dtype=jnp.float32):
  """A small nested tree of two float leaves."""
  return {'a': -jnp.ones((2, 3), dtype), 'b': {'c': jnp.ones((2, 5, 2), dtype)}}
