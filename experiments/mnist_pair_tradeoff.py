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

import dataclasses
import os
import time

import numpy as np

from sfa_jax.engine import compile_cache
from sfa_jax import engine
import scaffold

GRID = (
    scaffold.method_grid('sfa', p=(0.05, 0.1, 0.25, 0.5, 0.75, 0.96, 1.0), beta=(0.25, 0.5, 0.75))
    + scaffold.method_grid('l2', strength=np.logspace(-2, 2, 13).round(4).tolist())
    + scaffold.method_grid('ewc', strength=(1e2, 1e3, 1e4, 1e5, 1e7))
    + scaffold.method_grid('replay', fraction=(0.01, 0.05, 0.1))
    + [('finetune', {})]
)
QUICK_GRID = (
    scaffold.method_grid('sfa', p=(0.5, 1.0), beta=(0.5,))
    + scaffold.method_grid('l2', strength=(1.0,))
    + scaffold.method_grid('replay', fraction=(0.1,))
    + [('finetune', {})]
)


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


def main(argv=None) -> None:
  args = scaffold.experiment_parser(__doc__).parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  stream, config, seeds = scaffold.pair_stream(args)
  runs = scaffold.run_grid(stream, QUICK_GRID if args.quick else GRID, config, seeds, as_sweep=args.sweep)

  families = scaffold.tradeoff_points(runs)
  areas = scaffold.family_areas(families)
  split_areas = {k: v for k, v in scaffold.family_areas(scaffold.tradeoff_points(runs, family=_sfa_split)).items()
                 if k.startswith('sfa (')}
  name = 'mnist_pair_tradeoff_quick' if args.quick else 'mnist_pair_tradeoff'
  os.makedirs(args.out, exist_ok=True)
  scaffold.tradeoff_plot(families, os.path.join(args.out, f'{name}.png'),
                           axis_labels=('task A accuracy (even digits)', 'task B accuracy (odd digits)'),
                           title=f'MNIST pair: accuracy after task B ({len(seeds)} seeds, mean ± std)')
  payload = {'stream': stream.name, 'source': stream.source, 'seeds': list(seeds), 'config': engine.run.describe_config(config),
             'families': families, 'frontier_areas': areas | split_areas, 'runs': runs}
  markdown = _markdown(families, areas, split_areas, f'{name}.png')
  scaffold.write_results(args.out, name, payload, markdown, scaffold.command_line(__file__, argv),
                           time.perf_counter() - start)
  print(markdown)


if __name__ == '__main__':
  main()
