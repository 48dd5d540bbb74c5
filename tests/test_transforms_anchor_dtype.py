"""``anchor_dtype=`` of sfa, l2 and ewc: bfloat16 params with a float32 (or bfloat16) anchor, chosen explicitly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax

from _optax_helpers import run_optax
from _optax_helpers import tree_params

# 1 + 2**-10 has no bfloat16 (8 significant bits): rounded to bfloat16 it is 1.0.
FINE = 1.0 + 2.0**-10


def _make(name, anchor=None, **kwargs):
  if name == 'sfa':
    return sfa_jax.sfa(anchor, p=0.5, beta=0.5, total_steps=4, **kwargs)
  if name == 'l2':
    return sfa_jax.l2(0.5, anchor=anchor, **kwargs)
  return sfa_jax.ewc({'w': jnp.full(3, 2.0, jnp.bfloat16), 'n': jnp.zeros((), jnp.int32)}, 0.5, anchor=anchor, **kwargs)


def _params():
  return {'w': jnp.array([1.0, 2.0, -4.0], jnp.bfloat16), 'n': jnp.array(3, jnp.int32)}


def _grads(params):
  return {'w': jnp.full(3, 0.25, jnp.bfloat16), 'n': jnp.zeros((), jnp.float32)}


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_a_float32_anchor_is_stored_for_bfloat16_params_and_stays_so(name):
  params = _params()
  tx = optax.chain(optax.sgd(0.1), _make(name, anchor_dtype=jnp.float32)) if name == 'sfa' else optax.chain(
      _make(name, anchor_dtype=jnp.float32), optax.sgd(0.1))
  state = tx.init(params)
  anchor = sfa_jax.find_state(state).anchor
  assert anchor['w'].dtype == jnp.float32 and anchor['n'].dtype == jnp.int32  # integers keep theirs
  np.testing.assert_array_equal(anchor['w'], np.asarray(params['w'], np.float32))
  layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  step = jax.jit(tx.update)
  for _ in range(5):  # crosses SFA's averaging steps 2 and 4 and a step past T
    updates, state = step(_grads(params), state, params)
    chex.assert_trees_all_equal_dtypes(updates, _grads(params))
    params = optax.apply_updates(params, updates)
    assert params['w'].dtype == jnp.bfloat16 and int(params['n']) == 3
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout


def test_sfa_averages_toward_the_float32_anchor_in_float32_and_casts_back():
  params = {'w': jnp.array([1.0, 2.0], jnp.bfloat16)}
  anchor = {'w': jnp.array([FINE, 3.0], jnp.float32)}
  grads = {'w': jnp.array([0.0, -0.5], jnp.bfloat16)}  # the first update is 0.5 * 2**-10 exactly
  tx = sfa_jax.sfa(anchor, p=1.0, beta=0.5, total_steps=1, anchor_dtype=jnp.float32)
  state = tx.init(params)
  np.testing.assert_array_equal(state.anchor['w'], anchor['w'])  # kept exactly: not rounded to bfloat16
  updates, _ = tx.update(grads, state, params)
  u, theta, theta_o = (np.asarray(x['w'], np.float32) for x in (grads, params, anchor))
  expected = (u + 0.5 * (theta_o - theta - u)).astype(jnp.bfloat16)  # in float32, cast back once
  assert updates['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(updates['w'], np.float32), np.asarray(expected, np.float32))
  # With the anchor in the params' dtype the 2**-10 is lost before the average: another update.
  coarse = sfa_jax.sfa(jax.tree.map(lambda x: x.astype(jnp.bfloat16), anchor), p=1.0, beta=0.5, total_steps=1)
  rounded, _ = coarse.update(grads, coarse.init(params), params)
  assert float(updates['w'][0]) == 2.0**-11 and float(rounded['w'][0]) == 0.0


@pytest.mark.parametrize('name', ['l2', 'ewc'])
def test_the_penalties_pull_toward_the_float32_anchor(name):
  params = {'w': jnp.array([1.0, 2.0, -4.0], jnp.bfloat16), 'n': jnp.array(3, jnp.int32)}
  anchor = {'w': jnp.array([FINE, 2.0, -4.0], jnp.float32), 'n': jnp.array(0, jnp.int32)}
  grads = {'w': jnp.zeros(3, jnp.bfloat16), 'n': jnp.zeros((), jnp.float32)}
  tx = _make(name, anchor, anchor_dtype=jnp.float32)
  updates, _ = tx.update(grads, tx.init(params), params)
  weight = 0.5 * (2.0 if name == 'ewc' else 1.0)  # strength, times the Fisher (2) for EWC
  assert updates['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(updates['w'], np.float32), [weight * (1.0 - FINE), 0.0, 0.0])
  coarse = _make(name, jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, anchor))
  rounded, _ = coarse.update(grads, coarse.init(params), params)
  assert float(rounded['w'][0]) == 0.0  # a bfloat16 anchor (1.0) pulls nowhere


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_anchor_dtype_of_the_params_own_dtype_is_the_default_bit_for_bit(name):
  params = tree_params(jnp.bfloat16)
  rng = np.random.default_rng(0)
  noise = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16), params) for _ in range(6)]
  grads = iter(noise)
  fisher = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.bfloat16), params)
  make = {
      'sfa': lambda **kw: optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4, **kw)),
      'l2': lambda **kw: optax.chain(sfa_jax.l2(0.5, **kw), optax.adam(0.1)),
      'ewc': lambda **kw: optax.chain(sfa_jax.ewc(fisher, 0.5, **kw), optax.adam(0.1)),
  }[name]
  default, _ = run_optax(make(), params, lambda p: next(grads), 6, jax.jit)
  grads = iter(noise)
  explicit, states = run_optax(make(anchor_dtype=jnp.bfloat16), params, lambda p: next(grads), 6, jax.jit)
  chex.assert_trees_all_equal(default[-1], explicit[-1])
  assert sfa_jax.find_state(states[-1]).anchor['a'].dtype == jnp.bfloat16


def test_a_bfloat16_anchor_halves_the_anchor_of_float32_params():
  params = tree_params(jnp.float32)
  anchor = jax.tree.map(lambda x: x + FINE, params)
  state = sfa_jax.sfa(anchor, p=0.5, total_steps=4, anchor_dtype='bfloat16').init(params)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state.anchor))
  assert sum(leaf.nbytes for leaf in jax.tree.leaves(state.anchor)) * 2 == sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  chex.assert_trees_all_equal(state.anchor, jax.tree.map(lambda x: x.astype(jnp.bfloat16), anchor))


def test_reanchor_stores_the_new_params_in_the_anchor_dtype():
  params = _params()
  tx = optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4, anchor_dtype=jnp.float32, wait_for_anchor=True))
  state = tx.init(params)
  new_params = {'w': jnp.array([3.0, 5.0, 7.0], jnp.bfloat16), 'n': jnp.array(4, jnp.int32)}
  state = sfa_jax.reanchor(state, new_params, total_steps=6)
  anchor = sfa_jax.find_state(state).anchor
  assert anchor['w'].dtype == jnp.float32 and anchor['n'].dtype == jnp.int32
  np.testing.assert_array_equal(anchor['w'], [3.0, 5.0, 7.0])
  # float32 params (e.g. master weights) are taken as they are, without a round trip through bfloat16
  state = sfa_jax.reanchor(state, {'w': jnp.array([FINE, 0.0, 0.0], jnp.float32), 'n': jnp.array(4, jnp.int32)})
  assert float(sfa_jax.find_state(state).anchor['w'][0]) == FINE


def test_reanchor_of_a_masked_group_with_a_float32_anchor():
  params = {'body': jnp.ones(3, jnp.bfloat16), 'head': jnp.ones(2, jnp.bfloat16)}
  tx = optax.chain(optax.adam(0.1), optax.masked(sfa_jax.sfa(p=0.5, total_steps=4, anchor_dtype=jnp.float32),
                                                 {'body': True, 'head': False}))
  state = sfa_jax.reanchor(tx.init(params), {'body': jnp.full(3, 2.0, jnp.bfloat16), 'head': jnp.zeros(2, jnp.bfloat16)})
  anchor = sfa_jax.find_state(state).anchor
  assert isinstance(anchor['head'], optax.MaskedNode) and anchor['body'].dtype == jnp.float32
  np.testing.assert_array_equal(anchor['body'], [2.0, 2.0, 2.0])


def test_a_given_anchor_of_the_wrong_shape_is_named_under_anchor_dtype():
  tx = sfa_jax.sfa({'w': jnp.ones(4), 'n': jnp.array(0)}, p=0.5, total_steps=4, anchor_dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"anchor\['w'\] has shape \(4,\), but params\['w'\] has shape \(3,\)"):
    tx.init(_params())


@pytest.mark.parametrize('factory', [
    lambda **kw: sfa_jax.sfa(p=0.5, total_steps=4, **kw),
    lambda **kw: sfa_jax.l2(1.0, **kw),
    lambda **kw: sfa_jax.ewc({'w': jnp.ones(3)}, 1.0, **kw),
], ids=['sfa', 'l2', 'ewc'])
@pytest.mark.parametrize('bad, error, match', [
    (jnp.int32, ValueError, 'anchor_dtype must be a real floating dtype.*int32'),
    (jnp.complex64, ValueError, 'anchor_dtype must be a real floating dtype.*complex64'),
    ('float33', TypeError, "anchor_dtype must be a dtype such as jnp.float32; got 'float33'"),
    (32, TypeError, 'anchor_dtype must be a dtype'),
])
def test_a_bad_anchor_dtype_is_named(factory, bad, error, match):
  with pytest.raises(error, match=match):
    factory(anchor_dtype=bad)


def test_under_inject_hyperparams_anchor_dtype_is_a_static_arg():
  params = _params()
  injected = optax.inject_hyperparams(sfa_jax.sfa, hyperparam_dtype=jnp.float32)
  with pytest.raises(TypeError, match=r"static_args=\('anchor_dtype',\)"):
    injected(p=0.5, total_steps=4, anchor_dtype=jnp.float32).init(params)  # jnp.float32 taken for a schedule
  static = optax.inject_hyperparams(sfa_jax.sfa, static_args=('anchor_dtype',), hyperparam_dtype=jnp.float32)
  for tx in (static(p=0.5, total_steps=4, anchor_dtype=jnp.float32), injected(p=0.5, total_steps=4, anchor_dtype='float32')):
    state = tx.init(params)
    assert sfa_jax.find_state(state).anchor['w'].dtype == jnp.float32
    updates, _ = jax.jit(tx.update)(_grads(params), state, params)
    assert updates['w'].dtype == jnp.bfloat16
