"""The sweep that chose the offline demo's hyper-parameters (`sfa-jax demo`, `presets.DEMO_DEFAULTS`).

MNIST task pair (even digits, then odd digits; bundled 5000-image MNIST; one shared head, the
class-incremental setting), MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task, 3 seeds.
Each configuration is judged by the mean accuracy over *both* tasks after the sequence.

  python experiments/mnist_pair_sweep.py            # about 2 minutes on 2 CPU cores
  python experiments/mnist_pair_sweep.py --quick    # one seed, a few configurations

Writes experiments/results/mnist_pair_sweep.{json,md}.
"""

import dataclasses

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.cli import report
from sfa_jax.cli.presets import DEMO_DEFAULTS

import scaffold

GRID = [
    ('finetune', {}),
    ('sfa', {'p': (0.1, 0.25, 0.5, 1.0), 'beta': (0.1, 0.25, 0.5)}),
    ('l2', {'strength': (0.1, 1.0, 10.0)}),
    ('ewc', {'strength': (1e3, 1e4, 1e5)}),
    ('replay', {'fraction': (0.1,)}),
]
QUICK_GRID = [('finetune', {}), ('sfa', {'p': (0.25,), 'beta': (0.25,)}), ('l2', {'strength': (1.0,)})]


def experiment(args) -> scaffold.Outcome:
  stream = tasks.make_stream(DEMO_DEFAULTS['stream'], source=DEMO_DEFAULTS['source'])
  seeds = scaffold.seeds_of(args, DEMO_DEFAULTS['seeds'])
  config = dataclasses.replace(DEMO_DEFAULTS['config'], eval_every=0)
  runs = scaffold.train(stream, QUICK_GRID if args.quick else GRID, config, seeds, args.sweep)
  rows = sorted(engine.summarize_runs(runs), key=lambda row: -row['average_accuracy'][0])
  payload = {'seeds': list(seeds), 'config': engine.run.describe_config(config), 'table': rows, 'runs': runs}
  markdown = f'# MNIST pair sweep (sorted by mean accuracy over both tasks)\n\n{report.markdown_table(rows, stream.task_names)}'
  return scaffold.Outcome(scaffold.output_name(args, 'mnist_pair_sweep'), payload, markdown)


def main(argv=None) -> None:
  scaffold.run_script(__file__, scaffold.experiment_parser(__doc__), argv, experiment)


if __name__ == '__main__':
  main()
