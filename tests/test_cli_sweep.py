"""`sfa-jax sweep`: a grid of hyper-parameters and seeds as one program, written like `compare`."""

import json
import os

import numpy as np
import pytest

from sfa_jax.cli import command as cli

FAST = ['--source', 'digits', '--epochs', '1', '--batch-size', '32', '--no-compile-cache']


def test_sweep_writes_every_run_the_table_and_plots(tmp_path, capsys):
  out = tmp_path / 'sweep'
  argv = ['sweep', '--method', 'sfa', '--p', '0.25,1', '--beta', '0.5', '--seeds', '0,1', '--eval-every', '10', '--out', str(out)]
  assert cli.main(argv + FAST) == 0
  results = json.loads((out / 'results.json').read_text())
  assert results['command'] == 'sweep' and results['seeds'] == [0, 1]
  assert results['methods'] == ['sfa(beta=0.5, p=0.25)', 'sfa(beta=0.5, p=1)']
  assert [(r['method'], r['seed']) for r in results['runs']] == [
      ('sfa(beta=0.5, p=0.25)', 0), ('sfa(beta=0.5, p=0.25)', 1), ('sfa(beta=0.5, p=1)', 0), ('sfa(beta=0.5, p=1)', 1)
  ]
  for run in results['runs']:
    assert np.asarray(run['accuracy_matrix']).shape == (2, 2) and run['curve'] and run['averaging_steps']
  assert [len(r['averaging_steps']) for r in results['runs']] == [4, 4, 1, 1]
  assert [row['seeds'] for row in results['table']] == [2, 2]
  for label in ('sfa_beta=0.5_p=0.25', 'sfa_beta=0.5_p=1'):
    for kind in ('matrix', 'curves'):
      assert os.path.getsize(out / f'accuracy_{kind}_{label}.png') > 1000
  captured = capsys.readouterr()
  assert (out / 'results.md').read_text().strip() in captured.out
  assert 'sweep of 4 sfa (mean over configurations) task 1: 100%|##########|' in captured.err
  assert not (out / 'checkpoints').exists() and 'checkpoints deleted (--keep-checkpoints keeps them)' in captured.err


def test_a_sweep_keeps_its_checkpoints_when_asked(tmp_path, capsys):
  out = tmp_path / 'sweep'
  argv = ['sweep', '--method', 'sfa', '--p', '0.25,1', '--keep-checkpoints', '--out', str(out)]
  assert cli.main(argv + FAST) == 0
  assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['command.json', 'finished', 'sweep']
  assert f'checkpoints kept in {out / "checkpoints"} (' in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--method', 'sfa', '--p', '0.1,x'], "argument --p: p must be a number; got 'x'"),
        (['--method', 'sfa', '--p', '0.1,0.1'], 'argument --p: must list each value once'),
        (['--method', 'sfa', '--p', '0.1,2'], 'p must lie in'),
        (['--method', 'l2', '--p', '0.5'], "method 'l2' takes no hyper-parameter"),
        (['--method', 'replay', '--ratio', '0.25,0.5'], 'ratio differs across the configurations'),
    ],
)
def test_sweep_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
  assert cli.main(['sweep', '--out', str(tmp_path / 'x')] + argv + FAST) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('sfa-jax: error:') and message in err and '\n' not in err
  assert not (tmp_path / 'x').exists()  # every check comes before the first write


@pytest.mark.slow  # about 8 s (a run's SIGKILL and resume: test_continual)
def test_an_interrupted_sweep_resumes_to_the_same_results(tmp_path, capsys, monkeypatch):
  """A sweep is checkpointed as one run: stopped mid-task, `--resume` finishes it with the same numbers."""
  from sfa_jax.engine import callbacks

  argv = ['sweep', '--method', 'sfa', '--p', '0.25,1', '--seeds', '0,1', '--checkpoint-every', '5'] + FAST
  whole = tmp_path / 'whole'
  assert cli.main(argv + ['--out', str(whole)]) == 0
  expected = json.loads((whole / 'results.json').read_text())['runs']

  class Stop(KeyboardInterrupt):
    pass

  real = callbacks.ConsoleProgress.__call__

  def stop_in_task_1(self, event):
    if isinstance(event, callbacks.StepEvent) and (event.task, event.step) == (1, 12):
      raise Stop
    real(self, event)

  monkeypatch.setattr(callbacks.ConsoleProgress, '__call__', stop_in_task_1)
  out = tmp_path / 'stopped'
  assert cli.main(argv + ['--out', str(out)]) == 130
  monkeypatch.setattr(callbacks.ConsoleProgress, '__call__', real)
  capsys.readouterr()
  assert (out / 'checkpoints' / 'sweep').is_dir()  # interrupted: kept for --resume
  assert cli.main(argv + ['--out', str(out), '--resume']) == 0
  assert 'resumed at step' in capsys.readouterr().err
  assert not (out / 'checkpoints').exists()
  resumed = json.loads((out / 'results.json').read_text())['runs']
  assert [r['accuracy_matrix'] for r in resumed] == [r['accuracy_matrix'] for r in expected]
  assert [r['averaging_steps'] for r in resumed] == [r['averaging_steps'] for r in expected]
