"""The paper's ablation of the averaging period p on a long stream (its 20-task image experiment), offline.

SFA with p in {0.25, 0.5, 0.75, 0.96, 1.0} on a long stream, beside fine-tuning, 3 seeds, with the
accuracy on every task recorded during the whole run (every 50 steps and around each average).
beta is fixed for all p: by default chosen by a probe (beta in {0.25, 0.5, 0.75} at p = 0.5, first
seed, highest final average accuracy; the probe's numbers are in the results), or given by --beta.

Default stream: permuted MNIST, 10 tasks (bundled 5000-image MNIST, domain-incremental: one shared
10-way head), MLP 784-256-256-10, Adam 1e-3, batch 64, 2 epochs per task. --stream split-mnist, or
split-cifar100 / split-food101 with --data-dir (tfds array_record data; the paper's own streams).

  python experiments/p_ablation.py                 # full run
  python experiments/p_ablation.py --quick         # digits 8x8, 3 tasks, one seed

Writes experiments/results/p_ablation.{json,md} and p_ablation_curves.png (every task's accuracy
during the run, first seed) and p_ablation_average.png (average accuracy after each task).
"""

import dataclasses
import os

import numpy as np

from sfa_jax import engine
from sfa_jax.cli import plots

import scaffold

P_VALUES = (0.25, 0.5, 0.75, 0.96, 1.0)
BETA_PROBE = (0.25, 0.5, 0.75)


def _table(runs, task_names):
  rows = engine.summarize_runs(runs)
  points = {p['label']: p for points in scaffold.tradeoff_points(runs, point=scaffold.stability_plasticity).values()
            for p in points}
  jumps = {}
  for run in runs:
    jumps.setdefault(run['method'], []).append(scaffold.averaging_jumps(run))
  lines = ['| configuration | seeds | final average accuracy | forgetting | past tasks at the end | '
           'each task right after training it | change at an average: past tasks | : current task |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  cell = lambda mean, std: f'{mean:.3f} ± {std:.3f}'

  def jump(label, key):
    values = [j[key] for j in jumps[label] if j[key] is not None]
    return f'{np.mean(values):+.3f} ({sum(j["count"] for j in jumps[label])})' if values else '—'

  for row in rows:
    point = points[row['method']]
    lines.append(f"| {row['method']} | {row['seeds']} | **{cell(*row['average_accuracy'])}** | "
                 f"{cell(*row['forgetting'])} | {cell(point['mean'][0], point['std'][0])} | "
                 f"{cell(point['mean'][1], point['std'][1])} | {jump(row['method'], 'past')} | "
                 f"{jump(row['method'], 'current')} |")
  return '\n'.join(lines)


def experiment(args) -> scaffold.Outcome:
  stream, config = scaffold.long_stream(args)
  seeds = scaffold.seeds_of(args)
  p_values = (0.5, 1.0) if args.quick else P_VALUES

  probe = []
  beta = args.beta
  if beta is None:
    probe_betas = (0.5,) if args.quick else BETA_PROBE
    probe = scaffold.train(stream, [('sfa', {'p': (0.5,), 'beta': probe_betas})], config, seeds[:1], args.sweep)
    beta = max(probe, key=lambda run: run['metrics']['average_accuracy'])['hyperparams']['beta']
    print(f'beta = {beta} (probe at p = 0.5, seed {seeds[0]})', flush=True)

  curve_config = dataclasses.replace(config, eval_every=20 if args.quick else 50)
  runs = scaffold.train(stream, [('sfa', {'p': p_values, 'beta': (beta,)}), ('finetune', {})], curve_config, seeds, args.sweep)

  name = scaffold.output_name(args, 'p_ablation')
  first_seed = [run for run in runs if run['seed'] == seeds[0]]
  plots.curves_grid(first_seed, os.path.join(args.out, f'{name}_curves.png'))
  plots.average_accuracy_plot(runs, os.path.join(args.out, f'{name}_average.png'),
                              title=f'{stream.name} ({len(stream)} tasks, {stream.setting}): SFA by p, beta = {beta:g}')
  probe_lines = ''.join(f"\n| {run['method']} | {run['metrics']['average_accuracy']:.3f} |" for run in probe)
  probe_text = (f'beta = {beta:g}, chosen by a probe at p = 0.5 (seed {seeds[0]}, final average accuracy):\n\n'
                f'| probe | final average accuracy |\n|---|---:|{probe_lines}' if probe else f'beta = {beta:g} (given).')
  markdown = (
      f'# Averaging period p on a long stream: {stream.name}, {len(stream)} tasks, {stream.setting}\n\n'
      f'{probe_text}\n\n{_table(runs, stream.task_names)}\n\n'
      '"past tasks at the end": final accuracy on tasks 0..T-2 (stability); "each task right after training it": '
      'mean of R[k, k] over k >= 1 (plasticity). Forgetting: max-minus-final. "change at an average": mean change '
      'of the accuracy from the step before an averaging step to the step after it, over all averages of all seeds '
      '(their count in brackets), on the tasks before the current one and on the current one.\n\n'
      f'![curves]({name}_curves.png)\n\n![average accuracy]({name}_average.png)'
  )
  payload = {'stream': {'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'tasks': len(stream)},
             'seeds': list(seeds), 'config': engine.run.describe_config(curve_config), 'beta': beta, 'beta_probe': probe,
             'table': engine.summarize_runs(runs), 'runs': runs}
  return scaffold.Outcome(name, payload, markdown)


def main(argv=None) -> None:
  parser = scaffold.experiment_parser(__doc__)
  scaffold.add_stream_arguments(parser)
  parser.add_argument('--beta', type=float, help='fix beta instead of probing it')
  scaffold.run_script(__file__, parser, argv, experiment)


if __name__ == '__main__':
  main()
