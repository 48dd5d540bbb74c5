"""SI, MAS and offline EWC: each checked against a computation of its own, written here in NumPy.

* SI's path integral ω and importance Ω against a NumPy run of SGD / Adam that sums -g·Δθ step by
  step (the gradient of the task's loss alone), over two tasks, the second penalised;
* MAS's importance against the closed form of a linear model and central differences of a small
  tanh network;
* offline EWC's two trees against the explicit sum of one penalty per past task;
* the engine's methods: their penalty changes training, a sweep's lanes equal their runs, and
  their hyper-parameters are checked.
"""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax
from _optax_helpers import tree_params
from sfa_jax import engine
from sfa_jax import tasks

# ---------------------------------------------------------------------------------------------
# A NumPy reference of SI, written without sfa_jax's helpers.


def numpy_step(optimizer, lr, moments, grad, t):
  """One step of plain SGD or of Adam with optax's defaults (b1 0.9, b2 0.999, eps 1e-8); the change."""
  if optimizer == 'sgd':
    return -lr * grad
  mu, nu = moments
  mu[:] = 0.9 * mu + 0.1 * grad
  nu[:] = 0.999 * nu + 0.001 * grad**2
  return -lr * (mu / (1 - 0.9**t)) / (np.sqrt(nu / (1 - 0.999**t)) + 1e-8)


def numpy_si(optimizer, lr, strength, damping, problems, steps, theta):
  """Trains on each quadratic task in turn (the first without penalty, the optimizer's moments kept).

  Returns the params after every step, the path integral ω after every step, and Ω after each task.
  """
  theta = np.array(theta, np.float64)
  anchor, importance = theta.copy(), np.zeros_like(theta)
  moments, t = (np.zeros_like(theta), np.zeros_like(theta)), 0
  trajectory, paths, importances = [], [], []
  for k, (curvature, target) in enumerate(problems):
    path = np.zeros_like(theta)
    for _ in range(steps):
      t += 1
      grad = curvature * (theta - target)  # the task's loss alone
      penalty = strength * importance * (theta - anchor) if k > 0 else 0.0
      change = numpy_step(optimizer, lr, moments, grad + penalty, t)
      path += -grad * change
      theta = theta + change
      trajectory.append(theta.copy())
      paths.append(path.copy())
    importance = np.maximum(importance + path / ((theta - anchor) ** 2 + damping), 0.0)
    importances.append(importance.copy())
    anchor = theta.copy()
  return np.stack(trajectory), np.stack(paths), importances


class SIPathIntegralTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_the_numpy_path_integral(self):
    @hypothesis.settings(max_examples=10, deadline=None)
    @hypothesis.given(
        optimizer=st.sampled_from(['sgd', 'adam']),
        strength=st.floats(0.0, 5.0),
        damping=st.floats(0.01, 1.0),
        steps=st.integers(1, 12),
        seed=st.integers(0, 1000),
    )
    def check(optimizer, strength, damping, steps, seed):
      rng = np.random.default_rng(seed)
      problems = [(rng.uniform(0.5, 2.0, 4), rng.normal(size=4)) for _ in range(2)]
      theta0 = rng.normal(size=4)
      lr = 0.1
      trajectory, paths, importances = numpy_si(optimizer, lr, strength, damping, problems, steps, theta0)
      base = optax.sgd(lr) if optimizer == 'sgd' else optax.adam(lr)
      tx = optax.chain(sfa_jax.si(strength, damping, wait_for_anchor=True), base)
      step = self.variant(lambda grads, state, params: tx.update(grads, state, params))
      params, state = {'w': jnp.asarray(theta0, jnp.float32)}, tx.init({'w': jnp.asarray(theta0, jnp.float32)})
      got_params, got_paths, got_importances = [], [], []
      for curvature, target in problems:
        for _ in range(steps):
          grads = {'w': jnp.asarray(curvature, jnp.float32) * (params['w'] - jnp.asarray(target, jnp.float32))}
          updates, state = step(grads, state, params)
          params = optax.apply_updates(params, updates)
          got_params.append(np.asarray(params['w']))
          got_paths.append(np.asarray(sfa_jax.find_state(state).path['w']))
        state = sfa_jax.reanchor(state, params)
        got_importances.append(np.asarray(sfa_jax.find_state(state).importance['w']))
      # float32 against NumPy's float64: Adam's division by √v amplifies rounding to ~1e-5.
      np.testing.assert_allclose(np.stack(got_params), trajectory, rtol=1e-4, atol=1e-4)
      # The state's ω lags one step: the latest step's term is added at the next update (or reanchor).
      expected_paths = np.concatenate([np.zeros((1, 4)), paths[:steps - 1], np.zeros((1, 4)), paths[steps:-1]])
      np.testing.assert_allclose(np.stack(got_paths), expected_paths, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(got_importances, importances, rtol=1e-3, atol=1e-4)

    check()


def test_si_importance_is_clipped_at_zero_where_the_path_integral_is_negative():
  """An ascent (sgd with a negative rate) makes -g·Δθ negative: Ω is then 0, not negative."""
  params = {'w': jnp.array([1.0, 2.0])}
  for rate, positive in ((0.1, True), (-0.1, False)):
    tx = optax.chain(sfa_jax.si(1.0), optax.sgd(rate))
    state, p = tx.init(params), params
    for _ in range(3):
      updates, state = tx.update({'w': p['w'] - 3.0}, state, p)
      p = optax.apply_updates(p, updates)
    before = sfa_jax.find_state(state).path['w']
    importance = sfa_jax.find_state(sfa_jax.reanchor(state, p)).importance['w']
    assert bool(jnp.all(before > 0)) == positive
    assert bool(jnp.all(importance > 0)) if positive else bool(jnp.all(importance == 0))


def test_si_penalty_pulls_toward_the_anchor_with_the_importance():
  params = {'w': jnp.array([0.0, 0.0])}
  tx = optax.chain(sfa_jax.si(2.0, damping=1.0), optax.sgd(1.0))
  state = tx.init(params)
  importance = {'w': jnp.array([0.5, 0.0])}
  state = sfa_jax.reanchor(state, {'w': jnp.array([1.0, 1.0])}, importance=importance)
  updates, _ = tx.update({'w': jnp.zeros(2)}, state, params)
  chex.assert_trees_all_close(updates['w'], jnp.array([1.0, 0.0]))  # -λ·Ω·(θ − θ*) = -2·0.5·(0 − 1)


def test_si_restarts_the_task_at_reanchor():
  params = {'w': jnp.ones(3)}
  tx = optax.chain(sfa_jax.si(1.0), optax.adam(0.1))
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update({'w': params['w'] + 1.0}, state, params)
    params = optax.apply_updates(params, updates)
  si = sfa_jax.find_state(sfa_jax.reanchor(state, params))
  for tree in (si.anchor, si.previous_params):
    chex.assert_trees_all_equal(tree, params)
    assert tree['w'] is not params['w']  # copies: params and state can both be donated
  chex.assert_trees_all_equal(si.path, {'w': jnp.zeros(3)})
  chex.assert_trees_all_equal(si.previous_grad, {'w': jnp.zeros(3)})


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_si_keeps_dtypes_and_the_state_layout(dtype):
  params = tree_params(dtype)
  tx = optax.chain(sfa_jax.si(1.0), optax.adam(1e-2))
  state = tx.init(params)
  layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  si = sfa_jax.find_state(state)
  assert si.importance['a'].dtype == jnp.float32 and si.previous_params['a'].dtype == dtype
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(jax.tree.map(lambda x: jnp.full_like(x, 0.1), params), state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
  assert jax.tree.map(lambda x: (x.shape, x.dtype), sfa_jax.reanchor(state, params)) == layout


def test_si_leaves_integer_and_key_leaves_alone():
  params = {'w': jnp.ones(3), 'step': jnp.array(5, jnp.int32), 'key': jax.random.key(0)}
  updates = {'w': jnp.ones(3), 'step': jnp.array(1, jnp.int32), 'key': jax.random.key(7)}
  tx = sfa_jax.si(3.0)
  state = sfa_jax.reanchor(tx.init(params), {**params, 'w': jnp.zeros(3)}, importance={**params, 'w': jnp.ones(3)})
  new_updates, state = tx.update(updates, state, params)
  assert new_updates['step'] is updates['step'] and new_updates['key'] is updates['key']
  chex.assert_trees_all_close(new_updates['w'], jnp.full(3, 4.0))  # 1 + 3·1·(1 − 0)
  assert int(sfa_jax.find_state(sfa_jax.reanchor(state, params)).importance['step']) == 5


def test_si_params_and_state_can_be_donated():
  params = tree_params()
  tx = optax.chain(sfa_jax.si(1.0), optax.adam(1e-2))

  def step(params, state):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    return optax.apply_updates(params, updates), state

  donating = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  for _ in range(3):
    old = params['a']
    params, state = donating(params, state)
    assert old.is_deleted()
  chex.assert_tree_all_finite((params, sfa_jax.find_state(state).path))


# ---------------------------------------------------------------------------------------------
# MAS's importance.


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(num_examples=st.integers(1, 9), batch_size=st.integers(1, 5), seed=st.integers(0, 1000))
def test_mas_importance_of_a_linear_model_is_its_closed_form(num_examples, batch_size, seed):
  """f(x) = x·W + b: ∂‖f‖²/∂W = 2·x⊗f and ∂‖f‖²/∂b = 2·f, their absolute values averaged per example."""
  rng = np.random.default_rng(seed)
  w, b, x = rng.normal(size=(3, 2)), rng.normal(size=2), rng.normal(size=(num_examples, 3))
  f = x @ w + b
  expected_w = np.mean([np.abs(2 * np.outer(x[i], f[i])) for i in range(num_examples)], axis=0)
  expected_b = np.mean([np.abs(2 * f[i]) for i in range(num_examples)], axis=0)
  params = {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32), 'count': jnp.int32(7)}
  got = sfa_jax.mas_importance(_linear, params, jnp.asarray(x, jnp.float32), batch_size=batch_size)
  np.testing.assert_allclose(got['w'], expected_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['b'], expected_b, rtol=1e-5, atol=1e-6)
  assert got['count'].dtype == jnp.int32 and int(got['count']) == 0


def _linear(params, x):
  return x @ params['w'] + params['b']


def _tanh_network(params, x):
  return jnp.tanh(x @ params['w1']) @ params['w2']


def test_mas_importance_of_a_tanh_network_matches_central_differences():
  rng = np.random.default_rng(0)
  params = {'w1': rng.normal(size=(3, 4)), 'w2': rng.normal(size=(4, 2))}
  x = rng.normal(size=(3, 3))

  def squared_norm(p, example):  # NumPy, float64
    return float(np.sum((np.tanh(example @ p['w1']) @ p['w2']) ** 2))

  expected = {}
  for name, value in params.items():
    grads = np.zeros((len(x),) + value.shape)
    for index in np.ndindex(value.shape):
      for sign in (1, -1):
        shifted = dict(params, **{name: value.copy()})
        shifted[name][index] += sign * 1e-5
        grads[(slice(None),) + index] += sign * np.array([squared_norm(shifted, example) for example in x]) / 2e-5
    expected[name] = np.abs(grads).mean(0)
  got = sfa_jax.mas_importance(_tanh_network, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params),
                               jnp.asarray(x, jnp.float32), batch_size=2)
  for name in params:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-3, atol=1e-4)


def test_mas_importance_is_per_example_not_per_batch():
  """Two examples whose gradients cancel: the per-example mean keeps both, a batch gradient would be 0."""
  params = {'w': jnp.array([[1.0]]), 'b': jnp.zeros(1)}
  inputs = jnp.array([[1.0], [-1.0]])  # f = ±1: ∂‖f‖²/∂w = 2·x·f = 2 for both, ∂/∂b = ±2
  got = sfa_jax.mas_importance(_linear, params, inputs, batch_size=2)
  assert float(got['b'][0]) == 2.0 and float(got['w'][0, 0]) == 2.0


@pytest.mark.parametrize('kwargs, match', [
    ({'batch_size': 0}, 'batch_size'),
    ({'inputs': jnp.zeros((0, 3))}, 'no examples'),
])
def test_mas_importance_errors(kwargs, match):
  arguments = {'inputs': jnp.ones((2, 3)), **kwargs}
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
  with pytest.raises(ValueError, match=match):
    sfa_jax.mas_importance(_linear, params, arguments.pop('inputs'), **arguments)


# ---------------------------------------------------------------------------------------------
# Offline EWC.


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(num_tasks=st.integers(1, 5), strength=st.floats(0.0, 100.0), seed=st.integers(0, 1000))
@hypothesis.example(num_tasks=2, strength=0.0, seed=138)  # an end near 0 after a mean near 1: θ_k exactly
def test_offline_ewc_equals_the_explicit_sum_of_one_penalty_per_task(num_tasks, strength, seed):
  """λ·S⊙(θ − θ̄) from the two trees equals Σ_k λ·F_k⊙(θ − θ_k), to float32 rounding (rtol 1e-4).

  Some Fisher entries are exactly zero in some tasks (and in all of them for the last entry).
  """
  rng = np.random.default_rng(seed)
  fishers = rng.exponential(size=(num_tasks, 6)) * (rng.uniform(size=(num_tasks, 6)) > 0.3)
  fishers[:, -1] = 0.0
  ends = rng.normal(size=(num_tasks, 6))
  theta, grads = rng.normal(size=6), rng.normal(size=6)
  tx = optax.chain(sfa_jax.offline_ewc(strength), optax.identity())
  state = tx.init({'w': jnp.zeros(6)})
  for fisher, end in zip(fishers, ends):
    state = sfa_jax.reanchor(state, {'w': jnp.asarray(end, jnp.float32)}, fisher={'w': jnp.asarray(fisher, jnp.float32)})
  updates, _ = tx.update({'w': jnp.asarray(grads, jnp.float32)}, state, {'w': jnp.asarray(theta, jnp.float32)})
  explicit = grads + sum(strength * fisher * (theta - end) for fisher, end in zip(fishers, ends))
  scale = 1.0 + np.abs(grads) + sum(strength * fisher * (np.abs(theta) + np.abs(end)) for fisher, end in zip(fishers, ends))
  np.testing.assert_allclose(updates['w'], explicit, rtol=0, atol=1e-5 * scale.max())
  offline = sfa_jax.find_state(state)
  np.testing.assert_allclose(offline.fisher['w'], fishers.sum(0), rtol=1e-5)
  assert float(offline.anchor["w"][-1]) == np.float32(ends[-1, -1])  # no Fisher there: exactly the latest end


def test_offline_ewc_reanchor_adds_and_refuses_a_missing_or_wrong_fisher():
  params = tree_params()
  tx = optax.chain(sfa_jax.offline_ewc(1.0), optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="offline EWC adds the finished task's Fisher"):
    sfa_jax.reanchor(state, params)
  with pytest.raises(ValueError, match=r"fisher\['b'\]\['c'\] has shape"):
    sfa_jax.reanchor(state, params, fisher={'a': jnp.ones((2, 3)), 'b': {'c': jnp.ones(3)}})
  with pytest.raises(ValueError, match=r"fisher\['a'\] has negative"):
    sfa_jax.reanchor(state, params, fisher=jax.tree.map(lambda x: -jnp.ones_like(x), params))
  ones = jax.tree.map(jnp.ones_like, params)
  twice = sfa_jax.reanchor(sfa_jax.reanchor(state, params, fisher=ones), params, fisher=ones)
  chex.assert_trees_all_close(sfa_jax.find_state(twice).fisher, jax.tree.map(lambda x: 2 * x, ones))


def test_offline_fisher_is_the_sum_and_the_weighted_mean():
  rng = np.random.default_rng(3)
  fishers, ends = rng.exponential(size=(3, 4)), rng.normal(size=(3, 4))
  total, mean = {'w': jnp.zeros(4)}, {'w': jnp.zeros(4)}
  for fisher, end in zip(fishers, ends):
    total, mean = sfa_jax.offline_fisher(total, mean, {'w': jnp.asarray(fisher, jnp.float32)}, {'w': jnp.asarray(end, jnp.float32)})
  np.testing.assert_allclose(total['w'], fishers.sum(0), rtol=1e-6)
  np.testing.assert_allclose(mean['w'], (fishers * ends).sum(0) / fishers.sum(0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize('make, error, match', [
    (lambda: sfa_jax.si(-1.0), ValueError, r'strength must lie in \[0.0, inf\)'),
    (lambda: sfa_jax.si(1.0, damping=0.0), ValueError, r'damping must lie in \(0.0, inf\)'),
    (lambda: sfa_jax.si(1.0, damping=float('inf')), ValueError, 'damping must lie'),
    (lambda: sfa_jax.si(1.0, damping='big'), TypeError, 'damping must be a number'),
    (lambda: sfa_jax.offline_ewc(-2.0), ValueError, 'strength must lie'),
    (lambda: sfa_jax.offline_ewc(1.0, fisher={'a': jnp.array([-1.0])}), ValueError, r"fisher\['a'\] has negative"),
    (lambda: sfa_jax.set_hyperparams(optax.chain(sfa_jax.si(1.0)).init({'w': jnp.ones(2)}), damping=-1.0),
     ValueError, 'damping must lie'),
    (lambda: sfa_jax.reanchor(sfa_jax.l2(1.0).init({'w': jnp.ones(2)}), {'w': jnp.ones(2)}, importance={'w': jnp.ones(2)}),
     ValueError, 'holds no SIState'),
    (lambda: sfa_jax.reanchor(sfa_jax.si(1.0).init({'w': jnp.ones(2)}), {'w': jnp.ones(2)}, importance={'w': -jnp.ones(2)}),
     ValueError, r"importance\['w'\] has negative"),
])
def test_bad_arguments_are_refused_naming_them(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_set_hyperparams_changes_si_damping_and_strength():
  state = optax.chain(sfa_jax.si(1.0, damping=0.5), optax.sgd(0.1)).init({'w': jnp.ones(2)})
  si = sfa_jax.find_state(sfa_jax.set_hyperparams(state, damping=0.25, strength=3.0))
  assert float(si.damping) == 0.25 and float(si.strength) == 3.0



# ---------------------------------------------------------------------------------------------
# The engine's methods.

ENGINE_METHODS = {'si': {'strength': 100.0}, 'mas': {'strength': 10.0}, 'ewc-offline': {'strength': 1000.0}}


@pytest.mark.parametrize('name', sorted(ENGINE_METHODS))
def test_each_method_applies_its_penalty_after_the_optimizer_reset_or_without_it(name):
  """Task 0 moves w from 0 to 1 in two SGD steps; on task 1 (the optimizer state reset, as the
  engine does by default, or kept) a zero gradient at w = 2 gets the penalty's pull toward 1."""
  from sfa_jax.engine import methods
  from sfa_jax.engine.loop import RunState

  method = engine.make_method(name, strength=2.0)
  tx = method.transform(optax.sgd(0.5))
  params = {'w': jnp.zeros(3)}
  state = RunState(params, {}, tx.init(params), method.init_extras(params, {}, 3))
  for _ in range(2):
    updates, opt_state = tx.update({'w': -jnp.ones(3)}, state.opt_state, state.params)
    assert bool(jnp.all(updates['w'] == 0.5))  # task 0: no penalty
    state = state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  importance = lambda state: {'w': jnp.full(3, 2.0)}
  state = method.end_task(state, methods.Boundary(0, 3, 2, fisher=importance, mas_importance=importance))
  at = methods.Boundary(1, 3, 2, fisher=None)
  pulls = []
  for opt_state in (tx.init(state.params), state.opt_state):  # reset, or kept
    opt_state = method.prepare_optimizer(opt_state, state, at)
    updates, _ = tx.update({'w': jnp.zeros(3)}, opt_state, {'w': jnp.full(3, 2.0)})
    pulls.append(np.asarray(updates['w']))
  weight = 1.0 / (1.0 + 0.1) if name == 'si' else 2.0  # SI: ω = 2·0.5 = 1 over Δ² + ξ = 1.1
  np.testing.assert_allclose(pulls, np.full((2, 3), -0.5 * 2.0 * weight * (2.0 - 1.0)), rtol=1e-6)


@pytest.mark.parametrize('name', sorted(ENGINE_METHODS))
def test_the_hyper_parameters_live_in_the_state(name):
  """Two strengths (and dampings) update by one program: a sweep's lanes share one compiled step."""
  from sfa_jax.engine import programs

  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
  digests = set()
  for scale in (1.0, 7.0):
    values = {key: scale * value for key, value in ENGINE_METHODS[name].items()}
    if name == 'si':
      values['damping'] = 0.1 * scale
    tx = engine.make_method(name, **values).transform(optax.adam(1e-3))
    digests.add(programs.update_program(tx, tx.init(params), params))
  assert len(digests) == 1


@pytest.mark.parametrize('name, values, message', [
    ('si', {'damping': 0.0}, r'damping must lie in \(0, inf\); got 0.0'),
    ('si', {'strength': -1.0}, r'strength must lie in \[0, inf\)'),
    ('si', {'gamma': 0.5}, r"method 'si' takes no hyper-parameter \['gamma'\]; it takes: strength, damping"),
    ('mas', {'strength': float('nan')}, 'strength must lie in'),
    ('ewc-offline', {'strength': -0.5}, 'strength must lie in'),
    ('ewc-offline', {'gamma': 1.0}, "method 'ewc-offline' takes no hyper-parameter"),
])
def test_engine_methods_refuse_bad_hyper_parameters_naming_them(name, values, message):
  with pytest.raises(ValueError, match=message):
    engine.make_method(name, **values)


def test_the_command_line_takes_the_methods_and_their_flags(tmp_path, capsys):
  from sfa_jax.cli import command as cli

  out = ['--out', str(tmp_path / 'out')]
  args = cli.build_parser().parse_args(['run', '--method', 'si', '--strength', '4', '--damping', '0.05', *out])
  cli.check_arguments(args)
  assert args.method.name == 'si' and (args.strength, args.damping) == (4.0, 0.05)
  assert cli.main(['run', '--method', 'si', '--damping', '0', *out]) == 2
  assert 'argument --damping: damping must lie in (0, inf); got 0' in capsys.readouterr().err
  assert cli.main(['run', '--method', 'mas', '--damping', '0.1', *out]) == 2
  assert "--damping: method 'mas' takes no hyper-parameter 'damping'; it takes: strength" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(['run', '--help'])
  shown = ' '.join(capsys.readouterr().out.split())
  assert all(label in shown for label in ('si(damping=0.1, strength=2)', 'mas(strength=2)', 'ewc-offline(strength=100)'))
  assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def permuted_pair():
  return tasks.make_stream('permuted-mnist', source='digits', num_tasks=2, setting='domain-incremental')


@pytest.mark.slow
def test_each_penalty_keeps_the_first_task_far_better_than_fine_tuning(permuted_pair):
  """Two permuted-digit tasks: fine-tuning forgets task 0; each penalty at a large strength keeps it
  (and at strength 0 trains exactly as fine-tuning)."""
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=2, batch_size=64, eval_batch_size=2000,
                              learning_rate=5e-3)
  finetune = engine.run_sequence(permuted_pair, engine.make_method('finetune'), config).accuracy_matrix
  assert finetune[0][0] - finetune[1][0] > 0.2  # forgetting
  for name, values in ENGINE_METHODS.items():
    kept = engine.run_sequence(permuted_pair, engine.make_method(name, **values), config).accuracy_matrix
    assert kept[1][0] > finetune[1][0] + 0.15, (name, kept, finetune)
  off = engine.run_sequence(permuted_pair, engine.make_method('si', strength=0.0), config).accuracy_matrix
  assert off == finetune


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


@pytest.mark.slow
@pytest.mark.parametrize('name, values', [
    ('si', {'strength': (1.0, 300.0), 'damping': (0.1, 0.01)}),
    ('mas', {'strength': (1.0, 100.0)}),
    ('ewc-offline', {'strength': (10.0, 1e4)}),
])
def test_a_sweep_of_each_method_equals_its_runs(pair, name, values):
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)
  configurations = engine.grid(name, config=config, **values)
  results = engine.run_sweep(pair, configurations)
  assert len({tuple(map(tuple, result.accuracy_matrix)) for result in results}) > 1  # the lanes differ
  for (method, lane_config), result in zip(configurations, results):
    expected = engine.run_sequence(pair, method, lane_config)
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6, err_msg=method.label)
