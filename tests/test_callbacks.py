"""The loop's events and the built-in loggers (sfa_jax.engine.callbacks)."""

import io
import json

import numpy as np
import pytest

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.engine import callbacks

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (16,)),), epochs_per_task=1, batch_size=32, eval_batch_size=256, eval_every=10)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


@pytest.fixture(scope='module')
def sfa_events(pair):
  events = []
  result = engine.run_sequence(pair, engine.make_method('sfa', p=0.5), CONFIG, callbacks=events.append)
  return result, events


def test_the_loop_reports_every_step_evaluation_average_and_task_end(sfa_events):
  result, events = sfa_events
  steps = [e for e in events if isinstance(e, callbacks.StepEvent)]
  assert [e.global_step for e in steps] == list(range(1, sum(result.steps_per_task) + 1))
  assert [e.global_step for e in events if isinstance(e, callbacks.AverageEvent)] == result.averaging_steps
  assert [e.point for e in events if isinstance(e, callbacks.EvaluationEvent)] == result.curve
  ends = [e for e in events if isinstance(e, callbacks.TaskEndEvent)]
  assert [(e.task, list(e.accuracies)) for e in ends] == list(enumerate(result.accuracy_matrix))


def test_a_sweep_names_the_configuration_of_each_evaluation(pair):
  events = []
  configurations = engine.grid('sfa', p=(0.5, 1.0), config=CONFIG)
  results = engine.run_sweep(pair, configurations, callbacks=[events.append])
  for i, result in enumerate(results):
    assert [e.point for e in events if isinstance(e, callbacks.EvaluationEvent) and e.configuration == i] == result.curve
    assert [e.global_step for e in events if isinstance(e, callbacks.AverageEvent) and e.configuration == i] == result.averaging_steps
  step = next(e for e in events if isinstance(e, callbacks.StepEvent))
  assert np.shape(step.loss) == (2,)


def test_jsonl_logger_writes_one_json_object_per_event(tmp_path, sfa_events):
  result, events = sfa_events
  logger = callbacks.JsonlLogger(tmp_path / 'logs' / 'run.jsonl', every_steps=5)
  for event in events:
    logger(event)
  logger.close()
  lines = [json.loads(line) for line in (tmp_path / 'logs' / 'run.jsonl').read_text().splitlines()]
  steps = [line['global_step'] for line in lines if line['event'] == 'StepEvent']
  assert steps == [s for s in range(1, sum(result.steps_per_task) + 1) if s % 5 == 0]
  assert isinstance(next(line for line in lines if line['event'] == 'StepEvent')['loss'], float)
  evaluations = [line for line in lines if line['event'] == 'EvaluationEvent']
  assert [e['point']['accuracies'] for e in evaluations] == [list(p.accuracies) for p in result.curve]
  assert [line['accuracies'] for line in lines if line['event'] == 'TaskEndEvent'] == result.accuracy_matrix


def test_tensorboard_logger_writes_event_files(tmp_path, sfa_events):
  pytest.importorskip('tensorboardX')
  _, events = sfa_events
  logger = callbacks.TensorBoardLogger(tmp_path / 'tb', every_steps=5)
  for event in events:
    logger(event)
  logger.close()
  written = list((tmp_path / 'tb').rglob('events.out.tfevents.*'))
  assert written and all(path.stat().st_size > 0 for path in written)


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _steps(task, count, loss=0.5, accuracy=0.75):
  return [callbacks.StepEvent(task, step, count, step, loss, accuracy) for step in range(1, count + 1)]


def test_console_progress_redraws_one_bar_per_task_on_a_terminal():
  terminal = _Terminal()
  progress = callbacks.ConsoleProgress('sfa seed 0', terminal)
  for event in _steps(1, 100):
    progress(event)
  text = terminal.getvalue()
  assert text.count('\n') == 1 and 'sfa seed 0 task 1' in text
  last = text.rstrip('\n').split('\r')[-1]
  assert '100/100' in last and 'loss 0.500 acc 0.750' in last


def test_console_progress_is_quiet_off_a_terminal_unless_asked():
  log = io.StringIO()
  progress = callbacks.ConsoleProgress('l2', log)
  for event in _steps(0, 50):
    progress(event)
  assert log.getvalue() == ''
  progress(callbacks.ResumeEvent(7))  # a resume is said all the same
  assert log.getvalue() == 'l2: resumed at step 7\n'


def test_console_progress_disabled_draws_nothing_even_on_a_terminal():
  terminal = _Terminal()
  progress = callbacks.ConsoleProgress('l2', terminal, disable=True)
  for event in [callbacks.ResumeEvent(7), *_steps(0, 50)]:
    progress(event)
  assert terminal.getvalue() == ''


@pytest.mark.parametrize('disable', ['no', 0, 1])
def test_console_progress_refuses_a_disable_that_is_not_none_or_a_bool(disable):
  with pytest.raises(ValueError, match='disable must be None, False or True'):
    callbacks.ConsoleProgress('l2', disable=disable)


def test_console_progress_asked_prints_a_line_every_tenth_of_a_task_off_a_terminal():
  log = io.StringIO()
  progress = callbacks.ConsoleProgress('l2', log, disable=False)
  progress(callbacks.ResumeEvent(7))
  for event in _steps(0, 50):
    progress(event)
  lines = log.getvalue().splitlines()
  assert lines[0] == 'l2: resumed at step 7' and len(lines) == 11
  assert lines[-1].startswith('l2 task 0: 100%') and '50/50' in lines[-1] and 'loss 0.500' in lines[-1]


def test_callbacks_must_be_callable(pair):
  with pytest.raises(TypeError, match=r'callbacks\[1\] must be callable'):
    engine.run_sequence(pair, engine.make_method('finetune'), CONFIG, callbacks=[print, 'log.txt'])
