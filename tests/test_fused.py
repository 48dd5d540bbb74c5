"""The engine's fused steps: task data on the device, chunks of steps per dispatch, SFA's skipped anchor."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax
from sfa_jax import engine, tasks
from sfa_jax.engine import callbacks, feed, fused, loop, methods, programs, stored

CONFIG = engine.TrainConfig(epochs_per_task=2, batch_size=32, eval_every=5)


@pytest.fixture(scope='module')
def stream():
  return tasks.make_stream('mnist-pair', source='digits')


class EveryStep:
  """Records every step's loss; asks the loop for one step per dispatch."""

  every_step = True

  def __init__(self):
    self.losses = []

  def __call__(self, event):
    if isinstance(event, callbacks.StepEvent):
      self.losses.append(float(event.loss))


def _losses(events):
  return [float(e.loss) for e in events if isinstance(e, callbacks.StepEvent)]


def _same(a, b):
  assert a.accuracy_matrix == b.accuracy_matrix
  assert a.averaging_steps == b.averaging_steps and a.steps_per_task == b.steps_per_task
  assert a.curve == b.curve


def test_chunks_of_any_length_train_the_same_run(stream, monkeypatch):
  method = engine.make_method('sfa', p=0.25, beta=0.5)
  fused_events = []
  chunked = engine.run_sequence(stream, method, CONFIG, callbacks=fused_events.append)
  one_by_one = EveryStep()
  stepped = engine.run_sequence(stream, method, CONFIG, callbacks=one_by_one)
  monkeypatch.setattr(loop, 'CHUNK_SECONDS', 1e-9)  # chunks of one step after the first
  short = engine.run_sequence(stream, method, CONFIG)
  _same(chunked, stepped)
  _same(chunked, short)
  assert _losses(fused_events) == one_by_one.losses
  assert len(one_by_one.losses) == sum(chunked.steps_per_task)
  assert chunked.averaging_steps  # SFA averaged: the chunks were split at its averages


def test_step_events_come_in_order_with_the_averages_and_evaluations(stream):
  events = []
  result = engine.run_sequence(stream, engine.make_method('sfa', p=0.25), CONFIG, callbacks=events.append)
  steps = [e.global_step for e in events if isinstance(e, callbacks.StepEvent)]
  assert steps == list(range(1, sum(result.steps_per_task) + 1))
  last_step = 0
  for event in events:
    if isinstance(event, callbacks.StepEvent):
      last_step = event.global_step
    elif isinstance(event, callbacks.AverageEvent):
      assert event.global_step == last_step + 1  # announced just before its step's event
    elif isinstance(event, callbacks.EvaluationEvent):
      assert event.point.step == last_step  # right after the step it follows


def test_every_step_callback_gets_one_dispatch_per_step(stream, monkeypatch):
  calls = []
  make_chunk = fused.make_chunk

  def counting(*args, **kwargs):
    program = make_chunk(*args, **kwargs)
    return lambda *a: (calls.append(int(a[-1])) if a[-1] else None) or program(*a)  # not the warm-up's 0 steps

  monkeypatch.setattr(fused, 'make_chunk', counting)
  monkeypatch.setattr(programs, '_REUSED', {})
  config = dataclasses.replace(CONFIG, eval_every=0)
  result = engine.run_sequence(stream, engine.make_method('finetune'), config, callbacks=EveryStep())
  assert calls == [1] * sum(result.steps_per_task)
  calls.clear()
  engine.run_sequence(stream, engine.make_method('finetune'), config)
  assert len(calls) < sum(result.steps_per_task) / 4  # fused: many steps per dispatch


@pytest.mark.parametrize('method', [engine.make_method('replay', fraction=0.2, ratio=0.3), engine.make_method('sfa')])
def test_batches_gathered_on_the_host_equal_the_device_ones(stream, method):
  on_device = engine.run_sequence(stream, method, CONFIG)
  on_host = engine.run_sequence(stream, method, dataclasses.replace(CONFIG, device_data_bytes=0))
  _same(on_device, on_host)


def test_experience_replay_trains_each_step_on_a_whole_batch_and_the_memory_batch_beside_it(stream):
  all_tasks = list(stream)
  plan = engine.make_method('er', fraction=0.5, memory_ratio=0.5).batch_plan(all_tasks, 1, CONFIG.batch_size, seed=0)
  total = loop.task_steps(plan, CONFIG, 1)
  assert total == loop.task_steps(engine.make_method('finetune').batch_plan(all_tasks, 1, 32, 0), CONFIG, 1)
  rows = feed.task_rows(plan, CONFIG.batch_size, seed=0, total_steps=total)
  assert rows.data.shape == (total, 32) and rows.replay.shape == (total, 16)

  def step(params, model_state, opt_state, step_state, x, y, mask, ids, memory):
    assert memory is None  # trained on with the batch, not kept apart
    return params, model_state, opt_state, step_state, mask.sum().astype(jnp.float32), (ids == 1).sum().astype(jnp.float32)

  for budget in (2**30, 0):  # examples on the device, and gathered on the host
    task_feed = feed.task_feed([plan], [rows], lanes=False, budget=budget)
    n = min(2, task_feed.block_steps)
    chunk = fused.make_chunk(step, task_feed.layout)
    _, losses, metrics, _, done = chunk((jnp.float32(0), {}, {}, None), *task_feed.block(0, n), n)
    assert int(done) == n and losses[:n].tolist() == [48.0] * n and metrics[:n].tolist() == [32.0] * n


def test_the_second_tasks_program_compiles_in_the_background_while_the_first_task_trains(stream, tmp_path, caplog):
  """A memory changes the chunk's inputs at task 1: with the store on, that program compiles in
  the background thread from the run's start (its examples prepared as shapes), not when task 1
  starts, and the numbers are those of a run without the store."""
  config = dataclasses.replace(CONFIG, model_kwargs=(('hidden', (24,)),))  # shapes of this test alone
  method = engine.make_method('er', fraction=0.5)
  stored.set_directory(str(tmp_path))
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      result = engine.run_sequence(stream, method, config)
  finally:
    jax.config.update('jax_log_compiles', False)
    stored.set_directory(None)
  threads = [r.threadName for r in caplog.records if 'Finished XLA compilation of jit(chunk)' in r.getMessage()]
  assert len(threads) == 2 and 'MainThread' not in threads, threads
  assert result.accuracy_matrix == engine.run_sequence(stream, method, config).accuracy_matrix


def test_a_feed_prepared_as_shapes_has_the_placed_feeds_shapes(stream):
  plan = engine.make_method('er', fraction=0.5).batch_plan(list(stream), 1, 32, seed=0)
  rows = feed.task_rows(plan, 32, seed=0, total_steps=4)
  placed, shapes = (feed.task_feed([plan], [rows], lanes=False, budget=2**30, min_rows=500, place=place)
                    for place in (True, False))
  assert isinstance(shapes.device.x, jax.ShapeDtypeStruct)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes.device) == jax.tree.map(lambda a: (a.shape, a.dtype), placed.device)
  assert (shapes.layout, shapes.block_steps) == (placed.layout, placed.block_steps)


def test_a_memorys_block_holds_no_more_steps_than_the_runs_longest_task(stream):
  """Its batches are gathered on the host for each chunk: a short task sends no padding."""
  plan = engine.make_method('er', fraction=0.5).batch_plan(list(stream), 1, 32, seed=0)
  rows = feed.task_rows(plan, 32, seed=0, total_steps=12)
  capped = feed.task_feed([plan], [rows], lanes=False, budget=2**30, max_steps=12)
  assert capped.block_steps == 12 and capped.block(0, 12).replay.y.shape == (12 * 32,)
  assert feed.task_feed([plan], [rows], lanes=False, budget=2**30).block_steps == feed.MAX_CHUNK_STEPS
  own = engine.make_method('finetune').batch_plan(list(stream), 1, 32, seed=0)  # no memory: rows alone, not capped
  assert feed.task_feed([own], [feed.task_rows(own, 32, 0, 12)], lanes=False, budget=2**30, max_steps=12).block_steps == feed.MAX_CHUNK_STEPS


def test_a_plan_that_keeps_its_memory_apart_and_adds_it_is_refused(stream):
  plan = engine.make_method('er').batch_plan(list(stream), 1, 32, seed=0)
  with pytest.raises(ValueError, match='memory_apart.*memory_added'):
    loop.task_steps(plan._replace(memory_apart=True), CONFIG, 1)


def test_a_sweep_of_memories_gathered_on_the_host_equals_its_runs(stream):
  configurations = engine.grid('replay', fraction=(0.1, 0.3), seeds=(0, 1), config=dataclasses.replace(CONFIG, device_data_bytes=0))
  swept = engine.run_sweep(stream, configurations)
  for (method, config), result in zip(configurations, swept):
    run = engine.run_sequence(stream, method, dataclasses.replace(config, device_data_bytes=2**30))
    np.testing.assert_allclose(result.accuracy_matrix, run.accuracy_matrix, atol=1e-6)
    assert result.steps_per_task == run.steps_per_task


def _compiled_programs() -> int:
  return sum(value._cache_size() for value in programs._REUSED.values() if hasattr(value, '_cache_size'))


def test_compilations_do_not_grow_with_the_number_of_tasks(monkeypatch):
  counts = []
  for num_tasks in (2, 5):
    monkeypatch.setattr(programs, '_REUSED', {})
    stream = tasks.make_stream('permuted-mnist', source='digits', num_tasks=num_tasks)
    engine.run_sequence(stream, engine.make_method('sfa', p=0.5), dataclasses.replace(CONFIG, epochs_per_task=1))
    counts.append(_compiled_programs())
  assert counts[0] == counts[1] and counts[0] > 0


def test_sfa_may_average_false_passes_the_update_without_reading_the_anchor():
  params = {'w': jnp.arange(3.0), 'b': jnp.ones(2)}
  tx = sfa_jax.sfa(jax.tree.map(jnp.zeros_like, params), p=0.5, beta=0.5, total_steps=4)
  state = tx.init(params)
  updates = jax.tree.map(lambda p: p * 0 + 0.25, params)
  skipped, skipped_state = tx.update(updates, state, params, may_average=False)
  assert jax.tree.map(lambda a, b: bool((a == b).all()), skipped, updates) == {'w': True, 'b': True}
  assert int(skipped_state.count) == 1 and not bool(skipped_state.averaged)
  closed = jax.make_jaxpr(lambda u, s, p: tx.update(u, s, p, may_average=False))(updates, state, params)
  anchor_vars = set(closed.jaxpr.invars[len(jax.tree.leaves(updates)):][-len(jax.tree.leaves(params)):])
  assert not anchor_vars & {v for eqn in closed.jaxpr.eqns for v in eqn.invars if hasattr(v, 'count')}
  # Through a chain, the other transforms ignore it; on an averaging step it is the caller's promise.
  chain = optax.chain(optax.adam(1e-2), tx)
  _, chained = chain.update(updates, chain.init(params), params, may_average=False)
  assert int(chained[1].count) == 1
  with pytest.raises(TypeError, match='may_average must be a Python bool'):
    jax.jit(lambda flag: tx.update(updates, state, params, may_average=flag))(True)


def test_test_batches_score_every_task_in_one_program():
  splits = [tasks.Split(np.full((n, 1), k + 1.0, np.float32), np.zeros(n, np.int32)) for k, n in enumerate((3, 5))]
  batches = fused.test_batches(splits, [0, 1], batch_size=2)
  assert batches.x.shape == (5, 2, 1) and batches.task.tolist() == [0, 0, 1, 1, 1]
  totals = fused.make_scorer(lambda p, s, x, y, mask, ids: (x[:, 0] * mask).sum())(None, None, batches, 2)
  assert np.asarray(totals).tolist() == [3.0, 10.0]


def test_task_rows_follow_the_shuffled_epochs_and_the_memory():
  split = tasks.Split(np.zeros((10, 1), np.float32), np.arange(10, dtype=np.int32))
  memory = tasks.Split(np.zeros((4, 1), np.float32), np.arange(4, dtype=np.int32))
  plan = methods.BatchPlan(split, np.zeros(10, np.int32), memory, np.zeros(4, np.int32), 1)
  rows = feed.task_rows(plan, 4, seed=3, total_steps=7)
  epochs = [tasks.epoch_indices(10, 3, seed=3, epoch=e)[0] for e in range(3)]  # 3 batches an epoch
  np.testing.assert_array_equal(rows.data, np.concatenate(epochs)[:7])
  memory_epochs = [feed.replay_order(4, 1, 3, seed=3, epoch=e) for e in range(3)]  # passes over the memory
  np.testing.assert_array_equal(rows.replay, np.concatenate(memory_epochs)[:7])
  assert set(memory_epochs[0][:, 0].tolist()) < {0, 1, 2, 3} and len(set(memory_epochs[0][:, 0].tolist())) == 3


def test_padded_lengths_are_few_and_close():
  assert [feed.padded_length(n) for n in (1, 15, 16, 17, 800, 1000, 1797)] == [1, 15, 16, 18, 832, 1024, 1920]
  assert all(n <= feed.padded_length(n) <= n * 1.125 for n in range(1, 5000))


def test_a_single_sfa_run_skips_the_anchor_between_averages_when_asked_or_large(stream, monkeypatch):
  """Each dispatch is recorded as (skips the anchor, steps); chunks between averages may have any
  length (the pace of dispatches follows the clock), each average runs alone."""
  calls = []
  chunk = programs.ChunkPrograms.chunk

  def counting(self, layout, skip, *args):
    program = chunk(self, layout, skip, *args)
    return lambda *a: (calls.append((skip, int(a[-1]))) if a[-1] else None) or program(*a)

  monkeypatch.setattr(programs.ChunkPrograms, 'chunk', counting)
  monkeypatch.setattr(programs, '_REUSED', {})
  averaging = lambda: [steps for skip, steps in calls if not skip]
  method = engine.make_method('sfa', p=0.25, beta=0.5)
  config = dataclasses.replace(CONFIG, eval_every=0)
  branchless = engine.run_sequence(stream, method, config)  # small params: the branchless update
  assert calls and all(not skip for skip, _ in calls)
  calls.clear()
  skipped = engine.run_sequence(stream, method, dataclasses.replace(config, skip_anchor_between_averages=True))
  assert averaging() == [1] * len(skipped.averaging_steps) and skipped.averaging_steps  # each average alone
  assert skipped.averaging_steps == branchless.averaging_steps
  np.testing.assert_allclose(skipped.accuracy_matrix, branchless.accuracy_matrix, atol=0.02)  # rounding only
  calls.clear()
  monkeypatch.setattr(engine.config, 'SKIP_ANCHOR_MIN_BYTES', 1)  # every model is large: skipped by default
  assert engine.run_sequence(stream, method, config).averaging_steps == skipped.averaging_steps
  assert averaging() == [1] * len(skipped.averaging_steps)
  with pytest.raises(TypeError, match='skip_anchor_between_averages must be None, True or False'):
    engine.TrainConfig(skip_anchor_between_averages='yes')
