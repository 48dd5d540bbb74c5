"""The sweep that chose the offline demo's hyper-parameters (`sfa-jax demo`, `presets.DEMO_DEFAULTS`).

MNIST task pair (even digits, then odd digits; bundled 5000-image MNIST; one shared head, the
class-incremental setting), MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task, 3 seeds.
Each configuration is judged by the mean accuracy over *both* tasks after the sequence.

  python experiments/mnist_pair_sweep.py            # about 2 minutes on 2 CPU cores
  python experiments/mnist_pair_sweep.py --quick    # one seed, a few configurations

Writes experiments/results/mnist_pair_sweep.{json,md}.
"""

import dataclasses
import sys
import time

from sfa_jax.engine import compile_cache
from sfa_jax import engine
import scaffold
from sfa_jax.cli import report
from sfa_jax import tasks
from sfa_jax.cli.presets import DEMO_DEFAULTS

GRID = (
    [('finetune', {})]
    + scaffold.method_grid('sfa', p=(0.1, 0.25, 0.5, 1.0), beta=(0.1, 0.25, 0.5))
    + scaffold.method_grid('l2', strength=(0.1, 1.0, 10.0))
    + scaffold.method_grid('ewc', strength=(1e3, 1e4, 1e5))
    + [('replay', {'fraction': 0.1})]
)
QUICK_GRID = [('finetune', {}), ('sfa', {'p': 0.25, 'beta': 0.25}), ('l2', {'strength': 1.0})]


def main(argv=None) -> None:
  args = scaffold.experiment_parser(__doc__).parse_args(argv)
  compile_cache.enable_compilation_cache()
  stream = tasks.make_stream(DEMO_DEFAULTS['stream'], source=DEMO_DEFAULTS['source'])
  seeds = args.seeds or ((0,) if args.quick else DEMO_DEFAULTS['seeds'])
  config = dataclasses.replace(DEMO_DEFAULTS['config'], eval_every=0)
  start = time.perf_counter()
  runs = scaffold.run_grid(stream, QUICK_GRID if args.quick else GRID, config, seeds, as_sweep=args.sweep)
  rows = sorted(report.summarize_runs(runs), key=lambda row: -row['average_accuracy'][0])
  table = report.markdown_table(rows, stream.task_names)
  name = 'mnist_pair_sweep_quick' if args.quick else 'mnist_pair_sweep'
  payload = {'seeds': list(seeds), 'config': engine.run.describe_config(config), 'table': rows, 'runs': runs}
  markdown = f'# MNIST pair sweep (sorted by mean accuracy over both tasks)\n\n{table}'
  command = ' '.join(['python experiments/mnist_pair_sweep.py'] + list(sys.argv[1:] if argv is None else argv))
  scaffold.write_results(args.out, name, payload, markdown, command, time.perf_counter() - start)
  print(f'\n{table}')


if __name__ == '__main__':
  main()
