"""Merges at the task boundaries of the engine: MagMax (sequential fine-tuning, the largest-magnitude
task vectors) and CoFiMA (the previous merge and the trained model averaged with their Fishers),
checked hook by hook against NumPy, through a run, and resumed from checkpoints bit for bit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine import callbacks
from sfa_jax.engine import methods
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.loop import RunState

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def stream():
  return tasks.make_stream('split-mnist', source='digits', num_tasks=3)


def numpy_magmax(base, models, scaling):
  """Per entry, the float32 task vector of largest magnitude (the last such model), scaled onto the base."""
  taus = np.stack([np.float32(m) - np.float32(base) for m in models])
  last_max = len(models) - 1 - np.argmax(np.abs(taus)[::-1], axis=0)
  return base + np.float32(scaling) * np.take_along_axis(taus, last_max[None], axis=0)[0]


def numpy_cofima(previous, trained, previous_fisher, fisher, beta, floor=1e-6):
  """CoFiMA's average in float64, both Fishers floored."""
  weighted_previous = beta * np.maximum(np.float64(previous_fisher), floor)
  weighted_trained = (1 - beta) * np.maximum(np.float64(fisher), floor)
  return (weighted_previous * previous + weighted_trained * trained) / (weighted_previous + weighted_trained)


def _model(rng):
  """A small (params, model_state) pair: two float leaves and BatchNorm-like statistics."""
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32), 'b': rng.normal(size=4).astype(np.float32)}
  return params, {'mean': rng.normal(size=4).astype(np.float32)}


def _train_through(method, trained_models, fishers=None):
  """The hooks of ``method`` around tasks that 'train' into ``trained_models`` (task ``k``'s Fisher:
  ``fishers[k]``); the models each task starts from, and the states after each task's end."""
  params, model_state = trained_models[0]
  num_tasks = len(trained_models)
  state = RunState(params, model_state, None, method.init_extras(params, model_state, num_tasks))
  starts, ends = [], []
  for k, (params, model_state) in enumerate(trained_models):
    fisher = None if fishers is None else (lambda state, k=k: fishers[k])
    boundary = methods.Boundary(k, num_tasks, total_steps=10, fisher=fisher)
    state = method.start_task(state, boundary)
    starts.append((state.params, state.model_state))
    state = method.end_task(state._replace(params=params, model_state=model_state), boundary)
    ends.append(state)
  return starts, ends


@pytest.mark.parametrize('scaling', [0.5, 1.0])
def test_magmax_trains_sequentially_and_evaluates_the_largest_magnitude_merge(scaling):
  rng = np.random.default_rng(0)
  trained = [_model(rng) for _ in range(4)]
  starts, ends = _train_through(methods.MagMax(scaling=scaling), trained)
  base = trained[0]
  chex.assert_trees_all_equal((ends[0].params, ends[0].model_state), base)  # task 0: plain training
  for k in range(1, 4):
    chex.assert_trees_all_equal(starts[k], trained[k - 1])  # from the previous task as trained, not its merge
    merged = (ends[k].params, ends[k].model_state)
    expected = jax.tree.map(lambda b, *ms: numpy_magmax(b, ms, scaling), base, *trained[1:k + 1])
    chex.assert_trees_all_close(merged, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('beta, gamma', [(0.6, 0.0), (0.3, 1.0)])
def test_cofima_averages_the_previous_merge_and_the_trained_model_with_their_fishers(beta, gamma):
  rng = np.random.default_rng(1)
  trained = [_model(rng) for _ in range(3)]
  fishers = [jax.tree.map(lambda x: np.where(rng.random(x.shape) < 0.3, 0.0, rng.exponential(size=x.shape))
                          .astype(np.float32), trained[0][0]) for _ in trained]
  starts, ends = _train_through(methods.CoFiMA(beta=beta, gamma=gamma), trained, fishers)
  chex.assert_trees_all_equal(ends[0].params, trained[0][0])  # task 0: plain training
  running = fishers[0]
  for k in range(1, 3):
    previous = ends[k - 1]
    chex.assert_trees_all_equal(starts[k], (previous.params, previous.model_state))  # from the previous merge
    expected = jax.tree.map(lambda p, t, pf, f: numpy_cofima(p, t, pf, f, beta), previous.params, trained[k][0],
                            running, fishers[k])
    chex.assert_trees_all_close(ends[k].params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ends[k].model_state['mean'],
                               beta * previous.model_state['mean'] + (1 - beta) * trained[k][1]['mean'], rtol=1e-6)
    running = jax.tree.map(lambda old, new: gamma * old + new, running, fishers[k])
    chex.assert_trees_all_close(ends[k].extras['fisher'], running, rtol=1e-6)


def test_cofima_averages_plainly_without_fisher_information_and_keeps_the_frozen_params():
  previous = {'w': jnp.array([1.0, 2.0, 3.0, 4.0])}
  trained = {'w': jnp.array([5.0, 6.0, 3.0, 8.0])}  # the third entry frozen
  previous_fisher, fisher = {'w': jnp.array([0.0, 1.0, 0.0, 3.0])}, {'w': jnp.array([0.0, 1.0, 0.0, 1.0])}
  merged, _ = methods.CoFiMA().merge((previous, {}), (trained, {}), previous_fisher, fisher)
  # No Fisher: CoMA's 0.6·θ* + 0.4·θ. Equal Fishers: the same. Fishers 3 and 1: (1.8·4 + 0.4·8) / 2.2.
  np.testing.assert_allclose(merged['w'], [2.6, 3.6, 3.0, (1.8 * 4.0 + 0.4 * 8.0) / 2.2], rtol=1e-6)
  assert merged['w'][2] == 3.0
  only_trained, _ = methods.CoFiMA(beta=0.0).merge((previous, {}), (trained, {}), previous_fisher, fisher)
  np.testing.assert_allclose(only_trained['w'], trained['w'], rtol=1e-6)


class _Recorded:
  """A method subclass that keeps host copies of the trained models, the Fishers and the task ends."""

  def __init__(self, method):
    self.trained, self.fishers, self.ends = [], [], []
    record = self

    class Recorded(type(method)):
      def end_task(self, state, boundary):
        record.trained.append(jax.tree.map(np.asarray, (state.params, state.model_state)))
        if isinstance(self, methods.CoFiMA):
          record.fishers.append(jax.tree.map(np.asarray, boundary.fisher(state)))
        state = super().end_task(state, boundary)
        record.ends.append(jax.tree.map(np.asarray, (state.params, state.model_state)))
        return state

    self.method = Recorded(**method.values)


@pytest.mark.slow
def test_a_magmax_run_merges_the_models_it_trained(stream):
  recorded = _Recorded(methods.MagMax(scaling=0.7))
  result = engine.run_sequence(stream, recorded.method, CONFIG)
  assert len(result.accuracy_matrix) == 3
  base = recorded.trained[0]
  expected = jax.tree.map(lambda b, *ms: numpy_magmax(b, ms, 0.7), base, *recorded.trained[1:])
  chex.assert_trees_all_close(recorded.ends[-1], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_cofima_run_merges_with_the_engine_fishers(stream):
  recorded = _Recorded(methods.CoFiMA(beta=0.5))
  engine.run_sequence(stream, recorded.method, CONFIG)
  assert all(np.any(leaf > 0) for leaf in jax.tree.leaves(recorded.fishers[1]))
  for k in (1, 2):
    expected = jax.tree.map(lambda p, t, pf, f: numpy_cofima(p, t, pf, f, 0.5), recorded.ends[k - 1][0],
                            recorded.trained[k][0], recorded.fishers[k - 1], recorded.fishers[k])
    chex.assert_trees_all_close(recorded.ends[k][0], expected, rtol=1e-5, atol=1e-6)


class _Stop(Exception):
  pass


@pytest.mark.slow
@pytest.mark.parametrize('name', ['magmax', 'cofima'])
@pytest.mark.parametrize('every_steps', [1000, 2], ids=['at-a-task-end', 'mid-task'])
def test_an_interrupted_run_resumes_bit_for_bit(stream, tmp_path, name, every_steps):
  method = engine.make_method(name)
  whole = engine.run_sequence(stream, method, CONFIG)

  def stop_in_task_2(event):
    if isinstance(event, callbacks.StepEvent) and (event.task, event.step) == (2, 5):
      raise _Stop

  with pytest.raises(_Stop):
    engine.run_sequence(stream, method, CONFIG, callbacks=stop_in_task_2,
                        checkpointer=Checkpointer(tmp_path, every_steps=every_steps))
  resumed = engine.run_sequence(stream, method, CONFIG, checkpointer=Checkpointer(tmp_path))
  assert resumed.accuracy_matrix == whole.accuracy_matrix


@pytest.mark.slow
@pytest.mark.parametrize('name, values', [('magmax', {'scaling': (0.3, 1.0)}), ('cofima', {'beta': (0.3, 0.8)})])
def test_a_three_task_sweep_equals_its_runs(stream, name, values):
  configurations = engine.grid(name, config=CONFIG, **values)
  results = engine.run_sweep(stream, configurations)
  assert results[0].accuracy_matrix != results[1].accuracy_matrix
  for (method, config), result in zip(configurations, results):
    expected = engine.run_sequence(stream, method, config)
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6, err_msg=method.label)
