"""The paper's Figure 9: accuracy on task A (even digits) against task B (odd digits) after both.

MNIST task pair (bundled 5000-image MNIST, one shared head), the demo's config
(`sfa_jax.cli.presets.DEMO_DEFAULTS`: MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task), 3 seeds:

  SFA        p in {0.05, 0.1, 0.25, 0.5, 0.75, 0.96, 1} x beta in {0.25, 0.5, 0.75}
  L2         strength 13 values log-spaced over 0.01 .. 100   (0.01: as fine-tuning; 100: B not learned)
  EWC        strength in {1e2, 1e3, 1e4, 1e5, 1e7}  (a probe: 10 and 100 act as fine-tuning; with Adam, even
             1e7 leaves B at ~0.5: EWC never reaches 'no learning'; its Fisher costs ~45 s per run here)
  replay     1, 5, 10 % of task A kept (half of each batch from the memory)
  finetune

Each configuration is a point (task A accuracy, task B accuracy), mean ± std over seeds. Each family's
trade-off is summed up by the area its Pareto frontier dominates above (0, 0) (`scaffold.frontier_area`).

  python experiments/mnist_pair_tradeoff.py            # full run
  python experiments/mnist_pair_tradeoff.py --quick    # digits 8x8, one seed, a few configurations

Writes experiments/results/mnist_pair_tradeoff.{json,md,png}.
"""

import os

import numpy as np

from sfa_jax import engine
from sfa_jax.cli import plots

import scaffold

GRID = [
    ('sfa', {'p': (0.05, 0.1, 0.25, 0.5, 0.75, 0.96, 1.0), 'beta': (0.25, 0.5, 0.75)}),
    ('l2', {'strength': np.logspace(-2, 2, 13).round(4).tolist()}),
    ('ewc', {'strength': (1e2, 1e3, 1e4, 1e5, 1e7)}),
    ('replay', {'fraction': (0.01, 0.05, 0.1)}),
    ('finetune', {}),
]
QUICK_GRID = [
    ('sfa', {'p': (0.5, 1.0), 'beta': (0.5,)}),
    ('l2', {'strength': (1.0,)}),
    ('replay', {'fraction': (0.1,)}),
    ('finetune', {}),
]


def _sfa_split(run):
  """SFA's family split in two: one average at the task's end (p = 1, WiSE-FT-like) or several."""
  if run['method_name'] != 'sfa':
    return run['method_name']
  return 'sfa (p = 1)' if run['hyperparams']['p'] == 1.0 else 'sfa (p < 1)'


def _markdown(families, areas, split_areas, png_name):
  lines = ['# MNIST pair trade-off (the paper\'s Figure 9)', '',
           'Final accuracy on task A (even digits) and task B (odd digits), mean ± std over seeds.', '',
           f'![trade-off]({png_name})', '',
           '## Frontier area per method family', '',
           'Area dominated by the family\'s Pareto frontier above (0, 0); 1.0 = both tasks perfect.', '',
           '| family | configurations | frontier area |', '|---|---:|---:|']
  for name, area in sorted(areas.items() | split_areas.items(), key=lambda item: -item[1]):
    count = len(families[name]) if name in families else '—'
    lines.append(f'| {name} | {count} | {area:.3f} |')
  lines += ['', '## Every configuration', ''] + scaffold.tradeoff_rows(families)
  return '\n'.join(lines)


def experiment(args) -> scaffold.Outcome:
  stream, config, seeds = scaffold.pair_stream(args)
  runs = scaffold.train(stream, QUICK_GRID if args.quick else GRID, config, seeds, args.sweep)

  families = scaffold.tradeoff_points(runs)
  areas = scaffold.family_areas(families)
  split_areas = {k: v for k, v in scaffold.family_areas(scaffold.tradeoff_points(runs, family=_sfa_split)).items()
                 if k.startswith('sfa (')}
  name = scaffold.output_name(args, 'mnist_pair_tradeoff')
  plots.tradeoff_plot(families, os.path.join(args.out, f'{name}.png'), frontiers=scaffold.family_frontiers(families),
                      axis_labels=('task A accuracy (even digits)', 'task B accuracy (odd digits)'),
                      title=f'MNIST pair: accuracy after task B ({len(seeds)} seeds, mean ± std)')
  payload = {'stream': stream.name, 'source': stream.source, 'seeds': list(seeds), 'config': engine.run.describe_config(config),
             'families': families, 'frontier_areas': areas | split_areas, 'runs': runs}
  return scaffold.Outcome(name, payload, _markdown(families, areas, split_areas, f'{name}.png'))


def main(argv=None) -> None:
  scaffold.run_script(__file__, scaffold.experiment_parser(__doc__), argv, experiment)


if __name__ == '__main__':
  main()
