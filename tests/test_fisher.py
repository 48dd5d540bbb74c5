"""Tests of sfa_jax.fisher: closed forms on softmax regression, chunking, compilation, dtypes, errors."""

import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfa_jax import _layerwise_fisher
from sfa_jax import _validation
from sfa_jax import models
from sfa_jax import fisher as fisher_lib

NUM_FEATURES, NUM_CLASSES, NUM_EXAMPLES = 3, 4, 50


def linear_logits(params, x):
  return x @ params['w'] + params['b']


def make_problem(seed=0, num_examples=NUM_EXAMPLES):
  rng = np.random.default_rng(seed)
  params = {
      'w': jnp.asarray(rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), jnp.float32),
      'b': jnp.asarray(rng.normal(size=NUM_CLASSES), jnp.float32),
  }
  inputs = rng.normal(size=(num_examples, NUM_FEATURES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples)
  return params, inputs, labels


def numpy_reference(params, inputs, labels=None):
  """Per-example squared gradients of log softmax for logits = x @ W + b, in float64.

  Returns (empirical, expected, variance of one sampled-label term), each a dict like the params;
  ∇_W log p(y|x) = outer(x, e_y − p) and ∇_b log p(y|x) = e_y − p.
  """
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  x = np.asarray(inputs, np.float64)
  logits = x @ w + b
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  eye = np.eye(NUM_CLASSES)
  # residual[i, y] = e_y - p_i, one row per candidate label y: shape (N, C_label, C).
  residual = eye[None, :, :] - probs[:, None, :]
  grad_w_sq = (x[:, None, :, None] * residual[:, :, None, :]) ** 2  # (N, C_label, D, C)
  grad_b_sq = residual**2  # (N, C_label, C)
  result = {}
  if labels is not None:
    rows = np.arange(len(x))
    result['empirical'] = {
        'w': grad_w_sq[rows, labels].mean(0),
        'b': grad_b_sq[rows, labels].mean(0),
    }
  weight_w, weight_b = probs[:, :, None, None], probs[:, :, None]
  result['expected'] = {
      'w': (weight_w * grad_w_sq).sum(1).mean(0),
      'b': (weight_b * grad_b_sq).sum(1).mean(0),
  }
  result['term_variance'] = {
      'w': (weight_w * grad_w_sq**2).sum(1) - (weight_w * grad_w_sq).sum(1) ** 2,
      'b': (weight_b * grad_b_sq**2).sum(1) - (weight_b * grad_b_sq).sum(1) ** 2,
  }
  return result


@pytest.mark.parametrize('batch_size', [7, 50, 64])
def test_empirical_matches_numpy_closed_form(batch_size):
  params, inputs, labels = make_problem()
  fisher = fisher_lib.diagonal_fisher(
      linear_logits, params, inputs, labels, batch_size=batch_size
  )
  chex.assert_trees_all_close(
      fisher, numpy_reference(params, inputs, labels)['empirical'], rtol=1e-5, atol=1e-7
  )


@pytest.mark.parametrize('batch_size', [7, 64])
def test_expected_matches_numpy_closed_form(batch_size):
  params, inputs, _ = make_problem(seed=1)
  fisher = fisher_lib.diagonal_fisher(
      linear_logits, params, inputs, kind='expected', batch_size=batch_size
  )
  chex.assert_trees_all_close(
      fisher, numpy_reference(params, inputs)['expected'], rtol=1e-5, atol=1e-7
  )


def test_empirical_differs_from_expected_away_from_the_model():
  # The labels are not drawn from the model, so the two estimates must differ: a test that could
  # not tell them apart would not check that labels are used.
  params, inputs, labels = make_problem(seed=2)
  empirical = fisher_lib.diagonal_fisher(linear_logits, params, inputs, labels)
  expected = fisher_lib.diagonal_fisher(linear_logits, params, inputs, kind='expected')
  assert not np.allclose(empirical['w'], expected['w'], rtol=0.05)


def test_sampled_approaches_expected_within_five_sigma():
  params, inputs, _ = make_problem(seed=3)
  num_samples = 1000
  sampled = fisher_lib.diagonal_fisher(
      linear_logits, params, inputs, kind='sampled', key=jax.random.key(0),
      num_samples=num_samples,
  )
  reference = numpy_reference(params, inputs)
  for name in ('w', 'b'):
    # Var of the estimator = (1/N²) Σ_i Var_i / S, the examples' draws being independent.
    std = np.sqrt(reference['term_variance'][name].sum(0) / num_samples) / NUM_EXAMPLES
    error = np.abs(np.asarray(sampled[name], np.float64) - reference['expected'][name])
    assert np.all(error <= 5 * std + 1e-6), (name, (error / std).max())


def test_sampled_is_deterministic_and_independent_of_chunking():
  params, inputs, _ = make_problem(seed=4)

  def run(key, batch_size):
    return fisher_lib.diagonal_fisher(
        linear_logits, params, inputs, kind='sampled', key=key, batch_size=batch_size,
        num_samples=3,
    )

  first = run(jax.random.key(7), 7)
  chex.assert_trees_all_equal(first, run(jax.random.key(7), 7))
  chex.assert_trees_all_close(first, run(jax.random.key(7), 64), rtol=1e-6)
  assert not np.allclose(first['w'], run(jax.random.key(8), 7)['w'])
  # A raw uint32 key works like the typed one it wraps.
  chex.assert_trees_all_equal(first, run(jax.random.PRNGKey(7), 7))


@settings(max_examples=10, deadline=None)
@given(
    num_examples=st.integers(1, 30),
    batch_size=st.sampled_from([1, 4, 16]),
    kind=st.sampled_from(['empirical', 'expected']),
)
def test_any_chunking_gives_the_closed_form(num_examples, batch_size, kind):
  params, inputs, labels = make_problem(seed=5, num_examples=num_examples)
  fisher = fisher_lib.diagonal_fisher(
      linear_logits, params, inputs, labels, kind=kind, batch_size=batch_size
  )
  chex.assert_trees_all_close(
      fisher, numpy_reference(params, inputs, labels)[kind], rtol=1e-5, atol=1e-7
  )


def test_chunk_function_compiles_once_whatever_the_number_of_examples():
  traces = []

  def counting_logits(params, x):
    traces.append(x.shape)
    return linear_logits(params, x)

  traces_per_compilation = None
  for num_examples in (50, 23, 16, 7, 1, 64):
    params, inputs, labels = make_problem(num_examples=num_examples)
    fisher_lib.diagonal_fisher(counting_logits, params, inputs, labels, batch_size=16)
    traces_per_compilation = traces_per_compilation or len(traces)
  assert len(traces) == traces_per_compilation, traces


def test_padding_rows_never_reach_the_sum():
  # Padding rows are zeros; this model gives NaN logits on them. Masking must select, not multiply.
  def normalized_logits(params, x):
    return linear_logits(params, x / jnp.linalg.norm(x, axis=-1, keepdims=True))

  params, inputs, labels = make_problem(num_examples=5)
  fisher = fisher_lib.diagonal_fisher(normalized_logits, params, inputs, labels, batch_size=4)
  chex.assert_tree_all_finite(fisher)
  unit = inputs / np.linalg.norm(inputs, axis=-1, keepdims=True)
  chex.assert_trees_all_close(
      fisher, numpy_reference(params, unit, labels)['empirical'], rtol=1e-5, atol=1e-7
  )


def test_pytree_inputs_and_jax_array_inputs():
  params, inputs, labels = make_problem(seed=6)

  def split_logits(params, x):
    return linear_logits(params, jnp.concatenate([x['first'], x['rest']], axis=-1))

  tree_inputs = {'first': jnp.asarray(inputs[:, :1]), 'rest': jnp.asarray(inputs[:, 1:])}
  fisher = fisher_lib.diagonal_fisher(
      split_logits, params, tree_inputs, jnp.asarray(labels), batch_size=8
  )
  chex.assert_trees_all_close(
      fisher, numpy_reference(params, inputs, labels)['empirical'], rtol=1e-5, atol=1e-7
  )


def test_flax_mlp_matches_a_direct_vmap_of_grad():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(NUM_CLASSES)])
  _, inputs, labels = make_problem(seed=7, num_examples=20)
  params = jax.jit(model.init)(jax.random.key(0), inputs[:1])
  fisher = fisher_lib.diagonal_fisher(model.apply, params, inputs, labels, batch_size=8)

  def log_likelihood(p, x, y):
    return jax.nn.log_softmax(model.apply(p, x[None])[0])[y]

  per_example_grads = jax.jit(jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0)))
  grads = per_example_grads(params, inputs, labels)
  reference = jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads)
  chex.assert_trees_all_close(fisher, reference, rtol=1e-5, atol=1e-8)


class _TwoUses(nn.Module):
  """A dense layer applied twice per example (shared weights): no closed form for it."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(x.shape[-1])
    return nn.Dense(NUM_CLASSES)(shared(jnp.tanh(shared(x))))


class _Sequence(nn.Module):
  """A dense layer on (batch, time, features): one example has several rows, no closed form."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.Dense(4)(x.reshape(x.shape[0], 2, -1))
    return nn.Dense(NUM_CLASSES)(hidden.reshape(x.shape[0], -1))


class _Convolutions(nn.Module):
  """Strided VALID and dilated SAME convolutions (closed form), and a grouped one (the loop)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding='VALID')(x))
    x = jnp.tanh(nn.Conv(4, (2, 2), kernel_dilation=2)(x))
    x = jnp.tanh(nn.Conv(4, (1, 1), feature_group_count=2)(x))
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


class _Normalised(nn.Module):
  """NaN logits on all-zero rows, such as the padding of the last chunk."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(x / jnp.linalg.norm(x, axis=-1, keepdims=True))


def _flax_models():
  """name -> (model, heads): heads is None for models that take no task_id."""
  return {
      'mlp': (models.make_model('mlp', NUM_CLASSES, hidden=(8, 8)), 1),
      'mlp-heads': (models.make_model('mlp', NUM_CLASSES, num_heads=3, hidden=(8,)), 3),
      'cnn': (models.make_model('cnn', NUM_CLASSES, features=(2,), hidden=8), 1),
      'shared': (_TwoUses(), None),
      'sequence': (_Sequence(), None),
      'normalised': (_Normalised(), None),
      'convolutions': (_Convolutions(), None),
  }


@pytest.mark.parametrize(
    'name, kind',
    [pytest.param(name, 'empirical', marks=[pytest.mark.slow] if name == 'convolutions' else []) for name in _flax_models()]
    + [('mlp-heads', 'sampled'), ('cnn', 'expected')],
)
def test_layerwise_equals_the_per_example_loop(name, kind):
  model, heads = _flax_models()[name]
  rng = np.random.default_rng(11)
  shape = {'cnn': (21, 4, 4, 1), 'convolutions': (21, 9, 9, 2)}.get(name, (21, 6))
  inputs = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=21)
  task_ids = np.arange(21) % (heads or 1)
  if heads is None:
    logits_fn = lambda params, x: model.apply(params, x[0])
    params = model.init(jax.random.key(1), inputs[:1])
  else:
    logits_fn = lambda params, x: model.apply(params, x[0], task_id=x[1])
    params = model.init(jax.random.key(1), inputs[:1], task_id=task_ids[:1])

  def run(closed_form):
    return fisher_lib.diagonal_fisher(
        logits_fn, params, (inputs, task_ids), labels, kind=kind, key=jax.random.key(2),
        batch_size=8, layerwise=closed_form,
    )

  closed, looped = run(True), run(False)
  chex.assert_tree_all_finite(closed)
  chex.assert_trees_all_close(closed, looped, rtol=2e-5, atol=1e-9)


def test_which_layers_take_the_closed_form():
  """Dense layers called once per example on (batch, features) rows, plain 2-D convolutions."""
  rng = np.random.default_rng(0)
  rows, images = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 9, 9, 2)).astype(np.float32)
  for model, inputs, expected in [
      (models.make_model('mlp', NUM_CLASSES, hidden=(8, 8)), rows, [('Dense_0',), ('Dense_1',), ('head',)]),
      (_TwoUses(), rows, [('Dense_1',)]),
      (_Sequence(), rows, [('Dense_1',)]),
      (_Convolutions(), images, [('Conv_0',), ('Conv_1',), ('Dense_0',)]),
  ]:
    params = model.init(jax.random.key(0), inputs[:1])
    leaves, treedef = jax.tree.flatten(params)
    apply = lambda differentiated, x: model.apply(treedef.unflatten(differentiated), x)
    calls, logits_shape = _layerwise_fisher.find_affine_calls(apply, leaves, inputs)
    assert [call.path for call in calls] == expected
    assert logits_shape == (4, NUM_CLASSES)


def test_out_of_range_labels_are_caught_when_every_leaf_takes_the_closed_form():
  model = models.make_model('mlp', NUM_CLASSES, hidden=(8,))
  _, inputs, labels = make_problem(num_examples=9)
  params = model.init(jax.random.key(0), inputs[:1])
  labels = labels.copy()
  labels[4] = NUM_CLASSES
  with pytest.raises(ValueError, match='1 labels lie outside'):
    fisher_lib.diagonal_fisher(model.apply, params, inputs, labels, batch_size=4)


def test_bf16_params_give_bf16_fisher_and_non_float_leaves_zeros():
  params, inputs, labels = make_problem(seed=8)
  reference = numpy_reference(params, inputs, labels)['empirical']
  tree = {
      'w': params['w'].astype(jnp.bfloat16),
      'b': params['b'],
      'step': jnp.array([3, 4], jnp.int32),
      'rng': jax.random.key(0),
  }
  fisher = fisher_lib.diagonal_fisher(linear_logits, tree, inputs, labels)
  _validation.check_matching_tree(tree, fisher, reference_name='params', other_name='fisher')
  assert fisher['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(fisher['w'], np.float32), reference['w'], rtol=0.05)
  np.testing.assert_allclose(fisher['b'], reference['b'], rtol=0.05)
  chex.assert_trees_all_equal(fisher['step'], jnp.zeros(2, jnp.int32))
  assert fisher['rng'].dtype == tree['rng'].dtype
  np.testing.assert_array_equal(jax.random.key_data(fisher['rng']), 0)


def test_sharded_params_and_inputs_keep_their_sharding():
  # Two host devices need XLA_FLAGS before jax starts, hence a fresh interpreter.
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from sfa_jax import fisher as fisher_lib
      mesh = Mesh(np.array(jax.devices()), ('d',))
      rng = np.random.default_rng(0)
      params = {'w': jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
      inputs = rng.normal(size=(10, 4)).astype(np.float32)
      labels = rng.integers(0, 6, size=10)
      logits_fn = lambda p, x: x @ p['w']
      plain = fisher_lib.diagonal_fisher(logits_fn, params, inputs, labels, batch_size=4)
      for params_spec, inputs_spec in [(P(None, 'd'), P()), (P(None, 'd'), P('d')), (P(), P('d'))]:
        sharding = NamedSharding(mesh, params_spec)
        sharded = jax.device_put(params, sharding)
        data = jax.device_put(inputs, NamedSharding(mesh, inputs_spec))
        result = fisher_lib.diagonal_fisher(logits_fn, sharded, data, labels, batch_size=4)
        assert result['w'].sharding.is_equivalent_to(sharding, 2), result['w'].sharding
        np.testing.assert_allclose(result['w'], plain['w'], rtol=1e-6)
      # The dense closed form (a Flax layer) keeps the sharding too.
      import flax.linen as nn
      dense = nn.Dense(6)
      variables = dense.init(jax.random.key(0), inputs[:1])
      plain = fisher_lib.diagonal_fisher(dense.apply, variables, inputs, labels, batch_size=4)
      sharding = NamedSharding(mesh, P(None, 'd'))
      sharded = {'params': {'kernel': jax.device_put(variables['params']['kernel'], sharding),
                            'bias': variables['params']['bias']}}
      data = jax.device_put(inputs, NamedSharding(mesh, P('d')))
      result = fisher_lib.diagonal_fisher(dense.apply, sharded, data, labels, batch_size=4)
      kernel = result['params']['kernel']
      assert kernel.sharding.is_equivalent_to(sharding, 2), kernel.sharding
      np.testing.assert_allclose(kernel, plain['params']['kernel'], rtol=1e-6)
      print('ok')
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  done = subprocess.run(
      [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr


@pytest.mark.parametrize(
    'overrides, match',
    [
        (dict(kind='fisher'), "kind must be 'empirical', 'sampled' or 'expected'"),
        (dict(kind='sampled', labels=None), "kind='sampled' needs a PRNG key"),
        (dict(labels=None), "kind='empirical' needs the labels"),
        (dict(labels=np.zeros((NUM_EXAMPLES, 1), np.int32)), r'labels must have shape \(N,\)'),
        (dict(labels=np.zeros(NUM_EXAMPLES - 1, np.int32)), 'labels has 49 entries but inputs has 50'),
        (dict(labels=np.zeros(NUM_EXAMPLES, np.float32)), 'labels must be integer'),
        (dict(batch_size=0), r'batch_size must be an integer in \[1, '),
        (dict(batch_size=2.5), 'batch_size must be an integer; got float 2.5'),
        (dict(kind='sampled', key=jax.random.key(0), num_samples=0), 'num_samples must be'),
        (dict(inputs=np.zeros((0, NUM_FEATURES)), labels=np.zeros(0, int)), r'N == 0'),
        (dict(inputs=np.float32(1.0)), r'inputs must be an array of shape \(N, ...\)'),
        (dict(inputs={'a': np.zeros((3, 1)), 'b': np.zeros((4, 1))}), 'different numbers of'),
        (dict(labels=np.full(NUM_EXAMPLES, NUM_CLASSES)), r'50 labels lie outside \[0, classes\)'),
        (dict(labels=np.r_[-1, np.zeros(NUM_EXAMPLES - 1, int)]), r'1 labels lie outside'),
        (dict(logits_fn=lambda p, x: linear_logits(p, x)[..., None]), r'\(batch, classes\)'),
    ],
)
def test_diagonal_fisher_errors(overrides, match):
  params, inputs, labels = make_problem()
  arguments = dict(logits_fn=linear_logits, params=params, inputs=inputs, labels=labels)
  arguments.update(overrides)
  with pytest.raises((ValueError, TypeError), match=match):
    fisher_lib.diagonal_fisher(**arguments)


@settings(max_examples=15, deadline=None)
@given(gamma=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_online_fisher_is_gamma_previous_plus_current(gamma, seed):
  rng = np.random.default_rng(seed)
  previous = {'a': rng.random((2, 3)).astype(np.float32), 'b': rng.random(4).astype(np.float32)}
  current = {'a': rng.random((2, 3)).astype(np.float32), 'b': rng.random(4).astype(np.float32)}
  result = fisher_lib.online_fisher(previous, current, gamma)
  expected = jax.tree.map(lambda old, new: gamma * old + new, previous, current)
  chex.assert_trees_all_close(result, expected, rtol=1e-6)


def test_online_fisher_endpoints_dtypes_and_non_float_leaves():
  previous = {'w': jnp.array([1.0, 2.0], jnp.bfloat16), 'step': jnp.array(5)}
  current = {'w': jnp.array([0.5, 0.25], jnp.bfloat16), 'step': jnp.array(0)}
  only_current = fisher_lib.online_fisher(previous, current, 0.0)
  total = fisher_lib.online_fisher(previous, current, 1)
  chex.assert_trees_all_equal(only_current, current)
  chex.assert_trees_all_equal(total['w'], jnp.array([1.5, 2.25], jnp.bfloat16))
  assert total['step'] == 0
  chex.assert_trees_all_equal_dtypes(total, current)


@pytest.mark.parametrize('wrap', [jax.jit, lambda fn: fn], ids=['jit', 'eager'])
def test_online_fisher_with_a_traced_or_concrete_gamma(wrap):
  previous, current = {'w': jnp.array([2.0, 4.0])}, {'w': jnp.array([1.0, 0.0])}
  result = wrap(fisher_lib.online_fisher)(previous, current, jnp.float32(0.5))
  chex.assert_trees_all_close(result, {'w': jnp.array([2.0, 2.0])})


@pytest.mark.parametrize(
    'previous, current, gamma, match',
    [
        ({'w': jnp.ones(2)}, {'w': jnp.ones(2)}, 1.5, r'gamma must lie in \[0.0, 1.0\]'),
        ({'w': jnp.ones(2)}, {'w': jnp.ones(2)}, -0.1, r'gamma must lie in \[0.0, 1.0\]'),
        ({'w': jnp.ones(2)}, {'w': jnp.ones(2)}, float('nan'), 'gamma must lie in'),
        ({'w': jnp.ones(2)}, {'v': jnp.ones(2)}, 0.5, 'current does not have the tree structure'),
        ({'w': jnp.ones(2)}, {'w': jnp.ones(3)}, 0.5, r"current\['w'\] has shape \(3,\)"),
        (
            {'w': jnp.ones(2)},
            {'w': jnp.ones(2, jnp.bfloat16)},
            0.5,
            r"current\['w'\] has dtype bfloat16, but previous\['w'\] has dtype float32",
        ),
    ],
)
def test_online_fisher_errors(previous, current, gamma, match):
  with pytest.raises(ValueError, match=match):
    fisher_lib.online_fisher(previous, current, gamma)
