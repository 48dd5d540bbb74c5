"""Adaptive p (the paper's open question 1): average when the params drift far from the anchor, not every p·T steps.

MNIST task pair (even digits, then odd digits; bundled 5000-image MNIST, one shared head), the demo's
config (`sfa_jax.cli.presets.DEMO_DEFAULTS`: MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task),
3 seeds. Two families of equal size (8 configurations each), chosen before the run:

  sfa            p in {0.1, 0.25, 0.5, 1} x beta in {0.25, 0.5}           (fixed period)
  adaptive-sfa   threshold in {0.05, 0.1, 0.15, 0.2} x beta in {0.25, 0.5}, min_p = 0.05
                 (`sfa_jax.adaptive`: average when ||θ + u − θ_o|| >= threshold·||θ_o||, at most
                 every 0.05·T steps, and at the end of the task)
  finetune
  follow-up      adaptive-sfa threshold in {0.25, 0.3, 0.4} x beta in {0.25, 0.5}: added after the first
                 run showed the thresholds above too tight (post hoc; reported as its own family, and
                 merged with the first in 'adaptive-sfa (all 14)')

The thresholds span the drift that fine-tuning reaches on task B: ||θ − θ_o|| / ||θ_o|| grows from
0.02 after one step to 0.27 at the end of task B (first seed, measured before this run). Each
configuration is a point (task A accuracy, task B accuracy), mean ± std over seeds; each family is
summed up by the area its Pareto frontier dominates (`scaffold.frontier_area`). For adaptive SFA
the table also gives how many averages it made on task B and where the first one fell.

  python experiments/adaptive_p.py            # full run
  python experiments/adaptive_p.py --quick    # digits 8x8, one seed, two configurations

Writes experiments/results/adaptive_p.{json,md,png}.
"""

import os

import numpy as np

from sfa_jax import engine
from sfa_jax.cli import plots

import scaffold

MIN_P = 0.05
GRID = [
    ('sfa', {'p': (0.1, 0.25, 0.5, 1.0), 'beta': (0.25, 0.5)}),
    ('adaptive-sfa', {'threshold': (0.05, 0.1, 0.15, 0.2), 'beta': (0.25, 0.5), 'min_p': (MIN_P,)}),
    ('finetune', {}),
]
FOLLOW_UP_THRESHOLDS = (0.25, 0.3, 0.4)
FOLLOW_UP = [('adaptive-sfa', {'threshold': FOLLOW_UP_THRESHOLDS, 'beta': (0.25, 0.5), 'min_p': (MIN_P,)})]
QUICK_GRID = [('sfa', {'p': (0.25,), 'beta': (0.5,)}), ('adaptive-sfa', {'threshold': (0.1,), 'beta': (0.5,), 'min_p': (MIN_P,)})]


def _family(run):
  if run['method_name'] == 'adaptive-sfa' and run['hyperparams']['threshold'] in FOLLOW_UP_THRESHOLDS:
    return 'adaptive-sfa (follow-up)'
  return run['method_name']


def averaging_stats(runs):
  """Per configuration label: averages on the last task and where the first fell (fraction of it; None if
  some seed never averaged), means over seeds."""
  stats = {}
  for run in runs:
    start, total = sum(run['steps_per_task'][:-1]), run['steps_per_task'][-1]
    steps = [s - start for s in run['averaging_steps'] if s > start]
    stats.setdefault(run['method'], []).append((len(steps), steps[0] / total if steps else None))
  first_at = lambda values: float(np.mean([f for _, f in values])) if all(n for n, _ in values) else None
  return {label: {'averages': float(np.mean([n for n, _ in values])), 'first_at': first_at(values)}
          for label, values in stats.items()}


def _markdown(families, areas, stats, png_name, seeds):
  lines = ['# Adaptive p: SFA averaging when the drift from the anchor is large', '',
           f'MNIST pair, final accuracy on task A (even) and task B (odd), mean ± std over {len(seeds)} seeds.', '',
           f'![trade-off]({png_name})', '',
           '## Frontier area per family', '',
           '| family | configurations | frontier area |', '|---|---:|---:|']
  for name, area in sorted(areas.items(), key=lambda item: -item[1]):
    count = len(families[name]) if name in families else name.split('all ')[-1].rstrip(')')
    lines.append(f'| {name} | {count} | {area:.3f} |')
  first_at = lambda label: '—' if stats[label]['first_at'] is None else f"{stats[label]['first_at']:.2f}"
  lines += ['', '## Every configuration', ''] + scaffold.tradeoff_rows(families, {
      'averages on B': lambda label: f"{stats[label]['averages']:.1f}",
      'first average at (fraction of B)': first_at,
  })
  return '\n'.join(lines)


def experiment(args) -> scaffold.Outcome:
  stream, config, seeds = scaffold.pair_stream(args)
  runs = scaffold.train(stream, QUICK_GRID if args.quick else GRID + FOLLOW_UP, config, seeds, args.sweep)

  families = scaffold.tradeoff_points(runs, family=_family)
  areas = scaffold.family_areas(families)
  if 'adaptive-sfa (follow-up)' in families:
    both = families['adaptive-sfa'] + families['adaptive-sfa (follow-up)']
    areas[f'adaptive-sfa (all {len(both)})'] = scaffold.family_areas({'all': both})['all']
  stats = averaging_stats(runs)
  name = scaffold.output_name(args, 'adaptive_p')
  plots.tradeoff_plot(families, os.path.join(args.out, f'{name}.png'), frontiers=scaffold.family_frontiers(families),
                      axis_labels=('task A accuracy (even digits)', 'task B accuracy (odd digits)'),
                      title=f'MNIST pair: fixed p against adaptive p ({len(seeds)} seeds)')
  payload = {'stream': stream.name, 'source': stream.source, 'seeds': list(seeds), 'config': engine.run.describe_config(config),
             'min_p': MIN_P, 'families': families, 'frontier_areas': areas, 'averaging': stats, 'runs': runs}
  return scaffold.Outcome(name, payload, _markdown(families, areas, stats, f'{name}.png', seeds))


def main(argv=None) -> None:
  scaffold.run_script(__file__, scaffold.experiment_parser(__doc__), argv, experiment)


if __name__ == '__main__':
  main()
