"""The sequence trainer on a tiny real stream (scikit-learn's 8x8 digits): every method, compile-once,
the SFA schedule inside a run, replay batches, and resume after SIGKILL bit for bit."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

import sfa_jax

from sfa_jax import engine
from sfa_jax.engine import loop
from sfa_jax.engine import methods
from sfa_jax.engine import programs
from sfa_jax.engine import steps
from sfa_jax import models
from sfa_jax import tasks
from sfa_jax.engine.checkpoint import CheckpointError
from sfa_jax.engine.checkpoint import Checkpointer

CONFIG = engine.TrainConfig(epochs_per_task=2, batch_size=32, eval_batch_size=128)


@pytest.fixture(scope='module')
def pair():
  return tasks.make_stream('mnist-pair', source='digits')


@pytest.mark.parametrize('name', list(methods.registered()))
def test_every_method_runs_and_fills_the_accuracy_matrix(pair, name):
  result = engine.run_sequence(pair, engine.make_method(name), CONFIG)
  matrix = np.asarray(result.accuracy_matrix)
  assert matrix.shape == (2, 2)
  assert np.all((matrix >= 0) & (matrix <= 1))
  assert matrix[0, 0] > 0.9  # task 0 is plain training for every method
  assert matrix[0, 1] == 0.0  # class-incremental: the odd digits were never seen
  summary = result.summary()
  assert summary['average_accuracy'] == pytest.approx(matrix[-1].mean())
  json.dumps(result.to_json())


def test_methods_differ_as_the_paper_says(pair):
  """Fine-tuning forgets task A; SFA, both replays and joint training keep some of it."""
  final = {
      name: np.asarray(engine.run_sequence(pair, engine.make_method(name), CONFIG).accuracy_matrix)[-1]
      for name in ('finetune', 'sfa', 'replay', 'er', 'joint')
  }
  assert final['finetune'][0] < 0.05 and final['finetune'][1] > 0.9
  for name in ('sfa', 'replay', 'er', 'joint'):
    assert final[name][0] > 0.3, name
    assert final[name].mean() > final['finetune'].mean() + 0.1, name


def test_train_step_compiles_once_per_run(pair, caplog):
  """Two tasks, a replay batch mix, re-anchoring and new hyper-parameters: one train-step compile."""
  for name in ('sfa', 'replay', 'ewc'):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
      engine.run_sequence(pair, engine.make_method(name), CONFIG)
    step_compiles = [r for r in caplog.records if 'Finished XLA compilation of jit(step)' in r.getMessage()]
    assert len(step_compiles) <= 1, (name, [r.getMessage() for r in step_compiles])


def test_sfa_averages_where_the_schedule_says(pair):
  result = engine.run_sequence(pair, engine.make_method('sfa', p=0.25, beta=0.5), CONFIG)
  first, total = result.steps_per_task
  expected = [first + t for t in range(1, total + 1) if sfa_jax.is_averaging_step(t, 0.25, total)]
  assert result.averaging_steps == expected
  assert len(expected) == 4  # p = 0.25: every quarter of the task, the last one at its end


def test_sfa_with_beta_zero_is_finetuning_and_beta_one_keeps_task_a(pair):
  finetune = engine.run_sequence(pair, engine.make_method('finetune'), CONFIG).accuracy_matrix
  beta0 = engine.run_sequence(pair, engine.make_method('sfa', beta=0.0), CONFIG).accuracy_matrix
  beta1 = engine.run_sequence(pair, engine.make_method('sfa', p=1.0, beta=1.0), CONFIG).accuracy_matrix
  np.testing.assert_allclose(beta0, finetune, atol=1e-6)
  assert beta1[1] == beta1[0]  # the end-of-task average with beta = 1 returns to the anchor exactly


def test_replay_batches_mix_memory_and_current_task(pair):
  plan = engine.make_method('replay', fraction=0.5, ratio=0.25).batch_plan(list(pair), 1, CONFIG.batch_size, CONFIG.seed)
  assert plan.replay_size == 8
  assert set(np.unique(plan.replay_ids)) == {0} and set(np.unique(plan.task_ids)) == {1}
  memory_counts = np.bincount(plan.replay.y)
  full_counts = np.bincount(pair[0].train.y)
  np.testing.assert_allclose(memory_counts[memory_counts > 0], np.round(0.5 * full_counts[full_counts > 0]), atol=1)


def test_task_incremental_uses_one_head_per_task():
  stream = tasks.make_stream('split-mnist', source='digits', setting='task-incremental', num_tasks=5)
  result = engine.run_sequence(stream, engine.make_method('finetune'), engine.TrainConfig(epochs_per_task=1, batch_size=32))
  matrix = np.asarray(result.accuracy_matrix)
  # With the task id given, old tasks stay well above chance (0.5) even under fine-tuning.
  assert matrix.shape == (5, 5) and matrix[-1].mean() > 0.7


def test_bad_methods_and_configs_are_refused():
  with pytest.raises(ValueError, match='unknown method'):
    engine.make_method('sgd-magic')
  with pytest.raises(ValueError, match='p must lie'):
    engine.make_method('sfa', p=0.0)
  with pytest.raises(ValueError, match="takes no hyper-parameter \\['p'\\]"):
    engine.make_method('l2', p=0.5)
  with pytest.raises(ValueError, match='optimizer must be one of'):
    engine.TrainConfig(optimizer='lbfgs')
  with pytest.raises(ValueError, match='batch_size must be an integer'):
    engine.TrainConfig(batch_size=0)


def test_mismatched_or_corrupt_checkpoint_is_an_error(pair, tmp_path):
  ckpt_dir = tmp_path / 'ckpt'
  engine.run_sequence(pair, engine.make_method('sfa'), CONFIG, checkpointer=Checkpointer(ckpt_dir, every_steps=20))
  with pytest.raises(CheckpointError, match='another run configuration'):
    engine.run_sequence(pair, engine.make_method('l2'), CONFIG, checkpointer=Checkpointer(ckpt_dir))
  for path in ckpt_dir.glob('*/record/*'):  # every checkpoint: an unreadable one is skipped for the previous
    if path.is_file():
      path.write_text('{ not json')
  with pytest.raises(CheckpointError, match=r'no usable checkpoint .*\(cannot read the checkpoint'):
    engine.run_sequence(pair, engine.make_method('sfa'), CONFIG, checkpointer=Checkpointer(ckpt_dir))


_KILLABLE_RUN = textwrap.dedent(
    """
    import json, sys, time
    from sfa_jax import engine, tasks
    from sfa_jax.engine.checkpoint import Checkpointer
    stream = tasks.make_stream('mnist-pair', source='digits')
    config = engine.TrainConfig(epochs_per_task=2, batch_size=32, eval_batch_size=128, eval_every=9)
    slow = lambda event: time.sleep(0.05) if getattr(event, 'task', None) == 1 and hasattr(event, 'step') else None
    result = engine.run_sequence(stream, engine.make_method(sys.argv[2]), config,
                                    callbacks=slow, checkpointer=Checkpointer(sys.argv[1], every_steps=5))
    print(json.dumps(result.to_json()['accuracy_matrix']))
    """
)


# Two processes each: about 17 s a method. In the default suite, resume is pinned bit-exact in-process
# (test_rehearsal, test_lm, test_cli's resumed commands).
@pytest.mark.slow
@pytest.mark.parametrize('name', ['sfa', 'ewc', 'si'])
def test_sigkill_mid_task_then_resume_is_bit_exact(pair, tmp_path, name):
  ckpt_dir = str(tmp_path / 'ckpt')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _KILLABLE_RUN, ckpt_dir, name], env=env, stdout=subprocess.PIPE)
  # Wait for a checkpoint inside task 1 (task 0 has 44 steps: a step number above 50), then kill.
  deadline = time.time() + 120
  while time.time() < deadline:
    steps = [int(p) for p in os.listdir(ckpt_dir) if p.isdigit()] if os.path.isdir(ckpt_dir) else []
    if any(s > 50 for s in steps):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  resumed = subprocess.run(
      [sys.executable, '-c', _KILLABLE_RUN, ckpt_dir, name], env=env, capture_output=True, text=True, timeout=300
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  config = engine.TrainConfig(epochs_per_task=2, batch_size=32, eval_batch_size=128, eval_every=9)
  uninterrupted = engine.run_sequence(pair, engine.make_method(name), config).accuracy_matrix
  assert json.loads(resumed.stdout.strip().splitlines()[-1]) == uninterrupted


def test_cnn_through_the_trainer(pair):
  config = engine.TrainConfig(model='cnn', epochs_per_task=1, batch_size=32, eval_batch_size=128)
  result = engine.run_sequence(pair, engine.make_method('sfa', p=0.5, beta=0.25), config)
  assert np.asarray(result.accuracy_matrix)[0, 0] > 0.5


@pytest.mark.slow
def test_resnet18_batchnorm_state_through_the_trainer_and_merges(pair):
  """BatchNorm statistics are trained (model state), untouched by SFA, merged by WiSE-FT."""
  config = engine.TrainConfig(model='resnet18', epochs_per_task=1, batch_size=32, eval_batch_size=128)
  for name in ('sfa', 'wise-ft'):
    result = engine.run_sequence(pair, engine.make_method(name), config)
    assert np.asarray(result.accuracy_matrix)[0, 0] > 0.5


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
def test_jitted_initializer_is_bit_equal_to_eager_init(pair, model_name):
  model = engine.run.build_model(pair, engine.TrainConfig(model=model_name))
  sample = pair[0].train.x[:1]
  for seed in (0, 3):
    eager = model.init(jax.random.key(seed), sample, task_id=np.zeros(1, np.int32), train=False)
    jitted = steps.initializer(model, sample)(seed)
    chex.assert_trees_all_equal(jitted, models.split_variables(eager))


def test_the_initializer_traces_under_jit_and_eval_shape_and_refuses_bad_seeds(pair):
  init = steps.initializer(engine.run.build_model(pair, CONFIG), pair[0].train.x[:1])
  chex.assert_trees_all_equal(jax.jit(init)(3), init(3), init(np.int64(3)), init(jax.numpy.int32(3)))
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(init, 0), init(0))
  for bad in (-1, 2**32, 1.5, True):
    with pytest.raises(ValueError, match=r'seed must be an integer in \[0, 2\*\*32\)'):
      init(bad)


@pytest.mark.parametrize('name, keeps_start', [('finetune', False), ('sfa', False), ('wise-ft', True)])
def test_only_wise_ft_keeps_a_copy_of_the_task_start(pair, name, keeps_start):
  method = engine.make_method(name)
  model = engine.run.build_model(pair, CONFIG)
  params, model_state = steps.initializer(model, pair[0].train.x[:1])(0)
  state = loop.RunState(params, model_state, method.transform(CONFIG.make_optimizer()).init(params),
                        method.init_extras(params, model_state, len(pair)))
  state = method.start_task(state, methods.Boundary(1, len(pair), 10, fisher=None))
  copies = jax.tree.leaves(state.extras)
  assert bool(copies) == keeps_start
  if keeps_start:
    chex.assert_trees_all_equal(state.extras['start'], (params, model_state))


def test_runs_of_one_process_reuse_the_compiled_step(pair, caplog):
  """Another p reuses the step compiled for the first run, and gives the numbers of a fresh one."""
  programs._REUSED.clear()
  fresh = engine.run_sequence(pair, engine.make_method('sfa', p=0.5, beta=0.5), CONFIG).accuracy_matrix
  programs._REUSED.clear()
  engine.run_sequence(pair, engine.make_method('sfa', p=0.25, beta=0.25), CONFIG)
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    reused = engine.run_sequence(pair, engine.make_method('sfa', p=0.5, beta=0.5), CONFIG).accuracy_matrix
  compiles = [r.getMessage() for r in caplog.records if 'Finished XLA compilation of jit(step)' in r.getMessage()]
  assert compiles == []
  assert reused == fresh
