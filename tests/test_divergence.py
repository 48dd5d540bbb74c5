"""A run whose loss or model turns NaN stops with a DivergedError naming the task, the step and the
configuration, before it records or checkpoints anything past that step."""

import os
import pickle
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.cli import command as cli
from sfa_jax.engine import callbacks
from sfa_jax.engine import methods
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine.loop import DivergedError

CONFIG = engine.TrainConfig(model_kwargs=(('hidden', (32,)),), steps_per_task=6, batch_size=32, eval_batch_size=256)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


class _CountState(NamedTuple):
  at: jax.Array  # in the state: the lanes of a sweep share one update program
  count: jax.Array


def _nan_update(at: int) -> optax.GradientTransformation:
  """Passes the updates through, but makes them NaN on the ``at``-th update (counted over the
  optimizer state's life; never for 0)."""

  def init(params):
    return _CountState(jnp.asarray(at, jnp.int32), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    count = state.count + 1
    return jax.tree.map(lambda u: jnp.where(count == state.at, jnp.nan, u), updates), state._replace(count=count)

  return optax.GradientTransformation(init, update)


class DivergesAt(methods.Method):
  """Fine-tuning whose ``update``-th update (of each task: the optimizer state is reset) is NaN."""

  name = 'diverges-at'
  hyperparams = {'update': methods.Hyperparam(0.0, methods.NON_NEGATIVE)}

  def transform(self, optimizer):
    return optax.chain(optimizer, _nan_update(int(self['update'])))


class _Steps:
  """A callback that keeps the ``(task, step, loss)`` of every step event."""

  def __init__(self):
    self.seen = []

  def __call__(self, event):
    if isinstance(event, callbacks.StepEvent):
      self.seen.append((event.task, event.step, np.asarray(event.loss)))


def test_a_nan_loss_stops_the_run_at_its_step(pair):
  steps = _Steps()
  with pytest.raises(DivergedError, match=r'diverges-at\(update=3\) diverged at step 4 of task 0 \(global step 4\): '
                                          r'loss nan') as caught:
    engine.run_sequence(pair, DivergesAt(update=3), CONFIG, callbacks=steps)
  error = caught.value
  assert isinstance(error, FloatingPointError) and isinstance(error, ValueError)
  assert (error.task, error.step, error.global_step, error.configurations) == (0, 4, 4, (0,))
  assert [(task, step) for task, step, _ in steps.seen] == [(0, 1), (0, 2), (0, 3)]  # the steps before it, finite
  assert all(np.isfinite(loss) for _, _, loss in steps.seen)
  copy = pickle.loads(pickle.dumps(error))
  assert (str(copy), copy.step, copy.configurations) == (str(error), 4, (0,))


def test_a_model_that_diverges_on_a_tasks_last_step_stops_at_its_end(pair):
  """The last step's loss comes before its update: the model is checked at the task's end."""
  ends = []
  record = lambda event: ends.append(event) if isinstance(event, callbacks.TaskEndEvent) else None
  with pytest.raises(DivergedError, match=r"diverged in task 0: after its step 6 \(global step 6\), "
                                          r"params\['Dense_0'\]\['bias'\] holds NaN") as caught:
    engine.run_sequence(pair, DivergesAt(update=6), CONFIG, callbacks=record)
  assert (caught.value.task, caught.value.step) == (0, 6) and ends == []  # no row of the matrix from the NaN model


def test_a_sweep_names_the_configuration_that_diverged(pair):
  configurations = engine.grid(DivergesAt, update=(0, 2), config=CONFIG)
  with pytest.raises(DivergedError, match=r'^configuration 1 \(diverges-at\(update=2\), seed 0\) diverged at step 3 '
                                          r'of task 0') as caught:
    engine.run_sweep(pair, configurations)
  assert caught.value.configurations == (1,)


@pytest.mark.parametrize('update, message', [(5, 'at step 6 of task 0'), (4, 'after its step 4')])
def test_the_checkpoints_before_a_divergence_are_kept_and_resume(pair, tmp_path, update, message):
  """A checkpoint every 2 steps: none is written at or after the divergence (update 5: its loss
  shows at step 6; update 4: the model is checked before step 4's checkpoint)."""
  directory = tmp_path / 'checkpoints'
  run = lambda **kwargs: engine.run_sequence(pair, DivergesAt(update=update), CONFIG,
                                             checkpointer=Checkpointer(directory, every_steps=2), **kwargs)
  with pytest.raises(DivergedError, match=message):
    run()
  kept = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  assert kept == ([2, 4] if update == 5 else [2])
  resumed = []
  with pytest.raises(DivergedError, match=message):
    run(callbacks=lambda event: resumed.append(event.global_step) if isinstance(event, callbacks.ResumeEvent) else None)
  assert resumed == [kept[-1]]  # the latest checkpoint restores, and the run goes on from it


def test_the_command_line_reports_a_divergence_in_one_line(tmp_path, capsys):
  args = ['run', '--source', 'digits', '--epochs', '1', '--batch-size', '32', '--no-compile-cache', '--method', 'finetune',
          '--optimizer', 'sgd', '--lr', '1e30', '--out', str(tmp_path / 'run')]
  assert cli.main(args) == 2
  assert capsys.readouterr().err.splitlines()[-1].startswith('sfa-jax: error: finetune diverged at step ')
