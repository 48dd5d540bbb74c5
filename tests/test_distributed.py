"""Multi-device training (sfa_jax.engine.distributed): 8 simulated CPU devices, in a subprocess."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfa_jax.engine import distributed

# One subprocess (JAX fixes its device count at start-up) checks everything that needs 8 devices.
_EIGHT_DEVICES_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from sfa_jax import engine, models, tasks
    from sfa_jax.engine import distributed
    from sfa_jax.engine import callbacks, loop, methods, steps

    assert jax.device_count() == 8, jax.devices()
    mesh = distributed.make_mesh('data=2,fsdp=4')

    # The sharding rule: the largest dimension divisible by the fsdp axis (4), small leaves replicated.
    spec = lambda shape: tuple(distributed.leaf_sharding(shape, mesh).spec)
    assert spec((64, 32)) == (distributed.FSDP,), spec((64, 32))
    assert spec((30, 256)) == (None, distributed.FSDP), spec((30, 256))
    assert spec((1024, 10)) == (distributed.FSDP,)
    assert spec((31, 33)) == spec((32,)) == spec(()) == ()
    assert tuple(distributed.leaf_sharding((64, 32), distributed.make_mesh('data=8')).spec) == ('data',)
    try:
      distributed.shard_batch(np.zeros((12, 3)), mesh)
      raise AssertionError('a batch of 12 over 8 devices must fail')
    except ValueError as error:
      assert 'multiple of 8' in str(error)

    # The params are created sharded (FSDP), with the values of the one-device init.
    stream = tasks.make_stream('mnist-pair', source='digits')
    init_model = engine.run.build_model(stream, engine.TrainConfig(model_kwargs=(('hidden', (64,)),)))
    sample = stream[0].train.x[:1]
    sharded_init = steps.initializer(init_model, sample, mesh)(3)
    for got, want, sharding in zip(jax.tree.leaves(sharded_init), jax.tree.leaves(steps.initializer(init_model, sample)(3)),
                                   jax.tree.leaves(distributed.tree_shardings(sharded_init, mesh))):
      assert got.sharding.is_equivalent_to(sharding, got.ndim), (got.sharding, sharding)
      np.testing.assert_array_equal(got, want)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded_init))

    # The checkpoint checksum of arrays spread over devices (and processes) is that of their values.
    from sfa_jax.engine.checkpoint import fold64_checksum
    leaves = jax.tree.leaves(sharded_init)
    assert fold64_checksum(leaves) == fold64_checksum([np.asarray(leaf) for leaf in leaves])

    # The same accuracy matrix on one device and on the 2x4 mesh.
    config = engine.TrainConfig(epochs_per_task=1, batch_size=32, model_kwargs=(('hidden', (32,)),))
    for name in ACCURACY_METHODS:
      method = engine.make_method(name)
      single = engine.run_sequence(stream, method, config)
      sharded = engine.run_sequence(stream, method, config, mesh=mesh)
      np.testing.assert_allclose(sharded.accuracy_matrix, single.accuracy_matrix, atol=1e-6, err_msg=name)
      assert sharded.steps_per_task == single.steps_per_task

    if not CHECK_STEPS:
      raise SystemExit(print('DISTRIBUTED OK'))

    # Checkpoints of a sharded run: stopped mid-task and resumed on the mesh, the same matrix.
    import tempfile
    from sfa_jax.engine.checkpoint import Checkpointer

    class Stop(Exception):
      pass

    def stop_mid_task_1(event):
      if isinstance(event, callbacks.StepEvent) and event.task == 1 and event.step == event.steps // 2 + 1:
        raise Stop

    with tempfile.TemporaryDirectory() as folder:
      try:
        engine.run_sequence(stream, method, config, mesh=mesh, callbacks=stop_mid_task_1,
                               checkpointer=Checkpointer(folder, every_steps=4))
        raise AssertionError('the run was to stop in the middle of task 1')
      except Stop:
        pass
      resumed = engine.run_sequence(stream, method, config, mesh=mesh, checkpointer=Checkpointer(folder))
    np.testing.assert_allclose(resumed.accuracy_matrix, sharded.accuracy_matrix, atol=1e-6)

    # The state keeps its sharding across steps; the step compiles once; the transforms alone do
    # not communicate.
    task = stream[0]
    model = engine.run.build_model(stream, config)
    x, y = task.train.x[:32], task.train.y[:32]
    ids, mask = np.zeros(32, np.int32), np.ones(32, bool)
    variables = model.init(jax.random.key(0), x[:1], task_id=ids[:1], train=False)
    params, model_state = jax.tree.map(np.asarray, models.split_variables(variables))  # host copies: steps donate
    fisher = jax.tree.map(jnp.ones_like, params)
    for name in ('sfa', 'l2', 'ewc'):
      method = engine.make_method(name)
      tx = method.transform(optax.adam(1e-3))
      sharded_params = distributed.shard(params, mesh)
      run = loop.RunState(sharded_params, model_state, jax.jit(tx.init)(sharded_params), {'fisher': fisher})
      state = method.prepare_optimizer(run.opt_state, run, methods.Boundary(1, 2, 4, fisher=None))
      state = distributed.shard(state, mesh)
      expected = distributed.tree_shardings(state, mesh)
      anchored = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, 'anchor')) if hasattr(s, 'anchor')]
      assert tuple(anchored[0].anchor['Dense_0']['kernel'].sharding.spec) == (distributed.FSDP,), name

      # tx.update + apply_updates on sharded params: no collective in the compiled program.
      def update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s
      grads = distributed.shard(jax.tree.map(jnp.ones_like, params), mesh)
      hlo = jax.jit(update).lower(sharded_params, state, grads).compile().as_text()
      for collective in ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute', 'reduce-scatter'):
        assert collective not in hlo, (name, collective)

      step = steps.jitted_train_step(model, tx)
      p, ms, s = sharded_params, model_state, state
      for _ in range(5):  # crosses SFA's averaging steps (T = 4, p = 0.25)
        batch = distributed.shard_batch((x, y, mask, ids), mesh)
        p, ms, s, loss, _ = step(p, ms, s, *batch)
      assert np.isfinite(float(loss))
      assert step._cache_size() == 1, name
      for got, want in zip(jax.tree.leaves(s), jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(want, got.ndim), (name, got.sharding, want)
      for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(distributed.tree_shardings(params, mesh))):
        assert got.sharding.is_equivalent_to(want, got.ndim), (name, got.sharding, want)
    print('DISTRIBUTED OK')
    """
)


def _run_on_eight_devices(accuracy_methods, check_steps):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  script = f'ACCURACY_METHODS, CHECK_STEPS = {accuracy_methods!r}, {check_steps!r}\n' + _EIGHT_DEVICES_SCRIPT
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'DISTRIBUTED OK' in result.stdout


@pytest.mark.slow  # a fresh Python on 8 simulated devices: about 20 s (shardings: test_transforms_integration)
def test_eight_simulated_devices():
  """SFA's accuracy matrix; the sharding rule; state shardings and HLO of SFA, L2 and EWC steps."""
  _run_on_eight_devices(('sfa',), check_steps=True)


@pytest.mark.slow
def test_eight_simulated_devices_l2_ewc_accuracy():
  _run_on_eight_devices(('l2', 'ewc'), check_steps=False)


def test_parse_mesh_spec():
  assert distributed.parse_mesh_spec('data=2, fsdp=4') == {'data': 2, 'fsdp': 4}
  assert distributed.parse_mesh_spec('fsdp=8') == {'fsdp': 8}
  for bad, message in (('data:2', 'look like'), ('model=2', 'among'), ('data=0', '>= 1'), ('data=1,data=2', 'twice')):
    with pytest.raises(ValueError, match=message):
      distributed.parse_mesh_spec(bad)


def test_make_mesh_checks_the_device_count():
  mesh = distributed.make_mesh({'data': 1})
  assert mesh.axis_names == ('data',)
  with pytest.raises(ValueError, match='needs 2 devices'):
    distributed.make_mesh('data=2', devices=jax.devices()[:1])
  with pytest.raises(TypeError, match='jax.sharding.Mesh'):
    distributed.batch_sharding('data=1')


def test_one_device_mesh_places_everything():
  mesh = distributed.make_mesh('data=1,fsdp=1')
  tree = distributed.shard({'w': jnp.ones((64, 32)), 'step': jnp.zeros((), jnp.int32)}, mesh)
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(distributed.tree_shardings(tree, mesh))):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  batch = distributed.shard_batch(np.arange(6.0).reshape(3, 2), mesh)
  np.testing.assert_array_equal(batch, np.arange(6.0).reshape(3, 2))
  step = distributed.shard_step(jax.jit(lambda w, x: (w * 2, x.sum())), mesh, state_argnums=(0,))
  w, total = step(jnp.ones(3), np.ones((4, 2)))
  assert float(total) == 8.0
  np.testing.assert_array_equal(w, 2 * np.ones(3))
  with pytest.raises(TypeError, match='every leaf must be an array'):
    distributed.tree_shardings({'lr': 0.1}, mesh)


def test_cli_mesh_flag_checks_the_devices(tmp_path, capsys):
  from sfa_jax.cli import command as cli

  argv = ['run', '--stream', 'mnist-pair', '--source', 'digits', '--method', 'sfa', '--mesh', 'data=3']
  assert cli.main(argv + ['--out', str(tmp_path)]) == 2
  assert 'needs 3 devices' in capsys.readouterr().err
