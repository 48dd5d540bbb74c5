"""The language-model sequence: a causal LM fine-tuned on text domains in turn (Math → Law → Code).

It runs on the engine's one training loop (:func:`sfa_jax.engine.loop.train_stream`), as image
streams do: the domains are a task stream (:func:`domain_stream`: token windows as inputs, the
windows shifted by one as targets), the objective is
:data:`sfa_jax.engine.objectives.NEXT_TOKEN`, and any :class:`~sfa_jax.engine.methods.Method`
runs through its hooks (replay's memory, EWC's Fisher, the merges). Measured after each stage:

* every domain's held-out loss (and perplexity, its exponential) and the exact-match accuracy on
  the domains with problems (math): the share of problems whose completion greedy decoding
  reproduces exactly (:class:`sfa_jax.tasks.text.ExactMatchSet`);
* the loop's own metric, next-token accuracy on the held-out windows.

Choices, each stated here:

* training is counted in steps per domain (``LMConfig.steps_per_domain``), not epochs: the
  batches come from shuffled passes over the domain's windows;
* replay keeps ``fraction`` of each past domain's training windows and fills ``round(ratio ·
  batch_size)`` rows of each batch with them: the same steps and batch size as the other methods
  (equal compute), so replay sees fewer windows of the current domain;
* EWC's Fisher is the empirical diagonal Fisher of the per-window mean loss: ``mean_i g_i²`` over
  ``fisher_sequences`` training windows of the finished domain, one gradient per window;
* every method's run is whole: the first domain is plain fine-tuning for every method (each
  method is inactive there), trained by each run, so every run can be checkpointed and resumed;
  the optimizer state is re-initialised at every domain start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import _validation
from sfa_jax.engine import run as run_lib
from sfa_jax.engine.config import TrainConfig
from sfa_jax import tasks as tasks_lib
from sfa_jax.engine.checkpoint import Checkpointer
from sfa_jax.engine import callbacks as callbacks_lib
from sfa_jax.engine import loop
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import objectives as objectives_lib
from sfa_jax.engine import programs
from sfa_jax.tasks.text import ExactMatchSet
from sfa_jax.tasks.text import TextDomain


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """How each domain is trained and evaluated.

  Attributes:
    steps_per_domain: optimizer steps on each domain (one number, or one per domain).
    batch_size: windows per training batch.
    learning_rate: the optimizer's learning rate.
    optimizer: ``'adam'`` or ``'sgd'``.
    grad_clip: clip the gradient's global norm to this (0: no clipping).
    seed: seeds the batch order and the replay memory.
    eval_batch_size: windows (or problems) per evaluation batch.
    fisher_sequences: training windows used for EWC's Fisher.
    trainable: train and anchor only the params these path patterns select (``None``: all), as
      :attr:`sfa_jax.engine.config.TrainConfig.trainable`; e.g. ``('top_layers', 'norm')`` for a model
      from :func:`sfa_jax.models.llama.train_top_layers`.
  """

  steps_per_domain: int | tuple[int, ...] = 20
  batch_size: int = 4
  learning_rate: float = 1e-4
  optimizer: str = 'adam'
  grad_clip: float = 1.0
  seed: int = 0
  eval_batch_size: int = 8
  fisher_sequences: int = 8
  trainable: str | tuple[str, ...] | None = None

  def __post_init__(self):
    steps = self.steps_per_domain if isinstance(self.steps_per_domain, tuple) else (self.steps_per_domain,)
    if not steps:
      raise ValueError('steps_per_domain must be a number of steps or one per domain; got an empty tuple.')
    for value in steps:
      _validation.check_int('steps_per_domain', value)
    for name in ('batch_size', 'eval_batch_size', 'fisher_sequences'):
      _validation.check_int(name, getattr(self, name))
    _validation.check_int('seed', self.seed, low=0, high=2**32 - 1)
    _validation.check_in_interval('learning_rate', self.learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    _validation.check_non_negative('grad_clip', self.grad_clip)
    if self.optimizer not in ('adam', 'sgd'):
      raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}.")

  def train_config(self, model) -> TrainConfig:
    """The engine's settings for ``model``: these steps, batches, optimizer and seed, the next-token objective."""
    return TrainConfig(
        model=model, epochs_per_task=1, batch_size=self.batch_size, learning_rate=self.learning_rate,
        optimizer=self.optimizer_for, seed=self.seed, eval_batch_size=self.eval_batch_size,
        objective=objectives_lib.NEXT_TOKEN, steps_per_task=self.steps_per_domain, fisher_examples=self.fisher_sequences,
        trainable=self.trainable,
    )

  def steps(self, domain_index: int) -> int:
    """The steps of domain ``domain_index``."""
    if isinstance(self.steps_per_domain, tuple):
      return self.steps_per_domain[domain_index]
    return self.steps_per_domain

  def optimizer_for(self, learning_rate: float) -> optax.GradientTransformation:
    """:meth:`make_optimizer` as the engine asks for it; equal configs give equal factories, so
    their runs share one compiled step."""
    del learning_rate  # this config's own
    return self.make_optimizer()

  def make_optimizer(self) -> optax.GradientTransformation:
    """The optimizer, after gradient clipping when ``grad_clip > 0``."""
    base = optax.adam(self.learning_rate) if self.optimizer == 'adam' else optax.sgd(self.learning_rate)
    return optax.chain(optax.clip_by_global_norm(self.grad_clip), base) if self.grad_clip > 0 else base


@dataclasses.dataclass
class LMResult:
  """What one method measured on a domain sequence.

  Attributes:
    method: the method's label.
    domain_names: the domains, in training order.
    stages: the row names: ``'initial'`` (before training), then each domain after its stage.
    loss_matrix: ``L[i][j]``, held-out mean token loss on domain ``j`` after row ``i``.
    exact_match: ``{domain: [accuracy after row i]}`` for the domains with problems.
    train_losses: the training loss of every step, per domain.
    averaging_steps: SFA's averaging steps (global step numbers).
    seconds: wall time of training, evaluation, Fisher and the whole run.
  """

  method: str
  domain_names: list[str]
  stages: list[str]
  loss_matrix: list[list[float]]
  exact_match: dict[str, list[float]]
  train_losses: list[list[float]]
  averaging_steps: list[int]
  seconds: dict[str, float]

  def summary(self) -> dict[str, float]:
    """Final losses and exact match, mean final loss, and forgetting (loss rise since learned)."""
    final = self.loss_matrix[-1]
    learned = [self.loss_matrix[j + 1][j] for j in range(len(self.domain_names))]
    out = {f'final_loss_{name}': final[j] for j, name in enumerate(self.domain_names)}
    out['mean_final_loss'] = float(np.mean(final))
    out['mean_final_perplexity'] = float(np.mean(np.exp(final)))
    out['forgetting'] = float(np.mean([final[j] - learned[j] for j in range(len(final) - 1)])) if len(final) > 1 else 0.0
    for name, values in self.exact_match.items():
      out[f'final_exact_match_{name}'] = values[-1]
    return out

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict, with :meth:`summary` under ``'metrics'``."""
    return dataclasses.asdict(self) | {'metrics': self.summary()}


def make_lm_evaluator(model, batch_size: int) -> tuple[Callable, Callable]:
  """``(heldout_loss, exact_match)`` functions of ``(params, data)``, each compiled once per shape.

  ``heldout_loss(params, windows)`` is the mean token loss over all windows (the last batch is
  padded and masked); ``exact_match(params, problems)`` the share of problems of an
  :class:`~sfa_jax.tasks.text.ExactMatchSet` answered exactly by greedy decoding.

  Args:
    model: the causal LM.
    batch_size: windows or problems per batch.

  Returns:
    The two functions.
  """

  @jax.jit
  def loss_sum(params, windows, weights):
    logits = model.apply({'params': params}, windows[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    return (losses * weights).sum(), weights.sum()

  @jax.jit
  def correct(params, tokens, answer_mask, valid):
    predicted = jnp.argmax(model.apply({'params': params}, tokens[:, :-1]), -1)
    ok = (predicted == tokens[:, 1:]) | ~answer_mask[:, 1:]
    return jnp.sum(jnp.all(ok, axis=-1) & valid)

  def batches(*arrays):
    n = len(arrays[0])
    padded = -(-n // batch_size) * batch_size
    valid = np.arange(padded) < n
    arrays = [np.concatenate([a, np.repeat(a[:1], padded - n, axis=0)]) for a in arrays]
    for start in range(0, padded, batch_size):
      yield [a[start:start + batch_size] for a in arrays] + [valid[start:start + batch_size]]

  def heldout_loss(params, windows: np.ndarray) -> float:
    total, count = 0.0, 0.0
    for chunk, valid in batches(windows):
      weights = np.broadcast_to(valid[:, None], (len(chunk), chunk.shape[1] - 1)).astype(np.float32)
      s, c = loss_sum(params, chunk, weights)
      total, count = total + float(s), count + float(c)
    return total / count

  def exact_match(params, problems: ExactMatchSet) -> float:
    hits = sum(int(correct(params, t, m, v)) for t, m, v in batches(problems.tokens, problems.answer_mask))
    return hits / len(problems.tokens)

  return heldout_loss, exact_match


def greedy_generate(model, params, prompt: Sequence[int], num_tokens: int) -> list[int]:
  """Greedy continuation of ``prompt`` by ``num_tokens`` tokens (no cache: one forward per token).

  Args:
    model: the causal LM.
    params: its params.
    prompt: token ids.
    num_tokens: tokens to generate.

  Returns:
    The generated ids (without the prompt).

  Example:
    >>> import jax
    >>> from sfa_jax.models.llama import Llama, LlamaConfig
    >>> model = Llama(LlamaConfig.tiny())
    >>> tokens = jax.numpy.zeros((1, 4), jax.numpy.int32)
    >>> params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
    >>> len(greedy_generate(model, params, [1, 2, 3], 2))
    2
  """
  ids = list(prompt)
  apply = jax.jit(model.apply)
  for _ in range(num_tokens):
    logits = apply({'params': params}, jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids[len(prompt):]


def domain_stream(domains: Sequence[TextDomain]) -> tasks_lib.TaskStream:
  """The domains as a task stream: inputs ``windows[:, :-1]``, targets ``windows[:, 1:]``.

  Replay's memory is then a random ``fraction`` of a past domain's windows, joint training the
  union of the windows, as for any stream.

  Example:
    >>> import numpy as np
    >>> from sfa_jax.tasks.text import TextDomain
    >>> windows = np.arange(12, dtype=np.int32).reshape(3, 4)
    >>> stream = domain_stream([TextDomain('math', windows, windows, None, ())])
    >>> stream[0].train.x[0].tolist(), stream[0].train.y[0].tolist()
    ([0, 1, 2], [1, 2, 3])
  """
  return tasks_lib.stream_of(
      'text', [(d.name, _shifted(d.train), _shifted(d.heldout)) for d in domains],
      num_outputs=0, source='; '.join(source for d in domains for source in d.sources),
  )


def _domain_arrays(domain: TextDomain) -> list[np.ndarray]:
  problems = [] if domain.problems is None else [domain.problems.tokens, domain.problems.answer_mask]
  return [domain.train, domain.heldout, *problems]


def _shifted(windows: np.ndarray) -> tasks_lib.Split:
  return tasks_lib.Split(windows[:, :-1], windows[:, 1:])


def run_lm_sequences(
    model,
    params: Any,
    domains: Sequence[TextDomain],
    methods: Sequence[methods_lib.Method],
    config: LMConfig = LMConfig(),
    *,
    callbacks: callbacks_lib.Callback | Sequence[callbacks_lib.Callback] | None = None,
    checkpointers: Sequence[Checkpointer] | None = None,
) -> list[LMResult]:
  """Fine-tunes ``params`` on ``domains`` in order with each method; evaluates after each stage.

  Args:
    model: a causal LM (e.g. :class:`sfa_jax.models.llama.Llama`), ``model.apply(variables, tokens)``.
    params: its initial (pretrained) params; left untouched.
    domains: from :func:`sfa_jax.tasks.text.make_text_domains`, all with one window shape.
    methods: :class:`~sfa_jax.engine.methods.Method` s, e.g. from :func:`engine.make_method`.
    config: training settings.
    callbacks: called with every event of every method's run (:mod:`sfa_jax.engine.callbacks`).
    checkpointers: one :class:`~sfa_jax.engine.checkpoint.Checkpointer` per method (``None``: none):
      each run is saved and resumed as :func:`sfa_jax.engine.run.run_sequence` is.

  Returns:
    One :class:`LMResult` per method, in order.

  Raises:
    ValueError: on no domains, mismatched window shapes, a ``steps_per_domain`` tuple of the
      wrong length, or a checkpointer count other than the method count.
    TypeError: when a method is not a :class:`~sfa_jax.engine.methods.Method`.

  Example:
    >>> import jax
    >>> from sfa_jax import engine
    >>> from sfa_jax.engine import lm
    >>> from sfa_jax.models.llama import Llama, LlamaConfig
    >>> from sfa_jax.models.tokenizer import ByteTokenizer
    >>> from sfa_jax.tasks import text
    >>> domains = text.make_text_domains(ByteTokenizer(), 16, train_sequences=8,
    ...                                  heldout_sequences=4, num_problems=4, strict=False)
    >>> model = Llama(LlamaConfig.tiny())
    >>> params = jax.jit(model.init)(jax.random.key(0), domains[0].train[:1, :-1])['params']
    >>> config = lm.LMConfig(steps_per_domain=2, batch_size=2)
    >>> results = lm.run_lm_sequences(model, params, domains, [engine.make_method('sfa')],
    ...                               config)  # doctest: +SKIP
    >>> results[0].stages, len(results[0].loss_matrix[0])  # doctest: +SKIP
    (['initial', 'math', 'law', 'code'], 3)
  """
  if not domains:
    raise ValueError('domains must not be empty.')
  if len({d.train.shape[1] for d in domains} | {d.heldout.shape[1] for d in domains}) != 1:
    raise ValueError('every domain must have windows of one length.')
  if isinstance(config.steps_per_domain, tuple) and len(config.steps_per_domain) != len(domains):
    raise ValueError(f'steps_per_domain has {len(config.steps_per_domain)} entries for {len(domains)} domains.')
  for i, method in enumerate(methods):
    if not isinstance(method, methods_lib.Method):
      raise TypeError(f'methods[{i}] must be a sfa_jax.engine.methods.Method; got {method!r}.')
  if checkpointers is not None and len(checkpointers) != len(methods):
    raise ValueError(f'checkpointers has {len(checkpointers)} entries for {len(methods)} methods.')
  tasks = list(domain_stream(domains))
  train_config = config.train_config(model)
  heldout_loss, exact_match = programs.reused(  # later calls of this process: compiled already
      ('lm_evaluator', model, config.eval_batch_size), lambda: make_lm_evaluator(model, config.eval_batch_size))

  def evaluate(params) -> dict[str, Any]:
    return {
        'loss': [heldout_loss(params, d.heldout) for d in domains],
        'exact_match': {d.name: exact_match(params, d.problems) for d in domains if d.problems is not None},
    }

  initial = (jax.tree.map(jnp.asarray, params), {})
  initial_sum = run_lib.initial_checksum(initial)  # once: it reads every array of the model
  # Every run starts from these params: their row is measured once per process.
  data_sum = hashlib.sha256(b''.join(np.ascontiguousarray(a).tobytes() for d in domains for a in _domain_arrays(d))).hexdigest()
  starting_row = lambda: programs.reused(('lm_starting_row', model, initial_sum, data_sum, config.eval_batch_size),
                                         lambda: evaluate(initial[0]))

  def evaluate_state(state, after_task):
    return starting_row() if after_task is None else evaluate(state.params)

  results = []
  for i, method in enumerate(methods):
    losses: list[list[Any]] = [[] for _ in domains]

    def keep_loss(event, losses=losses):
      if isinstance(event, callbacks_lib.StepEvent):
        losses[event.task].append(event.loss)

    run_id = json.dumps({
        'stream': [d.name for d in domains], 'windows': [list(d.train.shape) for d in domains],
        'method': run_lib.describe_method(method), 'config': dataclasses.asdict(config),
        'model': repr(model), 'initial': initial_sum,
        'checkpoint_format': loop.CHECKPOINT_FORMAT,
    }, sort_keys=True, default=repr)
    (record,), seconds = loop.train_stream(
        tasks, [(method, train_config)], model=model, fingerprint=run_id, stacked=False,
        callbacks=[keep_loss, callbacks_lib.as_callbacks(callbacks)],
        checkpointer=None if checkpointers is None else checkpointers[i], initial=initial, evaluate_state=evaluate_state,
    )
    rows = record.extra
    results.append(LMResult(
        method=method.label,
        domain_names=[d.name for d in domains],
        stages=['initial'] + [d.name for d in domains],
        loss_matrix=[[float(v) for v in row['loss']] for row in rows],
        exact_match={name: [row['exact_match'][name] for row in rows] for name in rows[0]['exact_match']},
        train_losses=[[float(v) for v in domain] for domain in losses],
        averaging_steps=record.averaging_steps,
        seconds=seconds,
    ))
  return results
