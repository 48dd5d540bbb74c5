"""Your model, loss, data and optimizer in the engine: run, sweep and EWC's Fisher through them."""

import dataclasses
import logging

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax
from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine import methods
from sfa_jax.engine import objectives
from sfa_jax.engine import steps


class Regressor(nn.Module):
  """A plain Linen module: ``__call__(x)``, no task id, no train flag."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def _regression_stream() -> tasks.TaskStream:
  """Two tasks of 6 real features: y = w_k · x with another w per task (a domain shift)."""
  rng = np.random.default_rng(0)
  splits = []
  for k in range(2):
    w = rng.normal(size=6).astype(np.float32)
    x = rng.normal(size=(320, 6)).astype(np.float32)
    y = (x @ w / 3).astype(np.float32)
    splits.append((f'w{k}', tasks.Split(x[:256], y[:256]), tasks.Split(x[256:], y[256:])))
  return tasks.stream_of('linear', splits, num_outputs=1)


CONFIG = engine.TrainConfig(model=Regressor(), objective=objectives.regression(0.25), epochs_per_task=16,
                               batch_size=32, learning_rate=1e-2)


@pytest.fixture(scope='module')
def stream():
  return _regression_stream()


def test_a_user_module_and_loss_learn_a_regression_stream(stream):
  result = engine.run_sequence(stream, methods.Finetune(), CONFIG)
  (first, _), (forgot, learned) = result.accuracy_matrix
  assert first > 0.5 and learned > 0.5  # the share of predictions within 0.25
  assert forgot < first  # the second task's fit moves the first's
  sfa = engine.run_sequence(stream, methods.SFA(p=0.25, beta=0.5), CONFIG)
  assert sfa.accuracy_matrix[1][0] > forgot  # averaging toward the first task's end keeps more of it


def test_ewc_takes_the_fisher_of_a_user_loss(stream):
  result = engine.run_sequence(stream, methods.EWC(strength=10.0), CONFIG)
  assert result.accuracy_matrix[0] == engine.run_sequence(stream, methods.Finetune(), CONFIG).accuracy_matrix[0]
  params = {'w': jnp.array([2.0])}

  class Line(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param('w', nn.initializers.ones, (1,))

  split = tasks.Split(np.array([[1.0], [2.0]], np.float32), np.array([0.0, 0.0], np.float32))
  fisher = steps.task_fisher(Line(), params, {}, split, 0, batch_size=4, objective=objectives.regression())
  # Per example, d/dw (w·x − 0)² = 2·w·x²: 4 and 16; the Fisher is the mean of their squares.
  np.testing.assert_allclose(fisher['w'], [(4.0**2 + 16.0**2) / 2])


def test_a_sweep_of_a_user_model_equals_its_runs(stream):
  configurations = engine.grid('sfa', p=(0.25, 1.0), config=CONFIG)
  for (method, config), result in zip(configurations, engine.run_sweep(stream, configurations)):
    expected = engine.run_sequence(stream, method, config)
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6)
    assert result.averaging_steps == expected.averaging_steps


@pytest.mark.parametrize(
    'optimizer',
    [
        'adamw',
        lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, 100))),
        optax.multi_transform({'train': optax.adam(3e-3), 'frozen': optax.set_to_zero()},
                              lambda params: {name: 'frozen' if name == 'Dense_0' else 'train' for name in params}),
    ],
    ids=['adamw', 'clipped-cosine-adamw', 'partitioned'],
)
def test_any_optax_optimizer_trains_the_built_in_model(optimizer):
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32,
                                 learning_rate=3e-3, optimizer=optimizer)
  result = engine.run_sequence(pair, methods.SFA(p=0.5), config)
  assert result.accuracy_matrix[0][0] > 0.3 and len(result.averaging_steps) == 2  # chance: 0.2


def test_a_frozen_partition_stays_where_it_started():
  pair = tasks.make_stream('mnist-pair', source='digits')
  partitioned = optax.multi_transform({'train': optax.adam(1e-3), 'frozen': optax.set_to_zero()},
                                      lambda params: {name: 'frozen' if name == 'Dense_0' else 'train' for name in params})
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, optimizer=partitioned)
  model = engine.run.build_model(pair, config)
  start, _ = steps.initializer(model, pair[0].train.x[:1])(0)
  ends = []

  class KeepEnd(methods.SFA):
    def end_task(self, state, boundary):
      ends.append(jax.tree.map(np.asarray, state.params))  # a copy: the run donates its arrays to the next step
      return state

  engine.run_sequence(pair, KeepEnd(p=0.5), config)
  for end in ends:
    np.testing.assert_array_equal(end['Dense_0']['kernel'], start['Dense_0']['kernel'])
    assert not np.array_equal(end['head']['kernel'], start['head']['kernel'])


class _KeepEnds:
  """A method subclass's end_task hook that keeps a host copy of the state at every task end."""

  def __init__(self):
    self.ends = []

  def of(self, method_class):
    keep = self.ends

    class Kept(method_class):
      def end_task(self, state, boundary):
        state = super().end_task(state, boundary)
        keep.append(jax.tree.map(np.asarray, state))  # a copy: the run donates its arrays to the next step
        return state

    return Kept


@pytest.mark.parametrize('method_class, hyperparams', [(methods.SFA, {'p': 0.5}), (methods.L2, {'strength': 1.0}),
                                                       (methods.EWC, {'strength': 10.0})])
def test_trainable_trains_and_anchors_only_the_selected_params(method_class, hyperparams):
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, trainable='head')
  model = engine.run.build_model(pair, config)
  start, _ = steps.initializer(model, pair[0].train.x[:1])(0)
  kept = _KeepEnds()
  result = engine.run_sequence(pair, kept.of(method_class)(**hyperparams), config)
  assert len(result.accuracy_matrix) == 2
  for end in kept.ends:
    for leaf in ('kernel', 'bias'):
      np.testing.assert_array_equal(end.params['Dense_0'][leaf], start['Dense_0'][leaf])
    assert not np.array_equal(end.params['head']['kernel'], start['head']['kernel'])
  state = sfa_jax.find_state(kept.ends[-1].opt_state)
  assert isinstance(state.anchor['Dense_0']['kernel'], optax.MaskedNode)  # the anchor: the head's bytes only
  np.testing.assert_array_equal(state.anchor['head']['kernel'], kept.ends[0].params['head']['kernel'])
  adam = [s for s in jax.tree_util.tree_leaves(kept.ends[-1].opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert isinstance(adam.mu['Dense_0']['bias'], optax.MaskedNode) and adam.mu['head']['bias'].shape == (10,)
  if method_class is methods.EWC:
    fisher = kept.ends[0].extras['fisher']
    assert not np.any(fisher['Dense_0']['kernel']) and np.any(fisher['head']['kernel'])  # frozen: zero, never formed
    assert isinstance(state.fisher['Dense_0']['kernel'], optax.MaskedNode)


@pytest.mark.parametrize('method', [methods.WiseFT(beta=0.3), methods.TaskArithmetic(), methods.TIES(), methods.MagMax(),
                                    pytest.param(methods.CoFiMA(), marks=pytest.mark.slow)], ids=str)
def test_merges_keep_the_frozen_params_bit_for_bit(method):
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, trainable='head')
  model = engine.run.build_model(pair, config)
  start, _ = steps.initializer(model, pair[0].train.x[:1])(0)
  kept = _KeepEnds()
  engine.run_sequence(pair, kept.of(type(method))(**method.values), config)
  for end in kept.ends:  # after each task's merge
    chex.assert_trees_all_equal(end.params['Dense_0'], start['Dense_0'])
    assert not np.array_equal(end.params['head']['kernel'], start['head']['kernel'])


def test_trainable_everything_is_the_full_run_bit_for_bit():
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32)
  full = engine.run_sequence(pair, methods.SFA(p=0.5), config)
  subset = engine.run_sequence(pair, methods.SFA(p=0.5), dataclasses.replace(config, trainable=('Dense_.*', 'head')))
  assert subset.accuracy_matrix == full.accuracy_matrix and subset.averaging_steps == full.averaging_steps


def test_a_sweep_with_trainable_equals_its_runs():
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, trainable='head')
  configurations = engine.grid(methods.SFA, config=config, p=[0.25, 1.0])
  swept = engine.run_sweep(pair, configurations)
  for (method, lane_config), result in zip(configurations, swept):
    assert result.accuracy_matrix == engine.run_sequence(pair, method, lane_config).accuracy_matrix


@pytest.mark.parametrize('trainable, error, message', [
    (3, TypeError, 'trainable must be None, a path pattern'), ((), TypeError, 'trainable must be None'),
    (('head', 1), TypeError, 'trainable must be None'),
])
def test_bad_trainable_is_named(trainable, error, message):
  with pytest.raises(error, match=message):
    engine.TrainConfig(trainable=trainable)


def test_a_trainable_pattern_that_matches_nothing_is_named():
  pair = tasks.make_stream('mnist-pair', source='digits')
  with pytest.raises(ValueError, match="patterns: 'body' matches no leaf of params"):
    engine.run_sequence(pair, methods.SFA(), engine.TrainConfig(epochs_per_task=1, trainable='body'))


@pytest.mark.parametrize(
    'kwargs, error, message',
    [
        ({'optimizer': 'lbfgs'}, ValueError, 'optimizer must be one of'),
        ({'optimizer': 3}, TypeError, 'optimizer must be a name, an optax.GradientTransformation'),
        ({'model': 'mlp', 'objective': 'mse'}, TypeError, 'objective must be a sfa_jax.engine.objectives.Objective'),
        ({'model': object()}, TypeError, 'model must be a name or a Flax Linen module'),
        ({'model': Regressor(), 'model_kwargs': (('hidden', (8,)),)}, ValueError, 'model_kwargs configure a named model'),
    ],
)
def test_bad_extension_points_are_refused_with_the_argument_named(kwargs, error, message):
  with pytest.raises(error, match=message):
    engine.TrainConfig(**kwargs)


def test_a_factory_that_returns_no_transformation_is_named():
  with pytest.raises(TypeError, match=r'optimizer\(0.001\) must return an optax.GradientTransformation'):
    engine.TrainConfig(optimizer=lambda lr: lr).make_optimizer()


def test_a_stream_of_your_own_tasks_checks_its_splits():
  good = tasks.Split(np.zeros((4, 3), np.float32), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="task 'b': its train split has 4 inputs and 3 targets"):
    tasks.stream_of('s', [('a', good, good), ('b', good._replace(y=np.zeros(3)), good)], num_outputs=2)
  with pytest.raises(ValueError, match='share one shape'):
    tasks.stream_of('s', [('a', good, good), ('b', good._replace(x=np.zeros((4, 5))), good)], num_outputs=2)
  with pytest.raises(ValueError, match='at least one'):
    tasks.stream_of('s', [], num_outputs=2)
  # What would train on garbage without a word:
  nan = good._replace(x=np.array([[np.nan, 0, 0]] + [[0, 0, 0]] * 3, np.float32))
  with pytest.raises(ValueError, match="task 'a': its test split has NaN or infinite inputs"):
    tasks.stream_of('s', [('a', good, nan)], num_outputs=2)
  with pytest.raises(ValueError, match=r"its train split has class labels in \[0, 5\], outside \[0, num_outputs = 2\)"):
    tasks.stream_of('s', [('a', good._replace(y=np.array([0, 1, 5, 1], np.int32)), good)], num_outputs=2)
  with pytest.raises(ValueError, match=r'class labels in \[-1, 0\]'):
    tasks.stream_of('s', [('a', good._replace(y=np.array([0, -1, 0, 0])), good)], num_outputs=2)
  with pytest.raises(ValueError, match="task 'a': its test split is empty"):
    tasks.stream_of('s', [('a', good, tasks.Split(good.x[:0], good.y[:0]))], num_outputs=2)
  with pytest.raises(ValueError, match="task names must differ; 'a' names several tasks"):
    tasks.stream_of('s', [('a', good, good), ('a', good, good)], num_outputs=2)
  real = good._replace(y=np.full(4, 7.5, np.float32))  # regression targets: no label range
  assert len(tasks.stream_of('s', [('a', real, real)], num_outputs=1)) == 1


@pytest.mark.parametrize('kwargs, error, message', [
    ({'batch_size': 32.0}, TypeError, 'batch_size must be an integer; got float 32.0'),
    ({'epochs_per_task': True}, TypeError, 'epochs_per_task must be an integer; got bool'),
    ({'eval_every': 1.5}, TypeError, 'eval_every must be an integer'),
    ({'seed': -1}, ValueError, r'seed must be an integer in \[0, 4294967295\]; got -1'),
    ({'seed': 2**40}, ValueError, 'seed must be an integer in'),
    ({'seed': 0.5}, TypeError, 'seed must be an integer'),
    ({'steps_per_task': ()}, ValueError, 'steps_per_task must be a number of steps or one per task'),
    ({'steps_per_task': (3, 2.5)}, TypeError, 'steps_per_task must be an integer'),
    ({'reset_optimizer': 'no'}, TypeError, "reset_optimizer must be True or False; got 'no'"),
])
def test_config_fields_that_shape_arrays_are_plain_integers(kwargs, error, message):
  with pytest.raises(error, match=message):
    engine.TrainConfig(**kwargs)


def test_run_arguments_of_the_wrong_kind_are_named():
  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(epochs_per_task=1)
  with pytest.raises(TypeError, match=r"method must be a sfa_jax.engine.methods.Method \(e.g. engine.make_method\('sfa'\)\)"):
    engine.run_sequence(pair, 'sfa', config)
  with pytest.raises(TypeError, match=r'got the class SFA: call it, e.g. SFA\(\)'):
    engine.run_sequence(pair, methods.SFA, config)
  with pytest.raises(TypeError, match='config must be a sfa_jax.engine.config.TrainConfig; got dict'):
    engine.run_sequence(pair, methods.SFA(), {'epochs_per_task': 1})
  with pytest.raises(TypeError, match='stream must be a sfa_jax.tasks.TaskStream'):
    engine.run_sequence(list(pair), methods.SFA(), config)
  with pytest.raises(TypeError, match='stream must be a sfa_jax.tasks.TaskStream'):
    engine.run_sweep(list(pair), [(methods.SFA(), config)])
  with pytest.raises(ValueError, match='steps_per_task has 3 entries for 2 tasks'):
    engine.run_sequence(pair, methods.SFA(), dataclasses.replace(config, steps_per_task=(1, 2, 3)))
  with pytest.raises(ValueError, match=r'seed must be an integer in \[0, 2\*\*32\); got -1'):
    tasks.make_stream('mnist-pair', source='digits', seed=-1)


def test_a_batch_larger_than_a_later_task_fails_before_the_first_step():
  rng = np.random.default_rng(0)
  big = tasks.Split(rng.normal(size=(64, 3)).astype(np.float32), rng.integers(0, 2, 64).astype(np.int32))
  small = tasks.Split(big.x[:8], big.y[:8])
  stream = tasks.stream_of('s', [('big', big, big), ('small', small, small)], num_outputs=2)
  steps = []
  with pytest.raises(ValueError, match=r"16 is more than the 8 training examples of the smallest task \(s/small\)"):
    engine.run_sequence(stream, methods.Finetune(), engine.TrainConfig(model=Regressor(), batch_size=16),
                           callbacks=steps.append)
  assert steps == []  # nothing trained on the first task before failing at the second


def test_replay_of_real_valued_targets_keeps_a_fraction_of_all_examples(stream):
  plan = methods.Replay(fraction=0.25).batch_plan(list(stream), 1, 32, seed=0)
  assert len(plan.replay.y) == 64 and plan.replay.y.dtype == np.float32
  assert jax.tree.leaves(plan)  # the memory is real data


def test_a_run_starts_from_given_params_and_resumes_from_them(tmp_path, caplog):
  """A pretrained starting point: the run trains from it, a sweep too, and checks its shapes."""
  from sfa_jax.engine.checkpoint import Checkpointer

  pair = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32)
  model = engine.run.build_model(pair, config)
  seed_one = steps.initializer(model, pair[0].train.x[:1])(1)
  started = engine.run_sequence(pair, methods.SFA(), config, initial=seed_one)
  # Arrays committed to a device (as Orbax and jax.device_put leave them) start the same run on the
  # programs this process compiled: no train chunk compiles again.
  committed = jax.device_put(seed_one, jax.devices()[0])
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      assert engine.run_sequence(pair, methods.SFA(), config, initial=committed).accuracy_matrix == started.accuracy_matrix
  finally:
    jax.config.update('jax_log_compiles', False)
  assert not [r.getMessage() for r in caplog.records if 'Finished XLA compilation of jit(chunk)' in r.getMessage()]
  # Starting from seed 1's initialisation is the seed-0 data order on seed 1's model: not the seed-0 run.
  assert started.accuracy_matrix != engine.run_sequence(pair, methods.SFA(), config).accuracy_matrix
  swept = engine.run_sweep(pair, [(methods.SFA(), config)], initial=seed_one)
  np.testing.assert_allclose(swept[0].accuracy_matrix, started.accuracy_matrix, atol=1e-6)
  np.testing.assert_array_equal(seed_one[0]['head']['kernel'], steps.initializer(model, pair[0].train.x[:1])(1)[0]['head']['kernel'])
  resumed = engine.run_sequence(pair, methods.SFA(), config, initial=seed_one, checkpointer=Checkpointer(tmp_path))
  assert resumed.accuracy_matrix == started.accuracy_matrix
  bad = (jax.tree.map(lambda x: x[..., :3] if x.ndim == 2 else x, seed_one[0]), seed_one[1])
  with pytest.raises(ValueError, match=r"initial params\['Dense_0'\]\['kernel'\] has shape \(64, 3\), but the model's params\['Dense_0'\]\['kernel'\] has shape \(64, 32\)"):
    engine.run_sequence(pair, methods.SFA(), config, initial=bad)
  with pytest.raises(TypeError, match=r'initial must be a \(params, model_state\) pair'):
    engine.run_sequence(pair, methods.SFA(), config, initial=seed_one[0])


def test_a_stream_read_from_disk_batch_by_batch_trains_as_the_same_data_in_memory(tmp_path):
  """Data that does not fit in memory: an iterable of batches spilled once to memory-mapped files."""
  pair = tasks.make_stream('mnist-pair', source='digits')
  in_memory, on_disk = [], []
  for task in pair:
    def chunks(split, size=50):
      for start in range(0, len(split.y), size):
        yield split.x[start:start + size], split.y[start:start + size]
    train = tasks.split_from_batches(chunks(task.train), tmp_path / f'{task.index}-train')
    test = tasks.split_from_batches(chunks(task.test), tmp_path / f'{task.index}-test')
    assert isinstance(train.x, np.memmap) and not train.x.flags.writeable
    np.testing.assert_array_equal(train.x, task.train.x)
    in_memory.append((task.name, task.train, task.test))
    on_disk.append((task.name, train, test))
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32)
  expected = engine.run_sequence(tasks.stream_of('pair', in_memory, num_outputs=10), methods.SFA(), config)
  disk_stream = tasks.stream_of('pair', on_disk, num_outputs=10)
  assert isinstance(disk_stream[0].train.x, np.memmap)
  assert engine.run_sequence(disk_stream, methods.SFA(), config).accuracy_matrix == expected.accuracy_matrix
  # Over the device budget, each chunk of steps gathers its batches from the files: the same run.
  chunked = dataclasses.replace(config, device_data_bytes=100_000)
  assert engine.run_sequence(disk_stream, methods.SFA(), chunked).accuracy_matrix == expected.accuracy_matrix
  with pytest.raises(ValueError, match=r'batch 1 has inputs float32\[3\] and targets int32\[\]; the first had float32\[2\]'):
    tasks.split_from_batches(iter([(np.zeros((2, 2), np.float32), np.zeros(2, np.int32)),
                                   (np.zeros((2, 3), np.float32), np.zeros(2, np.int32))]), tmp_path / 'bad')
  with pytest.raises(ValueError, match='batches is empty'):
    tasks.split_from_batches(iter([]), tmp_path / 'empty')
