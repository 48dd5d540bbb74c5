"""A language-model sequence trainer: a causal LM fine-tuned on text domains in turn (Math → Law → Code).

Any :class:`~sfa_jax.engine.methods.Method` runs here through the same hooks as in
:mod:`sfa_jax.continual` (its transform, its task-boundary rules, its batch plan over the domains
as :func:`domain_tasks`), with the language-model loss and metrics:

* loss: mean next-token cross-entropy over the tokens of a batch of ``(batch, seq_len + 1)`` windows;
* after each stage, every domain's held-out loss (and perplexity, its exponential) and the
  exact-match accuracy on the domains with problems (math): the share of problems whose completion
  greedy decoding reproduces exactly (:class:`sfa_jax.tasks.text.ExactMatchSet`).

Differences with the image trainer, each a choice stated here:

* training is counted in steps per domain (``LMConfig.steps_per_domain``), not epochs: batches are
  drawn from shuffled passes over the domain's windows;
* replay keeps ``fraction`` of each past domain's training windows and fills ``round(ratio ·
  batch_size)`` rows of each batch with them: the same steps and batch size as the other methods
  (equal compute), so replay sees fewer windows of the current domain;
* EWC's Fisher is the empirical diagonal Fisher of the per-window mean loss: ``mean_i g_i²`` over
  ``fisher_sequences`` training windows of the finished domain, one gradient per window;
* the first domain is plain fine-tuning for every method (as in :mod:`sfa_jax.continual`), so
  :func:`run_lm_sequences` trains it once and starts every method from that shared model;
  the optimizer state is re-initialised at every domain start;
* compile once: the gradient (the costly program) is one jitted function shared by all methods;
  each method's update (element-wise) is a second, cheap jitted function.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from sfa_jax import _validation
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine.loop import RunState
from sfa_jax.tasks import Split
from sfa_jax.tasks import Task
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
  """

  steps_per_domain: int | tuple[int, ...] = 20
  batch_size: int = 4
  learning_rate: float = 1e-4
  optimizer: str = 'adam'
  grad_clip: float = 1.0
  seed: int = 0
  eval_batch_size: int = 8
  fisher_sequences: int = 8

  def __post_init__(self):
    steps = self.steps_per_domain if isinstance(self.steps_per_domain, tuple) else (self.steps_per_domain,)
    for value in steps:
      _validation.check_positive_int('steps_per_domain', value)
    for name in ('batch_size', 'eval_batch_size', 'fisher_sequences'):
      _validation.check_positive_int(name, getattr(self, name))
    _validation.check_in_interval('learning_rate', self.learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    _validation.check_non_negative('grad_clip', self.grad_clip)
    if self.optimizer not in ('adam', 'sgd'):
      raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}.")

  @property
  def reset_optimizer(self) -> bool:
    """Always ``True``: the optimizer state restarts at every domain (see the module docstring)."""
    return True

  def steps(self, domain_index: int) -> int:
    """The steps of domain ``domain_index``."""
    if isinstance(self.steps_per_domain, tuple):
      return self.steps_per_domain[domain_index]
    return self.steps_per_domain

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
    seconds: wall time of training, evaluation, Fisher and the whole run (the shared first domain
      included in each method's total).
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


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean next-token cross-entropy: ``Σ w·CE / max(Σ w, 1)``.

  Args:
    logits: ``(batch, length, vocab)``.
    targets: int ``(batch, length)``.
    weights: ``(batch, length)``, 0 or 1.

  Returns:
    A scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> float(token_loss(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2))))  # log 4
    1.3862943649291992
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_grad_fn(model) -> Callable:
  """``grad(params, windows, weights) -> (loss, grads)``, jitted once for all methods.

  Args:
    model: a causal LM, ``model.apply({'params': p}, tokens) -> logits``.

  Returns:
    The function; ``windows`` is int ``(batch, seq_len + 1)``, ``weights`` ``(batch, seq_len)``.
  """

  def loss_fn(params, windows, weights):
    return token_loss(model.apply({'params': params}, windows[:, :-1]), windows[:, 1:], weights)

  return jax.jit(jax.value_and_grad(loss_fn))


def make_update_fn(tx: optax.GradientTransformation) -> Callable:
  """``update(params, opt_state, grads) -> (params, opt_state)``, jitted, params and state donated."""

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(update, donate_argnums=(0, 1))


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
    >>> params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, 4), jax.numpy.int32))['params']
    >>> len(greedy_generate(model, params, [1, 2, 3], 2))
    2
  """
  ids = list(prompt)
  apply = jax.jit(model.apply)
  for _ in range(num_tokens):
    logits = apply({'params': params}, jnp.asarray([ids], jnp.int32))
    ids.append(int(jnp.argmax(logits[0, -1])))
  return ids[len(prompt):]


def sequence_fisher(grad_fn: Callable, params: Any, windows: np.ndarray, batch_size: int) -> Any:
  """Empirical diagonal Fisher ``mean_i g_i²``, ``g_i`` the gradient of window ``i``'s mean token loss.

  Each window's gradient comes from ``grad_fn`` on a full batch whose weights select that window
  alone (so the compiled gradient is reused; it costs one batch per window).

  Args:
    grad_fn: from :func:`make_grad_fn`.
    params: where the Fisher is estimated.
    windows: int ``(n, seq_len + 1)``.
    batch_size: the batch size ``grad_fn`` was compiled for.

  Returns:
    A tree like ``params``.
  """
  n = len(windows)
  total = jax.tree.map(jnp.zeros_like, params)
  for start in range(0, n, batch_size):
    chunk = windows[start:start + batch_size]
    rows = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - rows, axis=0)])
    for r in range(rows):
      weights = np.zeros((batch_size, chunk.shape[1] - 1), np.float32)
      weights[r] = 1.0
      _, grads = grad_fn(params, chunk, weights)
      total = jax.tree.map(lambda t, g: t + g * g, total, grads)
  return jax.tree.map(lambda t: t / n, total)


def domain_tasks(domains: Sequence[TextDomain]) -> list[Task]:
  """The domains as :class:`~sfa_jax.tasks.Task` s whose examples are token windows (no labels).

  A method's batch plan (replay's memory, joint's union) is then the same rule as for images:
  ``train.x`` holds a domain's training windows, ``train.y`` a zero per window (one class, so
  replay's stratified memory is a random ``fraction`` of the windows).
  """
  return [
      Task(j, d.name, Split(d.train, np.zeros(len(d.train), np.int32)), Split(d.heldout, np.zeros(len(d.heldout), np.int32)), (), ())
      for j, d in enumerate(domains)
  ]


class _Runner:
  """The pieces shared by every method of one :func:`run_lm_sequences` call."""

  def __init__(self, model, domains: Sequence[TextDomain], config: LMConfig, progress):
    self.domains, self.config, self.progress = domains, config, progress
    self.tasks = domain_tasks(domains)
    self.grad_fn = make_grad_fn(model)
    self.heldout_loss, self.exact_match = make_lm_evaluator(model, config.eval_batch_size)
    self.weights = np.ones((config.batch_size, domains[0].train.shape[1] - 1), np.float32)
    self._first_fisher = None

  def evaluate(self, params, seconds) -> tuple[list[float], dict[str, float]]:
    begin = time.perf_counter()
    losses = [self.heldout_loss(params, d.heldout) for d in self.domains]
    em = {d.name: self.exact_match(params, d.problems) for d in self.domains if d.problems is not None}
    seconds['evaluate'] += time.perf_counter() - begin
    return losses, em

  def boundary(self, k: int, seconds: dict[str, float]) -> methods_lib.Boundary:
    """Domain ``k``'s boundary; its Fisher of the shared first domain is computed once for all methods."""

    def fisher(state: RunState) -> Any:
      if k == 0 and self._first_fisher is not None:  # every method's domain 0 ends on one model
        return self._first_fisher
      begin = time.perf_counter()
      windows = self.domains[k].train[: self.config.fisher_sequences]
      value = sequence_fisher(self.grad_fn, state.params, windows, self.config.batch_size)
      seconds['fisher'] += time.perf_counter() - begin
      if k == 0:
        self._first_fisher = value
      return value

    return methods_lib.Boundary(k, len(self.domains), self.config.steps(k), fisher)

  def batches(self, method: methods_lib.Method, k: int):
    """The training batches of domain ``k``: the method's batch plan, drawn in shuffled passes."""
    config = self.config
    rng = np.random.default_rng([config.seed, k])
    plan = method.batch_plan(self.tasks, k, config.batch_size, config.seed)
    data = plan.data.x
    current = _passes(rng, len(data), config.batch_size - plan.replay_size, config.steps(k))
    recall = _passes(rng, len(plan.replay.x), plan.replay_size, config.steps(k)) if plan.replay is not None else None
    for i in range(config.steps(k)):
      rows = data[current[i]]
      yield rows if recall is None else np.concatenate([rows, plan.replay.x[recall[i]]])

  def train(self, method, state: RunState, k, update_fn, seconds, losses_out, averaging_out, global_step):
    begin = time.perf_counter()
    steps = self.config.steps(k)
    schedule = method.averaging_schedule(k, steps)
    losses = []
    params, opt_state = state.params, state.opt_state
    for step, batch in enumerate(self.batches(method, k), start=1):
      loss, grads = self.grad_fn(params, batch, self.weights)
      params, opt_state = update_fn(params, opt_state, grads)
      losses.append(loss)
      global_step += 1
      if schedule[step] if schedule is not None else bool(method.averaged(opt_state)):
        averaging_out.append(global_step)
      self.progress({'method': method.label, 'domain': self.domains[k].name, 'step': step, 'steps': steps, 'loss': loss})
    losses_out.append([float(v) for v in losses])
    seconds['train'] += time.perf_counter() - begin
    return state._replace(params=params, opt_state=opt_state), global_step


def _passes(rng: np.random.Generator, n: int, rows: int, steps: int) -> np.ndarray:
  """``steps`` batches of ``rows`` indices from shuffled passes over ``n`` items."""
  passes = -(-steps * rows // n)
  return np.concatenate([rng.permutation(n) for _ in range(passes)])[: steps * rows].reshape(steps, rows)


def run_lm_sequences(
    model,
    params: Any,
    domains: Sequence[TextDomain],
    methods: Sequence[methods_lib.Method],
    config: LMConfig = LMConfig(),
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[LMResult]:
  """Fine-tunes ``params`` on ``domains`` in order with each method; evaluates after each stage.

  The first domain is trained once (plain fine-tuning, which every method does there) and each
  method continues from that model.

  Args:
    model: a causal LM (e.g. :class:`sfa_jax.models.llama.Llama`).
    params: its initial (pretrained) params; left untouched.
    domains: from :func:`sfa_jax.tasks.text.make_text_domains`, all with one window shape.
    methods: :class:`~sfa_jax.engine.methods.Method` s, e.g. from :func:`continual.make_method`.
    config: training settings.
    progress: called after every step with ``{'method', 'domain', 'step', 'steps', 'loss'}``.

  Returns:
    One :class:`LMResult` per method, in order.

  Raises:
    ValueError: on no domains, mismatched window shapes, or a ``steps_per_domain`` tuple of the
      wrong length.

  Example:
    >>> import jax
    >>> from sfa_jax import continual, lm
    >>> from sfa_jax.models.llama import Llama, LlamaConfig
    >>> from sfa_jax.models.tokenizer import ByteTokenizer
    >>> from sfa_jax.tasks import text
    >>> domains = text.make_text_domains(ByteTokenizer(), 16, train_sequences=8, heldout_sequences=4,
    ...                                  num_problems=4, strict=False)
    >>> model = Llama(LlamaConfig.tiny())
    >>> params = jax.jit(model.init)(jax.random.key(0), domains[0].train[:1, :-1])['params']
    >>> results = lm.run_lm_sequences(model, params, domains, [continual.make_method('sfa')],
    ...                               lm.LMConfig(steps_per_domain=2, batch_size=2))  # doctest: +SKIP
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
  report = progress or (lambda event: None)
  runner = _Runner(model, domains, config, report)
  params = jax.tree.map(jnp.asarray, params)
  start = time.perf_counter()

  # The shared first domain: plain fine-tuning.
  shared_seconds = {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0}
  initial_losses, initial_em = runner.evaluate(params, shared_seconds)
  finetune = methods_lib.Finetune()
  tx = config.make_optimizer()
  first = RunState(jax.tree.map(jnp.copy, params), {}, jax.jit(tx.init)(params), {})
  first_losses: list[list[float]] = []
  first, _ = runner.train(finetune, first, 0, make_update_fn(tx), shared_seconds, first_losses, [], 0)
  first_eval = runner.evaluate(first.params, shared_seconds)
  shared_seconds['total'] = time.perf_counter() - start

  results = []
  for method in methods:
    begin = time.perf_counter()
    seconds = dict(shared_seconds)
    tx = method.transform(config.make_optimizer())
    init_state, update_fn = jax.jit(tx.init), make_update_fn(tx)
    state = RunState(jax.tree.map(jnp.copy, first.params), {}, None, method.init_extras(first.params, {}, len(domains)))
    state = method.end_task(state, runner.boundary(0, seconds))
    rows = [initial_losses, first_eval[0]]
    em = {name: [initial_em[name], first_eval[1][name]] for name in initial_em}
    train_losses, averaging_steps = list(first_losses), []
    global_step = config.steps(0)
    for k in range(1, len(domains)):
      at = runner.boundary(k, seconds)
      state = method.start_task(state, at)
      state = state._replace(opt_state=init_state(state.params))  # reset at every domain
      state = state._replace(opt_state=method.prepare_optimizer(state.opt_state, state, at))
      state, global_step = runner.train(method, state, k, update_fn, seconds, train_losses, averaging_steps, global_step)
      state = method.end_task(state, at)
      losses, accuracies = runner.evaluate(state.params, seconds)
      rows.append(losses)
      for name, value in accuracies.items():
        em[name].append(value)
    seconds['total'] = shared_seconds['total'] + time.perf_counter() - begin
    results.append(LMResult(
        method=method.label,
        domain_names=[d.name for d in domains],
        stages=['initial'] + [d.name for d in domains],
        loss_matrix=[[float(v) for v in row] for row in rows],
        exact_match=em,
        train_losses=train_losses,
        averaging_steps=averaging_steps,
        seconds=seconds,
    ))
  return results


def lm_markdown_table(results: Sequence[LMResult]) -> str:
  """A markdown table: per method, the final held-out loss (perplexity) per domain, exact match, forgetting.

  Args:
    results: from :func:`run_lm_sequences`.

  Returns:
    The table.
  """
  names = results[0].domain_names
  em_names = list(results[0].exact_match)
  header = ['method'] + [f'{n} loss (ppl)' for n in names] + ['mean loss'] + [f'{n} exact match' for n in em_names] + ['forgetting']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in results:
    s = r.summary()
    cells = [r.method] + [f'{v:.3f} ({math.exp(v):.1f})' for v in r.loss_matrix[-1]] + [f"{s['mean_final_loss']:.3f}"]
    cells += [f'{r.exact_match[n][-1]:.3f}' for n in em_names] + [f"{s['forgetting']:+.3f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_results(results: Sequence[LMResult], path: str) -> None:
  """Writes a PNG: held-out loss of each domain (and exact match) after each stage, one line per method.

  Args:
    results: from :func:`run_lm_sequences`.
    path: where the PNG goes.
  """
  names = results[0].domain_names
  em_names = list(results[0].exact_match)
  panels = len(names) + len(em_names)
  fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4))
  stages = results[0].stages
  for r in results:
    matrix = np.asarray(r.loss_matrix)
    for j, name in enumerate(names):
      axes[j].plot(range(len(stages)), matrix[:, j], marker='o', label=r.method)
    for j, name in enumerate(em_names):
      axes[len(names) + j].plot(range(len(stages)), r.exact_match[name], marker='o', label=r.method)
  for j, name in enumerate(names):
    axes[j].set_title(f'{name}: held-out loss')
  for j, name in enumerate(em_names):
    axes[len(names) + j].set_title(f'{name}: exact match')
  for ax in axes:
    ax.set_xticks(range(len(stages)), ['init'] + [f'after {s}' for s in stages[1:]], rotation=30, fontsize=7)
  axes[-1].legend(fontsize=6, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
