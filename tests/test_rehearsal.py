"""LwF, DER++ and A-GEM in the engine: their arrays against NumPy, their hooks inside the train
step, their runs against fine-tuning, their sweeps against their runs, and their resumes."""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfa_jax import engine
from sfa_jax import models
from sfa_jax import partial
from sfa_jax import tasks
from sfa_jax.cli import command as cli
from sfa_jax.engine import callbacks
from sfa_jax.engine import methods
from sfa_jax.engine import objectives
from sfa_jax.engine import rehearsal
from sfa_jax.engine import steps
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.loop import RunState

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def domains():
  """Two tasks whose labels share one head: what fine-tuning forgets and the methods keep."""
  return tasks.make_stream('mnist-pair', source='digits', setting='domain-incremental')


# ------------------------------------------------------------------------------------------------
# Independent references, in NumPy.


def numpy_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def numpy_distillation(old, new, classes, temperature, weights):
  """LwF's L_old: -mean_n Σ_c softmax(old/T)_c log softmax(new/T)_c over the selected classes."""
  classes = np.asarray(classes, bool)
  q = numpy_softmax(np.asarray(old)[:, classes] / temperature)
  log_p = np.log(numpy_softmax(np.asarray(new)[:, classes] / temperature))
  per_example = -(q * log_p).sum(-1)
  weights = np.asarray(weights, np.float64)
  return (per_example * weights).sum() / max(weights.sum(), 1.0)


def numpy_cross_entropy(logits, labels):
  return -np.mean(np.log(numpy_softmax(logits))[np.arange(len(labels)), labels])


def algorithm_r(seen, valid, drawn, size, buffer):
  """Vitter's reservoir, one example after another: the n-th (from 0) takes slot n while n < size,
  else slot ``drawn`` (uniform in 0..n) if it is below size."""
  buffer = list(buffer)
  n = seen
  for i, ok in enumerate(valid):
    if not ok:
      continue
    if n < size:
      buffer[n] = i
    elif drawn[i] < size:
      buffer[drawn[i]] = i
    n += 1
  return buffer


# ------------------------------------------------------------------------------------------------
# LwF.

logits = st.lists(st.floats(-8, 8, width=32), min_size=12, max_size=12)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(old=logits, new=logits, temperature=st.floats(0.25, 8.0),
                  classes=st.lists(st.booleans(), min_size=4, max_size=4).filter(any),
                  weights=st.lists(st.booleans(), min_size=3, max_size=3))
def test_the_distillation_loss_equals_numpy(old, new, temperature, classes, weights):
  old, new = np.reshape(old, (3, 4)), np.reshape(new, (3, 4))
  got = rehearsal.distillation(jnp.asarray(old), jnp.asarray(new), jnp.asarray(classes), temperature, jnp.asarray(weights))
  np.testing.assert_allclose(float(got), numpy_distillation(old, new, classes, temperature, weights), rtol=1e-4, atol=1e-5)


def test_the_distillation_gradient_is_finite_with_classes_left_out():
  old, classes = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([True, False, True])
  grad = jax.grad(lambda z: rehearsal.distillation(old, z, classes, 2.0, jnp.ones(1)))(jnp.zeros((1, 3)))
  assert np.isfinite(grad).all() and float(grad[0, 1]) == 0.0


def _lwf_case(num_heads):
  """An MLP, the end of task 0 (seed 0) and a model being trained on task 1 (seed 1), with the
  LwF step state of task 1."""
  model = models.make_model('mlp', 4, num_heads=num_heads, hidden=(8,))
  x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
  split = tasks.Split(x, np.arange(6, dtype=np.int32) % 4)
  stream = [tasks.Task(k, f't{k}', split, split, (), (0, 1) if k == 0 else (2, 3)) for k in range(2)]
  init = steps.initializer(model, x[:1])
  previous, current = init(0), init(1)
  spec = steps.step_spec(model, *previous, stream, batch_size=6, seed=0)
  method = methods.LwF(alpha=0.5, temperature=2.0)
  state = RunState(*previous, None, methods.with_step_state({}, method.init_step_state(*previous, spec)))
  state = method.start_task(state, methods.Boundary(1, 2, 10, None))
  return model, x, previous, current, method, methods.step_state(state.extras), spec


@pytest.mark.parametrize('num_heads', [1, 2])
def test_lwfs_term_is_alpha_times_the_distillation_toward_the_previous_models_outputs(num_heads):
  model, x, previous, current, method, state, spec = _lwf_case(num_heads)
  assert spec.task_heads == (num_heads > 1)
  apply = lambda variables, ids: model.apply(models.merge_variables(*variables), x, task_id=ids, train=False)
  ids = np.ones(6, np.int32)  # a batch of task 1; the head distilled is task 0's with one head per task
  distilled = np.zeros(6, np.int32) if num_heads > 1 else ids
  classes = [True, True, False, False]  # the past task's labels, 0 and 1
  expected = 0.5 * numpy_distillation(apply(previous, distilled), apply(current, distilled), classes, 2.0, np.ones(6))
  hooks = methods.StepModel(lambda p, xs, t: apply((p, current[1]), t), lambda p, s, xs, t: apply((p, s), t),
                            objectives.CLASSIFICATION.loss)
  batch = methods.StepBatch(x, np.zeros(6, np.int32), np.ones(6, bool), ids)
  got = method.step_loss(current[0], apply(current, ids), batch, state, hooks)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_lwf_on_task_0_adds_nothing():
  model, x, previous, current, method, state, spec = _lwf_case(1)
  fresh = method.init_step_state(*previous, spec)
  hooks = methods.StepModel(None, lambda p, s, xs, t: model.apply(models.merge_variables(p, s), xs, train=False), None)
  outputs = model.apply(models.merge_variables(*current), x, train=False)
  batch = methods.StepBatch(x, np.zeros(6, np.int32), np.ones(6, bool), np.zeros(6, np.int32))
  assert float(method.step_loss(current[0], outputs, batch, fresh, hooks)) == 0.0


# ------------------------------------------------------------------------------------------------
# DER++'s buffer.


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seen=st.integers(0, 30), size=st.sampled_from([1, 3, 8]), seed=st.integers(0, 2**16),
                  valid=st.lists(st.booleans(), min_size=6, max_size=6))
def test_reservoir_slots_are_algorithm_r_example_by_example(seen, size, seed, valid):
  key, valid = jax.random.key(seed), np.asarray(valid)
  slots = np.asarray(rehearsal.reservoir_slots(key, jnp.int32(seen), jnp.asarray(valid), size))
  n = seen + np.cumsum(valid) - 1
  drawn = np.asarray(jax.random.randint(key, n.shape, 0, n + 1))  # the draws it makes, one per example
  buffer = np.full(size, -1)
  kept = slots < size
  assert len(set(slots[kept])) == kept.sum()  # distinct slots: the writes do not depend on their order
  buffer[slots[kept]] = np.flatnonzero(kept)
  assert buffer.tolist() == algorithm_r(seen, valid, drawn, size, [-1] * size)


def test_reservoir_keeps_each_example_with_the_same_probability():
  size, batch, steps_count, trials = 12, 4, 12, 4000  # 48 examples: each kept with probability 1/4

  def stream(key):
    def step(carry, t):
      buffer, seen = carry
      slots = rehearsal.reservoir_slots(jax.random.fold_in(key, t), seen, jnp.ones(batch, bool), size)
      buffer = buffer.at[slots].set(t * batch + jnp.arange(batch), mode='drop')
      return (buffer, seen + batch), None

    (buffer, _), _ = jax.lax.scan(step, (jnp.full(size, -1), jnp.int32(0)), jnp.arange(steps_count))
    return buffer

  buffers = np.asarray(jax.jit(jax.vmap(stream))(jax.random.split(jax.random.key(0), trials)))
  assert (np.sort(buffers, axis=1)[:, 1:] != np.sort(buffers, axis=1)[:, :-1]).all()  # no example twice
  frequency = np.bincount(buffers.ravel(), minlength=batch * steps_count) / trials
  np.testing.assert_allclose(frequency, size / (batch * steps_count), atol=0.04)  # 5 standard deviations


def test_draw_takes_distinct_filled_rows():
  rows, valid = rehearsal.draw(jax.random.key(3), jnp.int32(7), 10, 5)
  assert len(set(rows.tolist())) == 5 and max(rows.tolist()) < 7 and valid.all()
  rows, valid = rehearsal.draw(jax.random.key(3), jnp.int32(2), 10, 5)
  assert sorted(rows[:2].tolist()) == [0, 1] and valid.tolist() == [True, True, False, False, False]


def _mlp_step(method, batch_size=6, tx=None, trainable=None):
  """An MLP of 4 outputs, its variables, the train step of ``method`` and a batch."""
  model = models.make_model('mlp', 4, hidden=(8,))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32)
  y = (np.arange(batch_size) % 4).astype(np.int32)
  params, model_state = steps.initializer(model, x[:1])(0)
  mask = None if trainable is None else partial.path_mask(params, trainable)
  step = jax.jit(steps.make_method_step(model, tx or optax.sgd(0.5), trainable=mask, method=method))
  return model, params, model_state, step, x, y


def test_derpp_stores_the_logits_at_insertion():
  method = methods.DERpp(buffer_size=16)
  model, params, model_state, step, x, y = _mlp_step(method)
  stream = [tasks.Task(0, 't', tasks.Split(x, y), tasks.Split(x, y), (), ())]
  state = method.init_step_state(params, model_state, steps.step_spec(model, params, model_state, stream, 6, 0))
  ids = np.zeros(6, np.int32)
  new_params, _, _, state, _, _ = step(params, model_state, optax.sgd(0.5).init(params), state, x, y, np.ones(6, bool), ids)
  before = model.apply({'params': params}, x, train=False)
  after = model.apply({'params': new_params}, x, train=False)
  assert int(state['seen']) == 6
  np.testing.assert_array_equal(state['x'][:6], x)  # an empty buffer takes the first examples in order
  np.testing.assert_array_equal(state['y'][:6], y)
  np.testing.assert_allclose(state['logits'][:6], before, rtol=1e-6)
  assert not np.allclose(state['logits'][:6], after, atol=1e-4)
  assert not np.asarray(state['x'][6:]).any()


def test_derpps_loss_is_alpha_mse_on_logits_plus_beta_cross_entropy_on_labels():
  method = methods.DERpp(buffer_size=10, alpha=0.3, beta=0.7)
  model, params, model_state, _, x, y = _mlp_step(method, batch_size=4)
  rng = np.random.default_rng(1)
  state = {
      'x': jnp.asarray(rng.normal(size=(10, 8, 8, 1)), jnp.float32), 'y': jnp.asarray(rng.integers(0, 4, 10), jnp.int32),
      'task_ids': jnp.zeros(10, jnp.int32), 'logits': jnp.asarray(rng.normal(size=(10, 4)), jnp.float32),
      'seen': jnp.int32(25), 'key': jax.random.key_data(jax.random.key(5)), 'alpha': jnp.float32(0.3), 'beta': jnp.float32(0.7),
  }
  apply = lambda p, xs, ids: model.apply({'params': p}, xs, train=True)
  hooks = methods.StepModel(apply, None, objectives.CLASSIFICATION.loss)
  batch = methods.StepBatch(x, y, np.ones(4, bool), np.zeros(4, np.int32))
  got = method.step_loss(params, None, batch, state, hooks)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(5), 25), 3)  # the step's draws: key folded with seen
  first, second = (np.asarray(rehearsal.draw(k, jnp.int32(10), 10, 4)[0]) for k in keys[:2])
  buffer_x, buffer_y, buffer_logits = (np.asarray(state[k]) for k in ('x', 'y', 'logits'))
  mse = np.mean((np.asarray(apply(params, buffer_x[first], None), np.float64) - buffer_logits[first]) ** 2)
  cross_entropy = numpy_cross_entropy(apply(params, buffer_x[second], None), buffer_y[second])
  np.testing.assert_allclose(float(got), 0.3 * mse + 0.7 * cross_entropy, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# A-GEM's reference gradient.


def _spy():
  """A transform whose state is the last ``reference_grads`` it was given (zeros without one)."""
  init = lambda params: jax.tree.map(jnp.zeros_like, params)

  def update(updates, state, params=None, *, reference_grads=None, **extra):
    return updates, state if reference_grads is None else reference_grads

  return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize('trainable', [None, 'head'])
def test_the_reference_gradient_reaching_the_transform_is_the_memory_batchs(trainable):
  model, params, model_state, step, x, y = _mlp_step(methods.AGEM(), tx=_spy(), trainable=trainable)
  memory = (x[:3] + 1.0, y[:3], np.zeros(3, np.int32))
  ids, mask = np.zeros(6, np.int32), np.ones(6, bool)
  trained = params if trainable is None else {'head': params['head']}
  spied = _spy().init(steps.trainable_part(params, None if trainable is None else partial.path_mask(params, trainable)))
  _, _, reference, *_ = step(params, model_state, spied, None, x, y, mask, ids, memory)
  memory_loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': params | p}, memory[0]), memory[1]).mean()
  expected = jax.grad(memory_loss)(trained)
  for name in trained:  # the trained leaves' gradients; the frozen ones are not formed
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), reference[name], expected[name])
  _, _, none, *_ = step(params, model_state, spied, None, x, y, mask, ids, None)  # no memory (task 0)
  assert not any(np.asarray(leaf).any() for leaf in jax.tree.leaves(none))


def test_agems_memory_holds_whole_numbers_of_each_past_task():
  stream = tasks.make_stream('mnist-pair', source='digits')
  plan = methods.AGEM(memory_per_task=40, reference_batch=16).batch_plan(list(stream), 1, 32, seed=3)
  assert len(plan.replay.y) == 40 and set(plan.replay_ids.tolist()) == {0} and plan.memory_apart
  assert plan.task_share(32) == 32 and plan.replay_size == 16


# ------------------------------------------------------------------------------------------------
# Runs: each method keeps more of task 0 than fine-tuning; a sweep's lanes are their runs; resumes.

RETENTION = dataclasses.replace(CONFIG, epochs_per_task=2, learning_rate=3e-3)
KEEPERS = {
    'lwf': methods.LwF(alpha=4.0),
    'derpp': methods.DERpp(buffer_size=128, alpha=1.0, beta=1.0),
    'agem': methods.AGEM(memory_per_task=128, reference_batch=64),
}


@pytest.fixture(scope='module')
def finetuned(domains):
  return engine.run_sequence(domains, methods.Finetune(), RETENTION).accuracy_matrix


@pytest.mark.parametrize('name', list(KEEPERS))
def test_each_method_keeps_more_of_task_0_than_fine_tuning(domains, finetuned, name):
  kept = engine.run_sequence(domains, KEEPERS[name], RETENTION).accuracy_matrix
  assert kept[1][0] > finetuned[1][0] + 0.05, (kept, finetuned)


def test_derpp_without_its_weights_is_fine_tuning(domains):
  plain = engine.run_sequence(domains, methods.DERpp(buffer_size=64, alpha=0.0, beta=0.0), CONFIG)
  assert plain.accuracy_matrix == engine.run_sequence(domains, methods.Finetune(), CONFIG).accuracy_matrix


SWEEPS = {
    'lwf': [(methods.LwF(alpha=0.5), CONFIG), (methods.LwF(alpha=4.0, temperature=1.0), dataclasses.replace(CONFIG, seed=1))],
    'derpp': [(methods.DERpp(buffer_size=64, alpha=0.2), CONFIG),
              (methods.DERpp(buffer_size=64, alpha=1.0, beta=0.1), dataclasses.replace(CONFIG, seed=1))],
    'agem': [(methods.AGEM(memory_per_task=32, reference_batch=16), CONFIG),
             (methods.AGEM(memory_per_task=64, reference_batch=16), dataclasses.replace(CONFIG, seed=1))],
}


@pytest.mark.parametrize('name', ['derpp', pytest.param('lwf', marks=pytest.mark.slow),
                                  pytest.param('agem', marks=pytest.mark.slow)])
def test_a_sweeps_lanes_equal_their_runs(domains, name):
  configurations = SWEEPS[name]
  results = engine.run_sweep(domains, configurations)
  for (method, config), result in zip(configurations, results):
    expected = engine.run_sequence(domains, method, config)
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6, err_msg=method.label)
  assert results[0].accuracy_matrix != results[1].accuracy_matrix


@pytest.mark.parametrize('name, values, key', [
    ('derpp', {'buffer_size': (32.0, 64.0)}, 'buffer_size'), ('agem', {'reference_batch': (8.0, 16.0)}, 'reference_batch')])
def test_a_sweep_refuses_to_vary_what_decides_the_shapes(name, values, key):
  with pytest.raises(ValueError, match=f'{key} differs across the configurations'):
    engine.check_configurations(engine.grid(name, config=CONFIG, **values))


class _Stop(Exception):
  pass


def _stop_in_task_1(event):
  if isinstance(event, callbacks.StepEvent) and event.task == 1 and event.step == 12:
    raise _Stop


@pytest.mark.parametrize('name', ['derpp', pytest.param('lwf', marks=pytest.mark.slow),
                                  pytest.param('agem', marks=pytest.mark.slow)])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(domains, tmp_path, name):
  method, _ = SWEEPS[name][1]
  config = dataclasses.replace(CONFIG, eval_every=9)
  with pytest.raises(_Stop):
    engine.run_sequence(domains, method, config, callbacks=_stop_in_task_1, checkpointer=Checkpointer(tmp_path, every_steps=5))
  resumed = []
  result = engine.run_sequence(domains, method, config, checkpointer=Checkpointer(tmp_path, every_steps=5),
                               callbacks=lambda event: resumed.append(event) if isinstance(event, callbacks.ResumeEvent) else None)
  assert resumed and resumed[0].global_step > 22  # from a checkpoint inside task 1
  expected = engine.run_sequence(domains, method, config)
  assert result.accuracy_matrix == expected.accuracy_matrix
  assert [p.accuracies for p in result.curve] == [p.accuracies for p in expected.curve]


# ------------------------------------------------------------------------------------------------
# Hyper-parameters and the command line.


@pytest.mark.parametrize('name, values, message', [
    ('lwf', {'alpha': -1.0}, r'alpha must lie in \[0, inf\)'),
    ('lwf', {'temperature': 0.0}, r'temperature must lie in \(0, inf\)'),
    ('derpp', {'buffer_size': 0.0}, r'buffer_size must lie in \[1, inf\)'),
    ('derpp', {'buffer_size': 2.5}, 'buffer_size must be a whole number; got 2.5'),
    ('derpp', {'beta': 1.5}, r'beta must lie in \[0, 1\]'),
    ('agem', {'memory_per_task': 0.5}, r'memory_per_task must lie in \[1, inf\)'),
    ('agem', {'reference_batch': 1.5}, 'reference_batch must be a whole number'),
])
def test_hyper_parameters_out_of_range_are_refused_naming_them(name, values, message):
  with pytest.raises(ValueError, match=message):
    methods.make_method(name, **values)


def test_the_command_line_takes_their_flags(tmp_path, capsys):
  fast = ['--source', 'digits', '--epochs', '1', '--batch-size', '32', '--no-compile-cache']
  for method, flags in (('lwf', ['--alpha', '2', '--temperature', '4']), ('derpp', ['--buffer-size', '64', '--beta', '1']),
                        ('agem', ['--memory-per-task', '100', '--reference-batch', '64'])):
    args = cli.build_parser().parse_args(['run', '--method', method, *flags, '--out', str(tmp_path / method)] + fast)
    cli.check_arguments(args)  # what `run` checks before it trains
    assert {flag[2:].replace('-', '_'): float(value) for flag, value in zip(flags[::2], flags[1::2])} == {
        name: getattr(args, name) for name in args.method.hyperparams if getattr(args, name) is not None}
  assert cli.main(['run', '--method', 'derpp', '--buffer-size', '0', '--out', str(tmp_path / 's')] + fast) == 2
  assert 'buffer_size must lie in [1, inf); got 0' in capsys.readouterr().err
  assert cli.main(['run', '--method', 'lwf', '--temperature', '0', '--out', str(tmp_path / 't')] + fast) == 2
  assert 'temperature must lie in (0, inf)' in capsys.readouterr().err
