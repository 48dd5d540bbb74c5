"""Tokenizers for the language models, in pure Python: byte-level BPE (GPT-2 style) and raw bytes.

:class:`BPETokenizer` is the byte-level BPE of GPT-2, StarCoder and SmolLM2, built from a vocabulary
and a ranked merge list (e.g. those stored in a GGUF file, see
:func:`sfa_jax.models.gguf_loader.load_gguf`). Text is cut into pieces first (SmolLM2's
pre-tokenizer: every digit on its own, then the GPT-2 pattern), each piece's UTF-8 bytes are mapped
to printable characters (GPT-2's ``bytes_to_unicode``) and merged pair by pair, lowest rank first.

The GPT-2 pattern uses the Unicode classes ``\\p{L}`` (letters) and ``\\p{N}`` (numbers), which
Python's ``re`` lacks: here letters are ``[^\\W\\d_]`` and numbers ``\\d`` (decimal digits). The two
agree on ordinary text; they differ on rare characters such as superscript digits or Roman
numerals, which Python counts as alphanumeric non-digits (so as letters here).

:class:`ByteTokenizer` maps each UTF-8 byte to a token (plus a few special tokens): the tokenizer of
the tiny randomly initialised models used by tests and quick runs, which need no file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Protocol

__all__ = ['Tokenizer', 'BPETokenizer', 'ByteTokenizer']

# GPT-2's pre-tokenizer pattern, with \p{L} -> [^\W\d_] and \p{N} -> \d (see the module docstring).
_GPT2_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)
_DIGIT = re.compile(r'\d')


class Tokenizer(Protocol):
  """What the language-model code needs from a tokenizer."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of ``ids``."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters.

  Returns:
    ``{byte: character}``; printable Latin-1 bytes map to themselves, the others to ``chr(256 + n)``.

  Example:
    >>> bytes_to_unicode()[ord(' ')]
    'Ġ'
  """
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  mapping, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      mapping[byte] = chr(byte)
    else:
      mapping[byte] = chr(256 + extra)
      extra += 1
  return mapping


def pre_tokenize(text: str) -> list[str]:
  """SmolLM2's pre-tokenizer: every digit alone, then the GPT-2 pattern on the text between.

  Args:
    text: any string.

  Returns:
    The pieces; they concatenate back to ``text``.

  Example:
    >>> pre_tokenize("It's 42 km")
    ['It', "'s", ' ', '4', '2', ' km']
  """
  pieces: list[str] = []
  start = 0
  for digit in _DIGIT.finditer(text):
    pieces.extend(_GPT2_PATTERN.findall(text[start:digit.start()]))
    pieces.append(digit.group())
    start = digit.end()
  pieces.extend(_GPT2_PATTERN.findall(text[start:]))
  return pieces


class BPETokenizer:
  """Byte-level BPE from a vocabulary and ranked merges (GPT-2 / SmolLM2 style).

  Args:
    tokens: the vocabulary; ``tokens[i]`` is the string of token ``i`` in GPT-2's byte alphabet.
    merges: ranked merges, each ``'left right'`` (rank = position in the list).
    eos_id: id of the end-of-text token (appended between documents).
    special_ids: ids of special tokens (never produced by :meth:`encode`; dropped by
      :meth:`decode`).

  Raises:
    ValueError: if a merge is not two tokens separated by one space, or ``eos_id`` is out of range.

  Example:
    >>> from sfa_jax.models.tokenizer import BPETokenizer, bytes_to_unicode
    >>> alphabet = [bytes_to_unicode()[b] for b in range(256)]
    >>> vocabulary = alphabet + ['ab', 'abc', '<eos>']
    >>> tok = BPETokenizer(vocabulary, ['a b', 'ab c'], eos_id=258, special_ids=[258])
    >>> tok.encode('abcab')
    [257, 256]
    >>> tok.decode([257, 256, 258])
    'abcab'
  """

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], eos_id: int, special_ids: Sequence[int] = ()):
    self.tokens = list(tokens)
    self.vocab_size = len(self.tokens)
    if not 0 <= eos_id < self.vocab_size:
      raise ValueError(f'eos_id must be in [0, {self.vocab_size}); got {eos_id}.')
    self.eos_id = int(eos_id)
    self.special_ids = frozenset(int(i) for i in special_ids)
    self._ids = {token: i for i, token in enumerate(self.tokens) if i not in self.special_ids}
    self._ranks = {}
    for rank, merge in enumerate(merges):
      parts = merge.split(' ')
      if len(parts) != 2:
        raise ValueError(f'merges[{rank}] must be two tokens separated by one space; got {merge!r}.')
      self._ranks[tuple(parts)] = rank
    self._byte_chars = bytes_to_unicode()
    self._char_bytes = {char: byte for byte, char in self._byte_chars.items()}
    self._cache: dict[str, tuple[int, ...]] = {}

  def _bpe(self, piece: str) -> tuple[int, ...]:
    """The ids of one pre-tokenized piece (cached)."""
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    word = [self._byte_chars[b] for b in piece.encode('utf-8')]
    while len(word) > 1:
      ranked = [(self._ranks.get(pair, -1), i) for i, pair in enumerate(zip(word, word[1:]))]
      ranked = [(rank, i) for rank, i in ranked if rank >= 0]
      if not ranked:
        break
      best = min(ranked)[0]
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and self._ranks.get((word[i], word[i + 1])) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = tuple(self._ids[symbol] for symbol in word)
    if len(self._cache) < 500_000:
      self._cache[piece] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added).

    Args:
      text: any string.

    Returns:
      The ids.

    Raises:
      KeyError: if a merged symbol is missing from the vocabulary (an inconsistent vocabulary).
    """
    ids: list[int] = []
    for piece in pre_tokenize(text):
      ids.extend(self._bpe(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of ``ids``; special tokens are dropped, invalid UTF-8 is replaced.

    Args:
      ids: token ids.

    Returns:
      The text.
    """
    chars = ''.join(self.tokens[i] for i in ids if int(i) not in self.special_ids)
    return bytes(self._char_bytes[c] for c in chars).decode('utf-8', errors='replace')


class ByteTokenizer:
  """One token per UTF-8 byte (ids 0..255), then ``<eos>`` (256) and 3 spare special ids.

  Example:
    >>> tok = ByteTokenizer()
    >>> tok.encode('hé')
    [104, 195, 169]
    >>> tok.decode(tok.encode('hé') + [tok.eos_id])
    'hé'
  """

  vocab_size = 260
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of ``text``."""
    return list(text.encode('utf-8'))

  def decode(self, ids: Sequence[int]) -> str:
    """The text of the byte ids among ``ids`` (special ids dropped)."""
    return bytes(int(i) for i in ids if int(i) < 256).decode('utf-8', errors='replace')
