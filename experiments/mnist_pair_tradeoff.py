"""The paper's Figure 9: accuracy on task A (even digits) against task B (odd digits) after both.

MNIST task pair (bundled 5000-image MNIST, one shared head), the demo's config
(`sfa_jax.cli.presets.DEMO_DEFAULTS`: MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task), 3 seeds:

  SFA        p in {0.05, 0.1, 0.25, 0.5, 0.75, 0.96, 1} x beta in {0.25, 0.5, 0.75}
  L2         strength 13 values log-spaced over 0.01 .. 100   (0.01: as fine-tuning; 100: B not learned)
  EWC        strength in {1e2, 1e3, 1e4, 1e5, 1e7}  (a probe: 10 and 100 act as fine-tuning; with Adam, even
             1e7 leaves B at ~0.5: EWC never reaches 'no learning'; its Fisher costs ~45 s per run here)
  replay     1, 5, 10 % of task A kept (half of each batch from the memory)
  SI         strength in {1, 10, ..., 1e6}      (2c of Zenke et al; damping 0.1)
  MAS        strength in {0.01, 0.1, ..., 1e4}
  LwF        alpha in {0.1, 0.3, 1, 3, 10, 30}  (temperature 2)
  DER++      buffer of 20, 100, 200 images (1, 5, 10 % of task A), alpha 0.5, beta 0.5
  A-GEM      20, 100, 200 images of task A kept, reference batch 64
  finetune

The field's methods span the same range, from fine-tuning to (nearly) no learning of B, so that
their frontiers are compared over one range with SFA's, L2's and replay's.

Each configuration is a point (task A accuracy, task B accuracy), mean ± std over seeds. Each family's
trade-off is summed up by the area its Pareto frontier dominates above (0, 0) (`scaffold.frontier_area`).

  python experiments/mnist_pair_tradeoff.py            # full run
  python experiments/mnist_pair_tradeoff.py --quick    # digits 8x8, one seed, a few configurations

Writes experiments/results/mnist_pair_tradeoff.{json,md,png} and the run log
mnist_pair_tradeoff.runs.jsonl (one finished run a line: a rerun trains only the runs it lacks).
"""

import json
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
    ('si', {'strength': (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)}),
    ('mas', {'strength': (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)}),
    ('lwf', {'alpha': (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)}),
    ('derpp', {'buffer_size': (20, 100, 200), 'alpha': (0.5,), 'beta': (0.5,)}),
    ('agem', {'memory_per_task': (20, 100, 200), 'reference_batch': (64,)}),
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


def train_logged(stream, grid, config, seeds, as_sweep, runs_path):
  """:func:`scaffold.train` of the configurations not yet in the run log ``runs_path`` (a run
  of the same stream and settings, by method and seed), each appended as it finishes; returns
  every configuration's run, in the grid's order."""
  settings_id = json.dumps([stream.name, stream.source, engine.run.describe_config(config)], sort_keys=True)
  done = scaffold.load_runs(runs_path, lambda run: (run['method'], run['seed']) if run['settings_id'] == settings_id else None)
  configurations = scaffold.configurations(grid, config, seeds)
  list(scaffold.train_missing(stream, configurations, done, runs_path, lambda label, seed: (label, seed),
                              fields=lambda finished, seconds: {'settings_id': settings_id}, keep_curve=True,
                              as_sweep=as_sweep, log=lambda line: print(line, flush=True)))
  return [{k: v for k, v in done[method.label, run_config.seed].items() if k != 'settings_id'}
          for method, run_config in configurations]


def experiment(args) -> scaffold.Outcome:
  stream, config, seeds = scaffold.pair_stream(args)
  name = scaffold.output_name(args, 'mnist_pair_tradeoff')
  os.makedirs(args.out, exist_ok=True)
  runs = train_logged(stream, QUICK_GRID if args.quick else GRID, config, seeds, args.sweep,
                      os.path.join(args.out, f'{name}.runs.jsonl'))

  families = scaffold.tradeoff_points(runs)
  areas = scaffold.family_areas(families)
  split_areas = {k: v for k, v in scaffold.family_areas(scaffold.tradeoff_points(runs, family=_sfa_split)).items()
                 if k.startswith('sfa (')}
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
