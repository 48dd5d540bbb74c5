"""The paper's Figures 7-8: can the averaging weight beta at p = 1 recover what averaging often (p < 1) gives?

On the long stream of `p_ablation.py` (default: permuted MNIST, 10 tasks, domain-incremental), 3 seeds:

  p = 1       beta in {0.1, 0.25, 0.5, 0.75, 0.9}    (one average per task, at its end: WiSE-FT-like)
  p < 1       p in {0.25, 0.5} x beta in {0.25, 0.5, 0.75}
  finetune    (beta = 0)

Each configuration gives a stability-plasticity point (final accuracy on the past tasks, accuracy on each
task right after training it); the two groups' Pareto frontiers and their areas answer the question, as does
the best final average accuracy of each group.

  python experiments/beta_ablation.py              # full run
  python experiments/beta_ablation.py --quick      # digits 8x8, 3 tasks, one seed

Writes experiments/results/beta_ablation.{json,md,png} and beta_ablation_average.png.
"""

import os

from sfa_jax import engine
from sfa_jax.cli import plots
from sfa_jax.cli import report

import scaffold

GRID = [
    ('sfa', {'p': (1.0,), 'beta': (0.1, 0.25, 0.5, 0.75, 0.9)}),
    ('sfa', {'p': (0.25, 0.5), 'beta': (0.25, 0.5, 0.75)}),
    ('finetune', {}),
]
QUICK_GRID = [('sfa', {'p': (1.0, 0.5), 'beta': (0.5,)})]


def _group(run):
  """p = 1 or p < 1; fine-tuning is p = 1 with beta = 0, so it joins the p = 1 group."""
  if run['method_name'] == 'finetune' or run['hyperparams']['p'] == 1.0:
    return 'p = 1'
  return 'p < 1'


def experiment(args) -> scaffold.Outcome:
  stream, config = scaffold.long_stream(args)
  seeds = scaffold.seeds_of(args)
  runs = scaffold.train(stream, QUICK_GRID if args.quick else GRID, config, seeds, args.sweep)

  groups = scaffold.tradeoff_points(runs, point=scaffold.stability_plasticity, family=_group)
  areas = scaffold.family_areas(groups)
  best = scaffold.best_per_family(runs, family=_group)
  name = scaffold.output_name(args, 'beta_ablation')
  plots.tradeoff_plot(groups, os.path.join(args.out, f'{name}.png'), frontiers=scaffold.family_frontiers(groups),
                      axis_labels=('final accuracy on the past tasks (stability)',
                                   'accuracy on each task right after training it (plasticity)'),
                      title=f'{stream.name}, {len(stream)} tasks: beta at p = 1 vs p < 1')
  plots.average_accuracy_plot(runs, os.path.join(args.out, f'{name}_average.png'),
                              title=f'{stream.name} ({len(stream)} tasks): beta at p = 1 vs p < 1')
  rows = sorted(engine.summarize_runs(runs), key=lambda row: -row['average_accuracy'][0])
  best_lines = '\n'.join(f"| {row['family']} | {row['method']} | {row['average_accuracy'][0]:.3f} ± "
                         f"{row['average_accuracy'][1]:.3f} | {areas[row['family']]:.3f} |" for row in best)
  points = '\n'.join(f"| {p['label']} | {p['mean'][0]:.3f} ± {p['std'][0]:.3f} | {p['mean'][1]:.3f} ± {p['std'][1]:.3f} |"
                     for group in groups.values() for p in group)
  markdown = (
      f'# beta at p = 1 against p < 1: {stream.name}, {len(stream)} tasks, {stream.setting}\n\n'
      '| group | best configuration | its final average accuracy | frontier area (stability x plasticity) |\n'
      f'|---|---|---:|---:|\n{best_lines}\n\n'
      f'![stability-plasticity]({name}.png)\n\n![average accuracy]({name}_average.png)\n\n'
      '## Stability and plasticity of each configuration\n\n'
      '| configuration | past tasks at the end | each task right after training it |\n|---|---:|---:|\n'
      f'{points}\n\n## Every configuration\n\n{report.markdown_table(rows, stream.task_names)}'
  )
  payload = {'stream': {'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'tasks': len(stream)},
             'seeds': list(seeds), 'config': engine.run.describe_config(config), 'groups': groups, 'frontier_areas': areas,
             'best': best, 'table': rows, 'runs': runs}
  return scaffold.Outcome(name, payload, markdown)


def main(argv=None) -> None:
  parser = scaffold.experiment_parser(__doc__)
  scaffold.add_stream_arguments(parser)
  scaffold.run_script(__file__, parser, argv, experiment)


if __name__ == '__main__':
  main()
