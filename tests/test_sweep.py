"""Vectorised sweeps: every configuration of a sweep gets its own sequential run's results."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from sfa_jax import engine
from sfa_jax import tasks

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


def _assert_same_as_sequential(stream, configurations, results):
  assert len(results) == len(configurations)
  for (method, config), result in zip(configurations, results):
    expected = engine.run_sequence(stream, method, config)
    label = f'{method.label} seed {config.seed}'
    assert result.method == expected.method
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6, err_msg=label)
    assert result.steps_per_task == expected.steps_per_task, label
    assert result.averaging_steps == expected.averaging_steps, label
    assert [(p.step, p.task) for p in result.curve] == [(p.step, p.task) for p in expected.curve], label
    np.testing.assert_allclose([p.accuracies for p in result.curve], [p.accuracies for p in expected.curve], atol=1e-6)


def test_sfa_sweep_over_p_beta_and_seeds_matches_sequential_runs(pair, caplog):
  config = dataclasses.replace(CONFIG, eval_every=7)
  configurations = [
      (engine.make_method('sfa', p=0.25, beta=0.25), config),
      (engine.make_method('sfa', p=0.5, beta=0.6), config),
      (engine.make_method('sfa', p=1.0, beta=0.3), dataclasses.replace(config, seed=1)),
  ]
  jax.config.update('jax_log_compiles', True)  # in every thread: the train program compiles in the background
  try:
    with caplog.at_level(logging.WARNING):
      results = engine.run_sweep(pair, configurations)
  finally:
    jax.config.update('jax_log_compiles', False)
  step_compiles = [r.getMessage() for r in caplog.records if 'Finished XLA compilation of jit(chunk)' in r.getMessage()]
  assert len(step_compiles) == 1, step_compiles  # one program for the whole sweep
  # Each configuration averages on its own schedule (p differs), inside the one program.
  assert [len(r.averaging_steps) for r in results] == [4, 2, 1]
  assert len({tuple(map(tuple, r.accuracy_matrix)) for r in results}) == 3
  _assert_same_as_sequential(pair, configurations, results)


def test_l2_sweep_over_strength_matches_sequential_runs(pair):
  configurations = engine.grid('l2', strength=(0.1, 30.0), config=CONFIG)  # one seed: the batches are passed once
  _assert_same_as_sequential(pair, configurations, engine.run_sweep(pair, configurations))


def test_replay_sweep_over_fraction_matches_sequential_runs(pair):
  configurations = engine.grid('replay', fraction=(0.05, 0.3), config=CONFIG)
  results = engine.run_sweep(pair, configurations)
  assert results[0].accuracy_matrix != results[1].accuracy_matrix  # different memories
  _assert_same_as_sequential(pair, configurations, results)


@pytest.mark.slow
@pytest.mark.parametrize(
    'name, values',
    [
        ('finetune', {}),
        ('ewc', {'strength': (10.0, 1e4)}),
        ('wise-ft', {'beta': (0.3, 0.7)}),
        ('task-arithmetic', {'scaling': (0.5, 1.0)}),
        ('ties', {'density': (0.2, 0.8)}),
        ('magmax', {'scaling': (0.3, 1.0)}),
        ('cofima', {'beta': (0.3, 0.8)}),
        ('joint', {}),
    ],
)
def test_every_other_method_matches_sequential_runs(pair, name, values):
  # Every value with seed 0, and the first value with seed 1.
  configurations = engine.grid(name, seeds=(0, 1), config=CONFIG, **values)
  configurations = configurations[::2] + configurations[1:2]
  _assert_same_as_sequential(pair, configurations, engine.run_sweep(pair, configurations))


SFA = engine.make_method('sfa')


@pytest.mark.parametrize(
    'configurations, error, message',
    [
        ([], ValueError, 'configurations is empty'),
        ('sfa', TypeError, 'must be a sequence of'),
        ([SFA], TypeError, r'configurations\[0\] must be a \(Method, TrainConfig\) pair'),
        ([(SFA, CONFIG), (engine.make_method('l2'), CONFIG)], ValueError, 'mix l2, sfa: run one sweep per method'),
        (
            [(engine.make_method('replay', ratio=0.25), CONFIG), (engine.make_method('replay', ratio=0.5), CONFIG)],
            ValueError,
            'ratio differs across the configurations',
        ),
        (
            [(SFA, CONFIG), (SFA, dataclasses.replace(CONFIG, batch_size=16))],
            ValueError,
            'TrainConfig.batch_size differs',
        ),
        ([(SFA, CONFIG), (SFA, CONFIG)], ValueError, r'configurations\[1\] repeats configurations\[0\]'),
    ],
)
def test_bad_configurations_are_refused(pair, configurations, error, message):
  with pytest.raises(error, match=message):
    engine.run_sweep(pair, configurations)
