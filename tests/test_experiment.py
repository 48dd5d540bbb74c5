"""The experiment scripts' scaffolding: frontiers and their areas by hand, grids of several methods, the
scripts' entry and outputs, the run logs."""

import json
import os
import re

import numpy as np
import pytest

from sfa_jax import engine
import scaffold
from sfa_jax import tasks


# ---------------------------------------------------------------------------------------------
# Frontier and area, hand-made.


def test_frontier_drops_dominated_and_repeated_points_and_sorts():
  points = [[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9], [0.5, 0.5], [0.5, 0.3], [0.05, 0.9]]
  np.testing.assert_array_equal(scaffold.frontier(points), [[0.1, 0.9], [0.5, 0.5], [0.9, 0.1]])


def test_frontier_of_points_on_a_line_keeps_only_the_best():
  # Equal x: only the highest y survives; equal y: only the largest x.
  np.testing.assert_array_equal(scaffold.frontier([[0.5, 0.1], [0.5, 0.7], [0.2, 0.7]]), [[0.5, 0.7]])


def test_frontier_of_nothing_and_of_one_point():
  assert scaffold.frontier(np.zeros((0, 2))).shape == (0, 2)
  np.testing.assert_array_equal(scaffold.frontier([[0.3, 0.2]]), [[0.3, 0.2]])


def test_frontier_area_by_hand():
  # A staircase: (0.2, 1.0), (0.5, 0.5), (1.0, 0.2) -> 0.2*1.0 + 0.3*0.5 + 0.5*0.2 = 0.45.
  assert scaffold.frontier_area([[1.0, 0.2], [0.2, 1.0], [0.5, 0.5], [0.3, 0.3]]) == pytest.approx(0.45)
  assert scaffold.frontier_area([[1.0, 1.0], [0.5, 0.5]]) == pytest.approx(1.0)
  assert scaffold.frontier_area([[0.0, 1.0], [1.0, 0.0]]) == 0.0  # corners cover no area
  assert scaffold.frontier_area(np.zeros((0, 2))) == 0.0


def test_frontier_area_reference_point_clips():
  # Reference (0.5, 0.5): only the part of each rectangle above it counts; points below add nothing.
  points = [[0.9, 0.6], [0.6, 0.9], [0.4, 1.0], [1.0, 0.4]]
  # Staircase from (0.5, 0.5): (0.6-0.5)*(0.9-0.5) + (0.9-0.6)*(0.6-0.5) = 0.04 + 0.03.
  assert scaffold.frontier_area(points, reference=(0.5, 0.5)) == pytest.approx(0.07)


def test_frontier_area_grows_with_a_dominating_point():
  points = [[0.2, 0.8], [0.8, 0.2]]
  assert scaffold.frontier_area(points + [[0.6, 0.6]]) > scaffold.frontier_area(points)


@pytest.mark.parametrize('bad', [[0.1, 0.2, 0.3], [[0.1, 0.2, 0.3]], [[np.nan, 0.1]], [[np.inf, 0.1]]])
def test_frontier_rejects_bad_points(bad):
  with pytest.raises(ValueError, match='points'):
    scaffold.frontier(bad)


def test_frontier_area_rejects_a_bad_reference():
  with pytest.raises(ValueError, match='reference'):
    scaffold.frontier_area([[0.1, 0.2]], reference=(0.0,))


def test_family_areas_and_tradeoff_points():
  def run(label, name, hyperparams, matrices):
    return [
        {'method': label, 'method_name': name, 'hyperparams': hyperparams, 'seed': seed, 'accuracy_matrix': m,
         'seconds': {'train': 1.0}, 'metrics': {'average_accuracy': 0.0, 'forgetting': 0.0, 'backward_transfer': 0.0}}
        for seed, m in enumerate(matrices)
    ]

  runs = (
      run('l2(strength=1)', 'l2', {'strength': 1.0}, [[[0.9, 0.0], [0.2, 0.8]], [[0.9, 0.0], [0.4, 0.6]]])
      + run('l2(strength=10)', 'l2', {'strength': 10.0}, [[[0.9, 0.0], [0.8, 0.2]]])
      + run('finetune', 'finetune', {}, [[[0.9, 0.0], [0.0, 0.9]]])
  )
  families = scaffold.tradeoff_points(runs)
  assert list(families) == ['l2', 'finetune']
  first = families['l2'][0]
  np.testing.assert_allclose(first['mean'], [0.3, 0.7])
  np.testing.assert_allclose(first['std'], [0.1, 0.1])
  areas = scaffold.family_areas(families)
  assert areas['l2'] == pytest.approx(0.3 * 0.7 + 0.5 * 0.2)
  assert areas['finetune'] == 0.0
  with pytest.raises(ValueError, match='task index 2'):
    scaffold.tradeoff_points(runs, task_y=2)


def test_stability_plasticity_by_hand():
  run = {'accuracy_matrix': [[0.9, 0.1, 0.1, 0.1], [0.5, 0.8, 0.1, 0.1], [0.4, 0.6, 0.7, 0.1], [0.3, 0.5, 0.2, 1.0]]}
  stability, plasticity = scaffold.stability_plasticity(run)
  assert stability == pytest.approx((0.3 + 0.5 + 0.2) / 3)
  assert plasticity == pytest.approx((0.8 + 0.7 + 1.0) / 3)  # task 0 left out
  with pytest.raises(ValueError, match='at least 2 tasks'):
    scaffold.stability_plasticity({'accuracy_matrix': [[0.9]]})


def test_best_per_family_picks_the_highest_mean_and_sorts():
  def runs(label, name, accuracies):
    return [{'method': label, 'method_name': name, 'accuracy_matrix': [[a]], 'seconds': {'train': 1.0},
             'metrics': {'average_accuracy': a, 'forgetting': 0.0, 'backward_transfer': 0.0}} for a in accuracies]

  all_runs = runs('a1', 'a', [0.5, 0.7]) + runs('a2', 'a', [0.9, 0.3]) + runs('b1', 'b', [0.8, 0.8])
  best = scaffold.best_per_family(all_runs)
  assert [(row['family'], row['method']) for row in best] == [('b', 'b1'), ('a', 'a1')]
  assert best[1]['average_accuracy'] == pytest.approx((0.6, 0.1))
  merged = scaffold.best_per_family(all_runs, family=lambda run: 'all')
  assert [row['method'] for row in merged] == ['b1']


# ---------------------------------------------------------------------------------------------
# Grids of several methods, trained.


def test_configurations_expand_each_method_then_the_seeds():
  config = engine.TrainConfig(batch_size=16)
  configurations = scaffold.configurations([('sfa', {'p': [0.25, 1], 'beta': [0.5]}), ('finetune', {})], config, [0, 1])
  assert [(m.label, c.seed) for m, c in configurations] == [
      ('sfa(beta=0.5, p=0.25)', 0), ('sfa(beta=0.5, p=0.25)', 1), ('sfa(beta=0.5, p=1)', 0), ('sfa(beta=0.5, p=1)', 1),
      ('finetune', 0), ('finetune', 1),
  ]
  assert all(c.batch_size == 16 for _, c in configurations)
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    scaffold.configurations([('nope', {})], config, [0])
  with pytest.raises(ValueError, match='p is empty'):
    scaffold.configurations([('sfa', {'p': []})], config, [0])


def test_train_gives_each_runs_json_and_logs(capsys):
  stream = tasks.make_stream('mnist-pair', source='digits')
  config = engine.TrainConfig(epochs_per_task=1, batch_size=32)
  runs = scaffold.train(stream, [('sfa', {'p': (0.5,)})], config, [0, 1], as_sweep=False)
  assert [(r['method_name'], r['seed'], r['hyperparams']) for r in runs] == [
      ('sfa', 0, {'beta': 0.25, 'p': 0.5}), ('sfa', 1, {'beta': 0.25, 'p': 0.5})]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('run_grid: 2 runs of 1 configurations and 2 seeds') and lines[2].startswith('sfa(beta=0.25, p=0.5)')
  finals = scaffold.final_accuracies(runs)
  column = [r['accuracy_matrix'][-1][1] for r in runs]
  assert finals['sfa(beta=0.25, p=0.5)'][1] == pytest.approx((np.mean(column), np.std(column)))
  json.dumps(runs)  # plain JSON


# ---------------------------------------------------------------------------------------------
# Run logs: a run appended as it finishes, read back on a rerun.


def _by_seed(run):
  return run['seed']


def test_a_run_log_torn_by_a_crash_keeps_its_runs_and_takes_the_next(tmp_path):
  path = str(tmp_path / 'runs.jsonl')
  scaffold.append_run(path, {'seed': 0})
  scaffold.append_run(path, {'seed': 1})
  with open(path, 'a') as f:
    f.write('{"seed": 2, "accur')  # the writer stopped mid-append
  with pytest.warns(scaffold.RunLogWarning, match=re.escape(path) + r', line 3: an unfinished last line'):
    assert list(scaffold.load_runs(path, _by_seed)) == [0, 1]
  with pytest.warns(scaffold.RunLogWarning, match=re.escape(path) + r', line 3: an unfinished last line .* removed'):
    scaffold.append_run(path, {'seed': 2})
  assert list(scaffold.load_runs(path, _by_seed)) == [0, 1, 2]
  assert open(path).read() == '{"seed": 0}\n{"seed": 1}\n{"seed": 2}\n'


def test_a_finished_run_without_its_newline_is_kept_and_the_next_starts_a_line(tmp_path):
  path = str(tmp_path / 'runs.jsonl')
  with open(path, 'w') as f:
    f.write('{"seed": 0}')
  scaffold.append_run(path, {'seed': 1})
  assert open(path).read() == '{"seed": 0}\n{"seed": 1}\n'


def test_a_run_log_damaged_before_its_last_line_is_refused_naming_the_line(tmp_path):
  path = str(tmp_path / 'runs.jsonl')
  with open(path, 'w') as f:
    f.write('{"seed": 0}\n{"seed": 1\n{"seed": 2}\n')
  with pytest.raises(ValueError, match=re.escape(path) + r', line 2: not a run'):
    scaffold.load_runs(path, _by_seed)
  with open(path, 'w') as f:
    f.write('{"seed": 0}\n[1]\n')  # JSON, but not a run
  with pytest.raises(ValueError, match=re.escape(path) + r', line 2: not a run'):
    scaffold.load_runs(path, _by_seed)


# ---------------------------------------------------------------------------------------------
# Outputs.


def test_write_results(tmp_path):
  json_path, md_path = scaffold.write_results(str(tmp_path / 'out'), 'x_quick', {'a': [1, 2]}, '# X\n\ntable', 'python x.py --quick', 3.25)
  data = json.loads(open(json_path).read())
  assert data['a'] == [1, 2] and data['command'] == 'python x.py --quick' and data['wall_seconds'] == 3.25
  assert data['machine']['cpus'] >= 1
  text = open(md_path).read()
  assert text.startswith('# X\n\ntable\n\nCommand: `python x.py --quick` (3 s wall time')
  with pytest.raises(ValueError, match='reserved'):
    scaffold.write_results(str(tmp_path), 'y', {'command': 1}, '', '', 0.0)
  json_path, _ = scaffold.write_results(str(tmp_path / 'out'), 'x/split', {}, '# X', 'python x.py', 1.0)
  assert json_path == str(tmp_path / 'out' / 'x' / 'split.json') and (tmp_path / 'out' / 'x' / 'split.md').is_file()
  for bad in ('', 'a/b/c', '../b', 'a/.b', '/b', 'a/'):
    with pytest.raises(ValueError, match='name'):
      scaffold.write_results(str(tmp_path), bad, {}, '', '', 0.0)


def test_output_names_are_short_and_systematic():
  full, quick = (scaffold.experiment_parser('x').parse_args(argv) for argv in ([], ['--quick']))
  assert scaffold.output_name(full, 'p_ablation') == 'p_ablation'
  assert scaffold.output_name(quick, 'three_scenarios', 'split') == 'three_scenarios_quick/split'
  keys = ['split-fashion-mnist-ci', 'split-fashion-mnist-ti']
  assert scaffold.output_name(full, 'pretrained_continual', scaffold.streams_label(keys), 'scratch') == (
      'pretrained_continual/split-fashion-mnist_scratch')
  assert scaffold.streams_label(['split-mnist-ci', 'permuted-mnist', 'split-mnist-ti']) == 'split-mnist_permuted-mnist'
  assert scaffold.streams_label(['split-mnist-ci', 'split-fashion-mnist-ti']) == 'split-mnist-ci_split-fashion-mnist-ti'
  for bad in (('',), ('x', 'a/b'), ('x', ''), ('a/b',)):
    with pytest.raises(ValueError, match='path separator'):
      scaffold.output_name(full, *bad)


def test_experiment_parser_seeds():
  parser = scaffold.experiment_parser('x')
  assert parser.parse_args([]).seeds is None
  with pytest.raises(SystemExit):
    parser.parse_args(['--seeds', '0,0'])


def test_run_script_writes_the_outcome_with_the_command(tmp_path, capsys):
  def experiment(args):
    assert os.path.isdir(args.out)  # made before the experiment runs
    return scaffold.Outcome(scaffold.output_name(args, 'x'), {'seeds': list(scaffold.seeds_of(args))}, '# X')

  argv = ['--quick', '--seeds', '3', '--out', str(tmp_path / 'out')]
  outcome = scaffold.run_script('/a/experiments/x.py', scaffold.experiment_parser('x'), argv, experiment)
  assert outcome.name == 'x_quick' and capsys.readouterr().out == '# X\n'
  data = json.loads((tmp_path / 'out' / 'x_quick.json').read_text())
  assert data['seeds'] == [3] and data['command'] == 'python experiments/x.py ' + ' '.join(argv)
  assert (tmp_path / 'out' / 'x_quick.md').read_text().startswith('# X\n\nCommand: `python experiments/x.py --quick')


# ---------------------------------------------------------------------------------------------
# The results page: what it names is there.


def _expand_braces(name):
  """``a.{json,md}`` -> ``['a.json', 'a.md']``, each ``{...}`` in turn."""
  match = re.search(r'\{([^{}]*)\}', name)
  if not match:
    return [name]
  return [expanded for part in match.group(1).split(',')
          for expanded in _expand_braces(name[:match.start()] + part + name[match.end():])]


def test_the_report_names_every_results_file_and_only_files_that_exist():
  results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'results')
  with open(os.path.join(results, 'REPORT.md')) as f:
    report = f.read()
  named = set(re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report))  # figures
  named |= {name for token in re.findall(r'`([^`\s<>*\[\]]+)`', report) for name in _expand_braces(token)
            if re.search(r'\.(json|jsonl|md|png)$', name) and not name.startswith('.')}
  missing = sorted(name for name in named if not os.path.isfile(os.path.join(results, name)))
  assert not missing, f'REPORT.md names results files that are not in experiments/results: {missing}'
  present = {os.path.relpath(os.path.join(folder, name), results) for folder, _, names in os.walk(results)
             for name in names if not folder.startswith(os.path.join(results, 'backbones')) and '_quick' not in name}
  unnamed = sorted(present - named - {'REPORT.md'})
  assert not unnamed, f'results files that REPORT.md does not name: {unnamed}'
  assert len(report.splitlines()) <= 400
