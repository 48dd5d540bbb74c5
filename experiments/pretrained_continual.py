"""The paper's regime for images: continual fine-tuning from a pretrained backbone, against training from scratch.

The backbone of `pretrain_backbone.py` (a SmallCNN trained on Fashion-MNIST) gets a freshly initialised
head (`sfa_jax.models.transfer.with_new_head`; the seed initialises the head) and the whole network is
fine-tuned on streams of another data set (the bundled 5000-image MNIST):

  split MNIST, 5 tasks of 2 digits, class-incremental (one 10-way head) and task-incremental (a head per task)
  permuted MNIST, 10 tasks, domain-incremental (shared 10-way head); 500 train / 250 test images per task

and, from a backbone pretrained on the bundled MNIST (`pretrain_backbone.py --data mnist`), of Fashion-MNIST
(Debian's `dataset-fashion-mnist`, 12 000 train / 2000 test images per task):

  split Fashion-MNIST, 5 tasks of 2 classes, class-incremental and task-incremental
    (--streams split-fashion-mnist-ci,split-fashion-mnist-ti: a separate invocation, as its backbone differs)

The same grids run from scratch (the same model, initialised with the seed), on the same streams with the
same budget (--steps optimizer steps per task, default 300: 24 epochs of a split-MNIST task, 38 of a permuted
one; Adam 1e-3, batch 64), 3 seeds:

  finetune; sfa p in {0.25, 0.5, 0.75, 0.96, 1} x beta in {0.25, 0.5} (p = 1 is WiSE-FT at that beta);
  replay 1 / 5 / 10 %; l2 strength in {0.1, 1, 10, 100}; ewc strength in {10, 1e3, 1e5};
  task-arithmetic 0.5; ties (density 0.2, scaling 1)   (permuted MNIST: PERMUTED_GRID, smaller)

The budget rule (`sfa_jax.engine.budget`) is checked per stream before any run: each averaging period of the
smallest p holds two steps, every two p of the grid average at different steps, and fine-tuning from the
backbone reaches 95 % of its converged accuracy on every task (measured once per stream: one fine-tuning
run with twice the steps per task, recorded in the results as 'budget'; from scratch, measured from scratch
as 'budget_scratch'). A failed rule stops the script
(--allow-short-budget: a loud warning instead). Each finished (stream, regime, configuration, seed) run is
appended to <streams>_<regime>.runs.jsonl at once and skipped on a rerun.

Each family is represented by its best configuration (highest mean final average accuracy, chosen on the
test accuracies alike for every family: there is no validation split).

  python experiments/pretrain_backbone.py && python experiments/pretrained_continual.py
  python experiments/pretrain_backbone.py --data mnist --epochs 30 && \
    python experiments/pretrained_continual.py --streams split-fashion-mnist-ci,split-fashion-mnist-ti
  python experiments/pretrained_continual.py --quick --backbone DIR   # digits 8x8, one seed, a few configs

Results are written when the grid is done (a stop keeps the finished runs in the run log; the rerun writes them)
into experiments/results/pretrained_continual/:
<streams>_<regime>.{json,md,runs.jsonl} (e.g. split-mnist-ci_pretrained; split-fashion-mnist for its CI and TI
streams together; no regime when both ran), <stream>_<regime>.png (stability-plasticity frontiers: the final
accuracy on the tasks before the last one against each task's accuracy right after training it) and
<stream>_<regime>.budget.json (the budget rule's measurement).
"""

import dataclasses
import json
import os
import time

import numpy as np

import importlib.util

from sfa_jax import engine
from sfa_jax import tasks
from sfa_jax.cli import plots
from sfa_jax.engine import budget
from sfa_jax.engine import compile_cache
from sfa_jax.engine import steps
from sfa_jax.models.transfer import with_new_head

import scaffold

_spec = importlib.util.spec_from_file_location('pretrain_backbone', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain_backbone.py'))
pretrain_backbone = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_backbone)

SPLIT_GRID = [  # 23 configurations
    ('finetune', {}),
    ('sfa', {'p': (0.25, 0.5, 0.75, 0.96, 1.0), 'beta': (0.25, 0.5)}),
    ('replay', {'fraction': (0.01, 0.05, 0.1)}),
    ('l2', {'strength': (0.1, 1.0, 10.0, 100.0)}),
    ('ewc', {'strength': (10.0, 1e3, 1e5)}),
    ('task-arithmetic', {'scaling': (0.5,)}),
    ('ties', {'density': (0.2,), 'scaling': (1.0,)}),
]
PERMUTED_GRID = [  # smaller: a permuted-MNIST run (10 tasks) costs ~2 split-MNIST runs
    ('finetune', {}),
    ('sfa', {'p': (0.25, 0.5, 0.96, 1.0), 'beta': (0.25,)}),
    ('replay', {'fraction': (0.1,)}),
    ('l2', {'strength': (1.0, 10.0)}),
    ('ewc', {'strength': (100.0, 1e4)}),
    ('task-arithmetic', {'scaling': (0.5,)}),
    ('ties', {'density': (0.2,), 'scaling': (1.0,)}),
]
STEPS = 300  # optimizer steps per task (the budget rule checks it per stream)
QUICK_GRID = [('sfa', {'p': (0.5,), 'beta': (0.5,)})]
REGIMES = ('pretrained', 'scratch')
PERMUTED_TRAIN, PERMUTED_TEST = 500, 250  # images per permuted-MNIST task (of 4000 / 1000)


STREAMS = ('split-mnist-ci', 'split-mnist-ti', 'permuted-mnist', 'split-fashion-mnist-ci', 'split-fashion-mnist-ti')
DEFAULT_STREAMS = STREAMS[:3]
QUICK_STREAMS = STREAMS[:3]  # --quick: scikit-learn's 8x8 digits stand in for MNIST; Fashion-MNIST has no quick form


def streams_of(quick: bool, keys=QUICK_STREAMS, data_dir=None) -> dict[str, tasks.TaskStream]:
  """The streams of ``keys`` (of :data:`STREAMS`), by key; split Fashion-MNIST reads Debian's files (or ``data_dir``'s)."""
  unknown = [key for key in keys if key not in (QUICK_STREAMS if quick else STREAMS)]
  if unknown:
    raise SystemExit(f'unknown stream(s) {unknown}{" in --quick mode" if quick else ""}; '
                     f'choose from {list(QUICK_STREAMS if quick else STREAMS)}.')
  source = 'digits' if quick else 'offline'

  def make(key):
    if key == 'permuted-mnist':
      permuted = tasks.make_stream('permuted-mnist', source=source, num_tasks=3 if quick else 10,
                                   setting=tasks.DOMAIN_INCREMENTAL)
      return permuted if quick else shrunk(permuted, PERMUTED_TRAIN, PERMUTED_TEST)
    name, setting = key.rsplit('-', 1)
    setting = {'ci': tasks.CLASS_INCREMENTAL, 'ti': tasks.TASK_INCREMENTAL}[setting]
    try:
      return tasks.make_stream(name, source=source, setting=setting,
                               data_dir=data_dir if name == 'split-fashion-mnist' else None)
    except FileNotFoundError as error:
      raise SystemExit(f'{error}\n\nInstall it with:\n  {pretrain_backbone.INSTALL_HINT}') from None

  return {key: make(key) for key in keys}


def default_backbone(keys, quick: bool) -> str:
  """The backbone folder the streams ``keys`` start from: pretrained on the other data set.

  The MNIST streams start from the Fashion-MNIST backbone, the Fashion-MNIST streams from the MNIST one;
  streams of one invocation share one backbone, so the two kinds run in separate invocations.
  """
  data = {'mnist' if key.startswith('split-fashion-mnist') else 'fashion-mnist' for key in keys}
  if len(data) > 1:
    raise SystemExit(f'--streams {",".join(keys)} mixes MNIST and Fashion-MNIST streams, whose default backbones '
                     'differ (pretrained on the other data set): run them in separate invocations, or give --backbone.')
  return os.path.join(scaffold.RESULTS_DIR, 'backbones', pretrain_backbone.backbone_name('cnn', data.pop(), quick))


def shrunk(stream: tasks.TaskStream, train: int, test: int) -> tasks.TaskStream:
  """``stream`` with the first ``train`` / ``test`` examples of each task (their order is already shuffled)."""
  cache = {}

  def load(index):
    if index not in cache:
      task = stream[index]
      cache[index] = dataclasses.replace(task, train=tasks.Split(task.train.x[:train], task.train.y[:train]),
                                         test=tasks.Split(task.test.x[:test], task.test.y[:test]))
    return cache[index]

  return dataclasses.replace(stream, source=f'{stream.source}; {train} train / {test} test images per task',
                             load_task=load)


def initial_of(stream, config, backbone, seed):
  """The backbone with a new head for ``stream``, the head initialised with ``seed``."""
  params, model_state = steps.initializer(engine.run.build_model(stream, config), stream[0].train.x[:1])(seed)
  return with_new_head(backbone[0], params), with_new_head(backbone[1], model_state)


def summary_rows(runs):
  """summarize_runs rows plus each task's accuracy right after training it (mean of the diagonal)."""
  rows = engine.summarize_runs(runs)
  for row in rows:
    diagonals = [float(np.mean(np.diag(r['accuracy_matrix']))) for r in runs if r['method'] == row['method']]
    row['just_trained'] = (float(np.mean(diagonals)), float(np.std(diagonals)))
    row['method_name'] = next(r['method_name'] for r in runs if r['method'] == row['method'])
  return rows


def best_rows(rows):
  best = {}
  for row in rows:
    name = row['method_name']
    if name not in best or row['average_accuracy'][0] > best[name]['average_accuracy'][0]:
      best[name] = row
  return sorted(best.values(), key=lambda row: -row['average_accuracy'][0])


def _cell(pair):
  return f'{pair[0]:.3f} ± {pair[1]:.3f}'


def comparison_table(rows_by_regime):
  """One row per family: best configuration and its numbers in both regimes."""
  bests = {regime: {row['method_name']: row for row in best_rows(rows)} for regime, rows in rows_by_regime.items()}
  families = list(bests.get('pretrained', {})) + [f for f in bests.get('scratch', {}) if f not in bests.get('pretrained', {})]
  lines = ['| family | pretrained: best config | final avg acc | forgetting | just trained | '
           'scratch: best config | final avg acc | forgetting | just trained | Δ avg acc |',
           '|---|---|---:|---:|---:|---|---:|---:|---:|---:|']
  for family in families:
    cells = []
    for regime in REGIMES:
      row = bests.get(regime, {}).get(family)
      cells += ([f"`{row['method']}`", f"**{_cell(row['average_accuracy'])}**", _cell(row['forgetting']),
                 _cell(row['just_trained'])] if row else ['–'] * 4)
    pre, scr = bests.get('pretrained', {}).get(family), bests.get('scratch', {}).get(family)
    delta = f"{pre['average_accuracy'][0] - scr['average_accuracy'][0]:+.3f}" if pre and scr else '–'
    lines.append(f"| {family} | {' | '.join(cells)} | {delta} |")
  return lines


def all_configs_table(rows):
  lines = ['| configuration | seeds | final avg acc | forgetting | just trained | train s |', '|---|---:|---:|---:|---:|---:|']
  for row in rows:
    lines.append(f"| {row['method']} | {row['seeds']} | {_cell(row['average_accuracy'])} | {_cell(row['forgetting'])} | "
                 f"{_cell(row['just_trained'])} | {row['train_seconds'][0]:.1f} |")
  return lines


def write_all(args, name, streams, runs, backbone_meta, seconds_by_group, command, start, note='', budgets=None):
  """The results files of a finished grid (tables, plots, times); ``'done'`` marks them complete."""
  budgets = budgets or {}
  os.makedirs(os.path.dirname(os.path.join(args.out, name)), exist_ok=True)
  payload_streams, md = {}, ['# Continual fine-tuning from a pretrained backbone against from scratch', '']
  md += [f"Backbone: `{backbone_meta['model']}` {backbone_meta['model_kwargs']}, pretrained on {backbone_meta['data']}, "
         f"{backbone_meta['steps']} steps, test accuracy {backbone_meta['test_accuracy']:.4f}. "
         'Best configuration per family by mean final average accuracy over seeds (chosen on test accuracies, '
         'as for every family). "just trained": each task\'s accuracy right after training it, mean over tasks.', '']
  for key, stream in streams.items():
    mine = [r for r in runs if r['stream'] == key]
    if not mine:
      continue
    rows_by_regime = {regime: summary_rows([r for r in mine if r['regime'] == regime]) for regime in REGIMES
                      if any(r['regime'] == regime for r in mine)}
    md += [f'## {key}: {stream.name}, {len(stream)} tasks, {stream.setting} ({stream.source})', '']
    md += [budget_line(budgets[key, regime]) for regime in REGIMES if (key, regime) in budgets]  # each names its start
    md += ['']
    md += comparison_table(rows_by_regime) + ['']
    for regime, rows in rows_by_regime.items():
      png = scaffold.output_name(args, 'pretrained_continual', key, regime) + '.png'
      families = scaffold.tradeoff_points([r for r in mine if r['regime'] == regime], point=scaffold.stability_plasticity)
      plots.tradeoff_plot(families, os.path.join(args.out, png), frontiers=scaffold.family_frontiers(families),
                          axis_labels=('final accuracy on the tasks before the last', 'accuracy right after training (tasks 1..)'),
                          title=f'{key}, {regime}')
      md += [f'### {regime}: every configuration', '', f'![{key} {regime}]({os.path.basename(png)})', ''] + all_configs_table(rows) + ['']
    payload_streams[key] = {'stream': engine.run.describe_stream(stream), 'tables': rows_by_regime,
                            'budget': budgets.get((key, 'pretrained')), 'budget_scratch': budgets.get((key, 'scratch'))}
  if note:
    md += [note, '']
  md += ['## Wall time per group (stream, regime, method; seconds)', '', '| stream | regime | method | runs | s |', '|---|---|---|---:|---:|']
  md += [f'| {k[0]} | {k[1]} | {k[2]} | {v[0]} | {v[1]:.0f} |' for k, v in seconds_by_group.items()]
  payload = {'done': True, 'backbone': backbone_meta, 'seeds': list(scaffold.seeds_of(args)),
             'config': engine.run.describe_config(base_config(args, backbone_meta)), 'streams': payload_streams,
             'group_seconds': [{'stream': k[0], 'regime': k[1], 'method': k[2], 'runs': v[0], 'seconds': v[1]}
                               for k, v in seconds_by_group.items()],
             'runs': [{k: v for k, v in r.items() if k != 'curve'} for r in runs]}
  scaffold.write_results(args.out, name, payload, '\n'.join(md), command, time.perf_counter() - start)


def output_name(args, stream_keys, regimes):
  """The outputs' base name: ``pretrained_continual/<streams>[_<regime>]`` (:func:`scaffold.output_name`).

  ``--name`` replaces ``<streams>[_<regime>]``; the regime is named when only one ran.
  """
  variant = [args.name] if args.name else [scaffold.streams_label(stream_keys)] + (list(regimes) if len(regimes) == 1 else [])
  return scaffold.output_name(args, 'pretrained_continual', *variant)


def collect(args, command, start):
  """The union of earlier outputs of this script, written as one result (tables, plots, times)."""
  runs, seconds_by_group, meta, commands, wall, budgets = [], {}, None, [], 0.0, {}
  for path in args.collect.split(','):
    with open(path) as f:
      data = json.load(f)
    if not data['done']:
      raise SystemExit(f'{path} is from a run that did not finish.')
    meta = meta or data['backbone']
    runs += data['runs']
    for regime, field in (('pretrained', 'budget'), ('scratch', 'budget_scratch')):
      budgets.update({(k, regime): v[field] for k, v in data['streams'].items() if v.get(field)})
    for g in data['group_seconds']:  # a family extended by a later run (--grid): its runs and seconds add up
      runs_before, seconds_before = seconds_by_group.get((g['stream'], g['regime'], g['method']), (0, 0.0))
      seconds_by_group[g['stream'], g['regime'], g['method']] = (runs_before + g['runs'], seconds_before + g['seconds'])
    commands.append(f"`{data['command']}` ({data['wall_seconds']:.0f} s)")
    wall = max(wall, data['wall_seconds'])
  keys = list(dict.fromkeys(r['stream'] for r in runs))
  streams = streams_of(args.quick, keys, args.data_dir)
  name = output_name(args, keys, [regime for regime in REGIMES if any(r['regime'] == regime for r in runs)])
  note = 'Collected from runs side by side: ' + '; '.join(commands) + f'. Longest: {wall:.0f} s.'
  write_all(args, name, streams, runs, meta, seconds_by_group, command, start, note=note, budgets=budgets)


def stream_budget(args, key, stream, config, methods, initial, seed, regime='pretrained'):
  """The budget rule for ``stream`` in ``regime`` (module docstring), recorded in ``<stream>_<regime>.budget.json``.

  Measured once per number of steps per task: a record of another number is measured again.
  ``initial`` is the measuring run's initial variables (the backbone with a head; None from scratch):
  fine-tuning from scratch converges more slowly, so each regime is measured from its own start.
  """
  path = os.path.join(args.out, scaffold.output_name(args, 'pretrained_continual', key, regime) + '.budget.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  record = None
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if record['convergence']['reference_steps'] != 2 * args.steps:
      record = None
  if record is None:
    probe_config = dataclasses.replace(config, seed=seed)
    convergence = budget.measure_convergence(stream, probe_config, 2 * args.steps, eval_every=max(1, args.steps // 10),
                                             initial=initial)
    convergence['regime'] = regime
    record = {'convergence': convergence}
    with open(path, 'w') as f:  # kept before the check: a failed rule does not lose the measurement
      json.dump(record, f, indent=1)
  p_values = [m['p'] for m in methods if m.name == 'sfa']
  check = budget.check_budget(args.steps, p_values=p_values, convergence=record['convergence'],
                              strict=not (args.allow_short_budget or args.quick), what=f'pretrained_continual {key} ({regime})')
  record['check'] = check.to_json()
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  print(budget_line(record), flush=True)
  return record


def budget_line(record):
  check, convergence = record['check'], record['convergence']
  converged = [round(t['converged_accuracy'], 3) for t in convergence['tasks']]
  start = 'from scratch' if convergence.get('regime') == 'scratch' else 'from the backbone'
  return (f"Budget: {check['steps_per_task']} steps per task (p grid {check['p_values']}: ceil(2/p_min) = "
          f"{check['min_steps_for_p']}); fine-tuning {start} reaches 95 % of its converged accuracy "
          f"{converged} (over {convergence['reference_steps']} steps per task, seed {convergence['seed']}) after "
          f"{check['steps_to_fraction']} steps; rule {'met' if check['ok'] else 'FAILED: ' + '; '.join(check['problems'])}.")


def base_config(args, meta):
  return engine.TrainConfig(
      model=meta['model'], model_kwargs=tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in meta['model_kwargs'].items()),
      epochs_per_task=1, batch_size=32 if args.quick else 64, learning_rate=1e-3, eval_every=0,
      eval_batch_size=1000, steps_per_task=args.steps)


def main(argv=None) -> None:
  parser = scaffold.experiment_parser(__doc__)
  parser.add_argument('--backbone', help='the folder written by pretrain_backbone.py (default: the one pretrained on '
                      'the other data set: <results>/backbones/smallcnn-fashion-mnist for the MNIST streams, '
                      'smallcnn-mnist for split Fashion-MNIST; _quick with --quick)')
  parser.add_argument('--streams', default=','.join(DEFAULT_STREAMS), help=f'comma-separated stream keys, of {", ".join(STREAMS)}')
  parser.add_argument('--data-dir', help="a folder with the four Fashion-MNIST IDX files (default: Debian's)")
  parser.add_argument('--grid', type=json.loads, help='a JSON list of [method, {hyper-parameter: value}] pairs that '
                      'replaces the grids, e.g. to extend a grid whose best point is on its edge')
  parser.add_argument('--steps', type=int, default=None, help=f'optimizer steps per task (default {STEPS}; 10 with --quick)')
  parser.add_argument('--allow-short-budget', action='store_true', help='warn, instead of stopping, when the budget rule fails')
  parser.add_argument('--regimes', default='pretrained,scratch', help='comma-separated: pretrained, scratch')
  parser.add_argument('--name', help='the outputs\' name in pretrained_continual[_quick]/ (default: the streams, '
                      'split-mnist for split-mnist-ci and -ti together, and the regime when only one runs)')
  parser.add_argument('--collect', help='comma-separated JSON files of finished runs of this script (e.g. one per '
                      'stream, run side by side): write their union as one output and its plots, train nothing')
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 10 if args.quick else STEPS
  if args.steps < 1:
    parser.error(f'--steps must be at least 1; got {args.steps}.')
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  command = scaffold.command_line(__file__, argv)
  if args.collect:
    return collect(args, command, start)
  stream_keys = list(dict.fromkeys(args.streams.split(',')))
  directory = args.backbone or default_backbone(stream_keys, args.quick)  # refuses a mix before any data is read
  streams = streams_of(args.quick, stream_keys, args.data_dir)
  if not os.path.exists(os.path.join(directory, 'metadata.json')):
    data = '--data mnist --epochs 30 ' if os.path.basename(directory).startswith('smallcnn-mnist') else ''
    raise SystemExit(f'no backbone in {directory}: run python experiments/pretrain_backbone.py '
                     f'{data}{"--quick" if args.quick else ""} first.')
  params, model_state, meta = pretrain_backbone.load_backbone(directory)
  config = base_config(args, meta)
  seeds = scaffold.seeds_of(args)
  regimes = [r for r in REGIMES if r in args.regimes.split(',')]
  name = output_name(args, list(streams), regimes)
  runs, seconds_by_group, budgets = [], {}, {}
  runs_path = os.path.join(args.out, f'{name}.runs.jsonl')
  done_runs = scaffold.load_runs(runs_path, lambda run: (run['stream'], run['regime'], run['method'], run['seed']))
  os.makedirs(os.path.dirname(runs_path), exist_ok=True)
  for key, stream in streams.items():
    if tuple(stream.input_shape) != tuple(meta['input_shape']):
      raise SystemExit(f'{key} has images of shape {stream.input_shape}; the backbone takes {meta["input_shape"]}.')
    grid = QUICK_GRID if args.quick else (PERMUTED_GRID if key == 'permuted-mnist' else SPLIT_GRID)
    grid = [(name, {k: (v,) for k, v in hp.items()}) for name, hp in args.grid] if args.grid else grid
    configurations = scaffold.configurations(grid, config, seeds)
    methods = list(dict.fromkeys(method for method, _ in configurations))
    for regime in regimes:  # budgets[key, regime]: the rule's record, each regime measured from its own start
      initial = initial_of(stream, config, (params, model_state), seeds[0]) if regime == 'pretrained' else None
      budgets[key, regime] = stream_budget(
          args, key, stream, config, methods, initial, seeds[0], regime)
    # Configuration by configuration in the grid's order (put the most telling first: a stop keeps them in the run log).
    for method in methods:
      for regime in regimes:
        initial_for = (lambda seed: initial_of(stream, config, (params, model_state), seed)) if regime == 'pretrained' else None
        t0 = time.perf_counter()
        list(scaffold.train_missing(
            stream, [(m, c) for m, c in configurations if m == method], done_runs, runs_path,
            lambda label, seed: (key, regime, label, seed), as_sweep=args.sweep, initial=initial_for,
            fields=lambda finished, seconds: {'stream': key, 'regime': regime, 'loadavg': os.getloadavg()}))
        group = [done_runs[key, regime, method.label, seed] for seed in seeds]
        runs += group
        runs_before, seconds_before = seconds_by_group.get((key, regime, method.name), (0, 0.0))
        seconds_by_group[key, regime, method.name] = (runs_before + len(group), seconds_before + time.perf_counter() - t0)
        best = max(summary_rows(group), key=lambda row: row['average_accuracy'][0])
        print(f'[{time.perf_counter() - start:6.0f} s] {key:15s} {regime:10s} {method.name:16s} {len(group):3d} runs '
              f'{time.perf_counter() - t0:6.1f} s  best {best["method"]} {_cell(best["average_accuracy"])} '
              f'(load {os.getloadavg()[0]:.1f})', flush=True)
  write_all(args, name, streams, runs, meta, seconds_by_group, command, start, budgets=budgets)
  print(open(os.path.join(args.out, f'{name}.md')).read())


if __name__ == '__main__':
  main()
