"""Tests for sfa_jax.models: shapes, heads, BatchNorm state, the registry and the state helpers."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfa_jax

from sfa_jax import models
from sfa_jax.models import MLP
from sfa_jax.models import OutputHead
from sfa_jax.models import ResNet18
from sfa_jax.models import SmallCNN
from sfa_jax.models import make_model
from sfa_jax.models import merge_variables
from sfa_jax.models import split_variables

# Small models and inputs keep the suite fast on a CPU.
_SMALL_KWARGS = {
    'mlp': {'hidden': (16,)}, 'cnn': {'features': (4, 8), 'hidden': 16}, 'resnet18': {}
}
_INPUT_SHAPES = {'mlp': (2, 8, 8, 1), 'cnn': (2, 8, 8, 1), 'resnet18': (2, 8, 8, 3)}
_RESNET18_CIFAR10_PARAMS = 11_173_962  # kuangliu/pytorch-cifar ResNet18 with 10 classes


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


def _init(model, x, **kwargs):
  # XLA on CPU compiles JAX's default (partitionable) threefry for 3-D and 4-D shapes, such as
  # convolution kernels, in seconds; the classic threefry compiles several times faster.
  with jax.threefry_partitionable(False):
    return jax.jit(lambda key, x: model.init(key, x, **kwargs))(jax.random.key(0), x)


def _num_params(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def resnet():
  """A single-head ResNet18's variables, a batch, and jitted training- and evaluation-mode applies.

  Built once for the module: compiling ResNet18 is the slow part of these tests.
  """
  model = ResNet18(num_outputs=10)
  x = _images(_INPUT_SHAPES['resnet18'])
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['batch_stats']))
  return _init(model, x), x, train, evaluate


def _stack_heads(params, num_heads):
  """A multi-head params tree from a single-head one: head ``t`` is the head scaled by ``t + 1``."""
  head = params['head']
  scales = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
  stacked = {
      'kernel': scales[:, None, None] * head['kernel'][None],
      'bias': scales[:, None] * (head['bias'][None] + 1.0),
  }
  return {**params, 'head': stacked}


# Shapes and the common call signature.


@pytest.mark.parametrize('name', ['mlp', 'cnn', 'resnet18'])
@pytest.mark.parametrize('num_heads', [1, 3])
def test_logit_shapes(name, num_heads):
  model = make_model(name, num_outputs=7, num_heads=num_heads, **_SMALL_KWARGS[name])
  x = jnp.zeros(_INPUT_SHAPES[name])
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, task_id=0))
  for train in (False, True):
    logits, _ = jax.eval_shape(
        lambda v: model.apply(v, x, task_id=2, train=train, mutable=['batch_stats']), variables
    )
    assert logits.shape == (2, 7)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_one_trainer_call_for_stateless_models(name):
  model = make_model(name, num_outputs=4, num_heads=2, **_SMALL_KWARGS[name])
  x = _images(_INPUT_SHAPES[name])
  params, state = split_variables(_init(model, x, task_id=0))
  assert state == {}
  logits, new_state = model.apply(
      merge_variables(params, state), x, task_id=1, train=True, mutable=list(state)
  )
  assert logits.shape == (2, 4)
  assert new_state == {}


def test_resnet18_param_count_matches_pytorch_cifar():
  x = jnp.zeros((1, 32, 32, 3))
  for num_heads in (1, 5):
    model = ResNet18(num_outputs=10, num_heads=num_heads)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, task_id=0))
    head_params = 512 * 10 + 10
    assert _num_params(shapes['params']) == _RESNET18_CIFAR10_PARAMS + (num_heads - 1) * head_params


def test_resnet18_has_cifar_layout():
  shapes = jax.eval_shape(lambda: ResNet18().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = shapes['params']
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 64)  # 3x3 stem, no bias
  assert 'shortcut_conv' not in params['stage1_block1']  # identity shortcut at 64 channels
  assert params['stage2_block1']['shortcut_conv']['kernel'].shape == (1, 1, 64, 128)
  assert set(shapes['batch_stats']['stem_bn']) == {'mean', 'var'}


# BatchNorm: training mode updates the running statistics, evaluation mode uses them.


@pytest.mark.slow  # ResNet-18 compiled in train mode: about 5 s
def test_resnet18_train_mode_updates_batch_stats(resnet):
  variables, x, train, _ = resnet
  params, state = split_variables(variables)
  logits, new_state = train(merge_variables(params, state), x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_trees_all_equal_structs(new_state, state)
  old_mean = state['batch_stats']['stem_bn']['mean']
  new_mean = new_state['batch_stats']['stem_bn']['mean']
  assert not np.allclose(old_mean, new_mean)
  # PyTorch's momentum 0.1: running = 0.9 * running + 0.1 * batch mean, from a zero start.
  stem = jax.lax.conv_general_dilated(
      x, params['stem_conv']['kernel'], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  np.testing.assert_allclose(new_mean, 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_resnet18_eval_mode_leaves_batch_stats_alone(resnet):
  variables, x, _, evaluate = resnet
  logits, new_state = evaluate(variables, x)
  chex.assert_trees_all_equal(new_state['batch_stats'], variables['batch_stats'])
  # With running statistics each example is normalised alone: a batch of one gives its own row.
  single, _ = evaluate(variables, x[:1])
  np.testing.assert_allclose(single, logits[:1], rtol=1e-4, atol=1e-5)


def test_resnet18_train_mode_normalises_with_the_batch(resnet):
  variables, x, train, _ = resnet
  batch = np.asarray(train(variables, x)[0])
  other_batch = np.asarray(train(variables, jnp.concatenate([x[:1], 1.0 - x[1:]]))[0])
  assert not np.allclose(batch[0], other_batch[0])


# Heads: one shared head, or one per task picked by task_id.


def test_multi_head_resnet18_matches_single_head_models(resnet):
  variables, x, _, evaluate = resnet
  params, state = split_variables(variables)
  multi = ResNet18(num_outputs=10, num_heads=3)
  multi_params = _stack_heads(params, 3)
  apply = jax.jit(lambda p, t: multi.apply(merge_variables(p, state), x, task_id=t))
  for task in range(3):
    single_params = {
        **params, 'head': jax.tree.map(lambda leaf, t=task: leaf[t], multi_params['head'])
    }
    expected, _ = evaluate(merge_variables(single_params, state), x)
    np.testing.assert_allclose(apply(multi_params, task), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['mlp', 'cnn'])
def test_task_id_selects_the_head(name):
  x = _images(_INPUT_SHAPES[name])
  single = make_model(name, num_outputs=3, **_SMALL_KWARGS[name])
  multi = make_model(name, num_outputs=3, num_heads=4, **_SMALL_KWARGS[name])
  params = _stack_heads(_init(single, x)['params'], 4)
  outputs = [multi.apply({'params': params}, x, task_id=task) for task in range(4)]
  for task, out in enumerate(outputs):
    head = jax.tree.map(lambda leaf, t=task: leaf[t], params['head'])
    expected = single.apply({'params': {**params, 'head': head}}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs[0], outputs[1])
  # One id per example: row i comes from head ids[i].
  ids = jnp.array([3, 1])
  mixed = multi.apply({'params': params}, x, task_id=ids)
  np.testing.assert_allclose(mixed[0], outputs[3][0], rtol=1e-6)
  np.testing.assert_allclose(mixed[1], outputs[1][1], rtol=1e-6)


@pytest.mark.parametrize('task_id, trained', [(1, {1}), (np.array([0, 2]), {0, 2})])
def test_gradient_reaches_only_the_selected_heads(task_id, trained):
  model = MLP(hidden=(8,), num_outputs=3, num_heads=4)
  x = _images((2, 5))
  params = _init(model, x, task_id=0)['params']
  grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, x, task_id=task_id).sum()))(params)
  for head in range(4):
    kernel_moved = bool(np.any(grads['head']['kernel'][head]))
    bias_moved = bool(np.any(grads['head']['bias'][head]))
    assert kernel_moved == bias_moved == (head in trained), head
  assert np.any(grads['Dense_0']['kernel'])


def test_shared_head_ignores_task_id_and_has_dense_layout():
  model = MLP(hidden=(8,), num_outputs=3)
  x = _images((2, 5))
  params = _init(model, x)['params']
  assert params['head']['kernel'].shape == (8, 3)
  assert params['head']['bias'].shape == (3,)
  reference = model.apply({'params': params}, x)
  for task_id in (0, 7, jnp.array([1, 2])):
    np.testing.assert_array_equal(model.apply({'params': params}, x, task_id=task_id), reference)


def test_each_head_is_initialised_like_a_dense_layer():
  head = OutputHead(num_outputs=64, num_heads=4)
  kernel = head.init(jax.random.key(0), jnp.zeros((1, 256)), task_id=0)['params']['kernel']
  # lecun_normal: variance 1 / fan_in, with fan_in = 256 inputs, not 4 * 256.
  np.testing.assert_allclose(np.std(kernel, axis=(1, 2)), 1 / 16, rtol=0.1)


@pytest.mark.parametrize(
    'task_id, message',
    [
        (None, 'pass task_id'),
        (4, r'task_id must lie in \[0, 4\)'),
        (-1, r'task_id must lie in \[0, 4\)'),
        (np.array([0, 5]), r'task_id must lie in \[0, 4\)'),
        (1.0, 'must hold integers'),
        (np.array([0, 1, 2]), r'scalar or have shape \(2,\)'),
    ],
)
def test_bad_task_ids_raise(task_id, message):
  model = MLP(hidden=(4,), num_outputs=3, num_heads=4)
  x = jnp.zeros((2, 5))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, task_id=0))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda v: model.apply(v, x, task_id=task_id), variables)


def test_traced_out_of_range_task_id_gives_nan_not_another_head():
  model = MLP(hidden=(4,), num_outputs=3, num_heads=4)
  x = _images((2, 5))
  variables = _init(model, x, task_id=0)
  apply = jax.jit(lambda t: model.apply(variables, x, task_id=t))
  assert np.all(np.isnan(apply(4)))
  assert np.all(np.isnan(apply(-1)))
  assert np.all(np.isfinite(apply(3)))


def test_jit_compiles_once_for_every_task():
  model = SmallCNN(features=(4,), hidden=8, num_outputs=3, num_heads=3)
  x = _images((2, 8, 8, 1))
  variables = _init(model, x, task_id=0)
  apply = jax.jit(lambda v, x, t: model.apply(v, x, task_id=t, train=False))
  for task in range(3):
    np.testing.assert_allclose(
        apply(variables, x, task), model.apply(variables, x, task_id=task), rtol=1e-5, atol=1e-6
    )
  assert apply._cache_size() == 1


def test_images_must_be_nhwc():
  x = jnp.zeros((2, 8, 8))
  for model in (SmallCNN(), ResNet18()):
    with pytest.raises(ValueError, match='NHWC'):
      jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))


# The registry.


def test_make_model_builds_the_named_model():
  assert isinstance(make_model('mlp', 10), MLP)
  assert isinstance(make_model('cnn', 10), SmallCNN)
  model = make_model('resnet18', 100, num_heads=10)
  assert isinstance(model, ResNet18)
  assert (model.num_outputs, model.num_heads) == (100, 10)
  assert make_model('mlp', 2, hidden=(100, 100)).hidden == (100, 100)


def test_the_package_and_its_registry_load_flax_when_a_model_is_built():
  code = (
      'import json, sys\n'
      'from sfa_jax import models\n'
      'from sfa_jax.models import registry\n'
      'at_import = [m for m in ("numpy", "jax", "flax") if m in sys.modules]\n'
      'models.make_model(sorted(registry.MODELS)[0], 2)\n'
      'print(json.dumps([at_import, "flax" in sys.modules]))\n'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == [[], True]
  assert [name for name in models.__all__ if not hasattr(models, name)] == []


def test_make_model_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"Unknown model 'vgg'.*\['cnn', 'mlp', 'resnet18'\]"):
    make_model('vgg', 10)
  with pytest.raises(ValueError, match='num_outputs'):
    make_model('mlp', 0)
  with pytest.raises(TypeError, match='num_heads must be an integer; got float 1.5'):
    make_model('mlp', 10, num_heads=1.5)
  with pytest.raises(TypeError, match='num_outputs must be an integer; got float 10.0'):
    make_model('mlp', 10.0)
  with pytest.raises(TypeError):
    make_model('mlp', 10, width=3)


# Params versus model state.


def test_split_and_merge_variables_round_trip():
  variables = {'params': {'w': jnp.ones(2)}, 'batch_stats': {'mean': jnp.zeros(2)}}
  params, state = split_variables(variables)
  assert params is variables['params']
  assert list(state) == ['batch_stats']
  assert merge_variables(params, state) == variables
  assert split_variables({'params': {}}) == ({}, {})


def test_split_and_merge_variables_reject_misplaced_params():
  with pytest.raises(ValueError, match="'params' collection"):
    split_variables({'batch_stats': {}})
  with pytest.raises(ValueError, match="'params' collection"):
    merge_variables({}, {'params': {}})


def test_interpolate_averages_model_state_on_float_leaves():
  anchor = {'mean': jnp.array([0.0, 2.0]), 'half': jnp.ones(2, jnp.bfloat16), 'count': jnp.array(1)}
  state = {'mean': jnp.array([1.0, 4.0]), 'half': jnp.zeros(2, jnp.bfloat16), 'count': jnp.array(5)}
  averaged = sfa_jax.interpolate(anchor, state, beta=0.25)
  np.testing.assert_allclose(averaged['mean'], [0.75, 3.5])
  np.testing.assert_allclose(averaged['half'].astype(jnp.float32), [0.25, 0.25])
  assert averaged['half'].dtype == jnp.bfloat16
  assert int(averaged['count']) == 5
  chex.assert_trees_all_equal(sfa_jax.interpolate(anchor, state, 0.0), state)
  chex.assert_trees_all_close(sfa_jax.interpolate(anchor, state, 1.0)['mean'], anchor['mean'])
  jitted = jax.jit(sfa_jax.interpolate)(anchor, state, jnp.float32(0.25))
  chex.assert_trees_all_close(jitted, averaged)


def test_interpolate_averages_resnet_batch_stats(resnet):
  variables, _, _, _ = resnet
  _, state = split_variables(variables)
  shifted = jax.tree.map(lambda leaf: leaf + 1.0, state)
  averaged = sfa_jax.interpolate(state, shifted, beta=0.5)
  chex.assert_trees_all_close(averaged, jax.tree.map(lambda leaf: leaf + 0.5, state))


def test_interpolate_rejects_bad_model_states():
  state = {'batch_stats': {'mean': jnp.zeros(2)}}
  with pytest.raises(ValueError, match='beta'):
    sfa_jax.interpolate(state, state, beta=1.5)
  with pytest.raises(ValueError, match=r"anchor\['batch_stats'\]\['mean'\] has shape"):
    sfa_jax.interpolate({'batch_stats': {'mean': jnp.zeros(3)}}, state, beta=0.5)
  with pytest.raises(ValueError, match='tree structure'):
    sfa_jax.interpolate({'batch_stats': {}}, state, beta=0.5)
