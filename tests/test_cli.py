"""The sfa-jax command line: outputs, the table, errors with exit code 2 (fast, before any write),
resume and its checkpoints (other commands refused, corrupt checkpoints skipped, full disks), the
quick demo."""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest
from _checkpoint_helpers import flip_bytes_in_arrays
from _checkpoint_helpers import steps

from sfa_jax.cli import command as cli
from sfa_jax.engine.grids import slug
from sfa_jax.engine import methods as methods_lib

FAST = ['--source', 'digits', '--epochs', '1', '--batch-size', '32', '--no-compile-cache']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_run_writes_every_output(tmp_path, capsys):
  out = tmp_path / 'run'
  code = cli.main(['run', '--method', 'sfa', '--p', '0.5', '--beta', '0.3', '--eval-every', '5', '--out', str(out)] + FAST)
  assert code == 0
  results = json.loads((out / 'results.json').read_text())
  assert results['methods'] == ['sfa(beta=0.3, p=0.5)'] and results['seeds'] == [0]
  (run,) = results['runs']
  assert np.asarray(run['accuracy_matrix']).shape == (2, 2)
  assert set(run['metrics']) >= {'average_accuracy', 'forgetting', 'backward_transfer'}
  assert run['averaging_steps'] and run['curve'] and run['seconds']['train'] > 0
  assert _is_png(out / 'accuracy_matrix_sfa_beta=0.3_p=0.5.png')
  assert _is_png(out / 'accuracy_curves_sfa_beta=0.3_p=0.5.png')
  assert set(results['environment']) == {'jax', 'backend', 'device', 'cpus'}
  assert results['config']['epochs_per_task'] == 1 and results['config']['batch_size'] == 32
  table = (out / 'results.md').read_text()
  captured = capsys.readouterr()
  assert 'sfa(beta=0.3, p=0.5)' in table and table.strip() in captured.out
  # Finished: its checkpoints are deleted, and the last line says so.
  assert not (out / 'checkpoints').exists() and os.listdir(out)
  assert captured.err.splitlines()[-1].endswith(f'outputs in {out}; checkpoints deleted (--keep-checkpoints keeps them)')
  # Not a terminal: about one progress line per 10 % of each task, the last one at 100 %.
  for task in (0, 1):
    lines = [line for line in captured.err.splitlines() if f'seed 0 task {task}:' in line]
    assert 9 <= len(lines) <= 11 and '100%|##########|' in lines[-1] and 'loss ' in lines[-1]


def test_compare_aggregates_seeds(tmp_path):
  out = tmp_path / 'cmp'
  code = cli.main(['compare', '--methods', 'finetune,l2', '--hp', 'l2.strength=2', '--seeds', '0,1', '--out', str(out)] + FAST)
  assert code == 0
  results = json.loads((out / 'results.json').read_text())
  assert [(r['method'], r['seed']) for r in results['runs']] == [
      ('finetune', 0), ('finetune', 1), ('l2(strength=2)', 0), ('l2(strength=2)', 1)
  ]
  row = results['table'][1]
  averages = [r['metrics']['average_accuracy'] for r in results['runs'][2:]]
  assert row['seeds'] == 2
  assert row['average_accuracy'] == pytest.approx([np.mean(averages), np.std(averages)])
  assert f'{np.mean(averages):.3f} ± {np.std(averages):.3f}' in (out / 'results.md').read_text()


def test_kept_checkpoints_are_named_with_their_size_and_resume_skips_finished_runs(tmp_path, capsys):
  out = tmp_path / 'resume'
  args = ['run', '--method', 'finetune', '--out', str(out)] + FAST
  assert cli.main(args + ['--keep-checkpoints']) == 0
  first = json.loads((out / 'results.json').read_text())['runs'][0]['accuracy_matrix']
  size = sum(p.stat().st_size for p in (out / 'checkpoints').rglob('*') if p.is_file())
  last = capsys.readouterr().err.splitlines()[-1]
  assert last.endswith(f'; checkpoints kept in {out / "checkpoints"} ({size / 2**20:.1f} MiB)') and size > 0
  assert cli.main(args + ['--resume']) == 0  # restored, not trained again; then deleted, as not kept
  assert 'resumed at step' in capsys.readouterr().err
  assert json.loads((out / 'results.json').read_text())['runs'][0]['accuracy_matrix'] == first
  assert not (out / 'checkpoints').exists()


def test_a_deletion_of_checkpoints_cut_short_leaves_those_of_a_finished_command(tmp_path, monkeypatch, capsys):
  out = tmp_path / 'out'
  args = ['run', '--method', 'finetune', '--out', str(out)] + FAST
  real_rmtree = shutil.rmtree

  def interrupted_once_finished(path, *args, **kwargs):  # Ctrl-C as the finished command deletes its checkpoints
    if (out / 'results.md').exists():
      raise KeyboardInterrupt
    real_rmtree(path, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(shutil, 'rmtree', interrupted_once_finished)
    assert cli.main(args) == 130
  assert (out / 'checkpoints' / 'finished').exists() and (out / 'results.json').exists()
  capsys.readouterr()
  assert cli.main(args) == 0  # replaced, not refused as an interrupted run's
  assert 'interrupted' not in capsys.readouterr().err and not (out / 'checkpoints').exists()


def test_the_results_say_why_replay_takes_more_steps(tmp_path, capsys):
  out = tmp_path / 'cmp'
  assert cli.main(['compare', '--methods', 'finetune,replay', '--out', str(out)] + FAST) == 0
  runs = json.loads((out / 'results.json').read_text())['runs']
  finetune, replay = (run['steps_per_task'] for run in runs)
  assert replay[0] == finetune[0] and replay[1] > finetune[1]  # half of each replay batch is memory
  note = (out / 'results.md').read_text().strip().splitlines()[-1]
  assert note.startswith(f"Optimizer steps per task: finetune: {finetune[0]}, {finetune[1]}; "
                         f"replay(fraction=0.1, ratio=0.5): {replay[0]}, {replay[1]} (")
  assert 'replay fills part of each batch from its memory' in note and note in capsys.readouterr().out


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--stream', 'split-cifar100'], "stream 'split-cifar100' reads only --source tfds, a data set prepared on disk: "
                                         'pass --data-dir, the tfds data folder holding cifar100/<version>/'),
        (['--source', 'tfds'], '--source tfds reads a data set prepared on disk: pass --data-dir, the tfds data folder holding mnist/<version>/'),
        (['--data-dir', '/tmp'], "argument --data-dir: stream 'mnist-pair' from --source offline reads data bundled with a package, "
                                 'from no folder: leave --data-dir out, or pass --source tfds with a tfds data folder'),
        (['--source', 'digits', '--data-dir', '/tmp'], "argument --data-dir: stream 'mnist-pair' from --source digits reads data bundled"),
        (['--stream', 'split-fashion-mnist', '--data-dir', os.path.dirname(__file__)],
         f'argument --data-dir: no Fashion-MNIST in {os.path.dirname(__file__)}: missing train-images-idx3-ubyte, '),
        (['--stream', 'split-fashion-mnist', '--data-dir', os.path.dirname(__file__)],
         'pass --data-dir a folder holding the four IDX files, or pass --source tfds --data-dir the tfds data folder holding'),
    ],
)
def test_a_data_error_names_the_command_lines_options(tmp_path, capsys, argv, message):
  """Not make_stream's keywords (data_dir=, source='tfds'), nor an option that was not given."""
  assert cli.main(['run', '--method', 'sfa', *argv, '--out', str(tmp_path / 'x'), '--no-compile-cache']) == 2
  err = capsys.readouterr().err
  assert err.startswith('sfa-jax: error: ') and message in err and err.count('\n') == 1, err
  assert not re.search(r"data_dir|source=|'tfds'", err), err
  assert not (tmp_path / 'x').exists()


def test_a_stream_only_tfds_serves_reads_tfds_without_source(tmp_path, capsys):
  assert cli.main(['run', '--method', 'sfa', '--stream', 'split-cifar100', '--data-dir', str(tmp_path), '--out', str(tmp_path / 'x')]) == 2
  assert f"No tfds data set 'cifar100' prepared in the array_record format under {tmp_path}" in capsys.readouterr().err


def test_every_commands_help_shows_the_defaults(capsys):
  help_of = {}
  for command in ('run', 'compare', 'sweep', 'demo'):
    with pytest.raises(SystemExit) as stop:
      cli.main([command, '--help'])
    assert stop.value.code == 0
    help_of[command] = ' '.join(capsys.readouterr().out.split())
  for command in ('run', 'compare', 'sweep'):
    for shown in ('task stream: mnist-pair', '(default: mnist-pair)', 'epochs per task (default: 2)', 'examples per batch (default: 64)',
                  'learning rate (default: 0.001)', 'adam, adamw, sgd (default: adam)', 'e.g. 0,1,2 (default: 0)',
                  "default: offline, or tfds for split-cifar100, split-food101", 'at task ends only (default: 0)'):
      assert shown in help_of[command], (command, shown)
  assert 'output folder (default: outputs/demo)' in help_of['demo']
  assert "the method's p, for methods that take it (default: the method's, listed above)" in help_of['run']
  for text in help_of.values():
    assert '(default: None)' not in text and '(default: False)' not in text and '(default: [])' not in text
  with pytest.raises(SystemExit):
    cli.main(['--help'])
  top = capsys.readouterr().out
  assert '\n  sfa-jax demo [--quick]\n' in top  # the description's lines as written
  assert 'Bad input: one line on stderr, exit code 2.' in top.replace('\n', ' ')


@pytest.mark.parametrize(
    'argv, message',
    [
        (['run', '--method', 'sfa', '--stream', 'imagenet-42'], "argument --stream: unknown stream 'imagenet-42'"),
        (['run', '--method', 'magic'], "argument --method: unknown method 'magic'"),
        (['run', '--method', 'sfa', '--model', 'mlpp'], "argument --model: unknown model 'mlpp'; choose from mlp, cnn, resnet18"),
        (['run', '--method', 'sfa', '--optimizer', 'lbfgs'], "unknown optimizer 'lbfgs'"),
        (['run', '--method', 'sfa', '--source', 'nowhere'], "argument --source: unknown source 'nowhere'"),
        (['run', '--method', 'sfa', '--setting', 'online'], "unknown setting 'online'"),
        (['run', '--method', 'sfa', '--p', '1.5'], 'argument --p: p must lie in (0, 1]; got 1.5'),
        (['run', '--method', 'sfa', '--beta', '-1'], 'beta must lie in [0, 1]'),
        (['run', '--method', 'sfa', '--p', 'nan'], 'p must lie in'),
        (['run', '--method', 'adaptive-sfa', '--min-p', '2'], 'argument --min-p: min_p must lie in'),
        (['run', '--method', 'l2', '--p', '0.5'], "--p: method 'l2' takes no hyper-parameter 'p'; it takes: strength"),
        (['run', '--method', 'sfa', '--epochs', '0'], 'argument --epochs: must be an integer >= 1; got 0'),
        (['run', '--method', 'sfa', '--batch-size', 'x'], "argument --batch-size: must be an integer >= 1; got 'x'"),
        (['run', '--method', 'sfa', '--num-tasks', '0'], 'argument --num-tasks: must be an integer >= 1'),
        (['run', '--method', 'sfa', '--eval-every', '-1'], 'argument --eval-every: must be an integer >= 0'),
        (['run', '--method', 'sfa', '--checkpoint-every', '-5'], 'argument --checkpoint-every: must be an integer >= 0'),
        (['run', '--method', 'sfa', '--lr', '0'], 'argument --lr: must be a finite number > 0'),
        (['run', '--method', 'sfa', '--lr', 'inf'], 'argument --lr: must be a finite number > 0'),
        (['run', '--method', 'sfa', '--seeds', 'a'], "argument --seeds: must be comma-separated integers, e.g. 0,1,2; got 'a'"),
        (['run', '--method', 'sfa', '--seeds', '-1'], 'argument --seeds: a seed must be an integer in [0, 2**32); got -1'),
        (['run', '--method', 'sfa', '--seeds', '0,1,0'], 'argument --seeds: must list each value once'),
        (['run', '--method', 'sfa', '--seeds', '0,,1'], 'argument --seeds: must be comma-separated values'),
        (['run', '--method', 'sfa', '--resume', '--overwrite'], 'argument --overwrite: not allowed with argument --resume'),
        (['run', '--method', 'sfa', '--bogus'], 'unrecognized arguments: --bogus'),
        (['compare', '--methods', 'sfa', '--hp', 'sfa.p'], 'argument --hp: must look like METHOD.NAME=VALUE'),
        (['compare', '--methods', 'sfa', '--hp', 'sfa.p=x'], "argument --hp: p must be a number; got 'x'"),
        (['compare', '--methods', 'sfa', '--hp', 'sfa.q=1'], "--hp sfa.q: method 'sfa' takes no hyper-parameter 'q'; it takes: p, beta"),
        (['compare', '--methods', 'sfa', '--hp', 'sfa.p=0.5', '--hp', 'sfa.p=0.25'], '--hp sfa.p is given twice (0.5 and 0.25)'),
        (['compare', '--methods', 'sfa,sfa'], 'argument --methods: must list each value once'),
        (['compare', '--methods', 'sfa,magic'], "argument --methods: unknown method 'magic'"),
        (['compare', '--methods', 'sfa', '--hp', 'l2.strength=1'], "--hp l2.strength: method 'l2' is not in --methods sfa"),
        (['compare', '--methods', 'sfa,l2', '--hp', 'l2.p=0.5'], "--hp l2.p: method 'l2' takes no hyper-parameter 'p'"),
        # Checked after parsing, still before anything is written: the data and the methods' rules.
        (['run', '--method', 'sfa', '--p', '0.5', '--p', '0.25'], 'argument --p: given twice; give it once'),
        (['run', '--method', 'sfa', '--model', 'mlp', '--model', 'cnn'], 'argument --model: given twice'),
        (['compare', '--methods', 'sfa', '--methods', 'l2'], 'argument --methods: given twice'),
        (['run', '--method', 'sfa', '--out', ''], 'argument --out: must be a folder path; got an empty one'),
        (['run', '--method', 'sfa', '--data-dir', '/nonexistent'], "argument --data-dir: no folder '/nonexistent'"),
        (['run', '--method', 'sfa', '--mesh', 'data=2;fsdp=4'], "argument --mesh: mesh must look like 'data=2,fsdp=4'"),
        (['run', '--method', 'sfa', '--mesh', 'model=2'], 'argument --mesh: mesh axes must be among'),
        (['run', '--method', 'sfa', '--stream', 'split-cifar100', '--source', 'offline'], "argument --source: stream 'split-cifar100' reads tfds; got 'offline'"),
        (['run', '--method', 'sfa', '--stream', 'split-fashion-mnist', '--source', 'digits'], 'reads offline, tfds'),
        (['run', '--method', 'sfa', '--num-tasks', '3'], "argument --num-tasks: stream 'mnist-pair' takes exactly 2 tasks; got 3"),
        (['run', '--method', 'sfa', '--stream', 'split-mnist', '--num-tasks', '11'], 'takes 1 to 10 tasks; got 11'),
        # Checked after parsing, still before anything is written: the data and the methods' rules.
        (['run', '--method', 'sfa', '--stream', 'split-cifar100', '--source', 'tfds', '--data-dir', '/tmp'], 'cifar100'),
        (['run', '--method', 'sfa', '--mesh', 'data=3'], 'needs 3 devices'),
        (['run', '--method', 'sfa', '--batch-size', '5000'], 'argument --batch-size: 5000 is more than the 2000 training examples'),
        (['sweep', '--method', 'sfa', '--p', '0.5,1', '--batch-size', '5000'], 'argument --batch-size: 5000 is more than'),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2_and_writes_nothing(tmp_path, capsys, argv, message):
  code = cli.main(argv + ['--out', str(tmp_path / 'x'), '--no-compile-cache'])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith('sfa-jax: error: ') and message in err
  assert err.count('\n') == 1 and 'Traceback' not in err
  assert not (tmp_path / 'x').exists()


def test_unwritable_output_folder(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  code = cli.main(['run', '--method', 'sfa', '--out', str(blocker / 'out')] + FAST)
  err = capsys.readouterr().err
  assert code == 2 and 'cannot write to the output folder' in err and err.count('\n') == 1


def test_python_dash_m_help():
  result = subprocess.run([sys.executable, '-m', 'sfa_jax', '--help'], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and 'demo' in result.stdout and 'compare' in result.stdout


def test_quick_demo_sfa_beats_finetuning(tmp_path):
  """The README's main job in reduced form, with the compilation cache on: SFA keeps more of both tasks."""
  out, cache = tmp_path / 'demo', tmp_path / 'cache'
  result = subprocess.run(
      [sys.executable, '-m', 'sfa_jax', 'demo', '--quick', '--out', str(out)],
      capture_output=True, text=True, timeout=600, env=os.environ | {'SFA_JAX_CACHE_DIR': str(cache)},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((out / 'results.json').read_text())
  assert results['command'] == 'demo' and results['seeds'] == [0] and results['config']['epochs_per_task'] == 1
  assert results['stream']['name'] == 'mnist-pair' and results['stream']['source'].startswith('mnist')
  mean = {row['method'].split('(')[0]: row['average_accuracy'][0] for row in results['table']}
  assert set(mean) == {'finetune', 'sfa', 'l2', 'ewc', 'replay'}
  assert mean['sfa'] > mean['finetune'] + 0.15
  for run in results['runs']:
    assert np.asarray(run['accuracy_matrix']).shape == (2, 2)
    label = slug(run['method'])
    assert _is_png(out / f'accuracy_matrix_{label}.png') and _is_png(out / f'accuracy_curves_{label}.png')
  (sfa,) = [run for run in results['runs'] if run['method'].startswith('sfa')]
  assert len(sfa['averaging_steps']) == 4 and len(sfa['curve']) > 2 * len(sfa['averaging_steps'])
  assert (out / 'results.md').read_text().strip() in result.stdout
  (replay,) = [run for run in results['runs'] if run['method'].startswith('replay')]
  assert f"replay(fraction=0.1, ratio=0.5): {', '.join(map(str, replay['steps_per_task']))} (" in result.stdout
  assert not (out / 'checkpoints').exists(), 'the demo left its checkpoints'
  assert any(cache.iterdir()), 'the persistent compilation cache stayed empty'


def test_adaptive_sfa_knobs_on_the_command_line():
  parser = cli.build_parser()
  common = ['--stream', 'mnist-pair', '--source', 'digits', '--out', 'unused']
  run = parser.parse_args(['run', '--method', 'adaptive-sfa', '--threshold', '0.2', '--min-p', '0.3'] + common)
  (method,) = cli._plan(run).methods
  assert (method['threshold'], method['min_p']) == (0.2, 0.3)
  sweep_args = parser.parse_args(['sweep', '--method', 'adaptive-sfa', '--threshold', '0.05,0.2'] + common)
  assert [m['threshold'] for m in cli._plan(sweep_args).methods] == [0.05, 0.2]


# ------------------------------------------------------------------------------------------------
# Checkpoints and --resume: a run of one command, then resumes of it and of other commands.

RUN = {'--stream': 'split-mnist', '--num-tasks': '2', '--method': 'sfa', '--p': '0.25', '--checkpoint-every': '10'}


def _argv(out, command='run', **changes):
  """``sfa-jax <command>`` with FAST's and RUN's options (a change replaces one, None drops it) and ``--out out``."""
  fast = dict(zip(FAST[:-1:2], FAST[1:-1:2]))  # the options of FAST, without its last flag
  options = {key: value for key, value in (fast | RUN | changes).items() if value is not None}
  return [command, *[part for item in options.items() for part in item], FAST[-1], '--out', str(out)]


def _files(folder):
  """Every file under ``folder`` with its size and modification time: to see that nothing changed."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  """RUN with --resume in an empty folder: its output folder (finished) and what it printed on stderr."""
  out = tmp_path_factory.mktemp('finished') / 'out'
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert cli.main(_argv(out) + ['--resume', '--keep-checkpoints']) == 0
  return out, err.getvalue()


@pytest.fixture
def finished_run(first_run):
  return first_run[0]


def test_resume_without_checkpoints_says_so_then_starts(first_run):
  out, err = first_run
  assert err.startswith(f'sfa-jax: no checkpoint in {out / "checkpoints"} to resume from; starting afresh\n')
  assert 'resumed at step' not in err and (out / 'results.json').exists()


def test_a_command_that_failed_before_its_first_save_holds_nothing_to_resume(tmp_path, monkeypatch, capsys):
  from sfa_jax import engine

  out = tmp_path / 'out'

  def fails(*args, **kwargs):
    raise ValueError('the data broke before the first step')

  with monkeypatch.context() as patch:
    patch.setattr(engine.run, 'run_sequence', fails)
    assert cli.main(_argv(out)) == 2
  assert (out / 'checkpoints' / 'command.json').exists()
  capsys.readouterr()
  assert cli.main(_argv(out, **{'--method': 'finetune', '--p': None})) == 0  # not refused: nothing was saved
  assert 'interrupted' not in capsys.readouterr().err


@pytest.fixture
def copied_run(finished_run, tmp_path):
  """A copy of ``finished_run`` as if interrupted after its last checkpoint (file times kept)."""
  out = tmp_path / 'out'
  shutil.copytree(finished_run, out)
  (out / 'checkpoints' / 'finished').unlink()
  return out


def test_a_finished_commands_checkpoints_are_replaced_by_the_next_command(finished_run, tmp_path):
  out = tmp_path / 'out'
  shutil.copytree(finished_run, out)
  assert (out / 'checkpoints' / 'finished').exists()
  assert cli.main(_argv(out, **{'--method': 'finetune', '--p': None}) + ['--keep-checkpoints']) == 0  # no --overwrite needed
  assert _only_run_checkpoints(out).name == 'finetune-seed0' and (out / 'checkpoints' / 'finished').exists()


def _only_run_checkpoints(out):
  (folder,) = [p for p in (out / 'checkpoints').iterdir() if p.is_dir()]
  return folder


@pytest.mark.parametrize(
    'command, changes, difference',
    [
        ('run', {'--num-tasks': '3'}, 'stream.tasks: ["split-mnist/0", "split-mnist/1"] in the checkpoint, ["split-mnist/0", "split-mnist/1", "split-mnist/2"] now'),
        ('run', {'--method': 'l2', '--p': None}, 'methods[0].name: "sfa" in the checkpoint, "l2" now'),
        ('run', {'--p': '0.2500001'}, 'methods[0].hyperparams.p: 0.25 in the checkpoint, 0.2500001 now'),
        ('run', {'--setting': 'task-incremental'}, 'stream.setting'),
        ('run', {'--lr': '0.002'}, 'config.learning_rate'),
        ('run', {'--eval-every': '7'}, 'config.eval_every'),
        ('run', {'--model': 'cnn'}, 'config.model'),
        ('run', {'--seeds': '1'}, 'seeds[0]: 0 in the checkpoint, 1 now'),
        ('compare', {'--method': None, '--p': None, '--methods': 'sfa', '--hp': 'sfa.p=0.25'}, 'command: "run" in the checkpoint, "compare" now'),
    ],
)
def test_resume_of_another_command_is_refused_and_writes_nothing(copied_run, capsys, command, changes, difference):
  before = _files(copied_run)
  assert cli.main(_argv(copied_run, command, **changes) + ['--resume']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'sfa-jax: error: cannot resume: the checkpoints in {copied_run / "checkpoints"} are of another command (')
  assert difference in err and 'pass --overwrite' in err and err.count('\n') == 1
  assert _files(copied_run) == before


@pytest.mark.parametrize(
    'changes, message',
    [
        ({'--model': 'mlpp'}, "unknown model 'mlpp'"),  # a typo once wiped an interrupted run
        ({}, 'holds the checkpoints of an interrupted run: pass --resume to continue it, or --overwrite to delete them'),
        # A folder without the idx files: the data fails to load, after parsing.
        ({'--stream': 'split-fashion-mnist', '--source': 'offline', '--data-dir': os.path.dirname(__file__), '--resume': None},
         'no Fashion-MNIST in'),
    ],
)
def test_a_failing_command_leaves_the_checkpoints_alone(copied_run, capsys, changes, message):
  before = _files(copied_run)
  flags = [key for key, value in changes.items() if value is None]
  assert cli.main(_argv(copied_run, **{k: v for k, v in changes.items() if v is not None}) + flags) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1
  assert _files(copied_run) == before


def test_sweep_refuses_a_folder_with_checkpoints_of_another_command(copied_run, capsys):
  before = _files(copied_run)
  argv = ['sweep', '--method', 'sfa', '--p', '0.5,1', *FAST, '--out', str(copied_run)]
  assert cli.main(argv) == 2
  assert 'holds the checkpoints of an interrupted run: pass --resume to continue it, or --overwrite' in capsys.readouterr().err
  assert cli.main(argv + ['--resume']) == 2
  err = capsys.readouterr().err
  assert 'cannot resume: the checkpoints in' in err and 'are of another command' in err, err
  assert _files(copied_run) == before


def test_overwrite_deletes_the_earlier_checkpoints(copied_run):
  assert cli.main(_argv(copied_run, **{'--method': 'finetune', '--p': None}) + ['--overwrite', '--keep-checkpoints']) == 0
  assert _only_run_checkpoints(copied_run).name == 'finetune-seed0'
  saved = json.loads((copied_run / 'checkpoints' / 'command.json').read_text())
  assert saved['methods'] == [{'name': 'finetune', 'class': 'sfa_jax.engine.methods:Finetune', 'hyperparams': {}}] and saved["stream"]["tasks"] == ["split-mnist/0", "split-mnist/1"]


def test_a_corrupt_checkpoint_is_skipped_on_resume_for_the_same_results(finished_run, copied_run, capsys):
  folder = _only_run_checkpoints(copied_run)
  *_, previous, latest = steps(folder)
  flip_bytes_in_arrays(folder / str(latest))
  assert cli.main(_argv(copied_run) + ['--resume']) == 0
  warning = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
  assert len(warning) == 1 and warning[0].startswith(f'sfa-jax: warning: skipped and deleted the unusable checkpoint {folder / str(latest)}')
  # Flipped bytes fail the arrays' checksums, or (in a compressed chunk) Orbax's own read first.
  assert re.search(r'\((corrupt: the checksum of .* differs|cannot restore the arrays: .*)\)', warning[0]), warning[0]
  assert warning[0].endswith(f'resumed from step {previous}')
  matrix = lambda out: json.loads((out / 'results.json').read_text())['runs'][0]['accuracy_matrix']
  assert matrix(copied_run) == matrix(finished_run)


def test_no_usable_checkpoint_is_a_clean_refusal(copied_run, capsys):
  folder = _only_run_checkpoints(copied_run)
  for step in steps(folder):
    flip_bytes_in_arrays(folder / str(step))
  results = (copied_run / 'results.json').read_bytes()
  assert cli.main(_argv(copied_run) + ['--resume']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'sfa-jax: error: no usable checkpoint in {folder}: ') and 'corrupt' in err and err.count('\n') == 1
  assert (copied_run / 'results.json').read_bytes() == results


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.CheckpointManager, 'save', no_space)
  assert cli.main(_argv(tmp_path / 'out', **{'--checkpoint-every': '1'})) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if ' task 0: [' not in line]
  assert err == [f'sfa-jax: error: cannot save the checkpoint at {_only_run_checkpoints(tmp_path / "out") / "1"}: No space left on device']


_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    sys.argv = ['sfa-jax'] + sys.argv[1:]
    runpy.run_module('sfa_jax', run_name='__main__')
    """
)


def test_a_failed_orbax_write_prints_one_line_and_no_traceback(tmp_path):
  """Orbax's own report of the failure (absl logs with tracebacks, closed event loops) stays quiet."""
  out = tmp_path / 'out'
  argv = _argv(out, **{'--method': 'finetune', '--p': None, '--checkpoint-every': '1'})
  result = subprocess.run([sys.executable, '-c', _FILE_SIZE_LIMIT, *argv], capture_output=True, text=True, timeout=300)
  err = [line for line in result.stderr.splitlines() if ' task 0: [' not in line]
  assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
  assert err[0].startswith(f'sfa-jax: error: cannot save the checkpoint at {_only_run_checkpoints(out) / "1"}: File too large')


# ------------------------------------------------------------------------------------------------
# Fast answers: parsing and checking load neither JAX nor the data.

_WITHOUT_JAX = textwrap.dedent(
    """
    import importlib.util, json, sys, types
    # The package's __init__ exports the transforms (JAX); what is measured here is what the
    # command line itself loads, so its modules are found without running the __init__.
    package = types.ModuleType('sfa_jax')
    package.__path__ = list(importlib.util.find_spec('sfa_jax').submodule_search_locations)
    sys.modules['sfa_jax'] = package
    from sfa_jax.cli import command as cli
    codes = []
    for argv in json.loads(sys.argv[1]):
      try:
        codes.append(cli.main(argv))
      except SystemExit as stop:  # --help
        codes.append(stop.code)
    heavy = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow_datasets', 'numpy', 'matplotlib', 'sklearn')
    print(json.dumps({'codes': codes, 'loaded': sorted(name for name in heavy if name in sys.modules)}))
    """
)


def test_help_and_argument_errors_load_neither_jax_nor_the_data(tmp_path):
  out = ['--out', str(tmp_path / 'x')]
  argvs = [
      ['--help'], ['run', '--help'], ['sweep', '--help'],
      ['run', '--method', 'magic', *out], ['run', '--method', 'sfa', '--model', 'mlpp', *out],
      ['run', '--method', 'sfa', '--p', '1.5', *out], ['run', '--method', 'l2', '--p', '0.5', *out],
      ['run', '--method', 'sfa', '--seeds', '-1', *out],
      ['compare', '--methods', 'sfa', '--hp', 'sfa.p=0.5', '--hp', 'sfa.p=0.2', *out],
      ['sweep', '--method', 'sfa', '--p', '0.1,0.1', *out], ['demo', '--resume', '--overwrite'],
      ['run', '--method', 'sfa', '--p', '0.5', '--p', '0.2', *out], ['run', '--method', 'sfa', '--mesh', 'foo', *out],
      ['run', '--method', 'sfa', '--num-tasks', '3', *out], ['run', '--method', 'sfa', '--stream', 'split-cifar100', *out],
      ['run', '--method', 'sfa', '--data-dir', str(tmp_path / 'none'), *out],
      ['compare', '--help'], ['demo', '--help'], ['run', '--method', 'sfa', '--data-dir', str(tmp_path), *out],
      ['run', '--method', 'sfa', '--source', 'tfds', *out],
  ]
  result = subprocess.run([sys.executable, '-c', _WITHOUT_JAX, json.dumps(argvs)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report == {'codes': [0, 0, 0] + [2] * 13 + [0, 0, 2, 2], 'loaded': []}
  assert result.stderr.count('sfa-jax: error: ') == 15 and not (tmp_path / 'x').exists()


def _cli_accepts(argv):
  """Whether the command line takes ``sfa-jax run --method finetune <argv>`` (parsed and checked, nothing run)."""
  try:
    cli.check_arguments(cli.build_parser().parse_args(['run', '--method', 'finetune', *argv]))
  except cli.UsageError:
    return False
  return True


def _make_stream_accepts(**kwargs):
  """Whether :func:`sfa_jax.tasks.make_stream` takes these arguments (data that is not installed counts as taken)."""
  from sfa_jax import tasks

  try:
    tasks.make_stream(**kwargs)
  except FileNotFoundError:  # the arguments fit; the data is not installed here
    return True
  except ValueError:
    return False
  return True


def test_the_command_line_takes_the_streams_sources_and_task_counts_that_make_stream_takes(tmp_path):
  """Every stream, source and --num-tasks, named or not, at the edges of each stream's counts."""
  from sfa_jax.tasks import catalog

  out = ['--out', str(tmp_path / 'out')]
  disagree = []
  for stream in (*catalog.STREAMS, 'split-mnsit'):
    for source in (*catalog.SOURCES, 'internet'):
      for data_dir in (None, str(tmp_path)):  # an empty folder: no tfds data set, no IDX files
        for num_tasks in (None, 0, 1, 2, 3, 10, 11, 100, 101, 102, 1000):
          argv = ['--stream', stream, '--source', source, *out]
          argv += [] if num_tasks is None else ['--num-tasks', str(num_tasks)]
          argv += [] if data_dir is None else ['--data-dir', data_dir]
          verdicts = _cli_accepts(argv), _make_stream_accepts(name=stream, source=source, num_tasks=num_tasks, data_dir=data_dir)
          if verdicts[0] != verdicts[1]:
            disagree.append((stream, source, data_dir, num_tasks, verdicts))
  assert not disagree, f'(stream, source, data_dir, num_tasks, (command line, make_stream)): {disagree}'


def test_without_source_a_stream_reads_its_first_source(tmp_path):
  """``offline`` where the stream has it, else ``tfds``: what make_stream takes with that source."""
  from sfa_jax.tasks import catalog

  for stream in catalog.STREAMS:
    first = catalog.stream_sources(stream)[0]
    for data_dir in (None, str(tmp_path)):
      argv = ['--stream', stream, '--out', str(tmp_path / 'out')] + ([] if data_dir is None else ['--data-dir', data_dir])
      assert _cli_accepts(argv) == _make_stream_accepts(name=stream, source=first, data_dir=data_dir), (stream, data_dir)


def test_the_command_line_takes_the_settings_models_and_optimizers_that_the_registries_take(tmp_path):
  import flax.linen as nn
  import optax

  from sfa_jax import engine, models
  from sfa_jax.engine import optimizers
  from sfa_jax.models import registry
  from sfa_jax.tasks import catalog

  def model_accepted(name):
    try:
      return isinstance(models.make_model(name, num_outputs=2), nn.Module)
    except ValueError:
      return False

  def optimizer_accepted(name):
    try:
      return isinstance(engine.TrainConfig(optimizer=name).make_optimizer(), optax.GradientTransformation)
    except ValueError:
      return False

  out = ['--out', str(tmp_path / 'out')]
  for setting in (*catalog.SETTINGS, 'online', 'class_incremental'):
    taken = _make_stream_accepts(name='mnist-pair', source='digits', setting=setting)
    assert _cli_accepts(['--setting', setting, '--source', 'digits', *out]) == taken, setting
  for model in (*registry.MODELS, 'perceptron', 'MLP'):
    assert _cli_accepts(['--model', model, *out]) == model_accepted(model), model
  for optimizer in (*optimizers.OPTIMIZERS, 'lbfgs', 'Adam'):
    assert _cli_accepts(['--optimizer', optimizer, *out]) == optimizer_accepted(optimizer), optimizer


def test_a_hyperparameter_flag_has_one_range_across_the_methods():
  """A flag checks the range of every registered method that takes it: one range per name."""
  ranges = {}
  for cls in methods_lib.registered().values():
    for name, spec in cls.hyperparams.items():
      assert ranges.setdefault(name, spec.interval) == spec.interval, (cls.name, name)


_ENTRY_POINT = textwrap.dedent(
    """
    import json, runpy, sys
    sys.argv = ['sfa-jax'] + sys.argv[1:]
    try:
      runpy.run_module('sfa_jax', run_name='__main__')
    except SystemExit as stop:
      code = stop.code
    heavy = ('jax', 'flax', 'optax', 'orbax', 'tensorflow_datasets', 'numpy')
    print(json.dumps({'code': code, 'loaded': sorted(name for name in heavy if name in sys.modules)}))
    """
)


@pytest.mark.parametrize('argv, code', [(['--help'], 0), (['run', '--method', 'sfa', '--p', '2', '--out', 'unused'], 2)])
def test_python_dash_m_sfa_jax_answers_without_loading_jax(argv, code):
  result = subprocess.run([sys.executable, '-c', _ENTRY_POINT, *argv], capture_output=True, text=True, timeout=60)
  assert json.loads(result.stdout.splitlines()[-1]) == {'code': code, 'loaded': []}, result.stderr[-2000:]


_WITHOUT_THE_ENGINE = textwrap.dedent(
    """
    import sys
    sys.modules['orbax'] = None  # as on a machine with the core alone: `import orbax` fails
    from sfa_jax.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_missing_engine_package_names_the_extra(tmp_path):
  argv = ['run', '--method', 'finetune', '--source', 'digits', '--out', str(tmp_path / 'out')]
  result = subprocess.run([sys.executable, '-c', _WITHOUT_THE_ENGINE, *argv], capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "sfa-jax: error: orbax is not installed: the command line runs the engine, which pip install "
      "'sfa-jax[engine]' installs")
