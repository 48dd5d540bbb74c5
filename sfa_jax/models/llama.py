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

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfa_jax import _validation


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
      _validation.check_positive_int(name, getattr(self, name))
    if self.max_length is not None:
      _validation.check_positive_int('max_length', self.max_length)
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

  Attributes:
    config: the model's shape.
  """

  config: LlamaConfig

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
    if positions is None:
      positions = jnp.arange(tokens.shape[1])
    embed = nn.Embed(c.vocab_size, c.dim, embedding_init=nn.initializers.normal(0.02), name='embed')
    x = embed(tokens)
    block = nn.remat(Block) if c.remat else Block
    stack = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=nn.broadcast,
        length=c.num_layers,
    )
    x, _ = stack(c, name='layers')(x, positions)
    x = RMSNorm(c.norm_eps, name='norm')(x)
    if c.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(c.vocab_size, use_bias=False, name='lm_head')(x).astype(jnp.float32)
