"""Grids of runs: the grid's order and checks, run_grid one after another and as sweeps (the same
runs, in order, as they finish), its checkpoints, initial variables and log, and the summary over seeds."""

import dataclasses
import json

import numpy as np
import pytest

from sfa_jax import engine
from sfa_jax import metrics
from sfa_jax import tasks

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


# ---------------------------------------------------------------------------------------------
# grid.


def test_grid_orders_hyper_parameters_then_seeds():
  configurations = engine.grid('sfa', p=(0.1, 1.0), beta=(0.25, 0.5), seeds=(3, 4), config=CONFIG)
  assert [(m.label, c.seed) for m, c in configurations][:3] == [
      ('sfa(beta=0.25, p=0.1)', 3), ('sfa(beta=0.25, p=0.1)', 4), ('sfa(beta=0.5, p=0.1)', 3)
  ]
  assert len(configurations) == 8 and all(c.batch_size == 32 for _, c in configurations)
  assert [m.label for m, _ in engine.grid('finetune', seeds=(0, 1))] == ['finetune', 'finetune']


@pytest.mark.parametrize(
    'kwargs, error, message',
    [
        ({'p': 0.5}, TypeError, 'p must be a sequence'),
        ({'p': ()}, ValueError, 'p is empty'),
        ({'seeds': ()}, ValueError, 'seeds is empty'),
        ({'p': (0.5, 2.0)}, ValueError, 'p must lie in'),
        ({'strength': (1.0,)}, ValueError, 'takes no hyper-parameter'),
        # Seeds are refused as TrainConfig refuses its seed, not rounded to an integer.
        ({'seeds': (0, 1.5)}, TypeError, r'seeds\[1\] must be an integer; got float 1.5'),
        ({'seeds': (0.5,)}, TypeError, r'seeds\[0\] must be an integer; got float 0.5'),
        ({'seeds': (True,)}, TypeError, r'seeds\[0\] must be an integer; got bool True'),
        ({'seeds': ('1',)}, TypeError, r"seeds\[0\] must be an integer; got str '1'"),
        ({'seeds': (np.float32(2.0),)}, TypeError, r'seeds\[0\] must be an integer; got float32'),
        ({'seeds': (-1,)}, ValueError, r'seeds\[0\] must be an integer in \[0, 4294967295\]'),
    ],
)
def test_bad_grids_are_refused(kwargs, error, message):
  with pytest.raises(error, match=message):
    engine.grid('sfa', **kwargs)


def test_numpy_integer_seeds_become_python_integers():
  (_, config), = engine.grid('finetune', seeds=(np.int64(3),))
  assert config.seed == 3 and type(config.seed) is int


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    engine.grid('nope')


# ---------------------------------------------------------------------------------------------
# run_grid: checks, one after another, as sweeps.


def test_run_grid_checks_everything_before_training(pair):
  finetune = engine.grid('finetune', config=CONFIG)
  with pytest.raises(ValueError, match=r'configurations\[1\] repeats configurations\[0\]'):
    engine.run_grid(pair, finetune + finetune)
  with pytest.raises(ValueError, match='configurations is empty'):
    engine.run_grid(pair, [])
  with pytest.raises(TypeError, match='pair'):
    engine.run_grid(pair, ['finetune'])
  with pytest.raises(ValueError, match='as_sweep=True with a mesh'):
    engine.run_grid(pair, finetune, as_sweep=True, mesh=object())
  other_batches = engine.grid('finetune', config=dataclasses.replace(CONFIG, batch_size=16))
  with pytest.raises(ValueError, match="share the checkpoint folder 'finetune-seed0'"):
    engine.run_grid(pair, finetune + other_batches, checkpoints='unused')


@pytest.mark.parametrize('setting, error, message', [
    ({'batch_size': 4096}, ValueError, 'is more than the .* training examples'),
    ({'steps_per_task': (5, 5, 5)}, ValueError, 'steps_per_task has 3 entries for 2 tasks'),
    ({'trainable': 'nope'}, ValueError, "'nope' matches no leaf of params"),
    ({'model': 'nope'}, ValueError, "Unknown model 'nope'"),
    ({'model_kwargs': (('nope', 1),)}, TypeError, "unexpected keyword argument 'nope'"),
    ({'optimizer': lambda learning_rate: None}, TypeError, 'must return an optax.GradientTransformation'),
])
def test_run_grid_checks_every_configuration_before_the_first_run(pair, setting, error, message):
  good = engine.grid('finetune', seeds=(0, 1), config=CONFIG)
  bad = engine.grid('sfa', p=(0.5,), seeds=(0, 1), config=dataclasses.replace(CONFIG, **setting))
  with pytest.raises(error, match=message) as raised:  # when called: nothing has trained
    engine.run_grid(pair, good + bad, as_sweep=False)
  assert raised.value.__notes__ == ['run_grid: configurations[2] (sfa(beta=0.25, p=0.5), seed 0).']


def test_run_grid_checks_the_stream_each_sweep_and_initial_when_called(pair):
  finetune = engine.grid('finetune', seeds=(0, 1), config=CONFIG)
  with pytest.raises(TypeError, match='stream must be a sfa_jax.tasks.TaskStream'):
    engine.run_grid('mnist-pair', finetune)
  with pytest.raises(TypeError, match='initial must map a seed'):
    engine.run_grid(pair, finetune, initial=(None, None))
  # Equal settings by value, written apart: one group, which a sweep refuses, before the first sweep.
  numpy_rate = engine.grid('sfa', seeds=(0,), config=dataclasses.replace(CONFIG, learning_rate=np.float64(CONFIG.learning_rate)))
  with pytest.raises(ValueError, match='TrainConfig.learning_rate differs across the configurations'):
    engine.run_grid(pair, finetune + numpy_rate + engine.grid('sfa', seeds=(1,), config=CONFIG), as_sweep=True)


def test_run_grid_runs_every_configuration_and_seed(pair):
  lines = []
  runs = [run.to_json() for run in engine.run_grid(pair, engine.grid('sfa', p=(0.5,), seeds=(0, 1), config=CONFIG), log=lines.append)]
  assert [(r['method_name'], r['seed']) for r in runs] == [('sfa', 0), ('sfa', 1)]
  assert runs[0]['hyperparams'] == {'beta': 0.25, 'p': 0.5}  # defaults filled in
  assert runs[0]['method'] == 'sfa(beta=0.25, p=0.5)'
  assert lines[0] == 'run_grid: 2 runs of 1 configurations and 2 seeds, one after another (chosen for the cpu backend)'
  assert lines[1].startswith('run_grid: ') and ' steps per task ' in lines[1] and '[0.5]: met' in lines[1]
  assert len(lines) == 3 and lines[2].startswith('sfa(beta=0.25, p=0.5)') and ' | avg ' in lines[2]
  # The seed is the run's: two seeds give different numbers.
  assert runs[0]['accuracy_matrix'] != runs[1]['accuracy_matrix']
  json.dumps(runs)  # plain JSON


@pytest.mark.slow  # about 10 s
def test_run_grid_as_sweeps_gives_the_runs_one_after_another_in_order(pair):
  """Sweeps group the configurations by method class (and by what a sweep cannot vary); the runs come
  back in the order given, each the same as its own run."""
  configurations = (engine.grid('sfa', p=(0.5,), seeds=(0, 1), config=CONFIG) + engine.grid('finetune', seeds=(0, 1), config=CONFIG)
                    + engine.grid('replay', ratio=(0.25, 0.5), config=CONFIG) + engine.grid('sfa', p=(1.0,), seeds=(0, 1), config=CONFIG))
  one_by_one = list(engine.run_grid(pair, configurations, as_sweep=False))
  lines = []
  swept = list(engine.run_grid(pair, configurations, as_sweep=True, log=lines.append))
  assert lines[0] == 'run_grid: 8 runs of 5 configurations and 2 seeds, as 4 vectorised sweeps (as asked)'
  assert [(run.method, run.config) for run in swept] == configurations == [(run.method, run.config) for run in one_by_one]
  for got, want in zip(swept, one_by_one):
    np.testing.assert_allclose(got.result.accuracy_matrix, want.result.accuracy_matrix, atol=1e-6, err_msg=got.method.label)
    assert got.result.averaging_steps == want.result.averaging_steps
  # A line per configuration, once its seeds have finished: sfa p=1 joins its sweep with p=0.5.
  assert [line.split()[0] for line in lines[2:]] == [
      'sfa(beta=0.25,', 'finetune', 'replay(fraction=0.1,', 'replay(fraction=0.1,', 'sfa(beta=0.25,']


def test_run_grid_yields_each_run_as_it_finishes(pair):
  runs = engine.run_grid(pair, engine.grid('finetune', seeds=(0, 1), config=CONFIG), as_sweep=False)
  first = next(runs)
  assert first.config.seed == 0 and first.result.method == 'finetune'
  assert next(runs).config.seed == 1
  assert next(runs, None) is None


def test_run_grid_starts_each_seed_from_its_initial_variables(pair):
  from sfa_jax.engine import steps

  def initial(seed):
    model = engine.run.build_model(pair, CONFIG)
    return steps.initializer(model, pair[0].train.x[:1])(seed + 10)

  configurations = engine.grid('finetune', seeds=(0, 1), config=CONFIG)
  swept = list(engine.run_grid(pair, configurations, as_sweep=True, initial=initial))
  for run in swept:
    expected = engine.run_sequence(pair, run.method, run.config, initial=initial(run.config.seed))
    np.testing.assert_allclose(run.result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6)


def test_run_grid_checkpoints_each_run_in_its_folder(pair, tmp_path):
  configurations = engine.grid('sfa', p=(0.5,), seeds=(0, 1), config=CONFIG)
  runs = list(engine.run_grid(pair, configurations, as_sweep=False, checkpoints=tmp_path / 'runs'))
  assert sorted(path.name for path in (tmp_path / 'runs').iterdir()) == ['sfa_beta=0.25_p=0.5_-seed0', 'sfa_beta=0.25_p=0.5_-seed1']
  list(engine.run_grid(pair, configurations, as_sweep=True, checkpoints=tmp_path / 'sweep'))
  assert [path.name for path in (tmp_path / 'sweep').iterdir()] == ['sweep']
  resumed = list(engine.run_grid(pair, configurations, as_sweep=False, checkpoints=tmp_path / 'runs'))  # from the last checkpoints
  assert [run.result.accuracy_matrix for run in resumed] == [run.result.accuracy_matrix for run in runs]


# ---------------------------------------------------------------------------------------------
# summarize_runs.


def _run(matrix, seed, train_seconds, method='sfa'):
  return {'method': method, 'seed': seed, 'accuracy_matrix': matrix, 'seconds': {'train': train_seconds},
          'metrics': metrics.summarize(np.asarray(matrix))}


def test_summary_is_mean_and_population_std_over_seeds():
  runs = [_run([[0.9, 0.1], [0.5, 0.8]], 0, 2.0), _run([[0.8, 0.2], [0.3, 0.9]], 1, 4.0),
          _run([[1.0, 0.0], [0.0, 1.0]], 0, 1.0, method='finetune')]
  sfa, finetune = engine.summarize_runs(runs)
  assert (sfa['method'], sfa['seeds'], finetune['method'], finetune['seeds']) == ('sfa', 2, 'finetune', 1)
  # Final rows (0.5, 0.8) and (0.3, 0.9); forgetting 0.9-0.5 and 0.8-0.3.
  assert sfa['final_accuracy'] == [pytest.approx((0.4, 0.1)), pytest.approx((0.85, 0.05))]
  assert sfa['average_accuracy'] == pytest.approx((0.625, 0.025))
  assert sfa['forgetting'] == pytest.approx((0.45, 0.05))
  assert sfa['backward_transfer'] == pytest.approx((-0.45, 0.05))
  assert sfa['train_seconds'] == pytest.approx((3.0, 1.0))
  assert finetune['average_accuracy'] == pytest.approx((0.5, 0.0))


def test_a_hand_built_config_holds_python_integers_so_task_seeds_do_not_wrap():
  config = engine.TrainConfig(seed=np.uint32(5_000_000), batch_size=np.int32(8), steps_per_task=(np.int64(3), 4))
  assert type(config.seed) is int and type(config.batch_size) is int and config.steps_per_task == (3, 4)
  from sfa_jax.engine import methods

  assert methods.task_seed(config.seed, 1) == 5_000_000_001
  assert engine.TrainConfig(seed=np.uint32(7)) == engine.TrainConfig(seed=7)
