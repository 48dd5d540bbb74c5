"""Tests of sfa_jax.transforms: SFA's trajectory against a NumPy reference, the schedule, L2/EWC maths,
re-anchoring, and the checks Optax runs on its own contrib optimizers."""

import functools
import warnings

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax
from _optax_helpers import quadratic_problem
from _optax_helpers import run_optax
from _optax_helpers import tree_params

# ---------------------------------------------------------------------------------------------
# A plain NumPy reference of SFA, written without sfa_jax's helpers.


def reference_averaging_steps(p, total_steps):
  """Steps (1-based) after which SFA averages: every round(p*T) steps (half up, >= 1) and at T."""
  period = max(1, int(np.floor(np.float32(p) * np.float32(total_steps) + np.float32(0.5))))
  return {t for t in range(1, total_steps + 1) if t % period == 0} | {total_steps}


def numpy_sfa_trajectory(optimizer, lr, p, beta, total_steps, extra_steps, problem):
  curvature, target, theta, anchor = (np.array(x, np.float64) for x in problem)
  averaging = reference_averaging_steps(p, total_steps)
  mu, nu = np.zeros_like(theta), np.zeros_like(theta)
  trajectory = []
  for t in range(1, total_steps + extra_steps + 1):
    grad = curvature * (theta - target)
    if optimizer == 'sgd':
      theta = theta - lr * grad
    else:  # Adam, optax's defaults: b1=0.9, b2=0.999, eps=1e-8, eps_root=0
      mu = 0.9 * mu + 0.1 * grad
      nu = 0.999 * nu + 0.001 * grad**2
      mu_hat, nu_hat = mu / (1 - 0.9**t), nu / (1 - 0.999**t)
      theta = theta - lr * mu_hat / (np.sqrt(nu_hat) + 1e-8)
    if t in averaging:
      theta = beta * anchor + (1 - beta) * theta
    trajectory.append(theta.copy())
  return np.stack(trajectory)


# ---------------------------------------------------------------------------------------------
# The schedule.


@pytest.mark.parametrize(
    'p, total_steps, expected',
    [
        (0.25, 10, [3, 6, 9, 10]),  # p*T = 2.5, rounded half up to 3; end of task added
        (0.5, 10, [5, 10]),  # T a multiple of k: one average at the end, not two
        (1.0, 7, [7]),  # p = 1: one average, at the end
        (0.3, 1, [1]),  # T = 1
        (0.01, 4, [1, 2, 3, 4]),  # p*T < 0.5: k = 1, every step
        (0.96, 100, [96, 100]),
        (0.29, 100, [29, 58, 87, 100]),  # p*T = 28.999999999999996 in float64: still 29
    ],
)
def test_schedule_examples(p, total_steps, expected):
  steps = [t for t in range(0, total_steps + 5) if sfa_jax.is_averaging_step(t, p, total_steps)]
  assert steps == expected
  assert set(steps) == reference_averaging_steps(p, total_steps)


_traced_schedule = jax.jit(jax.vmap(sfa_jax.is_averaging_step, in_axes=(0, None, None)))


@hypothesis.given(p=st.floats(1e-3, 1.0), total_steps=st.integers(1, 300))
def test_schedule_matches_reference_and_is_traceable(p, total_steps):
  steps = np.arange(0, 303)  # one shape for every example: p and T are traced, one compilation
  traced = _traced_schedule(steps, p, total_steps)
  got = {int(t) for t, flag in zip(steps, traced) if flag}
  assert got == reference_averaging_steps(p, total_steps)
  assert total_steps in got and all(1 <= t <= total_steps for t in got)


# ---------------------------------------------------------------------------------------------
# SFA's trajectory equals the NumPy reference.


class SFATrajectoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    @hypothesis.settings(max_examples=12, deadline=None)
    @hypothesis.given(
        optimizer=st.sampled_from(['sgd', 'adam']),
        p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
        beta=st.floats(0.0, 1.0),
        total_steps=st.one_of(st.just(1), st.integers(1, 25)),
        seed=st.integers(0, 1000),
    )
    def check(optimizer, p, beta, total_steps, seed):
      problem = quadratic_problem(seed)
      lr = 0.1 if optimizer == 'sgd' else 0.05
      expected = numpy_sfa_trajectory(optimizer, lr, p, beta, total_steps, 3, problem)
      curvature, target, theta0, anchor = (jnp.asarray(x, jnp.float32) for x in problem)
      base = optax.sgd(lr) if optimizer == 'sgd' else optax.adam(lr)
      tx = optax.chain(base, sfa_jax.sfa({'w': anchor}, p, beta, total_steps=total_steps))
      grad_fn = lambda params: {'w': curvature * (params['w'] - target)}
      trajectory, _ = run_optax(tx, {'w': theta0}, grad_fn, total_steps + 3, self.variant)
      got = np.stack([np.asarray(params['w']) for params in trajectory])
      np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)

    check()

  def test_averaging_steps_land_on_the_average(self):
    params = {'w': jnp.array([2.0, -4.0])}
    anchor = {'w': jnp.array([0.0, 0.0])}
    tx = optax.chain(optax.sgd(1.0), sfa_jax.sfa(anchor, p=1.0, beta=0.25, total_steps=2))
    grads = {'w': jnp.array([1.0, 1.0])}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # step 1: plain
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(params['w'], jnp.array([1.0, -5.0]))
    updates, state = tx.update(grads, state, params)  # step 2 = T: average of (0, -6) with 0
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(params['w'], 0.75 * jnp.array([0.0, -6.0]))
    updates, state = tx.update(grads, state, params)  # past T: plain again
    chex.assert_trees_all_close(updates['w'], -grads['w'])
    assert int(state[1].count) == 3


# ---------------------------------------------------------------------------------------------
# The L2 correspondence of the paper.


def test_sfa_every_step_equals_l2_sgd():
  """Exact: SGD(α) + SFA averaging *every* step with β = ηλ, α = η/(1−ηλ) equals L2(λ) + SGD(η).

  One SFA step:  θ' = β θ_o + (1−β)(θ − α g) = ηλ θ_o + (1−ηλ) θ − η g,
  one L2 step:   θ' = θ − η (g + λ(θ − θ_o))  = ηλ θ_o + (1−ηλ) θ − η g,
  the same map, so the trajectories agree to float rounding at every step, for any loss.
  """
  eta, lam, steps = 0.05, 2.0, 40
  curvature, target, theta0, anchor = (jnp.asarray(x, jnp.float32) for x in quadratic_problem(3))
  grad_fn = lambda params: {'w': curvature * (params['w'] - target) + jnp.sin(params['w'])}
  beta, alpha = eta * lam, eta / (1 - eta * lam)
  sfa_tx = optax.chain(optax.sgd(alpha), sfa_jax.sfa({'w': anchor}, p=1e-6, beta=beta, total_steps=steps))
  l2_tx = optax.chain(sfa_jax.l2(lam, anchor={'w': anchor}), optax.sgd(eta))
  sfa_path, _ = run_optax(sfa_tx, {'w': theta0}, grad_fn, steps)
  l2_path, _ = run_optax(l2_tx, {'w': theta0}, grad_fn, steps)
  for a, b in zip(sfa_path, l2_path):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_sfa_every_k_steps_only_approximates_l2():
  """Approximate: averaging every k > 1 steps with the k-step pull β_k = 1 − (1−ηλ)^k.

  Without a task gradient the two agree exactly at multiples of k (the pull toward θ_o is geometric
  in both). With a gradient they differ: SFA lets the params drift for k steps before pulling, L2
  pulls a little every step. Measured on a quadratic, as a fraction of the distance between the
  fine-tuned and the L2 end points: the gap grows with k, and the matched β_k is always closer to
  L2 than the one-step β = ηλ. (Measured: 0.09 at k = 2, 0.21 at k = 5, 0.39 at k = 10.)
  """
  eta, lam, steps = 0.05, 2.0, 60
  curvature, target, theta0, anchor = (jnp.asarray(x, jnp.float32) for x in quadratic_problem(4))

  def end_point(tx, grad_scale=1.0, every=None):
    grad_fn = lambda params: {'w': grad_scale * curvature * (params['w'] - target)}
    path, _ = run_optax(tx, {'w': theta0}, grad_fn, steps)
    return [p['w'] for p in path][every - 1 :: every] if every else path[-1]['w']

  l2_tx = optax.chain(sfa_jax.l2(lam, anchor={'w': anchor}), optax.sgd(eta))
  sfa_tx = lambda k, beta: optax.chain(optax.sgd(eta), sfa_jax.sfa({'w': anchor}, k / steps, beta, total_steps=steps))
  matched = lambda k: 1 - (1 - eta * lam) ** k

  no_grad_sfa = end_point(sfa_tx(5, matched(5)), grad_scale=0.0, every=5)
  no_grad_l2 = end_point(l2_tx, grad_scale=0.0, every=5)
  for a, b in zip(no_grad_sfa, no_grad_l2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  l2_end, ft_end = end_point(l2_tx), end_point(optax.sgd(eta))
  relative_gap = lambda end: float(jnp.linalg.norm(end - l2_end) / jnp.linalg.norm(ft_end - l2_end))
  gaps = {k: relative_gap(end_point(sfa_tx(k, matched(k)))) for k in (2, 5, 10)}
  naive = {k: relative_gap(end_point(sfa_tx(k, eta * lam))) for k in (2, 5, 10)}
  assert 1e-3 < gaps[2] < gaps[5] < gaps[10] < 0.5
  assert all(gaps[k] < naive[k] for k in gaps)


# ---------------------------------------------------------------------------------------------
# L2 and EWC maths.


@hypothesis.given(strength=st.floats(0.0, 10.0), seed=st.integers(0, 100))
def test_l2_and_ewc_add_the_penalty_gradient(strength, seed):
  rng = np.random.default_rng(seed)
  params, anchor, grads, fisher = (
      {'a': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), 'b': jnp.asarray(rng.normal(size=4), jnp.float32)}
      for _ in range(4)
  )
  fisher = jax.tree.map(jnp.abs, fisher)
  l2_updates, _ = sfa_jax.l2(strength, anchor).update(grads, sfa_jax.l2(strength, anchor).init(params), params)
  ewc_tx = sfa_jax.ewc(fisher, strength, anchor)
  ewc_updates, _ = ewc_tx.update(grads, ewc_tx.init(params), params)

  def penalty(params, weights):
    return 0.5 * strength * sum(
        jnp.sum(w * (p - a) ** 2) for p, a, w in zip(jax.tree.leaves(params), jax.tree.leaves(anchor), jax.tree.leaves(weights))
    )

  ones = jax.tree.map(jnp.ones_like, params)
  expected_l2 = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params, ones))
  expected_ewc = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params, fisher))
  chex.assert_trees_all_close(l2_updates, expected_l2, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(ewc_updates, expected_ewc, rtol=1e-5, atol=1e-5)


def test_integer_and_key_leaves_are_never_averaged_or_penalised():
  params = {'w': jnp.ones(3), 'step': jnp.array(5, jnp.int32), 'key': jax.random.key(0)}
  anchor = {'w': jnp.zeros(3), 'step': jnp.array(0, jnp.int32), 'key': jax.random.key(1)}
  updates = {'w': jnp.ones(3), 'step': jnp.array(1, jnp.int32), 'key': jax.random.key(7)}
  fisher = {'w': jnp.ones(3), 'step': jnp.array(0, jnp.int32), 'key': jax.random.key(0)}
  for tx in (
      sfa_jax.sfa(anchor, p=1.0, beta=0.5, total_steps=1),
      sfa_jax.l2(3.0, anchor),
      sfa_jax.ewc(fisher, 3.0, anchor),
  ):
    new_updates, _ = tx.update(updates, tx.init(params), params)
    assert new_updates['step'] is updates['step'] and new_updates['key'] is updates['key']
    assert not np.allclose(new_updates['w'], updates['w'])


# ---------------------------------------------------------------------------------------------
# Optax's contrib checks, applied to our transforms.


def _transforms_under_test(params):
  fisher = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  return {
      'sfa': optax.chain(optax.adam(1e-2), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)),
      'l2': optax.chain(sfa_jax.l2(0.1), optax.adam(1e-2)),
      'ewc': optax.chain(sfa_jax.ewc(fisher, 0.1), optax.adam(1e-2)),
  }


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_extra_args_pass_through_without_recompiling(name):
  params = tree_params()
  tx = _transforms_under_test(params)[name]
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize(
    'factory, hyperparams, changed',
    [
        (functools.partial(sfa_jax.sfa, p=0.5, total_steps=2), {'beta': 0.5}, {'beta': 0.9}),
        (functools.partial(sfa_jax.sfa, beta=0.5), {'p': 0.5, 'total_steps': 4}, {'p': 0.25, 'total_steps': 4}),
        (sfa_jax.l2, {'strength': 0.1}, {'strength': 2.0}),
        (functools.partial(sfa_jax.ewc, {'a': jnp.ones((2, 3)), 'b': {'c': jnp.ones((2, 5, 2))}}), {'strength': 0.1}, {'strength': 2.0}),
    ],
)
def test_inject_hyperparams(factory, hyperparams, changed):
  params = tree_params()
  grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), params)
  plain = factory(**hyperparams)
  injected = optax.inject_hyperparams(factory)(**hyperparams)

  def run(tx, state, steps=2):
    step = jax.jit(tx.update)
    p = params
    for _ in range(steps):
      updates, state = step(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  plain_params, plain_state = run(plain, plain.init(params))
  injected_params, injected_state = run(injected, jax.jit(injected.init)(params))
  chex.assert_trees_all_close(injected_params, plain_params, rtol=1e-6)
  chex.assert_trees_all_close(injected_state.inner_state, plain_state, rtol=1e-6)
  # Changing the hyper-parameter inside the state changes the result like a fresh factory would.
  state = injected.init(params)
  for key, value in changed.items():
    state.hyperparams[key] = jnp.asarray(value, state.hyperparams[key].dtype)
  changed_params, _ = run(injected, state)
  fresh_params, _ = run(factory(**changed), factory(**changed).init(params))
  chex.assert_trees_all_close(changed_params, fresh_params, rtol=1e-6)
  assert not np.allclose(jax.tree.leaves(changed_params)[0], jax.tree.leaves(plain_params)[0])


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_dtypes_preserved_and_state_stable(name, dtype):
  params = tree_params(dtype)
  tx = _transforms_under_test(params)[name]
  state = tx.init(params)
  initial = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  step = jax.jit(tx.update)
  for _ in range(5):  # crosses SFA's averaging steps 2 and 4 and a step past T
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params)
    updates, state = step(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal_dtypes(params, tree_params(dtype))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == initial


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_multisteps_accumulation(name):
  """MultiSteps(tx, k) on grads g1..gk equals tx on their mean; SFA counts real (outer) steps."""
  params = tree_params()
  tx = _transforms_under_test(params)[name]
  accumulating = optax.MultiSteps(tx, every_k_schedule=3)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(6)]
  acc_params, acc_state = params, accumulating.init(params)
  ref_params, ref_state = params, tx.init(params)
  step = jax.jit(accumulating.update)
  for i, g in enumerate(grads):
    updates, acc_state = step(g, acc_state, acc_params)
    acc_params = optax.apply_updates(acc_params, updates)
    if i % 3 == 2:
      mean = jax.tree.map(lambda *gs: sum(gs) / 3, *grads[i - 2 : i + 1])
      updates, ref_state = tx.update(mean, ref_state, ref_params)
      ref_params = optax.apply_updates(ref_params, updates)
      chex.assert_trees_all_close(acc_params, ref_params, rtol=1e-5, atol=1e-6)
  if name == 'sfa':
    assert int(acc_state.inner_opt_state[1].count) == 2


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_params_and_state_can_be_donated(name):
  params = tree_params()
  tx = _transforms_under_test(params)[name]
  state = tx.init(params)  # the anchor is a copy, so donating params does not donate the anchor

  @jax.jit
  def step_fn(params, state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donating = jax.jit(step_fn, donate_argnums=(0, 1))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # "Some donated buffers were not usable" would fail here
    for _ in range(5):
      old_leaf = params['a']
      params, state = donating(params, state)
      assert old_leaf.is_deleted()
  chex.assert_tree_all_finite(params)


# ---------------------------------------------------------------------------------------------
# Re-anchoring.


def test_reanchor_finds_states_in_wrappers_and_restarts_the_counter():
  params = tree_params()
  fisher = jax.tree.map(jnp.ones_like, params)
  tx = optax.MultiSteps(
      optax.chain(
          sfa_jax.ewc(fisher, 1.0),
          optax.inject_hyperparams(sfa_jax.l2)(strength=0.1),
          optax.adam(1e-2),
          optax.inject_hyperparams(sfa_jax.sfa)(p=0.5, beta=0.5, total_steps=4),
      ),
      every_k_schedule=1,
  )
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  new_fisher = jax.tree.map(lambda x: 2 * jnp.ones_like(x), params)
  new_state = sfa_jax.reanchor(state, params, fisher=new_fisher)
  ewc_state, l2_state, adam_state, sfa_state = new_state.inner_opt_state
  for anchor in (ewc_state.anchor, l2_state.inner_state.anchor, sfa_state.inner_state.anchor):
    chex.assert_trees_all_equal(anchor, params)
    assert anchor['a'] is not params['a']  # a copy: both can be donated
  chex.assert_trees_all_equal(ewc_state.fisher, new_fisher)
  assert int(sfa_state.inner_state.count) == 0
  chex.assert_trees_all_equal(adam_state, state.inner_opt_state[2])  # moments kept


def test_reanchor_errors():
  params = tree_params()
  with pytest.raises(ValueError, match='found no SFAState'):
    sfa_jax.reanchor(optax.adam(1e-3).init(params), params)
  state = optax.chain(optax.adam(1e-3), sfa_jax.sfa(p=0.5, total_steps=3)).init(params)
  with pytest.raises(ValueError, match=r"params\['b'\]\['c'\] has shape"):
    sfa_jax.reanchor(state, {'a': params['a'], 'b': {'c': jnp.ones(3)}})
  with pytest.raises(ValueError, match='holds no EWCState'):
    sfa_jax.reanchor(state, params, fisher=params)


def test_anchor_none_means_a_copy_of_the_params_at_init():
  params = tree_params()
  state = sfa_jax.sfa(p=0.5, total_steps=2).init(params)
  chex.assert_trees_all_equal(state.anchor, params)
  assert state.anchor['a'] is not params['a']


# ---------------------------------------------------------------------------------------------
# Bad input gets a clear error.


@pytest.mark.parametrize(
    'make, error, match',
    [
        (lambda: sfa_jax.sfa(None, 0.0, 0.5, total_steps=3), ValueError, r'p must lie in \(0.0, 1.0\]'),
        (lambda: sfa_jax.sfa(None, 1.5, 0.5, total_steps=3), ValueError, 'p must lie'),
        (lambda: sfa_jax.sfa(None, float('nan'), 0.5, total_steps=3), ValueError, 'p must lie'),
        (lambda: sfa_jax.sfa(None, 0.5, -0.1, total_steps=3), ValueError, r'beta must lie in \[0.0, 1.0\]'),
        (lambda: sfa_jax.sfa(None, 0.5, 1.1, total_steps=3), ValueError, 'beta must lie'),
        (lambda: sfa_jax.sfa(None, 0.5, 0.5, total_steps=0), ValueError, 'total_steps must be an integer >= 1'),
        (lambda: sfa_jax.sfa(None, 0.5, 0.5, total_steps=2.5), ValueError, 'total_steps must be an integer'),
        (lambda: sfa_jax.sfa(None, 0.5, 0.5), TypeError, 'sfa needs total_steps=T'),
        (lambda: sfa_jax.sfa(total_steps=3), TypeError, 'sfa needs p'),
        (lambda: sfa_jax.sfa(None, 0.5, lambda count: 0.5, total_steps=3), TypeError, 'inject_hyperparams'),
        (lambda: sfa_jax.l2(-1.0), ValueError, 'strength must lie'),
        (lambda: sfa_jax.ewc({'a': jnp.ones(2)}, -1.0), ValueError, 'strength must lie'),
        (lambda: sfa_jax.ewc(None, 1.0), ValueError, 'ewc needs a Fisher'),
        (lambda: sfa_jax.ewc({'a': jnp.array([1.0, -1.0])}, 1.0), ValueError, r"fisher\['a'\] has negative"),
    ],
)
def test_bad_hyperparameters(make, error, match):
  with pytest.raises(error, match=match):
    make()


@pytest.mark.parametrize(
    'bad_tree, match',
    [
        ({'a': jnp.ones((2, 3))}, r"missing leaves \[\"\['b'\]\['c'\]\"\]"),
        ({'a': jnp.ones((2, 3)), 'b': {'c': jnp.ones((2, 5, 3))}}, r"\['b'\]\['c'\] has shape \(2, 5, 3\)"),
        ({'a': jnp.ones((2, 3), jnp.bfloat16), 'b': {'c': jnp.ones((2, 5, 2))}}, r"\['a'\] has dtype bfloat16"),
    ],
)
def test_mismatched_anchor_or_fisher_names_the_leaf(bad_tree, match):
  params = tree_params()
  for tx, name in (
      (sfa_jax.sfa(bad_tree, 0.5, total_steps=3), 'anchor'),
      (sfa_jax.l2(1.0, anchor=bad_tree), 'anchor'),
      (sfa_jax.ewc(jax.tree.map(jnp.abs, bad_tree), 1.0), 'fisher'),
  ):
    with pytest.raises(ValueError, match=name + '.*' if 'missing' in match else name + match):
      tx.init(params)
    if 'missing' in match:
      with pytest.raises(ValueError, match=match):
        tx.init(params)


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_params_none_is_refused(name):
  params = tree_params()
  tx = _transforms_under_test(params)[name]
  state = tx.init(params)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, state, None)
  with pytest.raises(ValueError, match='params'):
    tx.init(None)
