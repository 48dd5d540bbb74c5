"""Methods as classes in one registry (sfa_jax.engine.methods), and a user's own method everywhere."""

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest
from _user_methods import BakedEMA
from _user_methods import ParamsEMA

from sfa_jax.cli import command as cli
from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine import callbacks
from sfa_jax.engine import methods

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256)
BUILT_IN = ('finetune', 'sfa', 'l2', 'ewc', 'replay', 'wise-ft', 'task-arithmetic', 'ties', 'joint', 'adaptive-sfa', 'multi-anchor-sfa')


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


def test_every_built_in_method_is_one_registered_class():
  registry = methods.registered()
  assert tuple(registry)[: len(BUILT_IN)] == BUILT_IN
  for name, cls in registry.items():
    method = cls()
    assert method.name == name and method == methods.make_method(name) and hash(method) == hash(cls())
    assert method.values == {key: spec.default for key, spec in cls.hyperparams.items()}
    assert all(spec.default in spec.interval for spec in cls.hyperparams.values()), name


@pytest.mark.parametrize('name', sorted(methods.registered()))
def test_the_estimates_a_method_takes_at_task_ends_are_the_ones_it_names(name):
  """The engine compiles the estimates of ``boundary_uses`` while the first task trains: a built-in
  method names exactly those its ``end_task`` calls."""
  import jax.numpy as jnp
  import optax
  from sfa_jax.engine.loop import RunState

  method = methods.registered()[name]()
  params = {'w': jnp.ones(2)}
  called = set()

  def estimate(kind):
    return lambda state: called.add(kind) or {'w': jnp.full(2, 2.0)}

  state = RunState(params, {}, method.transform(optax.sgd(0.1)).init(params), method.init_extras(params, {}, 3))
  for k in (0, 1):
    boundary = methods.Boundary(k, 3, 10, fisher=estimate('fisher'), mas_importance=estimate('mas_importance'))
    state = method.end_task(state, boundary)
  assert called == type(method).boundary_uses


def test_a_method_is_immutable_labelled_and_replaced_with_checks():
  method = methods.make_method('sfa', p=0.5)
  assert method.label == 'sfa(beta=0.25, p=0.5)' and repr(method) == 'SFA(beta=0.25, p=0.5)'
  assert method.replace(beta=0.5) == methods.SFA(p=0.5, beta=0.5) and method['p'] == 0.5
  with pytest.raises(AttributeError, match='immutable'):
    method.p = 1.0
  with pytest.raises(ValueError, match=r'p must lie in \(0, 1\]; got 0.0'):
    method.replace(p=0.0)


@pytest.mark.parametrize(
    'spec, kwargs, error, message',
    [
        ('sgd', {}, ValueError, "unknown method 'sgd'; known methods: finetune, sfa"),
        ('sfa', {'strength': 1.0}, ValueError, r"method 'sfa' takes no hyper-parameter \['strength'\]; it takes: p, beta"),
        ('sfa', {'p': 'half'}, TypeError, 'p must be a real number'),
        ('sfa', {'beta': True}, TypeError, 'beta must be a real number'),
        ('ewc', {'strength': -1.0}, ValueError, r'strength must lie in \[0, inf\)'),
        ('replay', {'ratio': 1.0}, ValueError, r'ratio must lie in \(0, 1\)'),
        ('no_such_module:Method', {}, ValueError, "cannot import the method 'no_such_module:Method'"),
        ('_user_methods:Missing', {}, ValueError, "cannot import the method '_user_methods:Missing'"),
        ('_user_methods:NotAMethod', {}, ValueError, 'is not a subclass of sfa_jax.engine.methods.Method'),
        (3, {}, TypeError, 'a method is a name, an import path or a Method subclass'),
    ],
)
def test_bad_methods_are_refused_with_the_argument_named(spec, kwargs, error, message):
  with pytest.raises(error, match=message):
    methods.make_method(spec, **kwargs)


def test_a_method_is_found_by_name_import_path_or_class():
  assert methods.make_method('_user_methods:ParamsEMA', decay=0.5) == ParamsEMA(decay=0.5)
  assert methods.make_method(ParamsEMA).label == 'params-ema(decay=0.9)'


def test_registering_checks_the_class():
  with pytest.raises(ValueError, match="a method named 'sfa' is registered already"):
    methods.register_method(type('OtherSFA', (methods.Method,), {'name': 'sfa'}))
  with pytest.raises(ValueError, match='has no name'):
    methods.register_method(type('Nameless', (methods.Method,), {}))
  with pytest.raises(TypeError, match='takes a subclass'):
    methods.register_method(dict)
  with pytest.raises(TypeError, match=r"hyperparams\['k'\] must be a Hyperparam"):
    methods.register_method(type('Loose', (methods.Method,), {'name': 'loose', 'hyperparams': {'k': 1.0}}))


def test_a_user_method_runs_and_with_decay_zero_is_finetuning(pair):
  finetune = engine.run_sequence(pair, methods.Finetune(), CONFIG)
  plain = engine.run_sequence(pair, ParamsEMA(decay=0.0), CONFIG)
  assert plain.accuracy_matrix == finetune.accuracy_matrix  # ema = θ exactly: the end is fine-tuning's
  smoothed = engine.run_sequence(pair, ParamsEMA(decay=0.9), CONFIG)
  assert smoothed.accuracy_matrix != finetune.accuracy_matrix and smoothed.method == 'params-ema(decay=0.9)'


def _assert_same_as_runs(stream, configurations, results):
  for (method, config), result in zip(configurations, results):
    expected = engine.run_sequence(stream, method, config)
    np.testing.assert_allclose(result.accuracy_matrix, expected.accuracy_matrix, atol=1e-6, err_msg=method.label)
    assert result.averaging_steps == expected.averaging_steps, method.label
    assert [(p.step, p.task) for p in result.curve] == [(p.step, p.task) for p in expected.curve], method.label
    np.testing.assert_allclose([p.accuracies for p in result.curve], [p.accuracies for p in expected.curve], atol=1e-6)


def test_a_sweep_of_a_user_method_equals_its_runs(pair):
  configurations = engine.grid(ParamsEMA, decay=(0.5, 0.9), config=CONFIG)
  _assert_same_as_runs(pair, configurations, engine.run_sweep(pair, configurations))


def test_a_sweep_refuses_a_method_whose_update_bakes_its_hyper_parameters(pair):
  with pytest.raises(ValueError, match=r'baked-ema\(decay=0.9\) \(configuration 1\) updates by another program'):
    engine.run_sweep(pair, engine.grid(BakedEMA, decay=(0.5, 0.9), config=CONFIG))
  engine.run_sweep(pair, engine.grid(BakedEMA, decay=(0.5,), seeds=(0, 1), config=CONFIG))  # one decay: fine


@pytest.mark.parametrize(
    'name, values',
    [('adaptive-sfa', {'threshold': (0.01, 0.05)}), ('multi-anchor-sfa', {'p': (0.5, 1.0)})],
)
def test_adaptive_and_multi_anchor_sweeps_equal_their_runs(name, values):
  """Averaging steps decided on the device (adaptive SFA) are read per configuration, with the evaluations after them."""
  stream = tasks.make_stream('split-mnist', source='digits', num_tasks=3)
  config = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256, eval_every=15)
  configurations = engine.grid(name, config=config, **values)
  results = engine.run_sweep(stream, configurations)
  assert all(result.averaging_steps for result in results)
  assert results[0].averaging_steps != results[1].averaging_steps
  _assert_same_as_runs(stream, configurations, results)


@pytest.mark.parametrize('schedule, error, message', [
    (lambda steps: np.zeros(steps + 1, bool), ValueError, r'has shape \(11,\); it must have 12 entries'),
    (lambda steps: np.zeros(steps, bool), ValueError, r'has shape \(10,\); it must have 12 entries'),
    (lambda steps: np.zeros((1, steps + 2), bool), ValueError, r'has shape \(1, 12\); it must have 12 entries'),
    (lambda steps: np.zeros(steps + 2, int), TypeError, 'must be a boolean array'),
], ids=['one-short', 'two-short', 'two-dimensional', 'integers'])
def test_a_wrong_averaging_schedule_is_refused_before_its_task_trains(pair, schedule, error, message):
  class WrongSchedule(methods.Finetune):
    name = 'wrong-schedule'

    def averaging_schedule(self, task_index, total_steps):
      return super().averaging_schedule(task_index, total_steps) if task_index == 0 else schedule(total_steps)

  trained = []
  record = lambda event: trained.append(event.task) if isinstance(event, callbacks.StepEvent) else None
  with pytest.raises(error, match=r"wrong-schedule's averaging_schedule\(1, 10\) for task 1 " + message):
    engine.run_sequence(pair, WrongSchedule(), dataclasses.replace(CONFIG, steps_per_task=10), callbacks=record)
  assert trained == [0] * 10  # task 0 only: task 1's schedule is refused before its first step


def test_the_command_line_takes_a_user_method_by_import_path(tmp_path, capsys):
  fast = ['--source', 'digits', '--epochs', '1', '--batch-size', '32', '--no-compile-cache']
  out = tmp_path / 'run'
  assert cli.main(['run', '--method', '_user_methods:ParamsEMA', '--hp', 'params-ema.decay=0.5', '--out', str(out)] + fast) == 0
  assert json.loads((out / 'results.json').read_text())['methods'] == ['params-ema(decay=0.5)']
  out = tmp_path / 'compare'
  assert cli.main(['compare', '--methods', 'finetune,_user_methods:ParamsEMA', '--out', str(out)] + fast) == 0
  assert json.loads((out / 'results.json').read_text())['methods'] == ['finetune', 'params-ema(decay=0.9)']
  capsys.readouterr()
  assert cli.main(['run', '--method', '_user_methods:ParamsEMA', '--hp', 'params-ema.decay=1', '--out', str(out)] + fast) == 2
  assert 'decay must lie in [0, 1)' in capsys.readouterr().err
  assert cli.main(['run', '--method', 'nowhere:Method', '--out', str(out)] + fast) == 2
  assert "cannot import the method 'nowhere:Method'" in capsys.readouterr().err


def test_no_module_outside_the_registry_asks_a_method_its_name():
  """The engine calls hooks; a `method.name == ...` branch would close it to user methods again."""
  package = pathlib.Path(__file__).parent.parent / 'sfa_jax'
  pattern = re.compile(r"method\w*(\[\w+\])?\.name\s*(==|!=|(not\s+)?in\b)")
  offenders = [
      f'{path.relative_to(package)}:{number}'
      for path in package.rglob('*.py') if path.name != 'methods.py'
      for number, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)
  ]
  assert offenders == []


def test_runs_of_a_method_that_bakes_its_hyper_parameters_do_not_share_a_compiled_step(pair):
  """One process, two decays: each run trains with its own (a reused step would keep the first's)."""
  half = engine.run_sequence(pair, BakedEMA(decay=0.5), CONFIG).accuracy_matrix
  ninety = engine.run_sequence(pair, BakedEMA(decay=0.9), CONFIG).accuracy_matrix
  assert ninety == engine.run_sequence(pair, ParamsEMA(decay=0.9), CONFIG).accuracy_matrix
  assert half == engine.run_sequence(pair, ParamsEMA(decay=0.5), CONFIG).accuracy_matrix
