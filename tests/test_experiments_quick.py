"""The experiment scripts' quick modes: each runs in-process and writes results of the expected shape."""

import importlib.util
import json
import os

import numpy as np
import pytest

from sfa_jax.engine.budget import BudgetWarning

import scaffold

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments')


def _main(script):
  spec = importlib.util.spec_from_file_location(script, os.path.join(EXPERIMENTS, f'{script}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _short_budget():
  """The quick modes train a few steps per task: fewer than the budget rule asks, which they say loudly."""
  return pytest.warns(BudgetWarning, match='budget rule failed')


def _load(tmp_path, name, pngs=()):
  assert (tmp_path / f'{name}.md').read_text().count('Command: `python experiments/') == 1
  for png in pngs:
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
  data = json.loads((tmp_path / f'{name}.json').read_text())
  assert data['command'].endswith('--quick --out ' + str(tmp_path)) and data['wall_seconds'] > 0
  for run in data.get('runs', []):
    assert {'seed', 'method_name', 'hyperparams', 'accuracy_matrix', 'metrics'} <= set(run)
    assert all(0.0 <= a <= 1.0 for row in run['accuracy_matrix'] for a in row)
  return data


@pytest.mark.slow  # its quick mode trains on the full MNIST pair (unchanged since it chose the demo's defaults)
def test_mnist_pair_sweep_quick(tmp_path):
  _main('mnist_pair_sweep')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'mnist_pair_sweep_quick')
  assert [row['method'] for row in data['table']] != [] and len(data['runs']) == 3


@pytest.mark.slow  # the trade-off script's quick grid: about 4 s
def test_mnist_pair_tradeoff_quick(tmp_path):
  _main('mnist_pair_tradeoff')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'mnist_pair_tradeoff_quick', ['mnist_pair_tradeoff_quick.png'])
  assert data['source'].startswith('digits')
  assert set(data['families']) == {'sfa', 'l2', 'replay', 'finetune'}
  assert set(data['frontier_areas']) == {'sfa', 'l2', 'replay', 'finetune', 'sfa (p = 1)', 'sfa (p < 1)'}
  assert all(0.0 <= area <= 1.0 for area in data['frontier_areas'].values())
  # SFA's area is at least that of either of its two halves.
  assert data['frontier_areas']['sfa'] >= max(data['frontier_areas']['sfa (p = 1)'], data['frontier_areas']['sfa (p < 1)'])
  point = data['families']['sfa'][0]
  assert set(point) == {'label', 'hyperparams', 'mean', 'std'} and len(point['mean']) == 2
  # Each run is logged as it finishes; a rerun trains nothing and writes the same results.
  log = tmp_path / 'mnist_pair_tradeoff_quick.runs.jsonl'
  lines = log.read_text().splitlines()
  assert len(lines) == len(data['runs'])
  _main('mnist_pair_tradeoff')(['--quick', '--out', str(tmp_path)])
  assert log.read_text().splitlines() == lines
  again = json.loads((tmp_path / 'mnist_pair_tradeoff_quick.json').read_text())
  assert again['runs'] == data['runs'] and again['frontier_areas'] == data['frontier_areas']


@pytest.mark.slow  # three scripts, about 10 s
def test_long_stream_scripts_quick(tmp_path):
  # The three scripts on the same tiny stream (permuted 8x8 digits, 3 tasks): one test, so the
  # stream's data and the compiled steps are shared.
  _main('p_ablation')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'p_ablation_quick', ['p_ablation_quick_curves.png', 'p_ablation_quick_average.png'])
  assert data['stream']['name'] == 'permuted-mnist' and data['stream']['tasks'] == 3
  assert data['stream']['setting'] == 'domain-incremental' and data['stream']['source'].startswith('digits')
  assert data['beta'] == 0.5 and len(data['beta_probe']) == 1
  assert [run['method'] for run in data['runs']] == ['sfa(beta=0.5, p=0.5)', 'sfa(beta=0.5, p=1)', 'finetune']
  assert all(len(run['curve']) > 3 for run in data['runs'])  # evaluated during the run

  _main('beta_ablation')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'beta_ablation_quick', ['beta_ablation_quick.png', 'beta_ablation_quick_average.png'])
  assert set(data['groups']) == set(data['frontier_areas']) == {'p = 1', 'p < 1'}
  assert {row['family'] for row in data['best']} == {'p = 1', 'p < 1'}

  _main('merges_vs_sfa')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'merges_vs_sfa_quick', ['merges_vs_sfa_quick_average.png'])
  assert [row['family'] for row in data['best']] != []
  assert {row['family'] for row in data['best']} == {run['method_name'] for run in data['runs']}
  assert 'magmax(scaling=0.5)' in {run['method'] for run in data['runs']}

  _main('merges_vs_sfa')(['--family', 'ewc', '--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'merges_vs_sfa_ewc_quick', ['merges_vs_sfa_ewc_quick_average.png'])
  assert [run['method'] for run in data['runs']] == ['ewc(gamma=1, strength=100)']

  _main('merges_vs_sfa')(['--family', 'cofima', '--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'merges_vs_sfa_cofima_quick', ['merges_vs_sfa_cofima_quick_average.png'])
  assert [run['method'] for run in data['runs']] == ['cofima(beta=0.6, gamma=0)']

  for family in ('si', 'mas', 'lwf', 'derpp', 'agem'):
    _main('merges_vs_sfa')(['--family', family, '--quick', '--out', str(tmp_path)])
    data = _load(tmp_path, f'merges_vs_sfa_{family}_quick', [f'merges_vs_sfa_{family}_quick_average.png'])
    assert {run['method_name'] for run in data['runs']} == {family}


def test_long_stream_needs_data_for_image_streams(tmp_path):
  with pytest.raises(ValueError, match='--data-dir'):
    _main('p_ablation')(['--quick', '--stream', 'split-cifar100', '--out', str(tmp_path)])


@pytest.mark.slow  # the adaptive-p script's quick grid: about 4 s
def test_adaptive_p_quick(tmp_path):
  _main('adaptive_p')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'adaptive_p_quick', ['adaptive_p_quick.png'])
  assert set(data['families']) == {'sfa', 'adaptive-sfa'}
  assert all(0.0 <= area <= 1.0 for area in data['frontier_areas'].values())
  by_label = {run['method']: run for run in data['runs']}
  adaptive = by_label['adaptive-sfa(beta=0.5, min_p=0.05, threshold=0.1)']
  start, total = adaptive['steps_per_task']
  stats = data['averaging'][adaptive['method']]
  assert stats['averages'] == len(adaptive['averaging_steps']) >= 1
  assert adaptive['averaging_steps'][-1] == start + total  # always at the end of task B
  assert stats['first_at'] == (adaptive['averaging_steps'][0] - start) / total


@pytest.mark.slow  # the many-tasks script's quick stream: about 4 s
def test_many_tasks_quick(tmp_path):
  _main('many_tasks')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'many_tasks_quick', ['many_tasks_quick.png', 'many_tasks_quick_10.png'])
  assert data['long']['tasks'] == 4 and data['short']['tasks'] == 3 and data['setting'] == 'domain-incremental'
  assert [row['method'] for row in data['long']['summary']] == ['finetune', 'multi-anchor-sfa(beta=0.25, p=0.5)']
  for row in data['long']['summary']:
    assert 0.0 <= row['average_accuracy'] <= 1.0 and -1.0 <= row['forgetting'] <= 1.0
  for run in data['long']['runs']:
    assert len(run['accuracy_matrix']) == 4 and 'curve' not in run
  assert {row['method'] for row in data['short']['table']} == {'sfa(beta=0.25, p=0.5)', 'replay(fraction=0.1, ratio=0.5)'}


@pytest.mark.slow  # pretraining, then two continual stages: about 35 s
def test_pretrained_continual_quick(tmp_path):
  # Pretraining (scikit-learn's 8x8 digits in quick mode: the shape of the quick streams), then the
  # continual stage from that backbone and from scratch.
  _main('pretrain_backbone')(['--quick', '--out', str(tmp_path)])
  backbone = tmp_path / 'backbones' / 'smallcnn-fashion-mnist_quick'
  meta = json.loads((backbone / 'metadata.json').read_text())
  assert meta['command'].endswith('--quick --out ' + str(tmp_path)) and meta['steps'] > 0
  assert meta['input_shape'] == [8, 8, 1] and 0.0 <= meta['test_accuracy'] <= 1.0
  with _short_budget():
    _main('pretrained_continual')(['--backbone', str(backbone), '--quick', '--out', str(tmp_path)])
  keys = ('split-mnist-ci', 'split-mnist-ti', 'permuted-mnist')
  folder = tmp_path / 'pretrained_continual_quick'
  data = _load(tmp_path, 'pretrained_continual_quick/split-mnist_permuted-mnist',
               [f'pretrained_continual_quick/{key}_{regime}.png' for key in keys for regime in ('pretrained', 'scratch')])
  assert {path.name for path in folder.glob('*.budget.json')} == {
      f'{key}_{regime}.budget.json' for key in keys for regime in ('pretrained', 'scratch')}
  assert '![split-mnist-ci pretrained](split-mnist-ci_pretrained.png)' in (folder / 'split-mnist_permuted-mnist.md').read_text()
  assert data['done'] and set(data['streams']) == set(keys)
  assert {(run['stream'], run['regime']) for run in data['runs']} == {(k, r) for k in keys for r in ('pretrained', 'scratch')}
  assert {run['method_name'] for run in data['runs']} == {'sfa'}
  assert data['streams']['split-mnist-ti']['stream']['setting'] == 'task-incremental'
  for key in keys:  # the budget rule's record: 10 steps per task, fine-tuning's convergence per task
    for regime, record in (('pretrained', data['streams'][key]['budget']), ('scratch', data['streams'][key]['budget_scratch'])):
      assert record['check']['steps_per_task'] == 10 and len(record['convergence']['tasks']) == len(data['streams'][key]['stream']['tasks'])
      assert record['convergence']['regime'] == regime  # each regime measured from its own start
  assert all(run['steps_per_task'] == [10] * len(run['steps_per_task']) for run in data['runs'])
  # A rerun trains nothing: every finished run was recorded in the runs file and is skipped.
  lines = (folder / 'split-mnist_permuted-mnist.runs.jsonl').read_text().splitlines()
  assert len(lines) == len(data['runs'])
  with _short_budget():  # the budget is checked again; no run is
    _main('pretrained_continual')(['--backbone', str(backbone), '--quick', '--out', str(tmp_path)])
  assert (folder / 'split-mnist_permuted-mnist.runs.jsonl').read_text().splitlines() == lines
  # --collect: the union of finished outputs (here just one), written again without training.
  (folder / 'permuted-mnist_scratch.png').unlink()
  _main('pretrained_continual')(['--collect', str(folder / 'split-mnist_permuted-mnist.json'),
                                 '--name', 'collected', '--quick', '--out', str(tmp_path)])
  collected = _load(tmp_path, 'pretrained_continual_quick/collected', ['pretrained_continual_quick/permuted-mnist_scratch.png'])
  assert len(collected['runs']) == len(data['runs']) and collected['streams'].keys() == data['streams'].keys()


def _fashion_idx_folder(folder, train_per_class=32, test_per_class=4):
  """A folder of tiny Fashion-MNIST-shaped IDX files (random 28x28 images, every class)."""
  rng = np.random.default_rng(0)
  folder.mkdir()
  for prefix, per_class in (('train', train_per_class), ('t10k', test_per_class)):
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    for kind, array in (('images-idx3', rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)), ('labels-idx1', labels)):
      header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
      (folder / f'{prefix}-{kind}-ubyte').write_bytes(header + array.tobytes())
  return folder


@pytest.mark.slow  # a SmallCNN pretrained, then a continual stage from it: about 16 s
def test_split_fashion_mnist_from_an_mnist_backbone(tmp_path):
  # The real-shape path (not --quick): a SmallCNN pretrained on the bundled MNIST, then split Fashion-MNIST
  # (here tiny IDX files) continual from it, task-incremental.
  _main('pretrain_backbone')(['--data', 'mnist', '--epochs', '1', '--train-size', '128', '--out', str(tmp_path)])
  backbone = tmp_path / 'backbones' / 'smallcnn-mnist'
  meta = json.loads((backbone / 'metadata.json').read_text())
  assert meta['data'].startswith('mnist') and meta['train_examples'] == 128 and meta['input_shape'] == [28, 28, 1]
  fashion = _fashion_idx_folder(tmp_path / 'fashion')
  with pytest.warns(UserWarning, match='budget rule'):  # 4 steps per task: allowed, loudly
    _main('pretrained_continual')(['--streams', 'split-fashion-mnist-ti', '--regimes', 'pretrained', '--steps', '4',
                                   '--allow-short-budget', '--seeds', '0', '--grid', '[["finetune", {}]]',
                                   '--data-dir', str(fashion), '--backbone', str(backbone), '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'pretrained_continual' / 'split-fashion-mnist-ti_pretrained.json').read_text())
  [run] = data['runs']
  assert data['done'] and data['backbone']['data'] == meta['data'] and run['stream'] == 'split-fashion-mnist-ti'
  assert run['steps_per_task'] == [4] * 5 and data['streams']['split-fashion-mnist-ti']['stream']['setting'] == 'task-incremental'
  assert 'Fashion' in data['streams']['split-fashion-mnist-ti']['stream']['name'] or 'fashion' in json.dumps(data['streams'])


def test_pretrained_continual_picks_the_backbone_of_the_other_data_set(tmp_path):
  module_main = _main('pretrained_continual')
  default_backbone = module_main.__globals__['default_backbone']
  assert default_backbone(['split-mnist-ci', 'permuted-mnist'], False).endswith(os.path.join('backbones', 'smallcnn-fashion-mnist'))
  assert default_backbone(['split-fashion-mnist-ti'], False).endswith(os.path.join('backbones', 'smallcnn-mnist'))
  with pytest.raises(SystemExit, match='mixes MNIST and Fashion-MNIST'):
    module_main(['--streams', 'split-mnist-ci,split-fashion-mnist-ci', '--out', str(tmp_path)])
  with pytest.raises(SystemExit, match=r"unknown stream\(s\) \['split-fashion-mnist-ci'\] in --quick mode"):
    module_main(['--streams', 'split-fashion-mnist-ci', '--quick', '--backbone', str(tmp_path), '--out', str(tmp_path)])


def test_pretrain_backbone_says_how_to_install_the_data(tmp_path):
  with pytest.raises(SystemExit, match='apt-get install dataset-fashion-mnist'):
    _main('pretrain_backbone')(['--data-dir', str(tmp_path), '--out', str(tmp_path)])


@pytest.mark.slow  # about 40 s: 2 seeds x 6 methods of a tiny Llama on the three text domains
def test_language_sequence_quick_over_seeds_and_resumed_run_by_run(tmp_path, capsys):
  _main('language_sequence')(['--quick', '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'language_sequence_quick.json').read_text())
  assert data['command'].endswith('--quick --out ' + str(tmp_path))
  assert data['setting']['seeds'] == [0, 1] and 0 < data['setting']['trainable_params'] < data['setting']['all_params']
  assert [run['seed'] for run in data['runs']] == [0] * 6 + [1] * 6
  summaries = {row['method']: row for row in data['summaries']}
  assert len(summaries) == 6 and all(row['seeds'] == 2 for row in summaries.values())
  finetune = summaries['finetune']
  assert finetune['std']['mean_final_loss'] > 0  # the seeds differ (batch order)
  assert (tmp_path / 'language_sequence_quick.md').read_text().count(' ± ') >= 6 * 6
  assert (tmp_path / 'language_sequence_quick.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert len((tmp_path / 'language_sequence_quick.runs.jsonl').read_text().splitlines()) == 12
  capsys.readouterr()
  _main('language_sequence')(['--quick', '--out', str(tmp_path)])  # every run is recorded: none trains again
  assert 'done' not in capsys.readouterr().out
  assert json.loads((tmp_path / 'language_sequence_quick.json').read_text())['summaries'] == data['summaries']


@pytest.mark.slow  # Tunix trainers of five methods on a tiny Llama, two seeds: about 2 min on 2 cores
def test_tunix_language_sequence_quick_beside_the_engine_and_resumed_run_by_run(tmp_path, capsys):
  pytest.importorskip('tunix', reason='google-tunix is not installed: pip install sfa-jax[tunix]')
  _main('tunix_language_sequence')(['--quick', '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'tunix_language_sequence_quick.json').read_text())
  assert data['command'].endswith('--quick --out ' + str(tmp_path)) and data['engine_summaries'] == []
  assert data['setting']['logit_difference_to_sfa_jax_llama'] < 1e-5 and data['setting']['seeds'] == [0, 1]
  labels = ['finetune', 'sfa(beta=0.5, p=0.25)', 'replay(fraction=0.1, ratio=0.5)', 'l2(strength=1)', 'ewc(gamma=1, strength=10000)']
  assert [run['method'] for run in data['runs']] == labels * 2 and [run['seed'] for run in data['runs']] == [0] * 5 + [1] * 5
  for run in data['runs']:
    assert len(run['loss_matrix']) == 4 and [len(losses) for losses in run['train_losses']] == [4, 4, 4]
    assert run['loss_matrix'][1][0] < run['loss_matrix'][0][0]  # math is learned
  assert data['runs'][1]['averaging_steps'] == list(range(5, 13))  # SFA's, from the second domain on (T = 4, p = 0.25)
  assert data['runs'][4]['seconds']['fisher'] > 0 and data['runs'][0]['seconds']['fisher'] == 0
  assert (tmp_path / 'tunix_language_sequence_quick.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # Beside the engine's results (here this run's, as if the engine's): every run recorded, none trains again.
  (tmp_path / 'language_sequence_quick.json').write_text(json.dumps({'summaries': data['summaries']}))
  capsys.readouterr()
  _main('tunix_language_sequence')(['--quick', '--out', str(tmp_path)])
  assert 's seed 0, ' not in capsys.readouterr().out  # no run's progress line
  markdown = (tmp_path / 'tunix_language_sequence_quick.md').read_text()
  assert markdown.count('| ewc(gamma=1, strength=10000) |') == 2 and "Beside the engine's" in markdown


@pytest.mark.slow  # one Tunix trainer and one engine run on a tiny Llama: about 1 min on 2 cores
def test_tunix_on_the_engine_s_parameters_is_the_engine_s_fine_tuning(tmp_path):
  pytest.importorskip('tunix', reason='google-tunix is not installed: pip install sfa-jax[tunix]')
  import dataclasses

  from sfa_jax import engine
  from sfa_jax.engine import lm

  _main('tunix_language_sequence')(['--quick', '--top-blocks', '--seeds', '0', '--out', str(tmp_path)])
  (run,) = json.loads((tmp_path / 'tunix_language_sequence_top_blocks_quick.json').read_text())['runs']
  model, params, domains, settings = _main('language_sequence').__globals__['setup'](True)
  config = dataclasses.replace(settings['config'], seed=0)
  (result,) = lm.run_lm_sequences(model, params, domains, [engine.make_method('finetune')], config)
  np.testing.assert_allclose(run['loss_matrix'], result.loss_matrix, atol=1e-5)
  assert run['exact_match'] == result.exact_match and run['method'] == result.method == 'finetune'


@pytest.mark.slow  # three scenarios of several methods, then a rerun: about 33 s
def test_three_scenarios_quick(tmp_path):
  # van de Ven & Tolias' split-MNIST protocol in its three scenarios, on the 8x8 digits: the side-by-side
  # table, the budget record, and a rerun that trains nothing (every run is recorded and skipped).
  with _short_budget():
    _main('three_scenarios')(['--protocols', 'split', '--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'three_scenarios_quick/split')
  assert {(run['scenario'], run['method_name']) for run in data['runs']} == {
      (s, m) for s in ('task-incremental', 'domain-incremental', 'class-incremental')
      for m in ('finetune', 'joint', 'ewc', 'ewc-offline', 'si', 'replay', 'lwf-vandeven')}
  assert data['budget']['check']['steps_per_task'] == 20 and len(data['budget']['convergence']['tasks']) == 5
  md = (tmp_path / 'three_scenarios_quick' / 'split.md').read_text()
  assert '| None (`finetune`) | 87.19' in md and 'not in the engine' in md
  assert '| EWC (`ewc-offline`) | 98.64' in md and '| SI (`si`) | 99.09' in md and '| LwF (`lwf-vandeven`) | 99.57' in md
  # Learning against keeping: each row's accuracy right after training and on the past at the end, over its seeds.
  finetune = [r for r in data['runs'] if (r['scenario'], r['method_name']) == ('task-incremental', 'finetune')]
  stability, plasticity = 100 * np.mean([scaffold.stability_plasticity(r) for r in finetune], axis=0)
  [row] = [line for line in md.splitlines() if line.startswith('| task-incremental | finetune |')]
  assert row.split(' | ')[4:6] == [f'{plasticity:.2f}', f'{stability:.2f}']
  lines = (tmp_path / 'three_scenarios_quick' / 'split.runs.jsonl').read_text().splitlines()
  _main('three_scenarios')(['--protocols', 'split', '--quick', '--out', str(tmp_path)])
  assert (tmp_path / 'three_scenarios_quick' / 'split.runs.jsonl').read_text().splitlines() == lines
  assert (tmp_path / 'three_scenarios_quick' / 'split.budget.json').is_file()


def test_budget_audit_quick(tmp_path):
  with _short_budget():
    _main('budget_audit')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'budget_audit_quick')
  [row] = data['audits']
  assert row['section'] == '§1' and row['check']['p_values'] == [0.25, 1.0] and row['check']['min_steps_for_p'] == 8
  assert len(row['converged_accuracy']) == 2 and len(row['check']['steps_to_fraction']) == 2
  assert row['check']['ok'] == (max(row['check']['steps_to_fraction']) <= row['check']['steps_per_task'])


@pytest.mark.slow  # four rows in two scenarios on the 8x8 digits, then a rerun: 25-45 s on 2 shared cores
def test_sequential_mnist_quick(tmp_path):
  # Buzzega et al's Seq-MNIST rows: Class-IL and Task-IL runs of each row, and a rerun that trains nothing.
  _main('sequential_mnist')(['--quick', '--out', str(tmp_path)])
  data = _load(tmp_path, 'sequential_mnist_quick')
  assert {(run['scenario'], run['row'], run['buffer']) for run in data['runs']} == {
      (s, r, b) for s in ('Class-IL', 'Task-IL') for r, b in (('SGD', None), ('ER', 200), ('A-GEM', 200), ('DER++', 200))}
  # Task-IL is the Class-IL model scored among its task's two outputs: trained alike, it is right wherever
  # the Class-IL model is, so every entry of its accuracy matrix is at least the Class-IL one.
  by_row = {(run['scenario'], run['row']): np.asarray(run['accuracy_matrix']) for run in data['runs']}
  for row in ('SGD', 'ER', 'A-GEM', 'DER++'):
    assert np.all(by_row['Task-IL', row] >= by_row['Class-IL', row] - 1e-9), row
  assert by_row['Task-IL', 'SGD'][-1, 0] > by_row['Class-IL', 'SGD'][-1, 0]  # fine-tuning forgets task 0 in Class-IL only
  md = (tmp_path / 'sequential_mnist_quick.md').read_text()
  assert '| DER++ | 200 | not found |' in md and 'Buffer 5120 is not run' in md
  lines = (tmp_path / 'sequential_mnist_quick.runs.jsonl').read_text().splitlines()
  _main('sequential_mnist')(['--quick', '--out', str(tmp_path)])
  assert (tmp_path / 'sequential_mnist_quick.runs.jsonl').read_text().splitlines() == lines


def test_sequential_mnist_task_il_score_masks_the_other_tasks():
  # Mammoth's mask_classes: the other tasks' outputs at -inf, then the argmax (the task of label y is y // 2).
  import jax.numpy as jnp

  spec = importlib.util.spec_from_file_location('sequential_mnist', os.path.join(EXPERIMENTS, 'sequential_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  logits = jnp.array([[0.0, 1.0, 9.0, 0.0], [5.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0]])
  labels = jnp.array([1, 3, 2])
  mask = jnp.ones(3, bool)
  assert int(module.TASK_IL_OBJECTIVE.score(logits, labels, mask)) == 2  # 1 among {0, 1}; 3 among {2, 3}; not 2
  assert int(module.OBJECTIVE['Class-IL'].score(logits, labels, mask)) == 0  # 2, 0 and 3 win among all four
  assert module.TASK_IL_OBJECTIVE.loss is module.OBJECTIVE['Class-IL'].loss  # the same training
