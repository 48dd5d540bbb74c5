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
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sfa_jax.engine import compile_cache  # noqa: E402
from sfa_jax import engine  # noqa: E402
import scaffold  # noqa: E402
from sfa_jax import metrics  # noqa: E402
from sfa_jax.cli import report  # noqa: E402
from sfa_jax import tasks  # noqa: E402

LONG_GRID = (
    [('finetune', {})]
    + scaffold.method_grid('sfa', p=(0.1, 0.25, 0.5, 1.0), beta=(0.25,))
    + scaffold.method_grid('multi-anchor-sfa', p=(0.25,), beta=(0.25,))
    + scaffold.method_grid('replay', fraction=(0.1,))
)
SHORT_GRID = (
    [('finetune', {})]
    + scaffold.method_grid('sfa', p=(0.25,), beta=(0.25, 0.5))
    + scaffold.method_grid('multi-anchor-sfa', p=(0.25,), beta=(0.25, 0.5))
    + scaffold.method_grid('replay', fraction=(0.1,))
)
QUICK_LONG_GRID = [('finetune', {})] + scaffold.method_grid('multi-anchor-sfa', p=(0.5,), beta=(0.25,))
QUICK_SHORT_GRID = scaffold.method_grid('sfa', p=(0.5,), beta=(0.25,)) + scaffold.method_grid('replay', fraction=(0.1,))
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


def long_plot(runs, path, title):
  """Three panels: average accuracy so far; accuracy of the early tasks over time; final accuracy per task."""
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  for i, run in enumerate(runs):
    matrix = np.asarray(run['accuracy_matrix'])
    early = min(EARLY_TASKS, len(matrix))
    trained = np.arange(1, len(matrix) + 1)
    color = f'C{i % 10}'
    axes[0].plot(trained, metrics.average_accuracy_curve(matrix), color=color, label=run['method'])
    axes[1].plot(trained[early - 1:], matrix[early - 1:, :early].mean(1), color=color)
    axes[1].plot(trained, matrix[:, 0], ':', color=color, alpha=0.7)
    axes[2].plot(trained, matrix[-1], '.', color=color, markersize=3)
  axes[0].set_ylabel('average accuracy on the tasks seen so far')
  axes[1].set_ylabel(f'accuracy: tasks 0-{EARLY_TASKS - 1} (line), task 0 (dotted)')
  axes[2].set_ylabel('final accuracy')
  for ax, xlabel in zip(axes, ('tasks trained', 'tasks trained', 'task index')):
    ax.set_xlabel(xlabel)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='lower center', ncol=len(runs), fontsize=8)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


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


def main(argv=None) -> None:
  args = scaffold.experiment_parser(__doc__).parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  source = 'digits' if args.quick else 'offline'
  seeds = scaffold.seeds_of(args)
  setting = tasks.DOMAIN_INCREMENTAL
  long_stream = tasks.make_stream('permuted-mnist', source=source, num_tasks=4 if args.quick else 100, setting=setting)
  short_stream = tasks.make_stream('permuted-mnist', source=source, num_tasks=3 if args.quick else 10, setting=setting)
  base = engine.TrainConfig(model='mlp', batch_size=32 if args.quick else 64, learning_rate=1e-3, eval_batch_size=1000)
  long_config = dataclasses.replace(base, epochs_per_task=1)
  short_config = dataclasses.replace(base, epochs_per_task=1 if args.quick else 2)

  print(f'Part 1: {len(long_stream)} tasks, seed {seeds[0]}', flush=True)
  long_runs = scaffold.run_grid(long_stream, QUICK_LONG_GRID if args.quick else LONG_GRID, long_config, seeds[:1], as_sweep=args.sweep)
  print(f'Part 2: {len(short_stream)} tasks, seeds {list(seeds)}', flush=True)
  short_runs = scaffold.run_grid(short_stream, QUICK_SHORT_GRID if args.quick else SHORT_GRID, short_config, seeds, as_sweep=args.sweep)

  name = 'many_tasks_quick' if args.quick else 'many_tasks'
  png_names = (f'{name}.png', f'{name}_10.png')
  os.makedirs(args.out, exist_ok=True)
  long_name = f'{len(long_stream)} permuted-MNIST tasks ({source}), 1 epoch per task, seed {seeds[0]}'
  long_plot(long_runs, os.path.join(args.out, png_names[0]), long_name)
  scaffold.average_accuracy_plot(short_runs, os.path.join(args.out, png_names[1]),
                                   title=f'{len(short_stream)} permuted-MNIST tasks, {len(seeds)} seeds')
  long_rows = [long_run_summary(run) for run in long_runs]
  short_rows = report.summarize_runs(short_runs)
  payload = {
      'source': source, 'setting': setting, 'seeds': list(seeds),
      # The long runs' curves (eval only at task ends) repeat their accuracy matrices: left out.
      'long': {'tasks': len(long_stream), 'config': engine.run.describe_config(long_config), 'summary': long_rows,
               'runs': [{k: v for k, v in run.items() if k != 'curve'} for run in long_runs]},
      'short': {'tasks': len(short_stream), 'config': engine.run.describe_config(short_config), 'table': short_rows, 'runs': short_runs},
  }
  short_name = f'{len(short_stream)} tasks, {short_config.epochs_per_task} epochs per task, {len(seeds)} seeds'
  markdown = _markdown(long_rows, long_name, short_rows, short_name, png_names)
  scaffold.write_results(args.out, name, payload, markdown, scaffold.command_line(__file__, argv),
                           time.perf_counter() - start)
  print(markdown)


if __name__ == '__main__':
  main()
