"""Many tasks (the paper's open questions 2 and 4): does SFA's anchoring hold over 100 tasks, and do several anchors help?

Part 1, 100 tasks: permuted MNIST with 100 pixel permutations (bundled 5000-image MNIST, 4000 train
and 1000 test images per task, domain-incremental: one shared 10-way head), MLP 784-256-256-10,
Adam 1e-3, batch 64, a small budget of 1 epoch (62 steps) per task, one seed (the first of --seeds):

  finetune; sfa with beta = 0.25 and p in {0.1, 0.25, 0.5, 1}; multi-anchor-sfa (p = 0.25, beta = 0.25);
  replay (10 % of each past task, half of each batch: the data-buffer reference)

Every task is evaluated after every task (the 100 x 100 accuracy matrix): final average accuracy,
forgetting (max convention), the accuracy of the early tasks over time.

Part 2, 10 tasks: the same stream cut to 10 tasks, 2 epochs per task, 3 seeds: single-anchor SFA
against multi-anchor SFA (the anchor is the mean of the ends of all past tasks, `continual` module
docstring) at p = 0.25 and beta in {0.25, 0.5}, beside finetune and replay: does the mean anchor
close the gap to replay?

  python experiments/many_tasks.py            # full run
  python experiments/many_tasks.py --quick    # digits 8x8: 4 tasks, then 3 tasks; one seed

Writes experiments/results/many_tasks.{json,md,png} (and many_tasks_10.png: average accuracy over
the 10-task runs).
"""

import dataclasses
import os

import numpy as np

from sfa_jax import engine
from sfa_jax import metrics
from sfa_jax import tasks
from sfa_jax.cli import plots

import scaffold

LONG_GRID = [
    ('finetune', {}),
    ('sfa', {'p': (0.1, 0.25, 0.5, 1.0), 'beta': (0.25,)}),
    ('multi-anchor-sfa', {'p': (0.25,), 'beta': (0.25,)}),
    ('replay', {'fraction': (0.1,)}),
]
SHORT_GRID = [
    ('finetune', {}),
    ('sfa', {'p': (0.25,), 'beta': (0.25, 0.5)}),
    ('multi-anchor-sfa', {'p': (0.25,), 'beta': (0.25, 0.5)}),
    ('replay', {'fraction': (0.1,)}),
]
QUICK_LONG_GRID = [('finetune', {}), ('multi-anchor-sfa', {'p': (0.5,), 'beta': (0.25,)})]
QUICK_SHORT_GRID = [('sfa', {'p': (0.5,), 'beta': (0.25,)}), ('replay', {'fraction': (0.1,)})]
EARLY_TASKS = 10  # "early tasks": the first ten of the long stream


def long_run_summary(run):
  """The numbers of one long run: final average accuracy, forgetting, plasticity, early tasks over time."""
  matrix = np.asarray(run['accuracy_matrix'])
  early = min(EARLY_TASKS, len(matrix))
  return {
      'method': run['method'],
      'average_accuracy': float(metrics.average_accuracy(matrix)),
      'forgetting': float(metrics.forgetting(matrix)),
      'just_trained': float(np.mean(np.diag(matrix))),  # each task right after training it
      'task0_final': float(matrix[-1, 0]),
      'early_final': float(matrix[-1, :early].mean()),
      'last_half_final': float(matrix[-1, len(matrix) // 2:].mean()),
      'train_seconds': run['seconds']['train'],
      'seconds': run['seconds']['total'],
  }


def _markdown(long_rows, long_name, short_rows, short_name, png_names):
  cell = lambda mean, std: f'{mean:.3f} ± {std:.3f}'
  lines = ['# Many tasks: SFA over a long permuted-MNIST stream, and multi-anchor SFA', '',
           f'## Part 1: {long_name}', '', f'![long stream]({png_names[0]})', '',
           '| method | final average accuracy | forgetting | each task right after training | task 0 at the end | '
           f'the first {EARLY_TASKS} tasks at the end | last half at the end | train s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for row in long_rows:
    lines.append(f"| {row['method']} | **{row['average_accuracy']:.3f}** | {row['forgetting']:.3f} | "
                 f"{row['just_trained']:.3f} | {row['task0_final']:.3f} | {row['early_final']:.3f} | "
                 f"{row['last_half_final']:.3f} | {row['train_seconds']:.0f} |")
  lines += ['', f'## Part 2: {short_name}, single- against multi-anchor SFA', '', f'![short stream]({png_names[1]})', '',
            '| method | seeds | final average accuracy | forgetting | BWT |', '|---|---:|---:|---:|---:|']
  for row in short_rows:
    lines.append(f"| {row['method']} | {row['seeds']} | **{cell(*row['average_accuracy'])}** | "
                 f"{cell(*row['forgetting'])} | {cell(*row['backward_transfer'])} |")
  return '\n'.join(lines)


def experiment(args) -> scaffold.Outcome:
  source = 'digits' if args.quick else 'offline'
  seeds = scaffold.seeds_of(args)
  setting = tasks.DOMAIN_INCREMENTAL
  long_stream = tasks.make_stream('permuted-mnist', source=source, num_tasks=4 if args.quick else 100, setting=setting)
  short_stream = tasks.make_stream('permuted-mnist', source=source, num_tasks=3 if args.quick else 10, setting=setting)
  base = engine.TrainConfig(model='mlp', batch_size=32 if args.quick else 64, learning_rate=1e-3, eval_batch_size=1000)
  long_config = dataclasses.replace(base, epochs_per_task=1)
  short_config = dataclasses.replace(base, epochs_per_task=1 if args.quick else 2)

  print(f'Part 1: {len(long_stream)} tasks, seed {seeds[0]}', flush=True)
  long_runs = scaffold.train(long_stream, QUICK_LONG_GRID if args.quick else LONG_GRID, long_config, seeds[:1], args.sweep)
  print(f'Part 2: {len(short_stream)} tasks, seeds {list(seeds)}', flush=True)
  short_runs = scaffold.train(short_stream, QUICK_SHORT_GRID if args.quick else SHORT_GRID, short_config, seeds, args.sweep)

  name = scaffold.output_name(args, 'many_tasks')
  png_names = (f'{name}.png', f'{name}_10.png')
  long_name = f'{len(long_stream)} permuted-MNIST tasks ({source}), 1 epoch per task, seed {seeds[0]}'
  plots.long_stream_plot(long_runs, os.path.join(args.out, png_names[0]), early_tasks=EARLY_TASKS, title=long_name)
  plots.average_accuracy_plot(short_runs, os.path.join(args.out, png_names[1]),
                              title=f'{len(short_stream)} permuted-MNIST tasks, {len(seeds)} seeds')
  long_rows = [long_run_summary(run) for run in long_runs]
  short_rows = engine.summarize_runs(short_runs)
  payload = {
      'source': source, 'setting': setting, 'seeds': list(seeds),
      # The long runs' curves (eval only at task ends) repeat their accuracy matrices: left out.
      'long': {'tasks': len(long_stream), 'config': engine.run.describe_config(long_config), 'summary': long_rows,
               'runs': [{k: v for k, v in run.items() if k != 'curve'} for run in long_runs]},
      'short': {'tasks': len(short_stream), 'config': engine.run.describe_config(short_config), 'table': short_rows, 'runs': short_runs},
  }
  short_name = f'{len(short_stream)} tasks, {short_config.epochs_per_task} epochs per task, {len(seeds)} seeds'
  return scaffold.Outcome(name, payload, _markdown(long_rows, long_name, short_rows, short_name, png_names))


def main(argv=None) -> None:
  scaffold.run_script(__file__, scaffold.experiment_parser(__doc__), argv, experiment)


if __name__ == '__main__':
  main()
