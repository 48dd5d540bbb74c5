"""Tests of sfa_jax.merging against hand-computed examples and a NumPy transcription of mergekit's TIES."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfa_jax import merging


def _tree(*values):
  return {'a': jnp.asarray(values[0], jnp.float32), 'b': {'c': jnp.asarray(values[1], jnp.float32)}}


def numpy_mergekit_ties(base, models, density, scaling):
  """mergekit's TIES on one tensor: magnitude top-k (k = floor(density*n)), sign by sum (0 -> +),
  mean over agreeing non-zero entries, base + lambda * mean."""
  deltas = []
  for model in models:
    delta = (model - base).reshape(-1)
    k = max(1, int(density * delta.size))
    keep = np.argsort(-np.abs(delta), kind='stable')[:k]
    trimmed = np.zeros_like(delta)
    trimmed[keep] = delta[keep]
    deltas.append(trimmed)
  deltas = np.stack(deltas)
  sign = np.sign(deltas.sum(0))
  sign[sign == 0] = 1
  agree = np.sign(deltas) == sign
  divisor = agree.sum(0)
  mixed = (deltas * agree).sum(0) / np.where(divisor == 0, 1, divisor)
  return base + scaling * mixed.reshape(base.shape)


class MergeTest(chex.TestCase):

  @chex.all_variants(with_pmap=False)
  def test_interpolate_and_task_arithmetic_by_hand(self):
    anchor = _tree([0.0, 2.0], [[1.0]])
    params = _tree([4.0, 0.0], [[3.0]])
    got = self.variant(merging.interpolate)(anchor, params, 0.25)
    chex.assert_trees_all_close(got, _tree([3.0, 0.5], [[2.5]]))
    base = _tree([1.0, 1.0], [[0.0]])
    models = [_tree([2.0, 1.0], [[1.0]]), _tree([1.0, 3.0], [[-2.0]])]
    got = self.variant(merging.task_arithmetic)(base, models, 0.5)
    chex.assert_trees_all_close(got, _tree([1.5, 2.0], [[-0.5]]))

  @chex.all_variants(with_pmap=False)
  def test_traced_beta_and_scaling(self):
    anchor, params = _tree([0.0], [1.0]), _tree([2.0], [3.0])
    sweep = self.variant(jax.vmap(merging.interpolate, in_axes=(None, None, 0)))
    got = sweep(anchor, params, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(got['a'][:, 0], [2.0, 1.0, 0.0])

  def test_ties_by_hand(self):
    base = {'w': jnp.zeros(4)}
    models = [{'w': jnp.array([2.0, 1.0, -1.0, 0.0])}, {'w': jnp.array([4.0, -3.0, 1.0, 0.0])}]
    # sign sums: +6, -2, 0 (tie -> +), 0 with no non-zero vote (-> 0)
    got = merging.ties(base, models, density=1.0, scaling=1.0)['w']
    np.testing.assert_allclose(got, [3.0, -3.0, 1.0, 0.0])
    # density 0.5 keeps 2 of 4 per model: [2, 1 or -1 (tie, lower index: 1)], [4, -3]
    got = merging.ties(base, models, density=0.5, scaling=2.0)['w']
    np.testing.assert_allclose(got, [6.0, -6.0, 0.0, 0.0])

  def test_ties_density_one_single_model_is_task_arithmetic(self):
    base = _tree([1.0, -2.0, 0.5], [[0.0, 1.0]])
    model = _tree([3.0, -1.0, 0.0], [[2.0, -1.0]])
    chex.assert_trees_all_close(
        merging.ties(base, [model], density=1.0, scaling=0.7), merging.task_arithmetic(base, [model], 0.7)
    )

  def test_per_tensor_and_global_trimming_differ(self):
    vector = {'big': jnp.array([10.0, 9.0, 8.0, 7.0]), 'small': jnp.array([0.1, 0.2])}
    per_tensor = merging.trim_by_magnitude(vector, 0.5)
    global_ = merging.trim_by_magnitude(vector, 0.5, trim='global')
    np.testing.assert_allclose(per_tensor['big'], [10.0, 9.0, 0.0, 0.0])
    np.testing.assert_allclose(per_tensor['small'], [0.0, 0.2])
    np.testing.assert_allclose(global_['big'], [10.0, 9.0, 8.0, 0.0])  # 3 of 6 entries overall
    np.testing.assert_allclose(global_['small'], [0.0, 0.0])

  @hypothesis.given(
      seed=st.integers(0, 10_000),
      num_models=st.integers(1, 4),
      density=st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0]),
      scaling=st.floats(0.0, 2.0),
  )
  def test_ties_equals_mergekit_per_tensor(self, seed, num_models, density, scaling):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3, 5)).astype(np.float32)
    models = [base + rng.normal(size=(3, 5)).astype(np.float32) for _ in range(num_models)]
    got = merging.ties({'w': jnp.asarray(base)}, [{'w': jnp.asarray(m)} for m in models], density, scaling)['w']
    np.testing.assert_allclose(got, numpy_mergekit_ties(base, models, density, scaling), rtol=1e-5, atol=1e-5)
    bound = scaling * max(np.abs(m - base).max() for m in models)
    assert np.all(np.abs(np.asarray(got) - base) <= bound + 1e-5)

  @hypothesis.given(seed=st.integers(0, 1000), beta=st.floats(0.0, 1.0))
  def test_interpolate_endpoints_and_bounds(self, seed, beta):
    rng = np.random.default_rng(seed)
    a, p = (_tree(rng.normal(size=3), rng.normal(size=(2, 2))) for _ in range(2))
    chex.assert_trees_all_close(merging.interpolate(a, p, 0.0), p)
    chex.assert_trees_all_close(merging.interpolate(a, p, 1.0), a)
    mid = merging.interpolate(a, p, beta)
    for m, x, y in zip(jax.tree.leaves(mid), jax.tree.leaves(a), jax.tree.leaves(p)):
      assert np.all(m >= np.minimum(x, y) - 1e-5) and np.all(m <= np.maximum(x, y) + 1e-5)
    chex.assert_trees_all_close(merging.task_arithmetic(a, [p], 0.0), a)

  def test_dtypes_kept_and_integer_leaves_from_the_latest_model(self):
    base = {'w': jnp.ones(3, jnp.bfloat16), 'step': jnp.array(1, jnp.int32)}
    model = {'w': jnp.full(3, 3.0, jnp.bfloat16), 'step': jnp.array(7, jnp.int32)}
    for merged in (
        merging.interpolate(base, model, 0.5),
        merging.task_arithmetic(base, [model], 1.0),
        merging.ties(base, [model], 0.5),
    ):
      assert merged['w'].dtype == jnp.bfloat16
      assert int(merged['step']) == 7

  def test_errors(self):
    base = _tree([1.0, 2.0], [[1.0]])
    wrong_shape = _tree([1.0, 2.0, 3.0], [[1.0]])
    with pytest.raises(ValueError, match=r"finetuned_models\[1\]\['a'\] has shape \(3,\)"):
      merging.task_arithmetic(base, [base, wrong_shape], 1.0)
    with pytest.raises(ValueError, match=r"params\['b'\]\['c'\] has dtype"):
      merging.interpolate(base, {'a': base['a'], 'b': {'c': base['b']['c'].astype(jnp.bfloat16)}}, 0.5)
    with pytest.raises(ValueError, match='is empty'):
      merging.ties(base, [], 0.5)
    with pytest.raises(ValueError, match='must be a list'):
      merging.ties(base, base, 0.5)
    with pytest.raises(ValueError, match=r'density must lie in \(0.0, 1.0\]'):
      merging.ties(base, [base], 0.0)
    with pytest.raises(ValueError, match='beta must lie'):
      merging.interpolate(base, base, 1.5)
    with pytest.raises(ValueError, match='scaling must lie'):
      merging.task_arithmetic(base, [base], -1.0)
    with pytest.raises(ValueError, match='trim must be one of'):
      merging.ties(base, [base], 0.5, trim='layer')
