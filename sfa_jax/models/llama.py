"""A Llama decoder in Flax Linen: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

The architecture of Llama 2/3 and SmolLM2 (Touvron et al, 2023): pre-norm residual blocks
``x + attention(rms_norm(x))`` and ``x + mlp(rms_norm(x))``, no biases, a final RMSNorm and (here)
an output layer tied to the token embedding (or, with ``tie_embeddings=False``, its own). The blocks are stacked with ``nn.scan``: every block
parameter has a leading axis of size ``num_layers``, and the model compiles as fast with 30 layers
as with one.

Rotary embeddings use the *rotate-half* convention of Hugging Face ``transformers``: the head
dimension is split in two halves, and entry ``i`` is rotated with entry ``i + head_dim / 2`` by the
angle ``position · rope_base^(-2i / head_dim)``. llama.cpp (and so a GGUF file) stores the query and
key weights permuted so that the rotated pairs are *adjacent* entries ``(2i, 2i + 1)`` instead;
:mod:`sfa_jax.models.gguf_loader` undoes that permutation when it loads a file.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from sfa_jax.models.llama import Llama, LlamaConfig
  >>> config = LlamaConfig.tiny(vocab_size=300)
  >>> model = Llama(config)
  >>> tokens = jnp.zeros((2, 8), jnp.int32)
  >>> params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  >>> jax.jit(model.apply)({'params': params}, tokens).shape
  (2, 8, 300)

References:
  Touvron et al, `Llama 2: Open Foundation and Fine-Tuned Chat Models
  <https://arxiv.org/abs/2307.09288>`_, 2023.
  Su et al, `RoFormer: Enhanced Transformer with Rotary Position Embedding
  <https://arxiv.org/abs/2104.09864>`_, 2021.
  Allal et al, `SmolLM2: When Smol Goes Big <https://arxiv.org/abs/2502.02737>`_, 2025.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import _validation

__all__ = ['LlamaConfig', 'Llama', 'split_layers', 'join_layers', 'train_top_layers']


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The shape of a Llama model. The defaults are SmolLM2-135M's.

  Attributes:
    vocab_size: number of tokens.
    dim: width of the residual stream.
    num_layers: number of decoder blocks.
    num_heads: query heads per block.
    num_kv_heads: key/value heads per block (grouped-query attention; divides ``num_heads``).
    ffn_dim: hidden width of the SwiGLU MLP.
    rope_base: base of the rotary angles.
    norm_eps: the epsilon of every RMSNorm.
    remat: recompute each block in the backward pass instead of storing its activations.
    tie_embeddings: the output layer is the token embedding (SmolLM2, Llama 3.2 1B/3B); if false,
      the model has its own ``lm_head/kernel`` of shape ``(dim, vocab_size)`` (Llama 2, Llama 3 8B).
    max_length: the longest context the checkpoint was trained for (Hugging Face's
      ``max_position_embeddings``), or None if unknown. Informational: the model does not enforce it.
  """

  vocab_size: int = 49152
  dim: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  ffn_dim: int = 1536
  rope_base: float = 1e5
  norm_eps: float = 1e-5
  remat: bool = False
  tie_embeddings: bool = True
  max_length: int | None = None

  def __post_init__(self):
    for name in ('vocab_size', 'dim', 'num_layers', 'num_heads', 'num_kv_heads', 'ffn_dim'):
      _validation.check_int(name, getattr(self, name))
    if self.max_length is not None:
      _validation.check_int('max_length', self.max_length)
    if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
      raise ValueError(f'dim ({self.dim}) must split into num_heads ({self.num_heads}) heads of even width.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads}).')
    if not self.rope_base > 1.0:
      raise ValueError(f'rope_base must be > 1; got {self.rope_base}.')
    if not self.norm_eps > 0.0:
      raise ValueError(f'norm_eps must be > 0; got {self.norm_eps}.')

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.dim // self.num_heads

  @classmethod
  def tiny(cls, vocab_size: int = 260, **overrides) -> 'LlamaConfig':
    """A small model of the same architecture (2 layers, width 64, 4 query / 2 key-value heads).

    Args:
      vocab_size: number of tokens (260 fits :class:`sfa_jax.models.tokenizer.ByteTokenizer`).
      **overrides: any other attribute.

    Returns:
      The config.

    Example:
      >>> LlamaConfig.tiny().num_layers
      2
    """
    values = dict(vocab_size=vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, rope_base=1e4)
    return cls(**(values | overrides))


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x²) + eps) · scale``, over the last axis, computed in float32."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale).astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotates ``x`` of shape ``(..., length, heads, head_dim)`` by its positions (rotate-half).

  Entries ``i`` and ``i + head_dim/2`` form a pair rotated by ``positions · base^(-2i/head_dim)``.

  Args:
    x: queries or keys.
    positions: int array of shape ``(length,)`` or ``(batch, length)``.
    base: the rotary base (``rope_base``).

  Returns:
    The rotated array, same shape and dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 1, 4))
    >>> out = rotary_embedding(x, jnp.arange(3), 1e4)
    >>> bool(jnp.allclose(out[0, 0], x[0, 0])), bool(jnp.allclose(jnp.linalg.norm(out, axis=-1), 2.0))
    (True, True)
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., length, half)
  cos = jnp.cos(angles)[..., None, :]  # broadcast over heads
  sin = jnp.sin(angles)[..., None, :]
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary positions."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    dense = lambda features, name: nn.Dense(features, use_bias=False, name=name)
    q = dense(c.num_heads * c.head_dim, 'query')(x).reshape(batch, length, c.num_heads, c.head_dim)
    k = dense(c.num_kv_heads * c.head_dim, 'key')(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = dense(c.num_kv_heads * c.head_dim, 'value')(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
    q = rotary_embedding(q, positions, c.rope_base)
    k = rotary_embedding(k, positions, c.rope_base)
    # Grouped-query attention: query head h reads key/value head h // (num_heads / num_kv_heads).
    q = q.reshape(batch, length, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim)
    scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k) / jnp.sqrt(jnp.float32(c.head_dim)).astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum('bkgqs,bskd->bqkgd', weights, v).reshape(batch, length, c.num_heads * c.head_dim)
    return dense(c.dim, 'out')(out)


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = nn.Dense(c.ffn_dim, use_bias=False, name='gate')(x)
    up = nn.Dense(c.ffn_dim, use_bias=False, name='up')(x)
    return nn.Dense(c.dim, use_bias=False, name='down')(nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm decoder block; ``nn.scan`` carries ``x`` through the stack."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array):
    c = self.config
    x = x + Attention(c, name='attention')(RMSNorm(c.norm_eps, name='attention_norm')(x), positions)
    x = x + MLP(c, name='mlp')(RMSNorm(c.norm_eps, name='mlp_norm')(x))
    return x, None


class Llama(nn.Module):
  """A Llama causal language model, its output layer tied to the token embedding by default.

  Params: ``embed/embedding`` ``(vocab, dim)``; ``layers/...`` the blocks, each leaf with a leading
  layer axis (``attention/{query,key,value,out}/kernel``, ``mlp/{gate,up,down}/kernel`` as
  ``(in, out)`` matrices, ``attention_norm/scale``, ``mlp_norm/scale``); ``norm/scale``; and, only
  when ``config.tie_embeddings`` is false, ``lm_head/kernel`` ``(dim, vocab)``.

  With ``top_layers = n > 0`` the last ``n`` blocks are a second stack of their own,
  ``top_layers/...`` (leading axis ``n``), and ``layers/...`` holds the first ``num_layers - n`` (no
  ``layers`` at all when ``n = num_layers``): the same model, its params laid out so that the top
  blocks can be trained and anchored alone (:func:`train_top_layers`; :func:`split_layers` and
  :func:`join_layers` convert the params).

  Attributes:
    config: the model's shape.
    top_layers: how many of the last blocks form the ``top_layers`` stack, in [0, num_layers].
  """

  config: LlamaConfig
  top_layers: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Next-token logits of shape ``(batch, length, vocab_size)``, in float32.

    Args:
      tokens: int array of shape ``(batch, length)``.
      positions: the tokens' positions, ``(length,)`` or ``(batch, length)``; default
        ``0..length-1``. Attention is causal over the sequence axis whatever the positions.

    Returns:
      The logits.
    """
    c = self.config
    _check_top_layers(self.top_layers, c.num_layers)
    if positions is None:
      positions = jnp.arange(tokens.shape[1])
    embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(0.02), name='embed')
    x = embed(tokens)
    block = nn.remat(Block) if c.remat else Block

    def stack(length: int, name: str) -> nn.Module:
      scan = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=nn.broadcast, length=length)
      return scan(c, name=name)

    bottom = c.num_layers - self.top_layers
    if bottom:
      x, _ = stack(bottom, 'layers')(x, positions)
    if self.top_layers:
      x, _ = stack(self.top_layers, 'top_layers')(x, positions)
    x = RMSNorm(c.norm_eps, name='norm')(x)
    if c.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(c.vocab_size, use_bias=False, name='lm_head')(x).astype(jnp.float32)


def _check_top_layers(top_layers: int, num_layers: int) -> None:
  if isinstance(top_layers, bool) or not isinstance(top_layers, (int, np.integer)) or not 0 <= top_layers <= num_layers:
    raise ValueError(f'top_layers must be an integer in [0, num_layers = {num_layers}]; got {top_layers!r}.')


def _stack_length(stack: Mapping[str, Any], name: str) -> int:
  lengths = {np.shape(leaf)[0] for leaf in jax.tree.leaves(stack)}
  if len(lengths) != 1:
    raise ValueError(f'params[{name!r}] must hold stacked blocks of one length; got leading axes {sorted(lengths)}.')
  return lengths.pop()


def _rows(leaf: Any, start: int, stop: int) -> Any:
  """``leaf[start:stop]``; for a ``jax.ShapeDtypeStruct``, the struct of that slice."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((stop - start,) + leaf.shape[1:], leaf.dtype)
  return leaf[start:stop]


def split_layers(params: Mapping[str, Any], top_layers: int) -> dict[str, Any]:
  """The params of ``Llama(config)`` laid out for ``Llama(config, top_layers=n)``.

  The blocks' stack ``layers`` (leading axis ``num_layers``) is cut in two: ``layers`` keeps the
  first ``num_layers - n`` blocks (and is dropped when that is 0), ``top_layers`` holds the last
  ``n``. Slices of NumPy arrays are views; of JAX arrays, copies; ``jax.ShapeDtypeStruct`` leaves
  (from ``jax.eval_shape``) give the structs of the slices.

  Args:
    params: the params of a :class:`Llama` with one stack (as :func:`~sfa_jax.models.load_hf_llama`
      and ``Llama(config).init`` give them).
    top_layers: ``n``, in [0, num_layers].

  Returns:
    A new dict (the other entries are the same objects).

  Raises:
    ValueError: if ``params`` has no ``layers`` stack or has a ``top_layers`` one already, or
      ``top_layers`` is out of range.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> config = LlamaConfig.tiny(num_layers=3)
    >>> tokens = jnp.zeros((1, 4), jnp.int32)
    >>> params = jax.eval_shape(Llama(config).init, jax.random.key(0), tokens)['params']
    >>> split = split_layers(params, 1)
    >>> up = lambda stack: split[stack]['mlp']['up']['kernel'].shape
    >>> up('layers'), up('top_layers')
    ((2, 64, 128), (1, 64, 128))
  """
  if 'layers' not in params or 'top_layers' in params:
    raise ValueError(f"split_layers needs the params of Llama(config) (one 'layers' stack, no 'top_layers'); "
                     f'got the keys {sorted(params)}.')
  num_layers = _stack_length(params['layers'], 'layers')
  _check_top_layers(top_layers, num_layers)
  bottom = num_layers - top_layers
  new = {key: value for key, value in params.items() if key != 'layers'}
  if bottom:
    new['layers'] = jax.tree.map(lambda leaf: _rows(leaf, 0, bottom), params['layers'])
  if top_layers:
    new['top_layers'] = jax.tree.map(lambda leaf: _rows(leaf, bottom, num_layers), params['layers'])
  return new


def join_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The params of ``Llama(config)`` again: ``layers`` and ``top_layers`` concatenated (inverse of :func:`split_layers`).

  What :func:`~sfa_jax.models.save_hf_llama` and ``Llama(config)`` take. Params without a
  ``top_layers`` stack are returned as a new dict of the same entries.

  Args:
    params: the params of ``Llama(config, top_layers=n)``.

  Returns:
    A new dict.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = Llama(LlamaConfig.tiny(num_layers=3))
    >>> init = jax.jit(model.init)  # compiled: faster than Flax's eager init
    >>> params = init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
    >>> joined = join_layers(split_layers(params, 2))
    >>> up = lambda params: params['layers']['mlp']['up']['kernel']
    >>> bool(jnp.all(up(joined) == up(params)))
    True
  """
  new = {key: value for key, value in params.items() if key not in ('layers', 'top_layers')}
  if 'top_layers' not in params:
    if 'layers' in params:
      new['layers'] = params['layers']
    return new
  if 'layers' not in params:
    new['layers'] = params['top_layers']
    return new

  def concatenate(bottom, top):
    if isinstance(bottom, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((bottom.shape[0] + top.shape[0],) + bottom.shape[1:], bottom.dtype)
    both_numpy = isinstance(bottom, np.ndarray) and isinstance(top, np.ndarray)
    return np.concatenate([bottom, top]) if both_numpy else jnp.concatenate([bottom, top])

  new['layers'] = jax.tree.map(concatenate, params['layers'], params['top_layers'])
  return new


def train_top_layers(model: Llama, params: Mapping[str, Any], top_layers: int, *, embedding: bool = False) -> tuple[Llama, dict[str, Any], dict[str, Any]]:
  """The top blocks of a Llama as the trainable part: ``(model, params, mask)`` for :mod:`sfa_jax.partial`.

  The model and params are relaid with the last ``top_layers`` blocks as their own stack
  (:func:`split_layers`); the mask selects those blocks, the final norm and, when the output layer
  is untied, ``lm_head``. The token embedding (which *is* the output layer when it is tied, as in
  SmolLM2 and Llama 3.2 1B) stays frozen unless ``embedding=True``.

  Args:
    model: a :class:`Llama` with one stack (``top_layers=0``).
    params: its params.
    top_layers: how many of the last blocks train, in [1, num_layers].
    embedding: train the token embedding too.

  Returns:
    ``(Llama(model.config, top_layers=n), the relaid params, mask)``: ``mask`` is a tree of bools
    like the params, for :func:`sfa_jax.partial.split_trainable` or :func:`sfa_jax.partial.train_only`.

  Raises:
    ValueError: if ``model`` is split already or ``top_layers`` is out of range.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = Llama(LlamaConfig.tiny(num_layers=3))
    >>> init = jax.jit(model.init)  # compiled: faster than Flax's eager init
    >>> params = init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
    >>> model, params, mask = train_top_layers(model, params, 1)
    >>> model.top_layers, mask['embed'], mask['norm'], mask['top_layers']['mlp']['up']
    (1, {'embedding': False}, {'scale': True}, {'kernel': True})
  """
  from sfa_jax import partial  # the core; models import it, never the other way

  if model.top_layers:
    raise ValueError(f'train_top_layers needs a Llama with one stack; got top_layers={model.top_layers}.')
  if isinstance(top_layers, bool) or not isinstance(top_layers, (int, np.integer)) or not 1 <= top_layers <= model.config.num_layers:
    raise ValueError(f'top_layers must be an integer in [1, num_layers = {model.config.num_layers}]; got {top_layers!r}.')
  split = split_layers(params, top_layers)
  patterns = ['top_layers', 'norm'] + (['lm_head'] if 'lm_head' in split else []) + (['embed'] if embedding else [])
  return Llama(model.config, top_layers=top_layers), split, partial.path_mask(split, patterns)
