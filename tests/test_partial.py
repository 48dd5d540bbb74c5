"""Parameter-efficient SFA (sfa_jax.partial, Llama's top_layers): what trains, what is anchored, what it costs."""

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sfa_jax
from sfa_jax import partial
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.llama import join_layers
from sfa_jax.models.llama import split_layers
from sfa_jax.models.llama import train_top_layers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _params():
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {'body': {'w': leaf(4, 3), 'b': leaf(3)}, 'head': {'w': leaf(3, 2)}, 'norm': {'scale': leaf(3)}}


MASK = {'body': {'w': False, 'b': False}, 'head': {'w': True}, 'norm': {'scale': True}}
TARGET = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), _params())


def _loss(params):
  """A separable loss: each leaf's gradient depends on that leaf alone."""
  return sum(jnp.sum((p - t) ** 2 * (1.0 + jnp.arange(p.size).reshape(p.shape)))
             for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(TARGET)))


def _methods(params):
  fisher = jax.tree.map(lambda x: jnp.abs(x) + 0.1, params)
  return {
      'sfa': optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4)),
      'l2': optax.chain(sfa_jax.l2(2.0), optax.adam(0.1)),
      'ewc': optax.chain(sfa_jax.ewc(fisher, 2.0), optax.adam(0.1)),
  }


def _split_step(tx):
  grad = partial.trainable_value_and_grad(_loss)

  @jax.jit
  def step(trainable, opt_state, frozen):
    _, grads = grad(trainable, frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  return step


def _full_step(tx):
  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(_loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


# ---------------------------------------------------------------------------------------------
# The subset: the same numbers as the whole-model transform, frozen leaves untouched, state small.


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_the_subset_transform_equals_the_full_one_on_those_leaves(name):
  params = _params()
  full_tx = _methods(params)[name]
  full, full_state = params, full_tx.init(params)
  for _ in range(5):  # SFA averages at steps 2 and 4
    full, full_state = _full_step(full_tx)(full, full_state)
  trainable, frozen = partial.split_trainable(params, MASK)
  tx = _methods(params)[name]  # EWC's full Fisher is cut to the trainable leaves at init
  state = tx.init(trainable)
  for _ in range(5):
    trainable, state = _split_step(tx)(trainable, state, frozen)
  expected = partial.split_trainable(full, MASK)[0]
  chex.assert_trees_all_close(trainable, expected, rtol=1e-6, atol=1e-7)
  assert not np.allclose(trainable['head']['w'], params['head']['w'])
  # train_only: the same, keeping one params tree; the frozen leaves are bit for bit the same.
  one_tree_tx = partial.train_only(_methods(params)[name], MASK)
  merged, one_state = params, one_tree_tx.init(params)
  for _ in range(5):
    merged, one_state = _full_step(one_tree_tx)(merged, one_state)
  chex.assert_trees_all_close(partial.split_trainable(merged, MASK)[0], expected, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(partial.split_trainable(merged, MASK)[1], frozen)


@pytest.mark.parametrize('name', ['sfa', 'l2', 'ewc'])
def test_the_anchor_and_the_moments_hold_the_trainable_leaves_only(name):
  params = _params()
  for state in (_methods(params)[name].init(partial.split_trainable(params, MASK)[0]),
                partial.train_only(_methods(params)[name], MASK).init(params)):
    anchored = sfa_jax.find_state(state)
    for tree in (anchored.anchor, getattr(anchored, 'fisher', anchored.anchor),
                 next(s for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
                      if isinstance(s, optax.ScaleByAdamState)).mu):
      flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda n: isinstance(n, optax.MaskedNode))[0]
      held = {partial.path_string(path) for path, leaf in flat if not isinstance(leaf, optax.MaskedNode)}
      masked = {partial.path_string(path) for path, leaf in flat if isinstance(leaf, optax.MaskedNode)}
      assert held == {'head/w', 'norm/scale'} and masked <= {'body', 'body/w', 'body/b'} and masked
    trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(partial.split_trainable(params, MASK)[0]))
    assert sum(x.nbytes for x in jax.tree.leaves(anchored.anchor)) == trainable_bytes


def test_reanchor_cuts_the_params_to_the_trainable_anchor():
  params = _params()
  trainable, frozen = partial.split_trainable(params, MASK)
  tx = optax.chain(optax.adam(0.1), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4, wait_for_anchor=True))
  state = tx.init(trainable)
  for _ in range(3):
    trainable, state = _split_step(tx)(trainable, state, frozen)
  for new_anchor in (trainable, partial.merge_trainable(trainable, frozen)):  # the trainable tree or all params
    anchor = sfa_jax.find_state(sfa_jax.reanchor(state, new_anchor)).anchor
    chex.assert_trees_all_equal(anchor, trainable)
  one_tree_tx = partial.train_only(tx, MASK)
  anchor = sfa_jax.find_state(sfa_jax.reanchor(one_tree_tx.init(params), params)).anchor
  assert isinstance(anchor['body']['w'], optax.MaskedNode)
  np.testing.assert_array_equal(anchor['head']['w'], params['head']['w'])


def test_split_and_merge_copy_nothing_and_round_trip():
  params = _params()
  trainable, frozen = partial.split_trainable(params, MASK)
  assert trainable['head']['w'] is params['head']['w'] and frozen['body']['w'] is params['body']['w']
  assert isinstance(trainable['body']['b'], optax.MaskedNode) and isinstance(frozen['head']['w'], optax.MaskedNode)
  merged = partial.merge_trainable(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
  # A prefix mask (a bool for a whole sub-tree) and a callable mask give the same split.
  prefix = partial.split_trainable(params, {'body': False, 'head': True, 'norm': True})
  called = partial.split_trainable(params, lambda p: partial.path_mask(p, ['head', 'norm']))
  for other in (prefix, called):
    assert jax.tree.structure(other[0], is_leaf=lambda n: isinstance(n, optax.MaskedNode)) == jax.tree.structure(
        trainable, is_leaf=lambda n: isinstance(n, optax.MaskedNode))
    assert partial.merge_trainable(*other)['body']['w'] is params['body']['w']


def test_the_frozen_gradients_are_not_formed():
  params = _params()
  trainable, frozen = partial.split_trainable(params, MASK)
  value, grads = partial.trainable_value_and_grad(_loss)(trainable, frozen)
  np.testing.assert_allclose(value, _loss(params), rtol=1e-6)
  assert isinstance(grads['body']['w'], optax.MaskedNode)
  chex.assert_trees_all_close(grads['head'], jax.grad(_loss)(params)['head'])
  text = jax.jit(partial.trainable_value_and_grad(lambda p: jnp.sum(p['body']['w'] @ p['head']['w']))).lower(
      trainable, frozen).as_text()
  assert text.count('dot_general') == 2  # forward and the head's gradient; none for body/w


def test_path_mask_matches_whole_path_components():
  params = {'layers': {'attention_norm': {'scale': 1.0}, 'mlp': {'kernel': 2.0}}, 'norm': {'scale': 3.0}, 'normal': 4.0}
  assert partial.path_mask(params, 'norm') == {
      'layers': {'attention_norm': {'scale': False}, 'mlp': {'kernel': False}}, 'norm': {'scale': True}, 'normal': False}
  assert partial.path_mask(params, ['layers/.*/kernel'])['layers'] == {'attention_norm': {'scale': False}, 'mlp': {'kernel': True}}


@pytest.mark.parametrize('call, error, match', [
    (lambda p: partial.path_mask(p, 'lm_head'), ValueError, "'lm_head' matches no leaf of params; its paths include"),
    (lambda p: partial.path_mask(p, '(['), ValueError, "patterns: '\\(\\[' is not a regular expression"),
    (lambda p: partial.path_mask(p, [3]), TypeError, 'patterns must be a string'),
    (lambda p: partial.path_mask(p, None), TypeError, 'patterns must be a string or a sequence of strings; got NoneType None'),
    (lambda p: partial.split_trainable(p, {'body': 1, 'head': True, 'norm': True}), TypeError, r"mask\['body'\] must be True or False"),
    (lambda p: partial.split_trainable(p, {'body': True}), ValueError, 'mask must have the tree structure of params'),
    (lambda p: partial.merge_trainable(p, p), ValueError, r"params\['body'\]\['b'\] is held by both trees"),
    (lambda p: partial.merge_trainable(p, {'body': 1}), ValueError, 'do not have one structure'),
])
def test_bad_masks_and_trees_are_named(call, error, match):
  with pytest.raises(error, match=match):
    call(_params())


# ---------------------------------------------------------------------------------------------
# Llama: the top blocks as their own stack.

TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 6)), jnp.int32)


@functools.cache
def _llama_params(tie_embeddings):
  model = Llama(LlamaConfig.tiny(vocab_size=64, num_layers=3, dim=32, ffn_dim=48, tie_embeddings=tie_embeddings))
  return model, jax.jit(model.init)(jax.random.key(0), TOKENS)['params']


def _llama(tie_embeddings=True):
  model, params = _llama_params(tie_embeddings)
  return model, jax.tree.map(jnp.copy, params)


@pytest.mark.parametrize('top', [1, pytest.param(3, marks=pytest.mark.slow)])
def test_the_split_llama_is_the_same_model(top):
  model, params = _llama()
  split = split_layers(params, top)
  assert ('layers' in split) == (top < 3) and split['top_layers']['mlp']['up']['kernel'].shape[0] == top
  logits = jax.jit(Llama(model.config, top_layers=top).apply)({'params': split}, TOKENS)
  np.testing.assert_allclose(logits, jax.jit(model.apply)({'params': params}, TOKENS), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(join_layers(split), params)
  numpy_params = jax.tree.map(np.asarray, params)
  assert np.shares_memory(split_layers(numpy_params, top)['top_layers']['mlp']['up']['kernel'], numpy_params['layers']['mlp']['up']['kernel'])


@pytest.mark.parametrize('tie', [True, False])
def test_train_top_layers_selects_the_top_blocks_the_norm_and_an_untied_head(tie):
  model, params = _llama(tie)
  split_model, split, mask = train_top_layers(model, params, 2)
  assert split_model.top_layers == 2
  selected = {partial.path_string(path).split('/')[0] for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0] if flag}
  assert selected == {'top_layers', 'norm'} | (set() if tie else {'lm_head'})
  with_embedding = train_top_layers(model, params, 2, embedding=True)[2]
  assert with_embedding['embed'] == {'embedding': True}


def test_bad_top_layers_are_named():
  model, params = _llama()
  for bad in (0, 4, -1, 1.5, True):
    with pytest.raises(ValueError, match=r'top_layers must be an integer in \[1, num_layers = 3\]'):
      train_top_layers(model, params, bad)
  with pytest.raises(ValueError, match=r'top_layers must be an integer in \[0, num_layers = 3\]'):
    split_layers(params, 4)
  with pytest.raises(ValueError, match='top_layers must be an integer'):
    Llama(model.config, top_layers=5).init(jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match="one 'layers' stack, no 'top_layers'"):
    split_layers(split_layers(params, 1), 1)


def test_partial_llama_fine_tuning_leaves_the_frozen_blocks_bit_for_bit():
  model, params = _llama()
  model, params, mask = train_top_layers(model, params, 1)
  trainable, frozen = partial.split_trainable(params, mask)
  tx = optax.chain(optax.adam(1e-2), sfa_jax.sfa(p=0.5, beta=0.5, total_steps=4))
  state = tx.init(trainable)

  def loss_fn(p, tokens):
    logits = model.apply({'params': p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grad = partial.trainable_value_and_grad(loss_fn)

  @jax.jit
  def step(trainable, state, frozen, tokens):
    loss, grads = grad(trainable, frozen, tokens)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  losses = []
  for _ in range(4):
    trainable, state, loss = step(trainable, state, frozen, TOKENS)
    losses.append(float(loss))
  after = join_layers(partial.merge_trainable(trainable, frozen))
  before = join_layers(params)
  np.testing.assert_array_equal(after['layers']['mlp']['up']['kernel'][:2], before['layers']['mlp']['up']['kernel'][:2])
  np.testing.assert_array_equal(after['embed']['embedding'], before['embed']['embedding'])
  assert not np.array_equal(after['layers']['mlp']['up']['kernel'][2], before['layers']['mlp']['up']['kernel'][2])
  assert losses[-1] < losses[0] and bool(sfa_jax.find_state(state).averaged)  # step T = 4 averaged


# ---------------------------------------------------------------------------------------------
# Memory: SFA is fine-tuning plus one copy of the trainable params per shard (benchmarks/lm_memory.py).


def _lm_memory():
  spec = importlib.util.spec_from_file_location('lm_memory', ROOT / 'benchmarks' / 'lm_memory.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_partial_sfa_costs_one_copy_of_the_trainable_params_in_the_anchor_dtype():
  """Resident bytes, from shapes (no compilation): float32 and bfloat16 params, anchors of either dtype."""
  lm_memory = _lm_memory()
  lm_memory.MODELS['test'] = LlamaConfig.tiny(vocab_size=64, num_layers=4, dim=64, ffn_dim=128)
  results = lm_memory.run(['test'], devices=1, batch=2, seq=8, top={'test': 1}, compile=False, progress=None)
  assert lm_memory.check(results, tolerance=0.0) == []
  rows = {(row['scope'].split()[0], row['dtype'], row['method']): row for row in results['rows']}
  full, top = rows['full', 'f32', 'sfa'], rows['top', 'f32', 'sfa']
  assert top['resident_extra'] == top['trainable_bytes'] + 18  # the anchor and SFA's scalars
  assert full['resident_extra'] == full['trainable_bytes'] + 18 > 3 * top['resident_extra']
  assert rows['top', 'bf16', 'sfa']['resident_extra'] == rows['top', 'bf16', 'sfa']['trainable_bytes'] + 18
  wide = rows['top', 'bf16', 'sfa, anchor float32']
  assert wide['resident_extra'] == 2 * wide['trainable_bytes'] + 18  # a float32 anchor of bfloat16 params
  assert rows['top', 'f32', 'finetune']['opt_state_bytes'] == 2 * top['trainable_bytes'] + 4  # Adam: 2 moments, a count


@pytest.mark.slow  # a fresh Python on 8 simulated devices: about 7 s
def test_the_benchmark_checks_the_claim_on_8_shards():
  """The script itself, on 8 simulated devices (its own process: JAX fixes the device count at start-up)."""
  code = (
      'import sys; sys.argv = ["lm_memory"]; sys.path.insert(0, "benchmarks"); import lm_memory, json, jax.numpy as jnp\n'
      'from sfa_jax.models.llama import LlamaConfig\n'
      'lm_memory.MODELS["test"] = LlamaConfig.tiny(vocab_size=64, num_layers=4, dim=64, ffn_dim=128)\n'
      'r = lm_memory.run(["test"], devices=8, batch=8, seq=8, top={"test": 1}, scopes=("partial",),'
      ' settings=lm_memory.SETTINGS[:2], progress=None)\n'
      'print(json.dumps({"failures": lm_memory.check(r, 0.01), "rows": r["rows"]}))\n'
  )
  env = os.environ | {'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['failures'] == []
  sfa_row = report['rows'][1]
  whole = 4 * sfa_row['trainable_params']  # float32 bytes of the trainable params
  assert sfa_row['trainable_bytes'] < whole / 4  # one shard: an eighth of each large leaf (small ones replicated)
  assert sfa_row['resident_extra'] == sfa_row['anchor_copy_bytes'] + 18


# ---------------------------------------------------------------------------------------------
# The package's layers (the README's and the docs' examples: tests/test_docs_examples.py).


def test_the_partial_names_load_no_flax():
  script = ('import sys, json, sfa_jax\n'
            'for name in ["split_trainable", "merge_trainable", "path_mask", "train_only", "trainable_value_and_grad"]:\n'
            '  getattr(sfa_jax, name)\n'
            'print(json.dumps(sorted(sys.modules)))')
  loaded = json.loads(subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True).stdout)
  assert 'sfa_jax.partial' in loaded and 'flax' not in {name.split('.')[0] for name in loaded}
