"""The budget rule of the experiments (sfa_jax.engine.budget): each rule fails when it should, and only then."""

import json
import re

import pytest

from sfa_jax.engine import budget
from sfa_jax import engine
from sfa_jax import tasks


def test_min_steps_for_p():
  assert budget.min_steps_for_p(0.25) == 8
  assert budget.min_steps_for_p(0.5) == 4
  assert budget.min_steps_for_p(1.0) == 2
  assert budget.min_steps_for_p(0.3) == 7  # 6.67 rounds up
  with pytest.raises(ValueError, match='p_min'):
    budget.min_steps_for_p(0.0)
  with pytest.raises(ValueError, match='p_min'):
    budget.min_steps_for_p(1.5)


def test_averaging_steps_is_the_transform_schedule():
  assert budget.averaging_steps(0.25, 10) == (3, 6, 9, 10)
  assert budget.averaging_steps(1.0, 7) == (7,)
  # A budget that fails the rule: at 12 steps per task p = 0.96 averages only at the end, as p = 1 does.
  assert budget.averaging_steps(0.96, 12) == budget.averaging_steps(1.0, 12) == (12,)
  assert budget.averaging_steps(0.96, 13) == (12, 13)


def test_check_budget_refuses_identical_schedules_and_short_periods():
  with pytest.raises(budget.BudgetError, match=r'p=0.96 and p=1 average after the same steps'):
    budget.check_budget(12, p_values=[0.25, 0.5, 0.75, 0.96, 1.0])
  with pytest.raises(budget.BudgetError, match=r'below ceil\(2/p_min\)=8'):
    budget.check_budget(7, p_values=[0.25, 1.0])
  check = budget.check_budget(300, p_values=[0.25, 0.5, 0.75, 0.96, 1.0])
  assert check.ok and check.min_steps_for_p == 8 and check.identical_schedules == ()
  assert json.loads(json.dumps(check.to_json()))['ok'] is True


def test_check_budget_warns_instead_when_not_strict():
  with pytest.warns(budget.BudgetWarning, match='p=0.96 and p=1'):
    check = budget.check_budget(12, p_values=[0.96, 1.0], strict=False)
  assert not check.ok and check.identical_schedules == ((0.96, 1.0),)


@pytest.mark.parametrize('p_values, error, message', [
    (0.5, TypeError, 'p_values must be a sequence of averaging fractions, e.g. (0.25, 0.5); got float 0.5'),
    ('0.5', TypeError, 'p_values must be a sequence of averaging fractions'),
    ([0.5, '1'], TypeError, 'p_values[1] must be a number'),
    ([0.5, 1.5], ValueError, 'p_values[1] must be in (0, 1]; got 1.5'),
])
def test_check_budget_names_a_bad_p_grid(p_values, error, message):
  with pytest.raises(error, match=re.escape(message)):
    budget.check_budget(100, p_values=p_values)


def test_check_budget_needs_a_positive_integer():
  with pytest.raises(ValueError, match='steps_per_task'):
    budget.check_budget(0)
  with pytest.raises(ValueError, match='steps_per_task'):
    budget.check_budget(2.5)


def test_converged_steps_and_the_convergence_rule():
  curve = [(10, 0.30), (20, 0.60), (30, 0.85), (40, 0.90), (50, 0.91), (60, 0.90)]
  record = budget.converged_steps(curve)
  assert record['converged_accuracy'] == pytest.approx(0.9033333)
  assert record['steps_to_fraction'] == 40  # 0.85 < 0.95 * 0.9033 = 0.858 <= 0.90
  convergence = {'fraction': 0.95, 'reference_steps': 60, 'tasks': [record, budget.converged_steps([(10, 0.9), (20, 0.9)])]}
  with pytest.raises(budget.BudgetError, match=r'tasks \[0\]'):
    budget.check_budget(record['steps_to_fraction'] - 1, convergence=convergence)
  assert budget.check_budget(record['steps_to_fraction'], convergence=convergence).steps_to_fraction == (40, 10)
  with pytest.raises(ValueError, match='increase'):
    budget.converged_steps([(20, 0.5), (10, 0.6)])
  with pytest.raises(ValueError, match='fraction'):
    budget.converged_steps(curve, fraction=0.0)


def test_task_curves_count_steps_from_each_task_start():
  run = {'steps_per_task': [5, 5], 'curve': [
      {'step': 5, 'task': 0, 'accuracies': [0.9, 0.0]}, {'step': 5, 'task': 0, 'accuracies': [0.9, 0.0]},
      {'step': 7, 'task': 1, 'accuracies': [0.5, 0.4]}, {'step': 10, 'task': 1, 'accuracies': [0.3, 0.8]}]}
  assert budget.task_curves(run) == [[(5, 0.9)], [(2, 0.4), (5, 0.8)]]


def test_measure_convergence_on_a_real_stream():
  stream = tasks.make_stream('split-mnist', source='digits', setting=tasks.TASK_INCREMENTAL)
  config = engine.TrainConfig(batch_size=32, model_kwargs=(('hidden', (32,)),), learning_rate=3e-3)
  record = budget.measure_convergence(stream, config, 40, eval_every=10)
  assert record['reference_steps'] == 40 and len(record['tasks']) == 5
  for task in record['tasks']:  # two digits apart, with the task id: learned within 40 steps
    assert [s for s, _ in task['curve']] == [10, 20, 30, 40]
    assert 0.8 < task['converged_accuracy'] <= 1.0 and task['steps_to_fraction'] in (10, 20, 30, 40)
  with pytest.raises(ValueError, match='reference_steps'):
    budget.measure_convergence(stream, config, 0)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


def test_steps_per_task_counts_the_batches_a_method_plans(pair):
  config = engine.TrainConfig(epochs_per_task=2, batch_size=32)
  sizes = [len(pair[k].train.y) for k in range(2)]
  own = [2 * (n // 32) for n in sizes]
  assert budget.steps_per_task(pair, config) == budget.steps_per_task(pair, config, method=engine.make_method('sfa')) == own
  # Replay: half of each batch of task 1 from the memory, so 16 of its own examples a step.
  assert budget.steps_per_task(pair, config, method=engine.make_method('replay', ratio=0.5)) == [own[0], 2 * (sizes[1] // 16)]
  # Joint: task 1 on both tasks' examples.
  assert budget.steps_per_task(pair, config, method=engine.make_method('joint')) == [own[0], 2 * (sum(sizes) // 32)]
  with pytest.raises(ValueError, match='steps_per_task has 3 entries for 2 tasks'):
    budget.steps_per_task(pair, engine.TrainConfig(steps_per_task=(5, 5, 5)))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['replay', 'joint'])
def test_steps_per_task_is_the_engines_count(pair, name):
  config = engine.TrainConfig(epochs_per_task=1, batch_size=32, model_kwargs=(('hidden', (8,)),))
  method = engine.make_method(name)
  assert budget.steps_per_task(pair, config, method=method) == engine.run_sequence(pair, method, config).steps_per_task

