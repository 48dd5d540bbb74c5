"""The sfa-jax command line: outputs, the table, errors with exit code 2, resume, and the quick demo."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sfa_jax import cli

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
  assert set(results['environment']) == {'jax', 'backend', 'device'}
  assert results['config']['epochs_per_task'] == 1 and results['config']['batch_size'] == 32
  table = (out / 'results.md').read_text()
  captured = capsys.readouterr()
  assert 'sfa(beta=0.3, p=0.5)' in table and table.strip() in captured.out
  # Not a terminal: about one progress line per 10 % of each task, the last one at 100 %.
  for task in (0, 1):
    lines = [line for line in captured.err.splitlines() if f'seed 0 task {task}:' in line]
    assert 9 <= len(lines) <= 11 and '[####################]' in lines[-1] and 'loss ' in lines[-1]


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


def test_resume_skips_finished_runs(tmp_path, capsys):
  out = tmp_path / 'resume'
  args = ['run', '--method', 'finetune', '--out', str(out)] + FAST
  assert cli.main(args) == 0
  first = json.loads((out / 'results.json').read_text())['runs'][0]['accuracy_matrix']
  capsys.readouterr()
  assert cli.main(args + ['--resume']) == 0
  assert 'resumed at step' in capsys.readouterr().err
  assert json.loads((out / 'results.json').read_text())['runs'][0]['accuracy_matrix'] == first


@pytest.mark.parametrize(
    'argv, message',
    [
        (['run', '--method', 'sfa', '--stream', 'imagenet-42'], "unknown stream 'imagenet-42'"),
        (['run', '--method', 'magic'], "unknown method 'magic'"),
        (['run', '--method', 'sfa', '--p', '1.5'], 'p must lie in'),
        (['run', '--method', 'sfa', '--beta', '-1'], 'beta must lie in'),
        (['compare', '--methods', 'sfa', '--hp', 'sfa.p'], '--hp must look like'),
        (['run', '--method', 'sfa', '--seeds', 'a'], '--seeds must be'),
        (['compare', '--methods', 'sfa,sfa'], '--methods must name each method once'),
        (['run', '--method', 'sfa', '--stream', 'split-cifar100', '--source', 'tfds', '--data-dir', '/nonexistent'], 'cifar100'),
        (['run', '--method', 'sfa', '--stream', 'split-fashion-mnist', '--data-dir', '/nonexistent'], 'not found'),
        (['run', '--method', 'sfa', '--source', 'nowhere'], "got source='nowhere'"),
        (['compare', '--methods', 'sfa,l2', '--hp', 'l2.p=0.5'], "'l2' takes no hyper-parameter"),
        (['run', '--method', 'adaptive-sfa', '--min-p', '2'], 'min_p must lie in'),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
  code = cli.main(argv + ['--out', str(tmp_path / 'x'), '--no-compile-cache'])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith('sfa-jax: error: ') and message in err
  assert err.count('\n') == 1 and 'Traceback' not in err


def test_unwritable_output_folder(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  code = cli.main(['run', '--method', 'sfa', '--out', str(blocker / 'out')] + FAST)
  err = capsys.readouterr().err
  assert code == 2 and 'cannot write to the output folder' in err and err.count('\n') == 1


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_redraws_one_line_on_a_terminal():
  terminal = _Terminal()
  progress = cli._Progress('sfa seed 0', terminal)
  for step in range(1, 101):
    progress({'task': 1, 'step': step, 'steps': 100, 'loss': 0.5, 'accuracy': 0.75})
  progress({'task': 1, 'evaluation': None})
  text = terminal.getvalue()
  assert text.startswith('\rsfa seed 0 task 1: [') and text.count('\n') == 1 and text.endswith('loss 0.500 acc 0.750\x1b[K\n')
  assert '100/100' in text.split('\r')[-1]


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
    label = cli._slug(run['method'])
    assert _is_png(out / f'accuracy_matrix_{label}.png') and _is_png(out / f'accuracy_curves_{label}.png')
  (sfa,) = [run for run in results['runs'] if run['method'].startswith('sfa')]
  assert len(sfa['averaging_steps']) == 4 and len(sfa['curve']) > 2 * len(sfa['averaging_steps'])
  assert (out / 'results.md').read_text().strip() in result.stdout
  assert any(cache.iterdir()), 'the persistent compilation cache stayed empty'


def test_adaptive_sfa_knobs_on_the_command_line():
  parser = cli.build_parser()
  common = ['--stream', 'mnist-pair', '--source', 'digits', '--out', 'unused']
  run = parser.parse_args(['run', '--method', 'adaptive-sfa', '--threshold', '0.2', '--min-p', '0.3'] + common)
  (method,) = cli._plan(run)[1]
  assert (method['threshold'], method['min_p']) == (0.2, 0.3)
  sweep_args = parser.parse_args(['sweep', '--method', 'adaptive-sfa', '--threshold', '0.05,0.2'] + common)
  assert [m['threshold'] for m in cli._plan(sweep_args)[1]] == [0.05, 0.2]
