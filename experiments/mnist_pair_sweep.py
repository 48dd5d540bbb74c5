"""The sweep that chose the offline demo's hyper-parameters (`sfa-jax demo`, `cli.DEMO_DEFAULTS`).

MNIST task pair (even digits, then odd digits; bundled 5000-image MNIST; one shared head, the
class-incremental setting), MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task, 3 seeds.
Each configuration is judged by the mean accuracy over *both* tasks after the sequence.

  python experiments/mnist_pair_sweep.py            # about 2 minutes on 2 CPU cores
  python experiments/mnist_pair_sweep.py --quick    # one seed, a few configurations

Writes experiments/results/mnist_pair_sweep.{json,md}.
"""

import argparse
import dataclasses
import json
import os
import time

from sfa_jax import compile_cache
from sfa_jax import continual
from sfa_jax import report
from sfa_jax import tasks
from sfa_jax.cli import DEMO_DEFAULTS

GRID = (
    [('finetune', {})]
    + [('sfa', {'p': p, 'beta': beta}) for p in (0.1, 0.25, 0.5, 1.0) for beta in (0.1, 0.25, 0.5)]
    + [('l2', {'strength': s}) for s in (0.1, 1.0, 10.0)]
    + [('ewc', {'strength': s}) for s in (1e3, 1e4, 1e5)]
    + [('replay', {'fraction': 0.1})]
)
QUICK_GRID = [('finetune', {}), ('sfa', {'p': 0.25, 'beta': 0.25}), ('l2', {'strength': 1.0})]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
  args = parser.parse_args()
  compile_cache.enable_compilation_cache()
  stream = tasks.make_stream(DEMO_DEFAULTS['stream'], source=DEMO_DEFAULTS['source'])
  seeds = (0,) if args.quick else DEMO_DEFAULTS['seeds']
  config = DEMO_DEFAULTS['config']
  runs = []
  start = time.perf_counter()
  for name, hyperparams in QUICK_GRID if args.quick else GRID:
    method = continual.make_method(name, **hyperparams)
    for seed in seeds:
      result = continual.run_sequence(stream, method, dataclasses.replace(config, seed=seed, eval_every=0))
      runs.append(result.to_json() | {'seed': seed})
    print(report.markdown_table(report.summarize_runs(runs[-len(seeds):]), stream.task_names).splitlines()[-1], flush=True)
  rows = sorted(report.summarize_runs(runs), key=lambda row: -row['average_accuracy'][0])
  table = report.markdown_table(rows, stream.task_names)
  os.makedirs(args.out, exist_ok=True)
  suffix = '_quick' if args.quick else ''
  with open(os.path.join(args.out, f'mnist_pair_sweep{suffix}.json'), 'w') as f:
    json.dump({'seeds': list(seeds), 'config': dataclasses.asdict(config), 'table': rows, 'runs': runs}, f, indent=1)
  with open(os.path.join(args.out, f'mnist_pair_sweep{suffix}.md'), 'w') as f:
    f.write(f'# MNIST pair sweep (sorted by mean accuracy over both tasks)\n\nCommand: '
            f'`python experiments/mnist_pair_sweep.py{" --quick" if args.quick else ""}` '
            f'({time.perf_counter() - start:.0f} s on this machine)\n\n{table}\n')
  print(f'\n{table}')


if __name__ == '__main__':
  main()
