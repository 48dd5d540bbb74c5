"""A-GEM's projection (sfa_jax.agem) against a NumPy projection written here, with and without jit."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax


def numpy_agem(g, reference):
  """The paper's rule on flat float64 vectors: project g when it conflicts with the reference."""
  g, reference = np.asarray(g, np.float64), np.asarray(reference, np.float64)
  dot = g @ reference
  if dot < 0:
    return g - dot / (reference @ reference) * reference
  return g


def _tree(flat):
  """A two-leaf tree of the 5 entries of ``flat``, with an integer leaf beside them."""
  flat = jnp.asarray(flat, jnp.float32)
  return {'a': flat[:2], 'b': {'c': flat[2:].reshape(3, 1)}, 'n': jnp.array(3, jnp.int32)}


def _flat(tree):
  return np.concatenate([np.ravel(tree['a']), np.ravel(tree['b']['c'])])


vectors = st.lists(st.floats(-10, 10, width=32), min_size=5, max_size=5)


class AGEMTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_projection_equals_numpy_and_never_conflicts(self):
    tx = sfa_jax.agem()
    update = self.variant(lambda g, r: tx.update(g, tx.init(g), reference_grads=r))

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(g=vectors, reference=vectors)
    @hypothesis.example(g=[0.0, 0.0, 2.802596928649634e-45, 0.0, 0.0], reference=[0.0, 0.0, -1.0, 0.0, 0.0])
    def check(g, reference):
      hypothesis.assume(np.linalg.norm(reference) > 1e-3)
      got, state = update(_tree(g), _tree(reference))
      expected = numpy_agem(g, reference)
      np.testing.assert_allclose(_flat(got), expected, rtol=1e-4, atol=1e-4)
      assert int(got['n']) == 3  # the integer leaf passes through
      tolerance = 1e-4 * np.linalg.norm(g) * np.linalg.norm(reference)
      assert float(np.dot(_flat(got), reference)) >= -tolerance - 1e-4
      dot = float(np.dot(np.float64(g), np.float64(reference)))
      # float32 decides the sign of a smaller dot: its rounding, and XLA flushes subnormals to zero.
      if abs(dot) > 1e-6 * np.linalg.norm(g) * np.linalg.norm(reference) + 1e-30:
        assert bool(state.projected) == (dot < 0)

    check()

  @chex.variants(with_jit=True, without_jit=True)
  def test_agreeing_gradients_pass_unchanged(self):
    tx = sfa_jax.agem()
    update = self.variant(lambda g, r: tx.update(g, tx.init(g), reference_grads=r))

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(g=vectors, reference=vectors)
    def check(g, reference):
      hypothesis.assume(np.dot(np.float64(g), np.float64(reference)) >= 0)
      got, state = update(_tree(g), _tree(reference))
      chex.assert_trees_all_equal(got, _tree(g))  # bit for bit
      assert not bool(state.projected)

    check()


def test_without_a_reference_the_gradient_passes_through():
  tx = sfa_jax.agem()
  g = _tree([1.0, -2.0, 3.0, 0.5, 0.0])
  got, state = tx.update(g, tx.init(g))
  chex.assert_trees_all_equal(got, g)
  assert not bool(state.projected) and int(state.projections) == 0


def test_the_reference_reaches_it_through_a_jitted_chain():
  tx = optax.chain(sfa_jax.agem(), optax.adam(0.1))
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)

  @jax.jit
  def step(g, state, reference):
    return tx.update(g, state, params, reference_grads=reference)

  g, reference = {'w': jnp.array([1.0, -1.0])}, {'w': jnp.array([0.0, 1.0])}
  updates, state = step(g, state, reference)
  plain, _ = optax.adam(0.1).update({'w': jnp.array([1.0, 0.0])}, optax.adam(0.1).init(params))
  chex.assert_trees_all_close(updates, plain)  # Adam saw the projected gradient [1, 0]
  assert isinstance(state[0], sfa_jax.AGEMState) and int(state[0].projections) == 1


def test_a_bfloat16_gradient_keeps_its_dtype_and_the_dot_runs_in_float32():
  tx = sfa_jax.agem()
  g = {'w': jnp.array([1.0, -1.0], jnp.bfloat16)}
  got, _ = tx.update(g, tx.init(g), reference_grads={'w': jnp.array([0.0, 1.0], jnp.bfloat16)})
  assert got['w'].dtype == jnp.bfloat16 and got['w'].tolist() == [1.0, 0.0]


def test_a_reference_of_another_structure_is_refused_naming_it():
  tx = sfa_jax.agem()
  g = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='reference_grads'):
    tx.update(g, tx.init(g), reference_grads={'v': jnp.ones(2)})
