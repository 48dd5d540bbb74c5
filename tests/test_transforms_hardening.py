"""The transforms inside real loops and wrappers, and under bad input: one test per class of defect.

Integer leaves, hyper-parameters that are not 0-d numbers, non-finite inputs, ``optax.masked`` /
``multi_transform``, Flax NNX, one transform for a whole sequence, what happened at a step, where
SFA may sit, and low-precision hyper-parameters.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sfa_jax
from sfa_jax import adaptive
from sfa_jax import merging

from _optax_helpers import run_optax
from _optax_helpers import tree_params


def _run(tx, params, grads_fn, steps, state=None):
  """The params and the state after ``steps`` jitted steps (from ``state``, or ``tx.init``)."""
  trajectory, states = run_optax(tx, params, grads_fn, steps, jax.jit, state)
  return trajectory[-1], states[-1]


def _ones(params):
  return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.result_type(x) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else jnp.float32), params)


# ---------------------------------------------------------------------------------------------
# 1. Integer leaves are decided by the param's dtype.


def _with_counter(counter):
  return {'w': jnp.array([1.0, 2.0]), 'counter': jnp.array(counter, jnp.int32)}


@pytest.mark.parametrize('optimizer', [optax.sgd(0.1), optax.adam(0.1)])
@pytest.mark.parametrize(
    'make',
    [
        lambda anchor: sfa_jax.sfa(anchor, p=1.0, beta=0.5, total_steps=1),
        lambda anchor: adaptive.adaptive_sfa(anchor, threshold=0.0, beta=0.5, min_p=1.0, total_steps=1),
    ],
    ids=['sfa', 'adaptive_sfa'],
)
def test_integer_params_are_never_averaged(optimizer, make):
  params = _with_counter(7)
  tx = optax.chain(optimizer, make(_with_counter(100)))
  new, _ = _run(tx, params, lambda p: {'w': jnp.ones(2), 'counter': jnp.zeros((), jnp.float32)}, 1)
  assert int(new['counter']) == 7
  assert not np.allclose(new['w'], params['w'])  # the float leaf was averaged


@pytest.mark.parametrize(
    'make',
    [lambda a: sfa_jax.l2(1.0, anchor=a), lambda a: sfa_jax.ewc({'w': jnp.ones(2), 'counter': jnp.array(1, jnp.int32)}, 1.0, anchor=a)],
    ids=['l2', 'ewc'],
)
def test_integer_params_are_never_penalised(make):
  params = _with_counter(7)
  tx = make({'w': jnp.zeros(2), 'counter': jnp.array(100, jnp.int32)})
  updates, _ = tx.update({'w': jnp.zeros(2), 'counter': jnp.zeros((), jnp.float32)}, tx.init(params), params)
  assert float(updates['counter']) == 0.0 and updates['counter'].dtype == jnp.float32
  np.testing.assert_allclose(updates['w'], params['w'])


# ---------------------------------------------------------------------------------------------
# 2. Hyper-parameters: 0-d numbers only, named in every error, int32 range.


@pytest.mark.parametrize(
    'make, error, match',
    [
        (lambda: sfa_jax.sfa(p=0.5, beta=np.array([0.5, 3]), total_steps=4), TypeError, r'beta must be a scalar .*shape \(2,\)'),
        (lambda: sfa_jax.sfa(p=jnp.array([0.5]), total_steps=4), TypeError, 'p must be a scalar'),
        (lambda: sfa_jax.sfa(p='0.5', total_steps=4), TypeError, "p must be a number; got str '0.5'"),
        (lambda: sfa_jax.sfa(p=0.5, beta='half', total_steps=4), TypeError, 'beta must be a number'),
        (lambda: sfa_jax.sfa(p=0.5, total_steps='10'), TypeError, 'total_steps must be a number'),
        (lambda: sfa_jax.sfa(p=0.5, total_steps=2**31), ValueError, r'total_steps must be at most 2\*\*31 - 1'),
        (lambda: sfa_jax.sfa(p=0.5, total_steps=np.int64(2**40)), ValueError, 'total_steps must be at most'),
        (lambda: sfa_jax.sfa(p=0.5, total_steps=2.5), ValueError, 'total_steps must be an integer'),
        (lambda: sfa_jax.sfa(p=True, total_steps=4), TypeError, 'p must be a number; got the bool'),
        (lambda: sfa_jax.sfa(p=0.5 + 1j, total_steps=4), TypeError, 'p must be a number'),
        (lambda: sfa_jax.l2(np.ones(3)), TypeError, 'strength must be a scalar'),
        (lambda: sfa_jax.l2('1'), TypeError, 'strength must be a number'),
        (lambda: sfa_jax.l2(float('inf')), ValueError, 'strength must lie'),
        (lambda: sfa_jax.ewc({'w': jnp.ones(2)}, [1.0]), TypeError, 'strength must be a number'),
        (lambda: adaptive.adaptive_sfa(threshold=np.ones(2), total_steps=4), TypeError, 'threshold must be a scalar'),
        (lambda: adaptive.adaptive_sfa(threshold=0.1, total_steps=2**31), ValueError, 'total_steps must be at most'),
        (lambda: sfa_jax.set_hyperparams(optax.chain(sfa_jax.sfa(p=0.5, total_steps=4)).init({'w': jnp.ones(2)}), beta=2.0),
         ValueError, 'beta must lie'),
        (lambda: sfa_jax.set_hyperparams(sfa_jax.sfa(p=0.5, total_steps=4).init({'w': jnp.ones(2)}), strength=1.0),
         ValueError, r"no anchored state inside opt_state has \['strength'\]"),
        (lambda: sfa_jax.set_hyperparams(sfa_jax.sfa(p=0.5, total_steps=4).init({'w': jnp.ones(2)}), lr=1.0),
         TypeError, "unknown hyper-parameter 'lr'"),
    ],
)
def test_hyperparameters_must_be_scalar_numbers_in_range(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_traced_scalar_hyperparameters_are_accepted_and_traced_arrays_refused():
  params = {'w': jnp.ones(2)}
  init = lambda beta: sfa_jax.sfa(p=0.5, beta=beta, total_steps=4).init(params).beta
  assert float(jax.jit(init)(0.25)) == 0.25
  np.testing.assert_allclose(jax.vmap(init)(jnp.array([0.1, 0.2])), [0.1, 0.2])
  with pytest.raises(TypeError, match='beta must be a scalar'):
    jax.jit(init)(jnp.ones(2))


def test_large_total_steps_within_int32_run():
  params = {'w': jnp.ones(2)}
  tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=1.0, total_steps=2**31 - 1))
  _, state = _run(tx, params, _ones, 2)
  assert int(sfa_jax.find_state(state).count) == 2


# ---------------------------------------------------------------------------------------------
# 3. Non-finite values, checked once, eagerly, naming the leaf.


@pytest.mark.parametrize(
    'make, match',
    [
        (lambda p: sfa_jax.ewc({'a': p['a'], 'b': {'c': jnp.full((2, 5, 2), jnp.inf)}}, 1.0), r"fisher\['b'\]\['c'\] has NaN or infinite"),
        (lambda p: sfa_jax.ewc({'a': -p['a'] ** 2, 'b': p['b']}, 1.0), r"fisher\['a'\] has negative entries"),
        (lambda p: sfa_jax.sfa({'a': p['a'].at[0, 0].set(jnp.nan), 'b': p['b']}, 0.5, total_steps=2).init(p),
         r"anchor\['a'\] has NaN or infinite"),
        (lambda p: sfa_jax.l2(1.0, {'a': p['a'], 'b': {'c': p['b']['c'] / 0.0}}).init(p), r"anchor\['b'\]\['c'\] has NaN"),
        (lambda p: sfa_jax.reanchor(sfa_jax.sfa(p=0.5, total_steps=2).init(p), {'a': p['a'] * jnp.nan, 'b': p['b']}),
         r"params\['a'\] has NaN or infinite"),
        (lambda p: merging.ties(p, [{'a': p['a'].at[1, 1].set(jnp.nan), 'b': p['b']}], density=0.5),
         r"finetuned_models\[0\]\['a'\] has NaN"),
        (lambda p: merging.task_arithmetic(p, [p], scaling=float('nan')), 'scaling must be a finite number'),
        (lambda p: merging.ties(p, [p], density=0.5, scaling=float('inf')), 'scaling must be a finite number'),
        (lambda p: merging.interpolate(p, {'a': p['a'] + jnp.inf, 'b': p['b']}, 0.5), r"params\['a'\] has NaN"),
        (lambda p: merging.task_vectors({'a': p['a'] * jnp.nan, 'b': p['b']}, [p]), r"base\['a'\] has NaN"),
        (lambda p: sfa_jax.online_fisher(p, jax.tree.map(lambda x: x * jnp.inf, p), 0.5), 'NaN or infinite'),
    ],
)
def test_non_finite_inputs_are_refused_naming_the_leaf(make, match):
  params = jax.tree.map(jnp.abs, tree_params())
  with pytest.raises(ValueError, match=match):
    make(params)


def test_finite_checks_are_skipped_for_traced_anchors():
  params = tree_params()
  state = jax.jit(optax.chain(optax.adam(1e-3), sfa_jax.sfa(params, 0.5, total_steps=2)).init)(params)
  chex.assert_trees_all_equal(sfa_jax.find_state(state).anchor, params)


# ---------------------------------------------------------------------------------------------
# 4. reanchor inside optax.masked and optax.multi_transform.


def _body_head():
  return {'body': {'w': jnp.arange(4.0), 'b': jnp.ones(2)}, 'head': {'w': jnp.full(3, 2.0)}}


def _shift(params, by):
  return jax.tree.map(lambda x: x + by, params)


def test_reanchor_sfa_on_the_body_only_with_masked():
  params = _body_head()
  mask = {'body': True, 'head': False}
  tx = optax.chain(optax.adam(0.1), optax.masked(sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4), mask))
  _, state = _run(tx, params, _ones, 2)
  new_params = _shift(params, 3.0)
  state = sfa_jax.reanchor(state, new_params)
  sfa_state = sfa_jax.find_state(state)
  chex.assert_trees_all_equal(sfa_state.anchor['body'], new_params['body'])
  assert isinstance(sfa_state.anchor['head'], optax.MaskedNode) and int(sfa_state.count) == 0
  # Training on lands where a fresh masked SFA anchored at new_params lands (same Adam state).
  fresh = optax.chain(optax.adam(0.1), optax.masked(sfa_jax.sfa(new_params, p=0.5, beta=0.5, total_steps=4), mask))
  fresh_state = (state[0], fresh.init(new_params)[1])
  chex.assert_trees_all_close(_run(tx, new_params, _ones, 4, state)[0], _run(fresh, new_params, _ones, 4, fresh_state)[0])


def test_reanchor_two_sfa_groups_with_different_masks_in_multi_transform():
  params = _body_head()
  tx = optax.multi_transform(
      {'body': optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)),
       'head': optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=1.0, beta=0.25, total_steps=4))},
      {'body': 'body', 'head': 'head'},
  )
  _, state = _run(tx, params, _ones, 3)
  new_params = _shift(params, -1.0)
  state = sfa_jax.reanchor(state, new_params, total_steps=6)
  body, head = sfa_jax.find_states(state)
  chex.assert_trees_all_equal(body.anchor['body'], new_params['body'])
  chex.assert_trees_all_equal(head.anchor['head'], new_params['head'])
  assert isinstance(body.anchor['head'], optax.MaskedNode) and isinstance(head.anchor['body'], optax.MaskedNode)
  assert [int(s.total_steps) for s in (body, head)] == [6, 6] and [float(s.p) for s in (body, head)] == [0.5, 1.0]


@pytest.mark.parametrize('wrap', [
    lambda tx: optax.apply_if_finite(tx, 3),
    optax.flatten,
    lambda tx: optax.inject_hyperparams(lambda learning_rate: tx)(learning_rate=0.1),
    lambda tx: optax.named_chain(('inner', tx)),
], ids=['apply_if_finite', 'flatten', 'inject_outer', 'named_chain'])
def test_reanchor_inside_other_wrappers(wrap):
  params = _body_head()
  tx = wrap(optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)))
  _, state = _run(tx, params, _ones, 2)
  new_params = _shift(params, 2.0)
  state = sfa_jax.reanchor(state, new_params, total_steps=3)
  sfa_state = sfa_jax.find_state(state)
  assert int(sfa_state.count) == 0 and int(sfa_state.total_steps) == 3
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
  np.testing.assert_array_equal(flat(sfa_state.anchor), flat(new_params))
  _run(tx, new_params, _ones, 3, state)  # the state still fits the transformation


def test_reanchor_l2_and_ewc_inside_masked():
  params = _body_head()
  mask = {'body': False, 'head': True}
  fisher = jax.tree.map(jnp.ones_like, params)
  for inner in (sfa_jax.l2(1.0), sfa_jax.ewc(jax.tree.map(lambda m, f: f if m else optax.MaskedNode(), mask, fisher), 1.0)):
    tx = optax.chain(optax.masked(inner, mask), optax.sgd(0.1))
    state = sfa_jax.reanchor(tx.init(params), _shift(params, 1.0), **({'fisher': fisher} if 'ewc' in repr(inner) else {}))
    chex.assert_trees_all_equal(sfa_jax.find_state(state).anchor['head'], _shift(params, 1.0)['head'])


def test_reanchor_ewc_with_a_new_fisher_inside_masked():
  params = _body_head()
  mask = {'body': True, 'head': False}
  tx = optax.chain(optax.masked(sfa_jax.ewc(
      {'body': jax.tree.map(jnp.ones_like, params['body']), 'head': optax.MaskedNode()}, 1.0), mask), optax.sgd(0.1))
  new_fisher = jax.tree.map(lambda x: jnp.full_like(x, 2.0), params)
  state = sfa_jax.reanchor(tx.init(params), params, fisher=new_fisher)
  chex.assert_trees_all_equal(sfa_jax.find_state(state).fisher['body'], new_fisher['body'])


# ---------------------------------------------------------------------------------------------
# 5. Flax NNX: reanchor(optimizer, model) and reanchor(opt_state, nnx.state(model, nnx.Param)).


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def _nnx_run(call_reanchor):
  x = jax.random.normal(jax.random.key(0), (16, 4))
  y = jnp.arange(16) % 3
  model = _NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(0.05), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)

  for _ in range(3):
    train_step(model, optimizer)
  moved = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  call_reanchor(optimizer, model)
  state = sfa_jax.find_state(optimizer)
  assert int(state.count) == 0 and not bool(state.averaged)
  chex.assert_trees_all_equal(nnx.to_pure_dict(state.anchor), moved)
  for _ in range(4):
    train_step(model, optimizer)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_nnx_reanchor_in_place_and_on_the_state_agree():
  in_place = _nnx_run(lambda optimizer, model: sfa_jax.reanchor(optimizer, model))
  on_state = _nnx_run(lambda optimizer, model: sfa_jax.reanchor(optimizer.opt_state, nnx.state(model, nnx.Param)))

  def assign_back(optimizer, model):  # the natural functional call, its result assigned back
    optimizer.opt_state = sfa_jax.reanchor(optimizer.opt_state, nnx.state(model, nnx.Param))

  assigned = _nnx_run(assign_back)
  chex.assert_trees_all_equal(in_place, on_state)
  chex.assert_trees_all_equal(in_place, assigned)


def test_nnx_set_hyperparams_in_place_and_module_without_its_optimizer_is_refused():
  model = _NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, total_steps=4)), wrt=nnx.Param)
  assert sfa_jax.set_hyperparams(optimizer, beta=0.125) is optimizer
  assert float(sfa_jax.find_state(optimizer.opt_state).beta) == 0.125
  with pytest.raises(TypeError, match=r'reanchor\(optimizer, model\)'):
    sfa_jax.reanchor(optimizer.opt_state, model)


def test_batch_statistics_average_with_interpolate():
  model = _NNXNet(nnx.Rngs(0))
  start = nnx.state(model, nnx.BatchStat)
  moved = jax.tree.map(lambda v: v + 2.0, start)
  averaged = sfa_jax.interpolate(start, moved, beta=0.5)
  np.testing.assert_allclose(averaged['norm']['mean'][...], start['norm']['mean'][...] + 1.0)


# ---------------------------------------------------------------------------------------------
# 6. One transform for a whole sequence: p, beta and T in the state.


def _sequence_run(tx, params, task_lengths):
  state = tx.init(params)
  traces = []
  step = jax.jit(lambda g, s, p: (traces.append(1), tx.update(g, s, p))[1])
  for k, steps in enumerate(task_lengths):
    if k:
      state = sfa_jax.reanchor(state, params, total_steps=steps)
    for _ in range(steps):
      updates, state = step(_ones(params), state, params)
      params = optax.apply_updates(params, updates)
  return params, state, len(traces)


def test_one_transform_serves_tasks_of_different_lengths_with_one_compilation():
  params = tree_params()
  tx = optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=3, wait_for_anchor=True))
  final, state, compiles = _sequence_run(tx, params, [3, 5])
  assert compiles == 1 and int(sfa_jax.find_state(state).total_steps) == 5
  # The same as: plain Adam for task 0, then a fresh sfa(anchor=end of task 0, T=5) keeping Adam's state.
  adam = optax.adam(0.1)
  mid, adam_state = _run(adam, params, _ones, 3)
  fresh = optax.chain(optax.adam(0.1), sfa_jax.sfa(mid, p=0.5, beta=0.5, total_steps=5))
  expected, _ = _run(fresh, mid, _ones, 5, (adam_state, fresh.init(mid)[1]))
  chex.assert_trees_all_close(final, expected, rtol=1e-6)


@pytest.mark.parametrize('make', [
    lambda: sfa_jax.l2(10.0, wait_for_anchor=True),
    lambda: sfa_jax.ewc(jax.tree.map(jnp.ones_like, tree_params()), 10.0, wait_for_anchor=True),
])
def test_penalties_wait_for_the_first_anchor(make):
  params = tree_params()
  tx = optax.chain(make(), optax.sgd(0.1))
  shifted = _shift(params, 1.0)
  inactive, _ = tx.update(_ones(params), tx.init(params), shifted)
  chex.assert_trees_all_close(inactive, jax.tree.map(lambda g: -0.1 * g, _ones(params)))
  active, _ = tx.update(_ones(params), sfa_jax.reanchor(tx.init(params), params), shifted)
  assert not np.allclose(jax.tree.leaves(active)[0], jax.tree.leaves(inactive)[0])


def test_a_checkpoint_restores_the_schedule(tmp_path):
  params = {'w': jnp.ones(3)}
  saved = sfa_jax.sfa(p=0.25, beta=0.5, total_steps=12).init(params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'state', saved)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'state', sfa_jax.sfa(p=0.5, beta=0.1, total_steps=40).init(params))
  assert (float(restored.p), float(restored.beta), int(restored.total_steps)) == (0.25, 0.5, 12)


def test_set_hyperparams_changes_the_schedule_like_a_fresh_factory():
  params = tree_params()
  tx = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4))
  state = sfa_jax.set_hyperparams(tx.init(params), p=0.25, beta=0.9)
  fresh = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.25, beta=0.9, total_steps=4))
  chex.assert_trees_all_close(_run(tx, params, _ones, 4, state)[0], _run(fresh, params, _ones, 4)[0])


def test_reanchor_total_steps_reaches_inject_hyperparams():
  params = tree_params()
  tx = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(sfa_jax.sfa)(p=0.5, beta=0.5, total_steps=4))
  state = sfa_jax.reanchor(tx.init(params), params, total_steps=10)
  assert int(state[1].hyperparams['total_steps']) == 10
  _, state = _run(tx, params, _ones, 1, state)
  assert int(sfa_jax.find_state(state).total_steps) == 10


# ---------------------------------------------------------------------------------------------
# 7. What happened at this step.


def test_averaged_flag_and_find_state_through_wrappers():
  params = {'w': jnp.ones(2)}
  for tx in (
      optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.25, beta=0.5, total_steps=10)),
      optax.chain(optax.sgd(0.1), optax.inject_hyperparams(sfa_jax.sfa)(p=0.25, beta=0.5, total_steps=10)),
  ):
    state, flags, step = tx.init(params), [], jax.jit(tx.update)
    for _ in range(12):
      _, state = step(_ones(params), state, params)
      flags.append(bool(sfa_jax.find_state(state).averaged))
    assert [t for t, flag in enumerate(flags, 1) if flag] == [3, 6, 9, 10]


def test_averaged_counts_outer_steps_inside_multisteps():
  params = {'w': jnp.ones(2)}
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=2)), every_k_schedule=3)
  state, step = tx.init(params), jax.jit(tx.update)
  for _ in range(6):
    _, state = step(_ones(params), state, params)
  inner = sfa_jax.find_state(state)
  assert int(inner.count) == 2 and bool(inner.averaged)


def test_find_state_errors():
  params = _body_head()
  with pytest.raises(ValueError, match='found no anchored state'):
    sfa_jax.find_state(optax.adam(1e-3).init(params))
  two = optax.multi_transform({'a': sfa_jax.l2(1.0), 'b': sfa_jax.l2(2.0)}, {'body': 'a', 'head': 'b'}).init(params)
  with pytest.raises(ValueError, match='found 2 of anchored state.*find_states'):
    sfa_jax.find_state(two)
  assert [float(s.strength) for s in sfa_jax.find_states(two, sfa_jax.L2State)] == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# 8. Where SFA may sit.


def _sfa():
  return sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)


def test_sfa_after_multisteps_is_refused():
  state = optax.chain(optax.MultiSteps(optax.adam(1e-3), 2), _sfa()).init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='chained after optax.MultiSteps'):
    sfa_jax.check_placement(state)
  with pytest.raises(ValueError, match='chained after optax.MultiSteps'):
    sfa_jax.reanchor(state, {'w': jnp.ones(2)})


@pytest.mark.parametrize('make, match', [
    (lambda: optax.chain(_sfa(), optax.adam(1e-3)), 'not the last transformation'),
    (lambda: optax.lookahead(optax.chain(optax.adam(1e-3), _sfa()), 2, 0.5, reset_state=True), 'inside optax.lookahead'),
    (lambda: optax.chain(optax.contrib.schedule_free_sgd(0.1), _sfa()), 'chained after optax.contrib.schedule_free'),
    (lambda: optax.contrib.schedule_free(optax.chain(optax.sgd(0.1), _sfa()), 0.1), 'inside optax.contrib.schedule_free'),
])
def test_doubtful_placements_warn(make, match):
  params = {'w': jnp.ones(2)}
  tx = make()
  init_params = optax.LookaheadParams.init_synced(params) if 'lookahead' in match else params
  with pytest.warns(UserWarning, match=match):
    sfa_jax.check_placement(tx.init(init_params))


@pytest.mark.parametrize('make', [
    lambda: optax.chain(optax.adam(1e-3), _sfa()),
    lambda: optax.MultiSteps(optax.chain(optax.adam(1e-3), _sfa()), 2),
    lambda: optax.chain(optax.adam(1e-3), optax.masked(_sfa(), {'body': True, 'head': False}),
                        optax.masked(optax.scale(1.0), {'body': False, 'head': True})),
    lambda: optax.multi_transform({'a': optax.chain(optax.adam(1e-3), _sfa()), 'b': optax.sgd(0.1)}, {'body': 'a', 'head': 'b'}),
    lambda: optax.chain(sfa_jax.l2(1.0), optax.adam(1e-3), _sfa()),
])
def test_valid_placements_pass_silently(make):
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    sfa_jax.check_placement(make().init(_body_head()))


# ---------------------------------------------------------------------------------------------
# 9. The schedule does not depend on the params' dtype.


def test_bf16_p_under_inject_hyperparams_is_refused_and_float32_hyperparams_keep_the_schedule():
  params = {'w': jnp.ones(4, jnp.bfloat16)}
  injected = optax.inject_hyperparams(sfa_jax.sfa)
  with pytest.raises(ValueError, match='p arrived as bfloat16.*hyperparam_dtype=jnp.float32'):
    optax.chain(optax.sgd(0.1), injected(p=0.35, beta=0.5, total_steps=10)).init(params)
  for tx in (
      optax.chain(optax.sgd(0.1), optax.inject_hyperparams(sfa_jax.sfa, hyperparam_dtype=jnp.float32)(p=0.35, beta=0.5, total_steps=10)),
      optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.35, beta=0.5, total_steps=10)),
  ):
    state, flags = tx.init(params), []
    for _ in range(10):
      _, state = tx.update(_ones(params), state, params)
      flags.append(bool(sfa_jax.find_state(state).averaged))
    assert [t for t, flag in enumerate(flags, 1) if flag] == [4, 8, 10]
    assert sfa_jax.find_state(state).p.dtype == jnp.float32


def test_linen_train_state_reanchor_and_find_state():
  from flax.training import train_state

  params = {'w': jnp.arange(3.0)}
  tx = optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4, wait_for_anchor=True))
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  state = state.apply_gradients(grads={'w': jnp.ones(3)})
  assert not bool(sfa_jax.find_state(state).active)
  state = sfa_jax.reanchor(state, total_steps=6)
  sfa_state = sfa_jax.find_state(state)
  chex.assert_trees_all_equal(sfa_state.anchor, state.params)
  assert bool(sfa_state.active) and int(sfa_state.total_steps) == 6 and int(sfa_state.count) == 0


def test_set_hyperparams_reaches_inject_hyperparams_but_not_an_outer_wrapper():
  params = tree_params()
  tx = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(sfa_jax.sfa)(p=0.5, beta=0.5, total_steps=4))
  state = sfa_jax.set_hyperparams(tx.init(params), beta=0.9)
  fresh = optax.chain(optax.sgd(0.1), sfa_jax.sfa(p=0.5, beta=0.9, total_steps=4))
  chex.assert_trees_all_close(_run(tx, params, _ones, 4, state)[0], _run(fresh, params, _ones, 4)[0], rtol=1e-6)
  outer = optax.inject_hyperparams(lambda beta: optax.chain(optax.adam(0.1, b1=beta), sfa_jax.sfa(p=0.5, total_steps=4)))(beta=0.8)
  state = sfa_jax.set_hyperparams(outer.init(params), beta=0.25)
  assert float(state.hyperparams['beta']) == np.float32(0.8) and float(sfa_jax.find_state(state).beta) == 0.25


# ---------------------------------------------------------------------------------------------
# 10. Inputs as optax takes them: Python numbers and NumPy arrays, checked leaf by leaf.

_TRANSFORMS = {
    'sfa': lambda anchor=None: optax.chain(optax.sgd(0.1), sfa_jax.sfa(anchor, p=0.5, beta=0.5, total_steps=2)),
    'l2': lambda anchor=None: optax.chain(sfa_jax.l2(1.0, anchor), optax.sgd(0.1)),
    'adaptive_sfa': lambda anchor=None: optax.chain(optax.sgd(0.1), adaptive.adaptive_sfa(anchor, threshold=0.0, total_steps=2)),
}


@pytest.mark.parametrize('name', sorted(_TRANSFORMS))
def test_python_number_params_and_updates_work_as_in_optax(name):
  tx = _TRANSFORMS[name]()
  params = {'w': 1.0, 'b': jnp.ones(2)}
  state = tx.init(params)
  updates, state = tx.update({'w': 1.0, 'b': jnp.ones(2)}, state, params)  # optax.sgd scales a float to a float
  assert jnp.shape(updates['w']) == () and np.isfinite(float(updates['w']))


@pytest.mark.parametrize('name', sorted(_TRANSFORMS))
def test_a_numpy_float64_anchor_is_stored_as_jax_stores_it(name):
  params = {'w': jnp.ones(2)}
  state = _TRANSFORMS[name]({'w': np.full(2, 3.0)}).init(params)  # float64 NumPy: float32 without x64
  anchor = sfa_jax.find_state(state).anchor['w']
  assert anchor.dtype == jnp.float32 and anchor.tolist() == [3.0, 3.0]
  sfa_jax.reanchor(state, {'w': np.zeros(2)})  # and as the next anchor


@pytest.mark.parametrize('name', sorted(_TRANSFORMS))
def test_updates_or_params_that_do_not_fit_are_named_in_the_update(name):
  tx = _TRANSFORMS[name]()
  state = tx.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"params\['w'\] has shape \(3,\), but updates\['w'\] has shape \(2,\)"):
    jax.jit(tx.update)({'w': jnp.ones(2)}, state, {'w': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"updates does not have the tree structure of params: missing leaves \[\"\['w'\]\"\]"):
    sfa_jax.sfa(p=0.5, total_steps=2).update({'v': jnp.ones(2)}, sfa_jax.sfa(p=0.5, total_steps=2).init({'w': jnp.ones(2)}), {'w': jnp.ones(2)})


@pytest.mark.parametrize('call, error, match', [
    (lambda: sfa_jax.averaging_period(0.5, 0), ValueError, 'total_steps must be an integer >= 1; got 0'),
    (lambda: sfa_jax.averaging_period(1.5, 10), ValueError, r'p must lie in \(0.0, 1.0\]; got 1.5'),
    (lambda: sfa_jax.is_averaging_step(3, 0.5, 10.5), ValueError, 'total_steps must be an integer'),
    (lambda: sfa_jax.is_averaging_step(3, 'half', 10), TypeError, 'p must be a number'),
])
def test_the_schedule_helpers_check_p_and_total_steps(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_the_schedule_helpers_still_trace():
  assert int(jax.jit(sfa_jax.averaging_period)(0.5, 10)) == 5
  assert jax.vmap(lambda p: sfa_jax.averaging_period(p, 10))(jnp.array([0.1, 0.5])).tolist() == [1, 5]
