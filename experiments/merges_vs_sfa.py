"""SFA against model merging (WiSE-FT, Task Arithmetic, TIES, MagMax, CoFiMA) and the classical baselines on a long
stream.

On the long stream of `p_ablation.py` (default: permuted MNIST, 10 tasks, domain-incremental), 3 seeds,
each method with its own small hyper-parameter search:

  sfa               p in {0.25, 0.5} x beta in {0.25, 0.5, 0.75}
  wise-ft           beta in {0.25, 0.5, 0.75}                        (SFA's p = 1)
  task-arithmetic   scaling in {0.3, 0.5, 0.7, 1.0}                  (task vectors from the task-0 model)
  ties              density in {0.1, 0.2, 0.5} x scaling in {0.5, 1.0}
  magmax            scaling in {0.3, 0.5, 0.7, 1.0}                  (task vectors of sequential fine-tuning)
  l2                strength in {0.1, 1, 10}
  replay            5 % and 10 % of each past task kept (half of each batch from the memory)
  finetune, joint   (lower and upper reference)

EWC runs only alone, with --family ewc (strength in {1e2, 1e3, 1e4}): its diagonal Fisher
(per-example gradients, once per task, 9 per run) costs far more than training here. So does CoFiMA,
which needs the same Fisher at every task end (10 per run): --family cofima (beta in {0.4, 0.6, 0.8} x
gamma in {0, 1}). The field's other methods run alone too, beside the main grid's results:

  si                strength in {1, 10, 100, 1000}                  (2c of Zenke et al; damping 0.1)
  mas               strength in {0.01, 0.03, 0.1, 0.3, 1, 10}
  lwf               alpha in {0.5, 1, 2}                             (temperature 2)
  derpp             buffer 500, alpha in {0.2, 0.5, 1} x beta 0.5
  agem              100 and 400 examples of each past task in memory, reference batch 64

Any family of the main grid runs alone the same way (--family magmax).

Each family is represented by its best configuration (highest mean final average accuracy). There is no
validation split: the choice is made on the test accuracies, alike for every family.

  python experiments/merges_vs_sfa.py                  # the grid above, EWC and CoFiMA aside
  python experiments/merges_vs_sfa.py --quick          # digits 8x8, 3 tasks, one seed, one config each
  python experiments/merges_vs_sfa.py --family ewc     # one family alone

Writes experiments/results/merges_vs_sfa.{json,md} and merges_vs_sfa_average.png; a family alone writes
merges_vs_sfa_<family>.*.
"""

import os

from sfa_jax import engine
from sfa_jax.cli import plots
from sfa_jax.cli import report

import scaffold

GRID = [
    ('sfa', {'p': (0.25, 0.5), 'beta': (0.25, 0.5, 0.75)}),
    ('wise-ft', {'beta': (0.25, 0.5, 0.75)}),
    ('task-arithmetic', {'scaling': (0.3, 0.5, 0.7, 1.0)}),
    ('ties', {'density': (0.1, 0.2, 0.5), 'scaling': (0.5, 1.0)}),
    ('magmax', {'scaling': (0.3, 0.5, 0.7, 1.0)}),
    ('l2', {'strength': (0.1, 1.0, 10.0)}),
    ('replay', {'fraction': (0.05, 0.1)}),
    ('finetune', {}),
    ('joint', {}),
]
QUICK_GRID = [
    ('sfa', {'p': (0.5,), 'beta': (0.5,)}), ('wise-ft', {'beta': (0.5,)}), ('ties', {'density': (0.2,), 'scaling': (1.0,)}),
    ('replay', {'fraction': (0.1,)}), ('magmax', {'scaling': (0.5,)}),
]
ALONE = {
    'ewc': ([('ewc', {'strength': (1e2, 1e3, 1e4)})], [('ewc', {'strength': (1e2,)})]),
    'cofima': ([('cofima', {'beta': (0.4, 0.6, 0.8), 'gamma': (0.0, 1.0)})], [('cofima', {'beta': (0.6,)})]),
    'si': ([('si', {'strength': (1.0, 10.0, 100.0, 1000.0)})], [('si', {'strength': (10.0,)})]),
    'mas': ([('mas', {'strength': (0.01, 0.03, 0.1, 0.3, 1.0, 10.0)})], [('mas', {'strength': (1.0,)})]),
    'lwf': ([('lwf', {'alpha': (0.5, 1.0, 2.0)})], [('lwf', {'alpha': (1.0,)})]),
    'derpp': ([('derpp', {'buffer_size': (500,), 'alpha': (0.2, 0.5, 1.0), 'beta': (0.5,)})],
              [('derpp', {'buffer_size': (64,), 'alpha': (0.2,)})]),
    'agem': ([('agem', {'memory_per_task': (100, 400), 'reference_batch': (64,)})],
             [('agem', {'memory_per_task': (32,), 'reference_batch': (16,)})]),
}
"""The families run only alone (a Fisher per task, or the field's methods beside the main grid):
``{family: (grid, quick grid)}``."""


def grid_of(args) -> tuple[str | None, list]:
  """The family run alone (``None``: the main grid) and its grid, from ``--family`` and ``--quick``.

  Example:
    >>> import argparse
    >>> grid_of(argparse.Namespace(quick=True, family='cofima'))
    ('cofima', [('cofima', {'beta': (0.6,)})])
    >>> grid_of(argparse.Namespace(quick=False, family='magmax'))
    ('magmax', [('magmax', {'scaling': (0.3, 0.5, 0.7, 1.0)})])
  """
  if args.family is None:
    return None, QUICK_GRID if args.quick else GRID
  if args.family in ALONE:
    grid, quick_grid = ALONE[args.family]
    return args.family, quick_grid if args.quick else grid
  grid = [entry for entry in (QUICK_GRID if args.quick else GRID) if entry[0] == args.family]
  return args.family, grid or [entry for entry in GRID if entry[0] == args.family]


def experiment(args) -> scaffold.Outcome:
  stream, config = scaffold.long_stream(args)
  seeds = scaffold.seeds_of(args)
  alone, grid = grid_of(args)
  runs = scaffold.train(stream, grid, config, seeds, args.sweep)

  best = scaffold.best_per_family(runs)
  rows = sorted(engine.summarize_runs(runs), key=lambda row: -row['average_accuracy'][0])
  name = scaffold.output_name(args, 'merges_vs_sfa' + (f'_{alone}' if alone else ''))
  best_labels = {row['method'] for row in best}
  plots.average_accuracy_plot([run for run in runs if run['method'] in best_labels],
                              os.path.join(args.out, f'{name}_average.png'),
                              title=f'{stream.name} ({len(stream)} tasks): best configuration of each family')
  markdown = (
      f'# SFA against merges and baselines: {stream.name}, {len(stream)} tasks, {stream.setting}\n\n'
      '## Best configuration of each family (by final average accuracy)\n\n'
      f'{report.markdown_table(best, stream.task_names)}\n\n![average accuracy]({name}_average.png)\n\n'
      f'## Every configuration\n\n{report.markdown_table(rows, stream.task_names)}'
  )
  payload = {'stream': {'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'tasks': len(stream)},
             'seeds': list(seeds), 'config': engine.run.describe_config(config), 'best': best, 'table': rows, 'runs': runs}
  return scaffold.Outcome(name, payload, markdown)


def main(argv=None) -> None:
  parser = scaffold.experiment_parser(__doc__)
  scaffold.add_stream_arguments(parser)
  parser.add_argument('--family', choices=sorted({name for name, _ in GRID} | set(ALONE)),
                      help='run one family alone (merges_vs_sfa_<family>.*); EWC and CoFiMA run only so')
  scaffold.run_script(__file__, parser, argv, experiment)


if __name__ == '__main__':
  main()
