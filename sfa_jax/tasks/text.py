"""Offline text domains for a language-model sequence: math, law and code, from real text.

Every source is installed, not downloaded:

* **code**: Python standard library modules, the files pinned in :data:`CODE_FILES` (read from the
  running interpreter's ``stdlib``; their text depends on its version, which ``sources`` records).
* **law**: the licence texts of Debian's ``/usr/share/common-licenses`` (:data:`LAW_FILES`, the
  regular files; the unversioned names are symlinks to these). The PyPI package
  ``licenseclassifier`` (2026.x) ships a compiled scanner (``scanner.bin.gz``), not plain licence
  texts, so it is not a source.
* **math**: the 270 competition problems of the PyPI package ``champ-dataset`` (problem, solution
  steps and answer), plus word problems from :func:`arithmetic_problems`, a seeded generator whose
  answers are checkable integers; held-out generated problems give the exact-match accuracy.

Each domain's documents are tokenized one by one, joined with the end-of-text token, cut into
windows of ``seq_len + 1`` tokens (input and shifted target; one static shape), shuffled with the
seed and split into train and held-out windows. Everything is deterministic.

Example:
  >>> from sfa_jax.models.tokenizer import ByteTokenizer
  >>> domains = make_text_domains(ByteTokenizer(), seq_len=32, train_sequences=8,
  ...                             heldout_sequences=4, num_problems=4, strict=False)
  >>> math = domains[0]
  >>> [d.name for d in domains], math.train.shape, math.problems.tokens.shape[0]
  (['math', 'law', 'code'], (8, 33), 4)
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sfa_jax import _validation

DOMAINS = ('math', 'law', 'code')
"""The text domains, in the order of the language sequence."""

CODE_FILES = (
    'bisect.py', 'calendar.py', 'colorsys.py', 'csv.py', 'fnmatch.py', 'fractions.py', 'functools.py',
    'glob.py', 'graphlib.py', 'heapq.py', 'json/decoder.py', 'json/encoder.py', 'numbers.py', 'queue.py',
    'random.py', 'sched.py', 'shlex.py', 'statistics.py', 'string.py', 'textwrap.py',
)
"""The standard-library modules whose source is the **code** domain."""
LAW_DIR = '/usr/share/common-licenses'
"""Where Debian installs the licence texts of the **law** domain."""
LAW_FILES = (
    'Apache-2.0', 'Artistic', 'BSD', 'CC0-1.0', 'GFDL-1.2', 'GFDL-1.3', 'GPL-1', 'GPL-2', 'GPL-3', 'LGPL-2',
    'LGPL-2.1', 'LGPL-3', 'MPL-1.1', 'MPL-2.0',
)
"""The licence files of :data:`LAW_DIR` that make the **law** domain."""

_NAMES = ('Ana', 'Ben', 'Chen', 'Dara', 'Eli', 'Fatima', 'Goran', 'Hana', 'Ivan', 'Jia', 'Kofi', 'Lena')
_ITEMS = ('apples', 'books', 'coins', 'pencils', 'stamps', 'marbles', 'cards', 'shells')


class Problem(NamedTuple):
  """A generated word problem: ``prompt`` (ends with ``'Answer:'``) and its integer answer."""

  prompt: str
  answer: int

  @property
  def completion(self) -> str:
    """The text a correct model continues ``prompt`` with: ``' <answer>\\n'``."""
    return f' {self.answer}\n'


class ExactMatchSet(NamedTuple):
  """Problems as token arrays for exact-match scoring (right-padded with the end-of-text token).

  Attributes:
    tokens: int32 ``(problems, length)``: prompt then completion.
    answer_mask: bool ``(problems, length)``: ``True`` at the completion's tokens; greedy decoding
      reproduces the completion iff the model's argmax at position ``t - 1`` is ``tokens[t]`` for
      every masked ``t`` (teacher forcing along the correct answer is greedy decoding when it is right).
  """

  tokens: np.ndarray
  answer_mask: np.ndarray


class TextDomain(NamedTuple):
  """One domain of the sequence.

  Attributes:
    name: ``'math'``, ``'law'`` or ``'code'``.
    train: int32 ``(N, seq_len + 1)`` training windows.
    heldout: int32 ``(M, seq_len + 1)`` held-out windows.
    problems: exact-match problems (math), else ``None``.
    sources: what the text came from.
  """

  name: str
  train: np.ndarray
  heldout: np.ndarray
  problems: ExactMatchSet | None
  sources: tuple[str, ...]


def code_documents() -> tuple[list[str], tuple[str, ...]]:
  """The source of the pinned standard-library modules (:data:`CODE_FILES`).

  Returns:
    ``(documents, sources)``.

  Example:
    >>> docs, sources = code_documents()
    >>> len(docs) == len(CODE_FILES), 'def ' in docs[0]
    (True, True)
  """
  root = sysconfig.get_paths()['stdlib']
  docs = []
  for name in CODE_FILES:
    with open(os.path.join(root, name), encoding='utf-8') as f:
      docs.append(f.read())
  return docs, (f'python{sys.version_info.major}.{sys.version_info.minor} stdlib: {len(CODE_FILES)} files',)


def law_documents(directory: str = LAW_DIR) -> tuple[list[str], tuple[str, ...]]:
  """The licence texts of :data:`LAW_FILES` in ``directory`` (Debian's common licences).

  Args:
    directory: where the files are.

  Returns:
    ``(documents, sources)``.

  Raises:
    FileNotFoundError: if a file is missing (not a Debian-like system).

  Example:
    >>> docs, _ = law_documents()  # doctest: +SKIP
  """
  docs = []
  for name in LAW_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} is missing: the law domain needs Debian\'s common-licenses directory.')
    with open(path, encoding='utf-8', errors='replace') as f:
      docs.append(f.read())
  return docs, (f'{directory}: {len(LAW_FILES)} files',)


def champ_documents() -> tuple[list[str], tuple[str, ...]]:
  """The 270 CHAMP competition problems, each as ``Problem … Solution … Answer: …`` text.

  Returns:
    ``(documents, sources)``.

  Raises:
    ImportError: if ``champ-dataset`` is not installed.

  Example:
    >>> docs, _ = champ_documents()  # doctest: +SKIP
  """
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.find_spec('champ_dataset')
  if spec is None:
    raise ImportError("the math domain's CHAMP problems need the PyPI package champ-dataset: pip install 'sfa-jax[lm]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], 'dataset_files', 'v0.json')
  with open(path, encoding='utf-8') as f:
    problems = json.load(f)['problems']
  docs = []
  for key in sorted(problems):
    p = problems[key]
    steps = ' '.join(step['_text'] for step in p['solution']['steps'])
    docs.append(f"Problem: {p['_text']}\nSolution: {steps}\nAnswer: {p['_answer']}\n")
  return docs, (f'champ-dataset v0.json: {len(docs)} problems',)


def arithmetic_problems(count: int, seed: int) -> list[Problem]:
  """Seeded arithmetic word problems with integer answers.

  Four templates, chosen uniformly: buying more (``a + b``, ``a, b`` in 2..60), giving away
  (``a - b``, ``b < a``), boxes (``a · b``, both in 2..12), equal sharing (``(a · b) / b``). The
  names and items are drawn from fixed lists. The prompt reads ``'Question: …\\nAnswer:'``.

  Args:
    count: number of problems.
    seed: seeds NumPy's generator.

  Returns:
    The problems.

  Raises:
    ValueError: if ``count`` is not a positive integer.

  Example:
    >>> p = arithmetic_problems(1, seed=0)[0]
    >>> p.prompt.startswith('Question:'), p.prompt.endswith('Answer:')
    (True, True)
    >>> isinstance(p.answer, int)
    True
  """
  _validation.check_int('count', count)
  rng = np.random.default_rng(seed)
  problems = []
  for _ in range(count):
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    kind = int(rng.integers(4))
    if kind == 0:
      a, b = (int(v) for v in rng.integers(2, 61, 2))
      question, answer = f'{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?', a + b
    elif kind == 1:
      a = int(rng.integers(3, 61))
      b = int(rng.integers(1, a))
      question, answer = f'{name} had {a} {item} and gave {b} away. How many {item} are left?', a - b
    elif kind == 2:
      a, b = (int(v) for v in rng.integers(2, 13, 2))
      question, answer = f'A box holds {a} {item}. How many {item} are in {b} boxes?', a * b
    else:
      q, b = (int(v) for v in rng.integers(2, 13, 2))
      question, answer = f'{name} shares {q * b} {item} equally among {b} friends. How many {item} does each friend get?', q
    problems.append(Problem(f'Question: {question}\nAnswer:', answer))
  return problems


def exact_match_set(problems: Sequence[Problem], tokenizer) -> ExactMatchSet:
  """Token arrays of ``problems`` for exact-match scoring (see :class:`ExactMatchSet`).

  Args:
    problems: the problems.
    tokenizer: has ``encode`` and ``eos_id``.

  Returns:
    The set.

  Raises:
    ValueError: if a prompt and its completion tokenize differently apart and together.

  Example:
    >>> from sfa_jax.models.tokenizer import ByteTokenizer
    >>> s = exact_match_set([Problem('Question: 1+1?\\nAnswer:', 2)], ByteTokenizer())
    >>> s.tokens.shape, int(s.answer_mask.sum())
    ((1, 25), 3)
  """
  rows = []
  for p in problems:
    prompt, completion = tokenizer.encode(p.prompt), tokenizer.encode(p.completion)
    if tokenizer.encode(p.prompt + p.completion) != prompt + completion:
      raise ValueError(f'problem {p.prompt!r}: prompt and completion do not tokenize apart as together.')
    rows.append((prompt, completion))
  length = max(len(a) + len(b) for a, b in rows)
  tokens = np.full((len(rows), length), tokenizer.eos_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, (prompt, completion) in enumerate(rows):
    tokens[i, :len(prompt) + len(completion)] = prompt + completion
    mask[i, len(prompt):len(prompt) + len(completion)] = True
  return ExactMatchSet(tokens, mask)


def windows(documents: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
  """The documents' tokens, each followed by end-of-text, cut into ``(n, seq_len + 1)`` windows.

  The tail that does not fill a window is dropped.

  Args:
    documents: texts.
    tokenizer: has ``encode`` and ``eos_id``.
    seq_len: tokens per input sequence (a window holds one more, the last target).

  Returns:
    int32 array of windows, in document order.

  Example:
    >>> from sfa_jax.models.tokenizer import ByteTokenizer
    >>> windows(['abcdef', 'gh'], ByteTokenizer(), seq_len=3).tolist()
    [[97, 98, 99, 100], [101, 102, 256, 103]]
  """
  _validation.check_int('seq_len', seq_len)
  stream = []
  for doc in documents:
    stream.extend(tokenizer.encode(doc))
    stream.append(tokenizer.eos_id)
  n = len(stream) // (seq_len + 1)
  return np.asarray(stream[: n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def _domain_documents(name: str, strict: bool, math_train_problems: int, seed: int):
  if name == 'code':
    return code_documents()
  if name == 'law':
    return law_documents()
  docs, sources = [], []
  try:
    docs, sources = champ_documents()
    docs, sources = list(docs), list(sources)
  except ImportError:
    if strict:
      raise
  generated = arithmetic_problems(math_train_problems, seed=seed * 2 + 1)
  docs += [p.prompt + p.completion for p in generated]
  sources.append(f'arithmetic_problems(count={math_train_problems}, seed={seed * 2 + 1})')
  return docs, tuple(sources)


def make_text_domains(
    tokenizer,
    seq_len: int,
    *,
    train_sequences: int,
    heldout_sequences: int,
    num_problems: int = 64,
    math_train_problems: int = 2000,
    seed: int = 0,
    strict: bool = True,
) -> tuple[TextDomain, TextDomain, TextDomain]:
  """The domains math, law and code, tokenized and cut into train and held-out windows.

  Args:
    tokenizer: has ``encode``, ``eos_id``.
    seq_len: tokens per input sequence.
    train_sequences: training windows per domain (the first after a seeded shuffle).
    heldout_sequences: held-out windows per domain (the next ones).
    num_problems: generated math problems for exact match (seed ``2·seed``; none of their
      prompts is in the training text).
    math_train_problems: generated problems in the math training text (seed ``2·seed + 1``).
    seed: seeds the generator and the shuffles.
    strict: require every source; with ``False`` the math domain does without ``champ-dataset``
      when it is missing (``sources`` says what was used).

  Returns:
    ``(math, law, code)``.

  Raises:
    ValueError: if a domain has fewer than ``train_sequences + heldout_sequences`` windows.
    ImportError, FileNotFoundError: if a source is missing.

  Example:
    See the module docstring.
  """
  for name in ('train_sequences', 'heldout_sequences', 'num_problems', 'math_train_problems'):
    _validation.check_int(name, locals()[name])
  eval_problems = arithmetic_problems(num_problems, seed=seed * 2)
  held_prompts = {p.prompt for p in eval_problems}
  domains = []
  for index, name in enumerate(DOMAINS):
    docs, sources = _domain_documents(name, strict, math_train_problems, seed)
    if name == 'math':
      docs = [d for d in docs if not any(d.startswith(p) for p in held_prompts)]
    cut = windows(docs, tokenizer, seq_len)
    needed = train_sequences + heldout_sequences
    if len(cut) < needed:
      raise ValueError(f'domain {name!r} has {len(cut)} windows of {seq_len + 1} tokens; {needed} are needed.')
    order = np.random.default_rng([seed, index]).permutation(len(cut))
    train, heldout = cut[order[:train_sequences]], cut[order[train_sequences:needed]]
    problems = exact_match_set(eval_problems, tokenizer) if name == 'math' else None
    domains.append(TextDomain(name, train, heldout, problems, sources))
  return tuple(domains)
