"""Tests of sfa_jax.merging: hand-computed merges, mergekit's TIES in NumPy, properties, errors."""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfa_jax import merging


def _tree(a, c, step=0):
  """A small nested tree with two float leaves and an integer leaf."""
  return {
      'a': jnp.asarray(a, jnp.float32),
      'b': {'c': jnp.asarray(c, jnp.float32)},
      'step': jnp.asarray(step, jnp.int32),
  }


def _w(values):
  return {'w': jnp.asarray(values, jnp.float32)}


def _random_models(seed, num_models):
  """A base {'w': (10, 10), 'b': (7,)} and models at heavy-tailed random offsets from it."""
  rng = np.random.default_rng(seed)
  base = {'w': rng.normal(size=(10, 10)).astype(np.float32),
          'b': rng.normal(size=7).astype(np.float32)}
  models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) ** 3, base)
            for _ in range(num_models)]
  return base, models


def numpy_mergekit_magnitude(delta, density):
  """mergekit's ``sparsify.magnitude``: keep the ``int(density·n)`` largest |δ| (at least 1 here)."""
  if density >= 1:
    return delta
  flat = delta.reshape(-1)
  keep = np.argsort(-np.abs(flat), kind='stable')[: max(1, int(density * flat.size))]
  trimmed = np.zeros_like(flat)
  trimmed[keep] = flat[keep]
  return trimmed.reshape(delta.shape)


def numpy_mergekit_ties(base, models, density):
  """mergekit's ``ties`` on one tensor (weights 1, normalize, consensus 'sum', no rescale).

  Deltas are trimmed per model, signs are elected by the sum (``>= 0`` is +), and the mixed delta
  is the sum of the agreeing deltas over their count (a zero count divides by 1).
  """
  deltas = np.stack([numpy_mergekit_magnitude(m - base, density) for m in models])
  majority = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
  mask = np.sign(deltas) == majority
  divisor = mask.sum(0).astype(np.float32)
  divisor[divisor == 0] = 1
  return base + (deltas * mask).sum(0) / divisor


def numpy_threshold_trim(vector, density):
  """Keeps |v| ≥ the n-th largest magnitude, n = max(1, int(density·N)) (the documented rule)."""
  flat = np.abs(vector).reshape(-1)
  n = max(1, int(density * flat.size))
  threshold = np.sort(flat)[::-1][n - 1]
  return np.where(np.abs(vector) >= threshold, vector, 0)


class HandComputedTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_interpolate(self):
    anchor = _tree([0.0, 2.0], [[1.0]], step=1)
    params = _tree([4.0, 0.0], [[3.0]], step=9)
    got = self.variant(merging.interpolate)(anchor, params, 0.25)
    chex.assert_trees_all_close(got, _tree([3.0, 0.5], [[2.5]], step=9))

  @chex.all_variants(with_pmap=False)
  def test_task_arithmetic(self):
    base = _tree([1.0, 1.0], [[0.0]], step=0)
    models = [_tree([2.0, 1.0], [[1.0]], step=5), _tree([1.0, 3.0], [[-2.0]], step=8)]
    merge = self.variant(merging.task_arithmetic)
    chex.assert_trees_all_close(merge(base, models, 0.5), _tree([1.5, 2.0], [[-0.5]], step=8))
    # A negative scaling subtracts the tasks (Ilharco et al's negation).
    chex.assert_trees_all_close(merge(base, models, -1.0), _tree([0.0, -1.0], [[1.0]], step=8))

  def test_task_vectors(self):
    base = _tree([1.0, 1.0], [[0.0]], step=0)
    vectors = merging.task_vectors(base, [_tree([3.0, 1.0], [[-1.0]], step=4)])
    chex.assert_trees_all_close(vectors, [_tree([2.0, 0.0], [[-1.0]], step=4)])

  @chex.all_variants(with_pmap=False)
  def test_ties_sign_election_zeros_and_disjoint_mean(self):
    base = _w([1.0, 1.0, 1.0, 1.0, 1.0])
    # Task vectors, entry by entry:
    #   0: +2, +4, -1  -> sum +5, elected +, mean of (2, 4)         = 3
    #   1: +1, -3, -3  -> sum -5, elected -, mean of (-3, -3)       = -3
    #   2: -1, +1,  0  -> sum 0 (tie -> +), mean of (+1); 0 never agrees = 1
    #   3:  0,  0,  0  -> no model agrees                           = 0
    #   4: +6, -1, -2  -> sum +3, elected +, mean of (6)            = 6
    taus = np.array([[2.0, 1.0, -1.0, 0.0, 6.0], [4.0, -3.0, 1.0, 0.0, -1.0],
                     [-1.0, -3.0, 0.0, 0.0, -2.0]])
    models = [_w(1.0 + tau) for tau in taus]
    merge = self.variant(merging.ties, static_argnames=('density', 'trim'))
    got = merge(base, models, density=1.0, scaling=0.5)['w']
    np.testing.assert_allclose(got, 1.0 + 0.5 * np.array([3.0, -3.0, 1.0, 0.0, 6.0]))

  def test_ties_trim_keeps_magnitude_ties_at_the_threshold(self):
    base = _w(np.zeros(4))
    models = [_w([2.0, 1.0, -1.0, 0.0]), _w([4.0, -3.0, 0.5, 0.25])]
    # density 0.5 keeps n = 2 per model: [2, 1, -1, 0] (1 and -1 tie at the threshold: both kept)
    # and [4, -3, 0, 0]. Sums +6, -2, -1, 0 -> signs +, -, -, +.
    got = merging.ties(base, models, density=0.5, scaling=2.0)['w']
    np.testing.assert_allclose(got, 2.0 * np.array([3.0, -3.0, -1.0, 0.0]))

  def test_ties_with_density_one_and_one_model_is_task_arithmetic(self):
    base = _tree([1.0, -2.0, 0.5], [[0.0, 1.0]])
    model = _tree([3.0, -1.0, 0.0], [[2.0, -1.0]], step=3)
    chex.assert_trees_all_close(
        merging.ties(base, [model], density=1.0, scaling=0.7),
        merging.task_arithmetic(base, [model], 0.7),
    )

  def test_per_tensor_and_global_trimming_differ(self):
    base = {'big': jnp.zeros(4), 'small': jnp.zeros(2)}
    model = {'big': jnp.array([10.0, 9.0, 8.0, 7.0]), 'small': jnp.array([0.1, -0.2])}
    per_tensor = merging.ties(base, [model], density=0.5)
    global_ = merging.ties(base, [model], density=0.5, trim='global')
    # Per tensor: 2 of 4 and 1 of 2. Globally: 3 of 6, all in the big tensor.
    np.testing.assert_allclose(per_tensor['big'], [10.0, 9.0, 0.0, 0.0])
    np.testing.assert_allclose(per_tensor['small'], [0.0, -0.2])
    np.testing.assert_allclose(global_['big'], [10.0, 9.0, 8.0, 0.0])
    np.testing.assert_allclose(global_['small'], [0.0, 0.0])
    chex.assert_trees_all_close(merging.trim_by_magnitude(model, 0.5, trim='global'), global_)

  def test_keep_count_truncates_the_float64_product_as_mergekit(self):
    vector = _w(np.arange(1.0, 101.0).reshape(10, 10))  # distinct magnitudes
    kept = merging.trim_by_magnitude(vector, 0.29)['w']
    assert int(jnp.sum(kept != 0)) == int(0.29 * 100) == 28
    # density * N < 1 keeps the single largest entry (mergekit refuses).
    kept = merging.trim_by_magnitude(_w([0.5, -3.0, 1.0]), 0.1)['w']
    np.testing.assert_allclose(kept, [0.0, -3.0, 0.0])


class ConventionsTest(chex.TestCase):

  def test_dtypes_kept_and_low_precision_computed_in_float32(self):
    rng = np.random.default_rng(0)
    base32 = rng.normal(size=64).astype(np.float32)
    models32 = [base32 + rng.normal(size=64).astype(np.float32) for _ in range(3)]
    base = {'w': jnp.asarray(base32, jnp.bfloat16)}
    models = [{'w': jnp.asarray(m, jnp.bfloat16)} for m in models32]
    as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    for merge in (
        lambda b, ms: merging.interpolate(b, ms[0], 0.3),
        lambda b, ms: merging.task_arithmetic(b, ms, 0.3),
        lambda b, ms: merging.ties(b, ms, 0.3, 0.7),
        lambda b, ms: merging.ties(b, ms, 0.3, 0.7, trim='global'),
        lambda b, ms: merging.magmax(b, ms, 0.7),
        lambda b, ms: merging.fisher_merge([b, *ms], [{'w': jnp.arange(64.0) % 5}] * (len(ms) + 1)),
    ):
      got = merge(base, models)
      assert got['w'].dtype == jnp.bfloat16
      # The float32 merge of the same (bf16-representable) values, rounded once.
      expected = merge(as32(base), [as32(m) for m in models])['w'].astype(jnp.bfloat16)
      np.testing.assert_array_equal(got['w'], expected)

  def test_non_float_leaves_come_from_the_most_recent_model(self):
    def tree(value, step, seed):
      return {'w': jnp.full(3, value), 'step': jnp.array(step), 'key': jax.random.key(seed),
              'flag': jnp.array(step > 2)}
    base, first, last = tree(1.0, 1, 0), tree(2.0, 2, 1), tree(3.0, 3, 2)
    for merged in (
        merging.interpolate(base, last, 0.5),
        merging.task_arithmetic(base, [first, last], 1.0),
        merging.ties(base, [first, last], 0.5),
        merging.task_vectors(base, [last])[0],
        merging.magmax(base, [first, last]),
        merging.fisher_merge([base, first, last], [tree(1.0, 0, 0)] * 3),
    ):
      assert int(merged['step']) == 3 and bool(merged['flag'])
      np.testing.assert_array_equal(jax.random.key_data(merged['key']),
                                    jax.random.key_data(last['key']))

  @chex.all_variants(with_pmap=False)
  def test_traced_beta_and_scaling_under_vmap(self):
    anchor, params = _w([0.0, 4.0]), _w([2.0, 0.0])
    sweep = self.variant(jax.vmap(merging.interpolate, in_axes=(None, None, 0)))
    got = sweep(anchor, params, jnp.array([0.0, 0.5, 1.0]))['w']
    np.testing.assert_allclose(got, [[2.0, 0.0], [1.0, 2.0], [0.0, 4.0]])
    scalings = jnp.array([0.0, 1.0, 2.0])
    sweep = self.variant(jax.vmap(merging.task_arithmetic, in_axes=(None, None, 0)))
    np.testing.assert_allclose(sweep(anchor, [params], scalings)['w'][:, 0], [0.0, 2.0, 4.0])
    ties_sweep = jax.vmap(lambda s: merging.ties(anchor, [params], 0.5, s, trim='global'))
    np.testing.assert_allclose(self.variant(ties_sweep)(scalings)['w'][:, 1], [4.0, 0.0, -4.0])


class PropertyTest(chex.TestCase):

  @hypothesis.given(
      seed=st.integers(0, 2**31),
      num_models=st.integers(1, 4),
      density=st.sampled_from([0.05, 0.1, 0.29, 0.5, 0.9, 1.0]),
      scaling=st.floats(-2.0, 2.0),
  )
  def test_ties_equals_mergekit_per_tensor(self, seed, num_models, density, scaling):
    base, models = _random_models(seed, num_models)
    got = merging.ties(base, models, density, scaling)
    for name in base:
      expected = numpy_mergekit_ties(base[name], [m[name] for m in models], density)
      # mergekit has no lambda: scale its merged delta.
      expected = base[name] + scaling * (expected - base[name])
      np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5)

  @hypothesis.given(
      vector=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                        elements=st.integers(-3, 3).map(float)),
      density=st.floats(0.01, 1.0),
  )
  def test_trim_keeps_every_entry_tied_with_the_threshold(self, vector, density):
    # Small integers: magnitude ties at the threshold are the rule, not the exception.
    got = merging.trim_by_magnitude({'v': jnp.asarray(vector)}, density)['v']
    np.testing.assert_array_equal(got, numpy_threshold_trim(vector, density))

  @hypothesis.given(seed=st.integers(0, 2**31), density=st.floats(0.01, 1.0))
  def test_global_trim_ranks_the_flattened_model(self, seed, density):
    rng = np.random.default_rng(seed)
    shapes = {'a': (3, 4), 'b': (5,), 'c': ()}
    vector = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    got = merging.trim_by_magnitude(vector, density, trim='global')
    flat = numpy_threshold_trim(np.concatenate([vector[k].reshape(-1) for k in shapes]), density)
    np.testing.assert_array_equal(np.concatenate([np.ravel(got[k]) for k in shapes]), flat)

  @hypothesis.given(seed=st.integers(0, 2**31), beta=st.floats(0.0, 1.0))
  def test_interpolate_endpoints_and_task_arithmetic_at_zero(self, seed, beta):
    rng = np.random.default_rng(seed)
    a, p = (_tree(rng.normal(size=3), rng.normal(size=(2, 2))) for _ in range(2))
    chex.assert_trees_all_equal(merging.interpolate(a, p, 0.0), p)
    chex.assert_trees_all_equal(merging.interpolate(a, p, 1.0), a)
    mid = merging.interpolate(a, p, beta)
    for m, x, y in zip(jax.tree.leaves(mid), jax.tree.leaves(a), jax.tree.leaves(p)):
      assert np.all(m >= np.minimum(x, y) - 1e-6) and np.all(m <= np.maximum(x, y) + 1e-6)
    chex.assert_trees_all_equal(merging.task_arithmetic(a, [p, p], 0.0), {**a, 'step': p['step']})

  @hypothesis.given(
      seed=st.integers(0, 2**31),
      num_models=st.integers(1, 4),
      density=st.floats(0.01, 1.0),
      scaling=st.floats(-3.0, 3.0),
      trim=st.sampled_from(merging.TRIM_SCOPES),
  )
  def test_ties_is_bounded_by_the_largest_task_vector(self, seed, num_models, density, scaling,
                                                      trim):
    base, models = _random_models(seed, num_models)
    got = merging.ties(base, models, density, scaling, trim=trim)
    for name in base:
      bound = abs(scaling) * max(np.abs(m[name] - base[name]).max() for m in models)
      assert np.all(np.abs(np.asarray(got[name]) - base[name]) <= bound * (1 + 1e-6) + 1e-6)


_FINITE = st.floats(-1e4, 1e4, width=32)  # within float16's range; -0.0 and subnormals included


@hypothesis.given(data=st.data(), dtype=st.sampled_from([np.float32, jnp.bfloat16, np.float16]),
                  num_models=st.integers(1, 2), beta=st.floats(0.0, 1.0), scaling=st.floats(-3.0, 3.0),
                  density=st.sampled_from([0.3, 1.0]), trim=st.sampled_from(merging.TRIM_SCOPES))
def test_every_merge_keeps_where_the_models_agree_bit_for_bit(data, dtype, num_models, beta, scaling, density, trim):
  """Where the anchor and params (or the base and every fine-tuned model) hold the same value, the
  merge is that value, bit for bit: a frozen entry stays frozen."""
  shape = (3, 4)  # one shape: the merges compile once per dtype and number of models
  draw = lambda: data.draw(hnp.arrays(np.float32, shape, elements=_FINITE)).astype(dtype)
  shared, agreed = draw(), data.draw(hnp.arrays(np.bool_, shape))
  base, *models = ({'w': jnp.asarray(np.where(agreed, shared, draw()))} for _ in range(num_models + 1))
  merges = {
      'interpolate': merging.interpolate(base, models[0], beta),
      'task_arithmetic': merging.task_arithmetic(base, models, scaling),
      'ties': merging.ties(base, models, density, scaling, trim=trim),
      'magmax': merging.magmax(base, models, scaling),
      'fisher_merge': merging.fisher_merge([base, *models], [{'w': np.abs(draw()).astype(np.float32)}
                                                             for _ in range(num_models + 1)]),
  }
  bits = lambda array: np.asarray(array).view(np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32)
  for name, merged in merges.items():
    assert merged['w'].dtype == dtype, name
    np.testing.assert_array_equal(bits(merged['w'])[agreed], bits(shared)[agreed], err_msg=name)


def test_mismatched_trees_name_the_leaf_path():
  base = _tree([1.0, 2.0], [[1.0]])
  wrong_shape = _tree([1.0, 2.0, 3.0], [[1.0]])
  wrong_dtype = {**base, 'b': {'c': base['b']['c'].astype(jnp.bfloat16)}}
  with pytest.raises(ValueError, match=r"finetuned_models\[1\]\['a'\] has shape \(3,\)"):
    merging.task_arithmetic(base, [base, wrong_shape], 1.0)
  with pytest.raises(ValueError, match=r"anchor\['b'\]\['c'\] has dtype bfloat16"):
    merging.interpolate(wrong_dtype, base, 0.5)
  with pytest.raises(ValueError, match=r"missing leaves \[\"\['step'\]\"\]"):
    merging.ties(base, [{'a': base['a'], 'b': base['b']}], 0.5)

def test_models_must_be_a_non_empty_list():
  base = _w([1.0])
  with pytest.raises(ValueError, match='finetuned_models is empty'):
    merging.ties(base, [], 0.5)
  with pytest.raises(ValueError, match='finetuned_models is empty'):
    merging.task_arithmetic(base, (), 1.0)
  with pytest.raises(TypeError, match=r'list or tuple.*got dict.*\[model\]'):
    merging.task_vectors(base, base)

@pytest.mark.parametrize('density', [0.0, -0.1, 1.5, float('nan')])
def test_density_out_of_range(density):
  with pytest.raises(ValueError, match=r'density must lie in \(0.0, 1.0\]'):
    merging.ties(_w([1.0]), [_w([2.0])], density)

def test_traced_density_is_refused():
  with pytest.raises(TypeError, match='static_argnames'):
    jax.jit(merging.trim_by_magnitude)(_w([1.0, 2.0]), 0.5)

@pytest.mark.parametrize('beta', [-0.1, 1.5, float('nan')])
def test_beta_out_of_range(beta):
  with pytest.raises(ValueError, match=r'beta must lie in \[0.0, 1.0\]'):
    merging.interpolate(_w([1.0]), _w([2.0]), beta)

def test_unknown_trim_and_complex_leaves():
  with pytest.raises(ValueError, match='trim must be one of'):
    merging.ties(_w([1.0]), [_w([2.0])], 0.5, trim='layer')
  complex_tree = {'z': jnp.ones(2, jnp.complex64)}
  with pytest.raises(ValueError, match=r"base\['z'\] is complex64"):
    merging.ties(complex_tree, [complex_tree], 0.5)


# -- MagMax and Fisher-weighted averaging ---------------------------------------------------------


def numpy_magmax(base, models, scaling):
  """MagMax from the paper, per entry: the task vector of largest magnitude, the later one on ties.

  The last maximum is found as the first maximum of the reversed stack (float32 task vectors).
  """
  taus = np.stack([np.asarray(m, np.float32) - np.asarray(base, np.float32) for m in models])
  last_max = len(models) - 1 - np.argmax(np.abs(taus)[::-1], axis=0)
  selected = np.take_along_axis(taus, last_max[None], axis=0)[0]
  return base + np.float32(scaling) * selected


def numpy_fisher_merge(models, fishers, weights, floor, favor_first):
  """Matena & Raffel's merge in float64: Σ w_k F̃_k θ_k / Σ w_k F̃_k, F̃ floored for the first model
  (or all)."""
  total, norm = 0.0, 0.0
  for k, (model, fisher, weight) in enumerate(zip(models, fishers, weights)):
    fisher = np.asarray(fisher, np.float64)
    if k == 0 or not favor_first:
      fisher = np.maximum(fisher, floor)
    total, norm = total + weight * fisher * np.asarray(model, np.float64), norm + weight * fisher
  return total / norm


def _random_fishers(rng, like, zeros=0.3):
  """Non-negative Fishers shaped as ``like``, a share ``zeros`` of their entries exactly 0."""
  return {name: np.where(rng.random(x.shape) < zeros, 0.0, rng.exponential(size=x.shape)).astype(np.float32)
          for name, x in like.items()}


class MagMaxTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_keeps_the_largest_magnitude_and_the_later_model_on_ties(self):
    base = _w([1.0, 1.0, 1.0, 1.0])
    # Task vectors, entry by entry: (+2, -3) -> -3; (-1, +1) tie -> +1; (0, 0) -> 0; (+5, +4) -> +5.
    models = [_w(1.0 + np.array([2.0, -1.0, 0.0, 5.0])), _w(1.0 + np.array([-3.0, 1.0, 0.0, 4.0]))]
    got = self.variant(merging.magmax)(base, models, 0.5)['w']
    np.testing.assert_array_equal(got, 1.0 + 0.5 * np.array([-3.0, 1.0, 0.0, 5.0]))
    # The default scaling is the paper's 0.5.
    chex.assert_trees_all_equal(merging.magmax(base, models), merging.magmax(base, models, 0.5))

  @hypothesis.given(seed=st.integers(0, 2**31), num_models=st.integers(1, 4), scaling=st.floats(-2.0, 2.0))
  def test_equals_numpy(self, seed, num_models, scaling):
    base, models = _random_models(seed, num_models)
    got = merging.magmax(base, models, scaling)
    for name in base:
      expected = numpy_magmax(base[name], [m[name] for m in models], scaling)
      np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)

  @hypothesis.given(
      data=st.data(), num_models=st.integers(1, 4), scaling=st.sampled_from([0.5, 1.0, -2.0]))
  def test_magnitude_ties_go_to_the_later_model(self, data, num_models, scaling):
    # Small integers: equal magnitudes of either sign are the rule, and the sums are exact.
    draw = lambda: data.draw(hnp.arrays(np.float32, (3, 4), elements=st.integers(-3, 3).map(float)))
    base, models = draw(), [draw() for _ in range(num_models)]
    got = merging.magmax({'w': base}, [{'w': m} for m in models], scaling)['w']
    np.testing.assert_array_equal(got, numpy_magmax(base, models, scaling))

  @hypothesis.given(seed=st.integers(0, 2**31), scaling=st.floats(-2.0, 2.0))
  def test_one_model_is_task_arithmetic(self, seed, scaling):
    base, (model,) = _random_models(seed, 1)
    chex.assert_trees_all_equal(merging.magmax(base, [model], scaling),
                                merging.task_arithmetic(base, [model], scaling))

  @hypothesis.given(seed=st.integers(0, 2**31), num_models=st.integers(2, 4), scaling=st.floats(-2.0, 2.0))
  def test_the_order_of_the_models_does_not_matter(self, seed, num_models, scaling):
    base, models = _random_models(seed, num_models)  # continuous values: no magnitude ties
    order = np.random.default_rng(seed).permutation(num_models)
    chex.assert_trees_all_equal(merging.magmax(base, models, scaling),
                                merging.magmax(base, [models[i] for i in order], scaling))

  @chex.all_variants(with_pmap=False)
  def test_traced_scaling_under_vmap(self):
    sweep = self.variant(jax.vmap(merging.magmax, in_axes=(None, None, 0)))
    got = sweep(_w([1.0, 1.0]), [_w([3.0, 0.0])], jnp.array([0.0, 0.5, 1.0]))['w']
    np.testing.assert_allclose(got, [[1.0, 1.0], [2.0, 0.5], [3.0, 0.0]])


class FisherMergeTest(chex.TestCase):

  @hypothesis.given(
      seed=st.integers(0, 2**31),
      num_models=st.integers(1, 4),
      floor=st.sampled_from([1e-6, 0.1, 1.0]),
      favor_first=st.booleans(),
  )
  def test_equals_numpy(self, seed, num_models, floor, favor_first):
    _, models = _random_models(seed, num_models)
    rng = np.random.default_rng(seed + 1)
    fishers = [_random_fishers(rng, models[0]) for _ in models]
    weights = rng.uniform(0.1, 2.0, size=num_models)
    got = merging.fisher_merge(models, fishers, list(weights), fisher_floor=floor, favor_first=favor_first)
    for name in models[0]:
      expected = numpy_fisher_merge([m[name] for m in models], [f[name] for f in fishers], weights, floor,
                                    favor_first)
      np.testing.assert_allclose(got[name], expected, rtol=2e-5, atol=2e-5)

  @hypothesis.given(seed=st.integers(0, 2**31), num_models=st.integers(1, 4), favor_first=st.booleans())
  def test_equal_fishers_give_the_weighted_plain_average(self, seed, num_models, favor_first):
    _, models = _random_models(seed, num_models)
    rng = np.random.default_rng(seed + 1)
    fisher = _random_fishers(rng, models[0], zeros=0.0 if favor_first else 0.3)
    if favor_first:  # at or above the floor, which only the first model's Fisher gets
      fisher = jax.tree.map(lambda f: f + np.float32(1e-6), fisher)
    weights = rng.uniform(0.1, 2.0, size=num_models)
    got = merging.fisher_merge(models, [fisher] * num_models, list(weights), favor_first=favor_first)
    for name in models[0]:
      expected = np.average(np.stack([m[name] for m in models]).astype(np.float64), axis=0, weights=weights)
      np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5)

  @hypothesis.given(seed=st.integers(0, 2**31), num_models=st.integers(2, 4), data=st.data())
  def test_a_model_alone_with_fisher_information_is_the_merge(self, seed, num_models, data):
    _, models = _random_models(seed, num_models)
    only = data.draw(st.integers(0, num_models - 1))
    rng = np.random.default_rng(seed + 1)
    fisher = jax.tree.map(lambda x: rng.uniform(1.0, 2.0, size=x.shape).astype(np.float32), models[0])
    fishers = [fisher if k == only else jax.tree.map(np.zeros_like, fisher) for k in range(num_models)]
    weights = rng.uniform(0.1, 2.0, size=num_models)
    floor = 1e-6
    got = merging.fisher_merge(models, fishers, list(weights), fisher_floor=floor)
    for name in models[0]:
      # Exact but for rounding for the first model; within the first model's floored pull otherwise.
      pull = 0.0 if only == 0 else floor * weights[0] * np.abs(models[0][name] - models[only][name]) / (
          weights[only] * fisher[name])
      np.testing.assert_array_less(np.abs(got[name] - models[only][name]),
                                   pull + 1e-6 * np.abs(models[only][name]) + 1e-6)

  @hypothesis.given(seed=st.integers(0, 2**31), num_models=st.integers(1, 4), favor_first=st.booleans())
  def test_each_entry_is_a_convex_combination_of_the_models(self, seed, num_models, favor_first):
    _, models = _random_models(seed, num_models)
    rng = np.random.default_rng(seed + 1)
    fishers = [_random_fishers(rng, models[0], zeros=0.5) for _ in models]
    weights = rng.uniform(0.0, 2.0, size=num_models)
    weights[0] += 0.1
    got = merging.fisher_merge(models, fishers, list(weights), favor_first=favor_first)
    for name in models[0]:
      stacked = np.stack([m[name] for m in models])
      slack = 1e-6 * np.abs(stacked).max(axis=0)
      assert np.all(got[name] >= stacked.min(axis=0) - slack) and np.all(got[name] <= stacked.max(axis=0) + slack)

  @chex.all_variants(with_pmap=False)
  def test_traced_weights_and_floor(self):
    models, fishers = [_w([0.0, 0.0]), _w([10.0, 10.0])], [_w([1.0, 0.0]), _w([1.0, 0.0])]
    sweep = self.variant(jax.vmap(lambda b: merging.fisher_merge(models, fishers, [b, 1 - b])))
    # Entry 1 has no Fisher information: the first model, through its floor.
    np.testing.assert_allclose(sweep(jnp.array([0.25, 0.5, 1.0]))['w'], [[7.5, 0.0], [5.0, 0.0], [0.0, 0.0]])
    floors = self.variant(jax.vmap(lambda f: merging.fisher_merge(models, fishers, favor_first=False,
                                                                   fisher_floor=f)))
    np.testing.assert_allclose(floors(jnp.array([1e-6, 1.0]))['w'], [[5.0, 5.0], [5.0, 5.0]], rtol=1e-6)


@pytest.mark.parametrize(
    'models, fishers, kwargs, error, message',
    [
        (_w([1.0]), [_w([1.0])], {}, TypeError, r'models must be a list or tuple.*got dict'),
        ([], [], {}, ValueError, 'models is empty'),
        ([_w([1.0])], _w([1.0]), {}, TypeError, r'fishers must be a list or tuple.*\[fisher\]'),
        ([_w([1.0]), _w([2.0])], [_w([1.0])], {}, ValueError, 'fishers has 1 trees for 2 models'),
        ([_w([1.0]), _w([2.0, 3.0])], [_w([1.0])] * 2, {}, ValueError, r"models\[1\]\['w'\] has shape \(2,\)"),
        ([_w([1.0])], [{'v': jnp.ones(1)}], {}, ValueError, r'fishers\[0\] does not have the tree structure'),
        ([_w([1.0])], [_w([-1.0])], {}, ValueError, r"fishers\[0\]\['w'\] has negative entries"),
        ([_w([1.0])], [_w([np.inf])], {}, ValueError, r"fishers\[0\]\['w'\] has NaN or infinite entries"),
        ([_w([1.0])] * 2, [_w([1.0])] * 2, {'weights': [1.0]}, ValueError, r'one number per model \(2\)'),
        ([_w([1.0])] * 2, [_w([1.0])] * 2, {'weights': [1.0, -1.0]}, ValueError, 'finite and non-negative'),
        ([_w([1.0])] * 2, [_w([1.0])] * 2, {'weights': [0.0, 1.0]}, ValueError, r'weights\[0\] must be positive'),
        ([_w([1.0])] * 2, [_w([1.0])] * 2, {'weights': [0.0, 0.0], 'favor_first': False}, ValueError, 'all 0'),
        ([_w([1.0])], [_w([1.0])], {'fisher_floor': 0.0}, ValueError, r'fisher_floor must lie in \(0.0, inf\)'),
    ],
)
def test_fisher_merge_names_what_is_wrong(models, fishers, kwargs, error, message):
  with pytest.raises(error, match=message):
    merging.fisher_merge(models, fishers, **kwargs)


def test_magmax_names_a_non_finite_scaling_and_a_mismatched_model():
  with pytest.raises(ValueError, match='scaling must be a finite number'):
    merging.magmax(_w([1.0]), [_w([2.0])], float('nan'))
  with pytest.raises(ValueError, match=r"finetuned_models\[0\]\['w'\] has shape \(2,\)"):
    merging.magmax(_w([1.0]), [_w([2.0, 3.0])])
