"""Reads and writes Llama checkpoints in the Hugging Face layout (``config.json`` + safetensors).

A Hugging Face model directory (what ``LlamaForCausalLM.save_pretrained`` writes, and what the Hub
serves) holds:

* ``config.json``: the shape (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
  ``num_key_value_heads``, ``num_hidden_layers``, ``rms_norm_eps``, ``rope_theta``,
  ``vocab_size``, ``tie_word_embeddings``, ``max_position_embeddings``);
* the weights, as one ``model.safetensors`` or as shards ``model-00001-of-0000N.safetensors``
  listed by ``model.safetensors.index.json`` (``{"weight_map": {tensor name: file}}``).

Layout conversions, Hugging Face → :class:`~sfa_jax.models.llama.Llama`:

* linear weights (``*_proj.weight``, ``lm_head.weight``) are stored ``(out, in)`` as in
  ``torch.nn.Linear``; Flax ``Dense`` kernels are ``(in, out)``: transposed;
* the query and key rows are kept as they are: Hugging Face's rotary embedding rotates halves
  ``(i, i + head_dim/2)`` as :class:`~sfa_jax.models.llama.Llama` does. (A GGUF file stores them
  permuted for llama.cpp's adjacent-pair rotation; :mod:`sfa_jax.models.gguf_loader` undoes that
  on load, so a GGUF model saved here is a correct Hugging Face checkpoint.)
* the blocks' tensors ``model.layers.{i}.*`` are stacked on a leading layer axis (``nn.scan``);
* ``lm_head.weight`` is present only when ``tie_word_embeddings`` is false; it becomes
  ``lm_head/kernel`` and the config's ``tie_embeddings`` is false.

Only plain Llama is supported: a config with another architecture, ``rope_scaling`` (Llama 3.1's
``llama3`` scaling, YaRN, ...), a ``sliding_window``, biases, an activation other than SiLU, a
``head_dim`` other than ``hidden_size / num_attention_heads`` or a ``quantization_config`` is
refused with an error naming the field. Tensors are stored as float32, bfloat16 or float16 (what
Hugging Face stores): a file storing another dtype (integers, float64) is refused, naming the file
and the tensor. The ``safetensors`` package reads and writes the files (``pip install safetensors``,
part of the ``lm`` extra); bfloat16 tensors come as ``ml_dtypes`` NumPy arrays. A file cut short or
otherwise unreadable (a shard, ``config.json``, the index) is refused with an error naming it.

Example:
  >>> import tempfile, jax, jax.numpy as jnp
  >>> from sfa_jax.models.llama import Llama, LlamaConfig
  >>> config = LlamaConfig.tiny(vocab_size=100, num_layers=1, tie_embeddings=False)
  >>> tokens = jnp.zeros((1, 4), jnp.int32)
  >>> params = jax.jit(Llama(config).init)(jax.random.key(0), tokens)['params']
  >>> directory = tempfile.mkdtemp()
  >>> save_hf_llama(directory, params, config)  # config.json + model.safetensors
  >>> model, loaded = load_hf_llama(directory)
  >>> jax.jit(model.apply)({'params': loaded}, tokens).shape
  (1, 4, 100)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig

_CONFIG_FILE = 'config.json'
_WEIGHTS_FILE = 'model.safetensors'
_INDEX_FILE = 'model.safetensors.index.json'

# Hugging Face name inside block i (model.layers.{i}.NAME) -> (Flax path under 'layers', is linear).
_BLOCK_TENSORS = {
    'self_attn.q_proj.weight': (('attention', 'query', 'kernel'), True),
    'self_attn.k_proj.weight': (('attention', 'key', 'kernel'), True),
    'self_attn.v_proj.weight': (('attention', 'value', 'kernel'), True),
    'self_attn.o_proj.weight': (('attention', 'out', 'kernel'), True),
    'mlp.gate_proj.weight': (('mlp', 'gate', 'kernel'), True),
    'mlp.up_proj.weight': (('mlp', 'up', 'kernel'), True),
    'mlp.down_proj.weight': (('mlp', 'down', 'kernel'), True),
    'input_layernorm.weight': (('attention_norm', 'scale'), False),
    'post_attention_layernorm.weight': (('mlp_norm', 'scale'), False),
}
# Hugging Face name outside the blocks -> (Flax path, is linear).
_TOP_TENSORS = {
    'model.embed_tokens.weight': (('embed', 'embedding'), False),
    'model.norm.weight': (('norm', 'scale'), False),
    'lm_head.weight': (('lm_head', 'kernel'), True),
}
# Buffers some older checkpoints store; they are recomputed, never read.
_IGNORED = re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq')
# safetensors' dtype codes of the dtypes a checkpoint may store -> their NumPy dtype.
_STORED_DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16)}
_STORED_NAMES = 'float32, bfloat16 or float16'
# The dtypes load_hf_llama may convert the params to.
_LOAD_DTYPES = (*_STORED_DTYPES.values(), np.dtype(np.float64))
_SIZE_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
               'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def _safetensors():
  try:
    import safetensors.numpy  # noqa: PLC0415 (optional dependency)
  except ImportError as error:
    raise ImportError("Hugging Face checkpoints need the PyPI package safetensors: pip install 'sfa-jax[lm]'") from error
  return safetensors


def _read_json(path: str) -> dict[str, Any]:
  """The JSON object in the file ``path``.

  Raises:
    ValueError: naming the file, if it is not a JSON object (cut short, damaged, or another value).
  """
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
    raise ValueError(f'{path} is not valid JSON (cut short or damaged?): {error}.') from error
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not an object.')
  return value


@contextlib.contextmanager
def _open_safetensors(path: str) -> Iterator[Any]:
  """``safetensors.safe_open(path)`` for NumPy, its errors naming the file.

  Raises:
    ValueError: naming the file, if it is not a readable safetensors file (e.g. cut short).
  """
  safetensors = _safetensors()
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      yield f
  except safetensors.SafetensorError as error:
    raise ValueError(f'{path} is not a readable safetensors file (cut short or damaged?): {error}.') from error


def _dtype_among(dtype: Any, allowed: tuple[np.dtype, ...], argument: str) -> np.dtype:
  """``np.dtype(dtype)``, if it is one of ``allowed``.

  Raises:
    ValueError: naming ``argument`` and the allowed dtypes otherwise.
  """
  try:
    result = np.dtype(dtype)
  except TypeError:
    result = np.dtype(object)  # not a dtype: refused below
  if not any(result == d for d in allowed):
    raise ValueError(f'{argument} must be one of {", ".join(d.name for d in allowed)} (or None); got {dtype!r}.')
  return result


# ----------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
  """The :class:`LlamaConfig` of a Hugging Face ``config.json`` (as a dict).

  Args:
    hf_config: the parsed ``config.json`` of a ``LlamaForCausalLM``.

  Returns:
    The config.

  Raises:
    ValueError: naming the field, if a required field is missing or the config uses a feature
      :class:`~sfa_jax.models.llama.Llama` does not implement (another architecture,
      ``rope_scaling``, ``sliding_window``, biases, another activation, another ``head_dim``,
      quantization).

  Example:
    >>> config = config_from_hf({'architectures': ['LlamaForCausalLM'], 'hidden_size': 64,
    ...     'intermediate_size': 128, 'num_attention_heads': 4, 'num_key_value_heads': 2,
    ...     'num_hidden_layers': 2, 'vocab_size': 100, 'tie_word_embeddings': True})
    >>> config.num_kv_heads, config.rope_base, config.tie_embeddings
    (2, 10000.0, True)
  """
  c = dict(hf_config)

  def refuse(field: str, why: str):
    raise ValueError(f'config.json: {field} = {c.get(field)!r}: {why}; only plain LlamaForCausalLM is supported.')

  architectures = c.get('architectures')
  if architectures is not None and list(architectures) != ['LlamaForCausalLM']:
    refuse('architectures', 'not LlamaForCausalLM')
  if c.get('model_type', 'llama') != 'llama':
    refuse('model_type', "not 'llama'")
  rope_theta = c.get('rope_theta', 10000.0)
  for field in ('rope_scaling', 'rope_parameters'):  # rope_parameters: transformers >= 5
    rope = c.get(field)
    if rope is None:
      continue
    if not isinstance(rope, Mapping) or rope.get('rope_type', rope.get('type', 'default')) != 'default':
      refuse(field, 'rotary scaling is not implemented')
    rope_theta = rope.get('rope_theta', rope_theta)
  if c.get('sliding_window') is not None:
    refuse('sliding_window', 'sliding-window attention is not implemented')
  for field in ('attention_bias', 'mlp_bias'):
    if c.get(field, False):
      refuse(field, 'biases are not implemented')
  if c.get('hidden_act', 'silu') != 'silu':
    refuse('hidden_act', "only 'silu' is implemented")
  if c.get('quantization_config') is not None:
    refuse('quantization_config', 'quantized checkpoints are not supported')
  required = ('hidden_size', 'intermediate_size', 'num_attention_heads', 'num_hidden_layers', 'vocab_size')
  missing = [field for field in required if c.get(field) is None]
  if missing:
    raise ValueError(f'config.json lacks {", ".join(missing)}.')
  num_heads = int(c['num_attention_heads'])
  head_dim = c.get('head_dim')
  if head_dim is not None and int(head_dim) * num_heads != int(c['hidden_size']):
    refuse('head_dim', f'not hidden_size / num_attention_heads = {c["hidden_size"]} / {num_heads}')
  kv_heads = c.get('num_key_value_heads')
  max_length = c.get('max_position_embeddings')
  return LlamaConfig(
      vocab_size=int(c['vocab_size']),
      dim=int(c['hidden_size']),
      num_layers=int(c['num_hidden_layers']),
      num_heads=num_heads,
      num_kv_heads=num_heads if kv_heads is None else int(kv_heads),
      ffn_dim=int(c['intermediate_size']),
      rope_base=float(rope_theta),
      norm_eps=float(c.get('rms_norm_eps', 1e-6)),  # transformers' LlamaConfig defaults
      tie_embeddings=bool(c.get('tie_word_embeddings', False)),
      max_length=None if max_length is None else int(max_length),
  )


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` (as a dict) of a :class:`LlamaConfig`.

  Args:
    config: the model's shape.

  Returns:
    A ``LlamaForCausalLM`` config; :func:`config_from_hf` maps it back to ``config`` (``remat``
    aside, which is not part of a checkpoint). ``max_position_embeddings`` is written only when
    ``config.max_length`` is set (transformers then assumes 2048).

  Example:
    >>> config_to_hf(LlamaConfig())['num_key_value_heads']
    3
  """
  hf = {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'hidden_size': config.dim,
      'intermediate_size': config.ffn_dim,
      'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads,
      'num_hidden_layers': config.num_layers,
      'head_dim': config.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_base,
      'rope_scaling': None,
      'attention_bias': False,
      'mlp_bias': False,
      'vocab_size': config.vocab_size,
      'tie_word_embeddings': config.tie_embeddings,
  }
  if config.max_length is not None:
    hf['max_position_embeddings'] = config.max_length
  return hf


# ----------------------------------------------------------------------------------------------
# tensor names and shapes


def _hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every Hugging Face tensor name of the model -> its shape, in Hugging Face's order."""
  d, f, q, kv = config.dim, config.ffn_dim, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  block = {
      'self_attn.q_proj.weight': (q, d), 'self_attn.k_proj.weight': (kv, d), 'self_attn.v_proj.weight': (kv, d),
      'self_attn.o_proj.weight': (d, q), 'mlp.gate_proj.weight': (f, d), 'mlp.up_proj.weight': (f, d),
      'mlp.down_proj.weight': (d, f), 'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
  }
  shapes = {'model.embed_tokens.weight': (config.vocab_size, d)}
  for i in range(config.num_layers):
    shapes |= {f'model.layers.{i}.{name}': shape for name, shape in block.items()}
  shapes['model.norm.weight'] = (d,)
  if not config.tie_embeddings:
    shapes['lm_head.weight'] = (config.vocab_size, d)
  return shapes


def _flax_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every Flax param path of ``Llama(config)`` -> its shape."""
  hf = _hf_shapes(config)
  shapes = {}
  for name, (path, linear) in _BLOCK_TENSORS.items():
    shape = hf[f'model.layers.0.{name}']
    shapes[('layers', *path)] = (config.num_layers, *(shape[::-1] if linear else shape))
  for name, (path, linear) in _TOP_TENSORS.items():
    if name in hf:
      shapes[path] = hf[name][::-1] if linear else hf[name]
  return shapes


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise KeyError(key)
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  if not isinstance(tree, Mapping):
    return [prefix]
  return [path for key, value in tree.items() for path in _leaf_paths(value, (*prefix, str(key)))]


# ----------------------------------------------------------------------------------------------
# loading


def _weight_files(directory: str) -> dict[str, str]:
  """``{tensor name: safetensors file}`` of a directory (one file, or shards with their index)."""
  single, index = os.path.join(directory, _WEIGHTS_FILE), os.path.join(directory, _INDEX_FILE)
  if os.path.isfile(single):  # transformers' own order of preference
    with _open_safetensors(single) as f:
      return dict.fromkeys(f.keys(), single)
  if os.path.isfile(index):
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, Mapping):
      raise ValueError(f'{index} has no "weight_map".')
    files = {}
    for name, file in weight_map.items():
      path = os.path.join(directory, file)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{index} puts {name} in {file}, which is missing from {directory}.')
      files[name] = path
    return files
  others = sorted(n for n in os.listdir(directory) if n.endswith(('.bin', '.pt', '.pth', '.safetensors', '.gguf')))
  raise FileNotFoundError(f'{directory} has neither {_WEIGHTS_FILE} nor {_INDEX_FILE}'
                          + (f' (it has {others}: only safetensors checkpoints are read).' if others else '.'))


def _check_stored(path: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
  """Checks, from a safetensors file's header alone, the tensors it is to hold.

  Args:
    path: the safetensors file.
    shapes: ``{tensor name: the shape the config needs}`` of the tensors read from it.

  Raises:
    ValueError: naming the file and the tensor, for a tensor the file lacks, stores with another
      shape, or stores in a dtype other than float32, bfloat16 or float16 (integers of a quantized
      export, float64); naming the file, if it is unreadable (e.g. cut short).
  """
  with _open_safetensors(path) as f:
    stored = set(f.keys())
    for name, shape in shapes.items():
      if name not in stored:
        raise ValueError(f'tensor {name} is not in {path}, the file {_INDEX_FILE} puts it in.')
      header = f.get_slice(name)
      if header.get_dtype() not in _STORED_DTYPES:
        raise ValueError(f'tensor {name} in {path} is stored as {header.get_dtype()}; '
                         f'a checkpoint stores {_STORED_NAMES} (F32, BF16 or F16).')
      if tuple(header.get_shape()) != shape:
        raise ValueError(f'tensor {name} in {path} has shape {tuple(header.get_shape())}; config.json needs {shape}.')


def load_hf_llama(directory: str | os.PathLike, *, dtype: Any = np.float32) -> tuple[Llama, dict[str, Any]]:
  """A Llama model and its params from a Hugging Face model directory.

  Args:
    directory: holds ``config.json`` of a ``LlamaForCausalLM`` and ``model.safetensors`` or the
      shards listed by ``model.safetensors.index.json`` (a local snapshot of a Hub repository, or a
      directory :func:`save_hf_llama` wrote).
    dtype: the params' dtype: float32 (default; bfloat16 and float16 checkpoints convert
      exactly), bfloat16, float16 or float64, or None to keep each tensor's stored dtype (bfloat16
      as an ``ml_dtypes`` array).

  Returns:
    ``(model, params)``: a :class:`~sfa_jax.models.llama.Llama` of the directory's shape (its
    ``config`` is the :class:`LlamaConfig`) and its params as NumPy arrays, so that
    ``model.apply({'params': params}, tokens)`` gives float32 logits ``(batch, length, vocab)``.

  Raises:
    FileNotFoundError: if ``config.json`` or the weights are missing.
    ValueError: for another ``dtype``; a file that cannot be read (``config.json``, the index or a
      safetensors file cut short or damaged: naming the file); an unsupported config (naming the
      field; see :func:`config_from_hf`); a missing, unexpected or mis-shaped tensor, or one stored
      in a dtype other than float32, bfloat16 or float16 (naming the tensor and its file). Every
      file's header is checked before any tensor is read.
    ImportError: if ``safetensors`` is not installed.

  Example:
    >>> model, params = load_hf_llama('SmolLM2-135M')  # doctest: +SKIP
    >>> logits = model.apply({'params': params}, tokens)  # doctest: +SKIP
  """
  dtype = None if dtype is None else _dtype_among(dtype, _LOAD_DTYPES, 'dtype')
  directory = os.fspath(directory)
  config_path = os.path.join(directory, _CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'no {_CONFIG_FILE} in {directory!r}.')
  config = config_from_hf(_read_json(config_path))
  files = _weight_files(directory)
  expected = _hf_shapes(config)
  missing = [name for name in expected if name not in files]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise ValueError(f'tensor {missing[0]}{more} is missing from {directory} (config.json needs shape {expected[missing[0]]}).')
  extra = sorted(n for n in files if n not in expected and not _IGNORED.fullmatch(n) and n != 'lm_head.weight')
  if extra:
    raise ValueError(f'{directory} has tensors the Llama config does not use: {extra[:5]}.')
  if config.tie_embeddings and 'lm_head.weight' in files:  # read to check that it is the embedding
    expected = expected | {'lm_head.weight': expected['model.embed_tokens.weight']}

  by_file: dict[str, list[str]] = {}
  for name in expected:
    by_file.setdefault(files[name], []).append(name)
  for path, names in by_file.items():
    _check_stored(path, {name: expected[name] for name in names})
  tensors = {}
  for path, names in by_file.items():
    with _open_safetensors(path) as f:
      for name in names:
        value = f.get_tensor(name)
        tensors[name] = value if dtype is None else value.astype(dtype, copy=False)
  if config.tie_embeddings and 'lm_head.weight' in tensors:
    head = tensors.pop('lm_head.weight')
    if not np.array_equal(head.astype(np.float32), tensors['model.embed_tokens.weight'].astype(np.float32)):
      raise ValueError('tie_word_embeddings is true but tensor lm_head.weight differs from model.embed_tokens.weight.')

  params: dict[str, Any] = {}
  for name, (path, linear) in _TOP_TENSORS.items():
    if name in tensors:
      _set(params, path, np.ascontiguousarray(tensors.pop(name).T) if linear else tensors.pop(name))
  for name, (path, linear) in _BLOCK_TENSORS.items():
    per_layer = [tensors.pop(f'model.layers.{i}.{name}') for i in range(config.num_layers)]
    _set(params, ('layers', *path), np.stack([w.T for w in per_layer] if linear else per_layer))
  return Llama(config), params


# ----------------------------------------------------------------------------------------------
# saving


def _parse_size(size: int | str) -> int:
  if isinstance(size, str):
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*', size.upper())
    if not match:
      raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 2GiB.")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ''])
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f'max_shard_size must be a positive number of bytes; got {size!r}.')
  return int(size)


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  """Writes ``value`` to the file ``path`` as indented JSON."""
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def _write_files(directory: str, writers: Mapping[str, Callable[[str], None]]) -> None:
  """Writes files of ``directory`` so that none is ever left half-written.

  Every file is first written whole to a new hidden file of the directory and flushed to disk;
  then each is renamed over its name, which replaces the old file at once. An error or a crash
  before leaves the old files as they were (and the new ones are removed on an error).

  Args:
    directory: an existing directory.
    writers: ``{file name: a function writing the file's content to the path it is given}``, in
      the order the files are put in place.
  """
  staged: dict[str, str] = {}
  try:
    for name, write in writers.items():
      staged[name] = os.path.join(directory, f'.{name}.{uuid.uuid4().hex}.tmp')
      write(staged[name])
      with open(staged[name], 'rb') as f:
        os.fsync(f.fileno())
    for name, path in staged.items():
      os.replace(path, os.path.join(directory, name))
  finally:
    for path in staged.values():  # those not renamed, after an error
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def save_hf_llama(directory: str | os.PathLike, params: Mapping[str, Any], config: LlamaConfig | Mapping[str, Any], *,
                  max_shard_size: int | str | None = None, dtype: Any = None) -> None:
  """Writes Llama params as a Hugging Face model directory (``config.json`` + safetensors).

  The directory loads back with :func:`load_hf_llama`, and in Hugging Face ``transformers`` with
  ``LlamaForCausalLM.from_pretrained(directory)`` (no tokenizer files are written: copy them from
  the model you started from).

  Args:
    directory: created if needed. Weight files of an earlier save there (``model.safetensors``,
      ``model-*-of-*.safetensors``, the index) are replaced, as ``save_pretrained`` does.
    params: the :class:`~sfa_jax.models.llama.Llama` params (or ``{'params': params}``), NumPy or
      JAX arrays (fully addressable: gather a multi-process sharded tree first).
    config: the :class:`LlamaConfig` of the params, or a Hugging Face config dict (e.g. the
      original ``config.json``, to keep its other fields such as ``bos_token_id``); it is checked
      like :func:`load_hf_llama` checks one.
    max_shard_size: bytes per file (an int, or a string like ``'5GB'``, ``'500MB'``, ``'2GiB'``);
      when the tensors exceed it they are split into ``model-0000i-of-0000N.safetensors`` with
      ``model.safetensors.index.json``, in order, a tensor never split (one larger than the limit
      gets a file to itself). Default: one ``model.safetensors``.
    dtype: the stored dtype, one of those Hugging Face stores: float32, bfloat16 or float16 (e.g.
      ``'bfloat16'``, ``jnp.bfloat16``, ``np.float16``); or None (default) to store each param as
      it is, which must then be one of them.

  Each file is written to a new file in ``directory`` and renamed into place once every one is
  written: an error or a crash while writing leaves the directory's earlier model as it was.

  Raises:
    ValueError: before anything is written: for another ``dtype``, or (``dtype=None``) a param of
      another dtype; a param missing or mis-shaped for the config (naming it); an unsupported
      config (naming the field).
    ImportError: if ``safetensors`` is not installed.

  Example:
    >>> model, params = load_hf_llama('SmolLM2-135M')  # doctest: +SKIP
    >>> save_hf_llama('finetuned', params, model.config, max_shard_size='100MB')  # doctest: +SKIP
  """
  safetensors = _safetensors()
  dtype = None if dtype is None else _dtype_among(dtype, tuple(_STORED_DTYPES.values()), 'dtype')
  if isinstance(config, LlamaConfig):
    hf_config, config = config_to_hf(config), config
  elif isinstance(config, Mapping):
    hf_config, config = dict(config), config_from_hf(config)
  else:
    raise TypeError(f'config must be a LlamaConfig or a Hugging Face config dict; got {type(config).__name__}.')
  if set(params) == {'params'}:
    params = params['params']
  limit = None if max_shard_size is None else _parse_size(max_shard_size)

  expected = _flax_shapes(config)
  unexpected = sorted('/'.join(p) for p in _leaf_paths(params) if p not in expected)
  if unexpected:
    raise ValueError(f'params {unexpected[:5]} are not part of a Llama with this config '
                     f'(tie_embeddings={config.tie_embeddings}).')

  def param(path):
    try:
      value = np.asarray(_get(params, path))
    except KeyError:
      raise ValueError(f'param {"/".join(path)} is missing (the config needs shape {expected[path]}).') from None
    if value.shape != expected[path]:
      raise ValueError(f'param {"/".join(path)} has shape {value.shape}; the config needs {expected[path]}.')
    if dtype is None and value.dtype not in _STORED_DTYPES.values():
      raise ValueError(f'param {"/".join(path)} is {value.dtype}; a checkpoint stores {_STORED_NAMES}: '
                       f"pass dtype='float32' (or another of them) to convert it.")
    return value if dtype is None else value.astype(dtype, copy=False)

  layers = {name: param(('layers', *path)) for name, (path, _) in _BLOCK_TENSORS.items()}
  tensors: dict[str, np.ndarray] = {}
  for name in _hf_shapes(config):  # Hugging Face's order, which the shards follow
    if name in _TOP_TENSORS:
      path, linear = _TOP_TENSORS[name]
      value = param(path)
    else:
      i, short = re.fullmatch(r'model\.layers\.(\d+)\.(.+)', name).groups()
      value, linear = layers[short][int(i)], _BLOCK_TENSORS[short][1]
    tensors[name] = np.ascontiguousarray(value.T if linear else value)

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if limit is not None and shards[-1] and size + value.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  names = ([_WEIGHTS_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])

  stored = {str(v.dtype) for v in tensors.values()}
  hf_config['torch_dtype'] = stored.pop() if len(stored) == 1 else 'float32'
  if 'dtype' in hf_config:  # transformers >= 5 names it so
    hf_config['dtype'] = hf_config['torch_dtype']
  writers = {name: (lambda path, shard=shard: safetensors.numpy.save_file(shard, path, metadata={'format': 'pt'}))
             for name, shard in zip(names, shards)}
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(v.nbytes for v in tensors.values())},
             'weight_map': {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    writers[_INDEX_FILE] = lambda path: _write_json(path, index)
  writers[_CONFIG_FILE] = lambda path: _write_json(path, hf_config)

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  _write_files(directory, writers)
  stale = re.compile(r'model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?')
  for existing in os.listdir(directory):
    if stale.fullmatch(existing) and existing not in writers:
      os.remove(os.path.join(directory, existing))
