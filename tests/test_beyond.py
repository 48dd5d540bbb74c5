"""Tests of the methods beyond the paper: adaptive SFA (sfa_jax.adaptive) against a NumPy reference and
Optax's checks, and the adaptive-sfa and multi-anchor-sfa methods of the sequence trainer."""

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
from sfa_jax import adaptive
from sfa_jax import engine
from sfa_jax.engine import callbacks
from sfa_jax.engine import loop
from sfa_jax.engine import methods
from sfa_jax import tasks
from sfa_jax.engine.checkpoint import Checkpointer

# ---------------------------------------------------------------------------------------------
# A plain NumPy reference of adaptive SFA, written without sfa_jax's helpers.


def numpy_adaptive_trajectory(optimizer, lr, threshold, beta, min_p, total_steps, extra_steps, problem):
  """Params after every step, and the steps (1-based) after which the rule averaged."""
  curvature, target, theta, anchor = (np.array(x, np.float64) for x in problem)
  gap = max(1, int(np.floor(np.float32(min_p) * np.float32(total_steps) + np.float32(0.5))))
  anchor_norm = np.linalg.norm(anchor)
  mu, nu = np.zeros_like(theta), np.zeros_like(theta)
  trajectory, averaged, last = [], [], 0
  for t in range(1, total_steps + extra_steps + 1):
    far = np.linalg.norm(theta - anchor) >= threshold * anchor_norm  # the params the step starts from
    grad = curvature * (theta - target)
    if optimizer == 'sgd':
      theta = theta - lr * grad
    else:  # Adam, optax's defaults
      mu = 0.9 * mu + 0.1 * grad
      nu = 0.999 * nu + 0.001 * grad**2
      theta = theta - lr * (mu / (1 - 0.9**t)) / (np.sqrt(nu / (1 - 0.999**t)) + 1e-8)
    if t <= total_steps and (t == total_steps or (t - last >= gap and far)):
      theta = beta * anchor + (1 - beta) * theta
      averaged.append(t)
      last = t
    trajectory.append(theta.copy())
  return np.stack(trajectory), averaged


def run_adaptive(tx, params, grad_fn, num_steps, step_wrapper=lambda f: f):
  """Params after every step, the steps after which adaptive SFA averaged, and the final state."""
  trajectory, states = run_optax(tx, params, grad_fn, num_steps, step_wrapper)
  averaged = [t for t, state in enumerate(states, 1) if int(sfa_jax.find_state(state, adaptive.AdaptiveSFAState).last_average) == t]
  return trajectory, averaged, states[-1]


# ---------------------------------------------------------------------------------------------
# The rule and the trajectory.


class AdaptiveTrajectoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    @hypothesis.settings(max_examples=5, deadline=None)
    @hypothesis.given(
        optimizer=st.sampled_from(['sgd', 'adam']),
        threshold=st.one_of(st.just(0.0), st.floats(0.0, 0.6)),
        beta=st.floats(0.0, 1.0),
        min_p=st.floats(0.01, 1.0),
        total_steps=st.integers(1, 25),
        seed=st.integers(0, 1000),
    )
    def check(optimizer, threshold, beta, min_p, total_steps, seed):
      problem = quadratic_problem(seed)
      lr = 0.1 if optimizer == 'sgd' else 0.05
      expected, expected_steps = numpy_adaptive_trajectory(optimizer, lr, threshold, beta, min_p, total_steps, 3, problem)
      curvature, target, theta0, anchor = (jnp.asarray(x, jnp.float32) for x in problem)
      base = optax.sgd(lr) if optimizer == 'sgd' else optax.adam(lr)
      tx = optax.chain(base, adaptive.adaptive_sfa({'w': anchor}, threshold, beta, min_p, total_steps=total_steps))
      grad_fn = lambda params: {'w': curvature * (params['w'] - target)}
      trajectory, averaged, state = run_adaptive(tx, {'w': theta0}, grad_fn, total_steps + 3, self.variant)
      np.testing.assert_allclose(np.stack([p['w'] for p in trajectory]), expected, rtol=2e-4, atol=2e-5)
      # A drift within float rounding of the threshold could flip a decision; the draws avoid it.
      assert averaged == expected_steps
      assert int(state[1].num_averages) == len(expected_steps)
      assert int(state[1].count) == total_steps + 3

    check()


def test_averages_where_the_drift_crosses_the_threshold():
  """SGD(1) with a constant gradient moves 1 per step from an anchor of norm 10: threshold 0.25 is 2.5."""
  params = {'w': jnp.array([10.0, 0.0])}
  tx = optax.chain(optax.sgd(1.0), adaptive.adaptive_sfa(threshold=0.25, beta=0.5, min_p=0.1, total_steps=12))
  grad_fn = lambda params: {'w': jnp.array([0.0, -1.0])}
  trajectory, averaged, state = run_adaptive(tx, params, grad_fn, 14)
  # Steps start at drift 0, 1, 2, 3 (>= 2.5: lands on 4, averaged to 2), 2, 3 (averaged), ...; and at T = 12.
  assert averaged == [4, 6, 8, 10, 12]
  chex.assert_trees_all_close(trajectory[3]['w'], jnp.array([10.0, 2.0]))
  chex.assert_trees_all_close(trajectory[13]['w'], jnp.array([10.0, 4.0]))  # past T: no average
  assert float(state[1].anchor_norm) == pytest.approx(10.0)


@pytest.mark.parametrize('optimizer', [optax.sgd(0.1), optax.adam(0.05)])
def test_threshold_zero_is_sfa_at_min_p_and_infinity_is_sfa_at_p_one(optimizer):
  curvature, target, theta0, anchor = (jnp.asarray(x, jnp.float32) for x in quadratic_problem(1))
  grad_fn = lambda params: {'w': curvature * (params['w'] - target) + jnp.sin(params['w'])}
  for threshold, p in ((0.0, 0.3), (float('inf'), 1.0)):
    paths = []
    for tx in (
        adaptive.adaptive_sfa({'w': anchor}, threshold, beta=0.4, min_p=0.3, total_steps=20),
        sfa_jax.sfa({'w': anchor}, p=p, beta=0.4, total_steps=20),
    ):
      state = (chained := optax.chain(optimizer, tx)).init({'w': theta0})
      params, path = {'w': theta0}, []
      for _ in range(23):
        updates, state = chained.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        path.append(params['w'])
      paths.append(np.stack(path))
    np.testing.assert_array_equal(paths[0], paths[1])


def test_integer_and_key_leaves_pass_through_and_do_not_count_in_the_drift():
  params = {'w': jnp.ones(3), 'step': jnp.array(5, jnp.int32), 'key': jax.random.key(0)}
  anchor = {'w': jnp.zeros(3), 'step': jnp.array(1000, jnp.int32), 'key': jax.random.key(1)}
  updates = {'w': jnp.ones(3), 'step': jnp.array(1, jnp.int32), 'key': jax.random.key(7)}
  tx = adaptive.adaptive_sfa(anchor, threshold=0.0, beta=0.5, min_p=1.0, total_steps=1)
  state = tx.init(params)
  assert float(state.drift) == pytest.approx(np.sqrt(3.0))  # of the params, from the anchor
  new_updates, state = tx.update(updates, state, params)
  assert new_updates['step'] is updates['step'] and new_updates['key'] is updates['key']
  chex.assert_trees_all_close(new_updates['w'], jnp.zeros(3))  # lands on 0.5 * 0 + 0.5 * 2 = 1
  assert float(state.drift) == pytest.approx(np.sqrt(3.0)) and float(state.anchor_norm) == 0.0


# ---------------------------------------------------------------------------------------------
# Optax's checks, and re-anchoring.


def test_inject_hyperparams_and_changing_the_threshold():
  params = tree_params()
  grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), params)
  factory = functools.partial(adaptive.adaptive_sfa, total_steps=6)
  hyper = {'threshold': 0.2, 'beta': 0.5, 'min_p': 0.2}

  def run(tx, state, steps=4):
    step, p = jax.jit(tx.update), params
    for _ in range(steps):
      updates, state = step(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  injected = optax.inject_hyperparams(factory)(**hyper)
  plain_params, plain_state = run(factory(**hyper), factory(**hyper).init(params))
  injected_params, injected_state = run(injected, jax.jit(injected.init)(params))
  chex.assert_trees_all_close(injected_params, plain_params, rtol=1e-6)
  chex.assert_trees_all_close(injected_state.inner_state, plain_state, rtol=1e-6)
  state = injected.init(params)
  state.hyperparams['threshold'] = jnp.asarray(10.0, state.hyperparams['threshold'].dtype)
  changed_params, changed_state = run(injected, state)
  fresh_params, _ = run(factory(**hyper | {'threshold': 10.0}), factory(**hyper | {'threshold': 10.0}).init(params))
  chex.assert_trees_all_close(changed_params, fresh_params, rtol=1e-6)
  assert int(changed_state.inner_state.num_averages) < int(injected_state.inner_state.num_averages)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_dtypes_preserved_and_state_stable(dtype):
  params = tree_params(dtype)
  tx = optax.chain(optax.adam(1e-2), adaptive.adaptive_sfa(threshold=0.005, beta=0.5, min_p=0.25, total_steps=4))
  state = tx.init(params)
  initial = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  step = jax.jit(tx.update)
  for _ in range(5):
    updates, state = step(jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params), state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == initial
  assert int(state[1].num_averages) == 3  # steps 2-4: Adam moves 1% of ||anchor|| a step; step 1 starts at it


def test_params_and_state_can_be_donated_also_after_reanchor():
  params = tree_params()
  tx = optax.chain(optax.adam(1e-2), optax.inject_hyperparams(adaptive.adaptive_sfa)(threshold=0.1, total_steps=4))

  def step_fn(params, state):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    return optax.apply_updates(params, updates), state

  donating = jax.jit(step_fn, donate_argnums=(0, 1))
  state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # "Some donated buffers were not usable" would fail here
    for i in range(6):
      if i == 3:
        state = sfa_jax.reanchor(state, params)
      old_leaf = params['a']
      params, state = donating(params, state)
      assert old_leaf.is_deleted()
  chex.assert_tree_all_finite(params)


def test_reanchor_sets_the_anchor_and_its_norm_and_restarts_the_counters():
  params = tree_params()
  tx = optax.MultiSteps(
      optax.chain(optax.adam(1e-2), optax.inject_hyperparams(adaptive.adaptive_sfa)(threshold=0.0, total_steps=4)),
      every_k_schedule=1,
  )
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  assert int(sfa_jax.find_state(state, adaptive.AdaptiveSFAState).num_averages) > 0
  new = sfa_jax.find_state(sfa_jax.reanchor(state, params), adaptive.AdaptiveSFAState)
  chex.assert_trees_all_equal(new.anchor, params)
  assert new.anchor['a'] is not params['a']
  assert float(new.anchor_norm) == pytest.approx(float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(params)))))
  assert (int(new.count), int(new.last_average), int(new.num_averages), float(new.drift)) == (0, 0, 0, 0.0)
  with pytest.raises(ValueError, match=r"params\['b'\]\['c'\] has shape"):
    sfa_jax.reanchor(state, {'a': params['a'], 'b': {'c': jnp.ones(3)}})


@pytest.mark.parametrize(
    'make, error, match',
    [
        (lambda: adaptive.adaptive_sfa(None, -0.1, total_steps=3), ValueError, r'threshold must lie in \[0.0, inf\]'),
        (lambda: adaptive.adaptive_sfa(None, float('nan'), total_steps=3), ValueError, 'threshold must lie'),
        (lambda: adaptive.adaptive_sfa(None, 0.1, 1.5, total_steps=3), ValueError, 'beta must lie'),
        (lambda: adaptive.adaptive_sfa(None, 0.1, 0.5, 0.0, total_steps=3), ValueError, r'min_p must lie in \(0.0, 1.0\]'),
        (lambda: adaptive.adaptive_sfa(None, 0.1, total_steps=0), ValueError, 'total_steps must be an integer >= 1'),
        (lambda: adaptive.adaptive_sfa(None, 0.1), TypeError, 'needs total_steps'),
        (lambda: adaptive.adaptive_sfa(total_steps=3), TypeError, 'needs threshold'),
        (lambda: adaptive.adaptive_sfa(None, lambda count: 0.1, total_steps=3), TypeError, 'inject_hyperparams'),
        (lambda: sfa_jax.find_state(optax.adam(1e-3).init(tree_params()), adaptive.AdaptiveSFAState), ValueError, 'no AdaptiveSFAState'),
        (lambda: adaptive.adaptive_sfa(threshold=0.1, total_steps=3).init(None), ValueError, 'params'),
        (lambda: adaptive.adaptive_sfa({'a': jnp.ones(2)}, 0.1, total_steps=3).init(tree_params()), ValueError, 'anchor'),
        (lambda: sfa_jax.register_anchored_state(dict, lambda s, p: s), TypeError, 'anchor field'),
        (lambda: engine.make_method('adaptive-sfa', threshold=-1.0), ValueError, 'threshold must lie'),
        (lambda: engine.make_method('multi-anchor-sfa', threshold=0.1), ValueError, 'takes no hyper-parameter'),
    ],
)
def test_bad_input(make, error, match):
  with pytest.raises(error, match=match):
    make()


# ---------------------------------------------------------------------------------------------
# The methods in the sequence trainer, on scikit-learn's 8x8 digits.

CONFIG = engine.TrainConfig(epochs_per_task=1, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


@pytest.fixture(scope='module')
def sfa_run(pair):
  return engine.run_sequence(pair, engine.make_method('sfa', p=0.25, beta=0.5), CONFIG)


def test_adaptive_sfa_at_threshold_zero_is_sfa_in_the_trainer(pair, sfa_run):
  result = engine.run_sequence(pair, engine.make_method('adaptive-sfa', threshold=0.0, beta=0.5, min_p=0.25), CONFIG)
  assert result.averaging_steps == sfa_run.averaging_steps and len(sfa_run.averaging_steps) == 4
  np.testing.assert_array_equal(result.accuracy_matrix, sfa_run.accuracy_matrix)


def test_adaptive_sfa_records_its_averages_where_the_rule_puts_them(pair):
  """The averaging steps obey the rule: on task 1 only, at least min_p*T apart, always at its end."""
  method = engine.make_method('adaptive-sfa', threshold=0.12, beta=0.5, min_p=0.1)
  result = engine.run_sequence(pair, method, CONFIG)
  first, total = result.steps_per_task
  steps = [s - first for s in result.averaging_steps]
  gap = int(sfa_jax.averaging_period(0.1, total))
  assert steps[-1] == total and all(1 <= s <= total for s in steps)
  assert all(b - a >= gap for a, b in zip(steps, steps[1:-1]))
  assert 2 <= len(steps) < total // gap  # the threshold, not only the gap, decides some averages


@pytest.mark.slow
def test_multi_anchor_sfa_is_sfa_on_two_tasks(pair, sfa_run):
  result = engine.run_sequence(pair, engine.make_method('multi-anchor-sfa', p=0.25, beta=0.5), CONFIG)
  np.testing.assert_array_equal(result.accuracy_matrix, sfa_run.accuracy_matrix)
  assert result.averaging_steps == sfa_run.averaging_steps


def test_multi_anchor_sfa_anchors_at_the_running_mean_of_past_task_ends():
  method = engine.make_method('multi-anchor-sfa', p=0.5, beta=0.5)
  params = {'w': jnp.zeros(3)}
  tx = method.transform(optax.sgd(0.1))
  run = loop.RunState(params, {}, tx.init(params), method.init_extras(params, {}, 4))
  ends = [jnp.full(3, value, jnp.float32) for value in (1.0, 2.0, 6.0)]
  for k, end in enumerate(ends, start=1):  # task k starts where task k-1 ended
    at = methods.Boundary(k, 4, 10, fisher=None)
    run = method.start_task(run._replace(params=end), at)
    run = run._replace(opt_state=method.prepare_optimizer(tx.init(run.params), run, at))
    state = sfa_jax.find_state(run.opt_state)
    chex.assert_trees_all_close(state.anchor, jnp.mean(jnp.stack(ends[:k]), axis=0))
    assert float(state.beta) == 0.5 and bool(state.active) and int(state.total_steps) == 10
  chex.assert_trees_all_close(run.extras['mean_anchor'], jnp.full(3, 3.0))


@pytest.mark.slow
def test_multi_anchor_sfa_resumes_bit_exact_mid_task(tmp_path):
  """The running mean is saved with the checkpoints: a run stopped inside task 2 resumes exactly."""
  stream = tasks.make_stream('split-mnist', source='digits', num_tasks=3)
  method = engine.make_method('multi-anchor-sfa', p=0.5, beta=0.5)
  uninterrupted = engine.run_sequence(stream, method, CONFIG).accuracy_matrix

  class Stop(Exception):
    pass

  def stop_in_task_2(event):
    if isinstance(event, callbacks.StepEvent) and (event.task, event.step) == (2, 7):
      raise Stop

  with pytest.raises(Stop):
    engine.run_sequence(stream, method, CONFIG, callbacks=stop_in_task_2, checkpointer=Checkpointer(tmp_path, every_steps=5))
  resumed = engine.run_sequence(stream, method, CONFIG, checkpointer=Checkpointer(tmp_path, every_steps=5))
  assert resumed.accuracy_matrix == uninterrupted

