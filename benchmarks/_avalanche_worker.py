"""The Avalanche side of ``benchmarks/vs_avalanche.py``; runs in Avalanche's own virtual environment.

  python _avalanche_worker.py DATA.npz SPEC.json OUT.json

``DATA.npz`` holds the split-MNIST stream that sfa_jax built (``train_x``, ``train_y``, ``test_x``,
``test_y``, ``test_task``, ``class_order``); ``SPEC.json`` lists the runs (``{'label', 'strategy', 'kwargs'}``) and
the shared settings (``epochs``, ``batch_size``, ``learning_rate``, ``seed``). Each run builds the
stream with Avalanche's ``nc_benchmark`` from these in-memory tensors, trains the MLP
784-256-256-10 with Adam, and after each experience evaluates every task's test set (a plain
no-grad forward pass, the measurement sfa_jax's evaluator makes; no metric plugins). It writes, per run, the accuracy matrix and the wall time of training and
evaluation (the same span as sfa_jax's ``run_sequence``). Imports only Avalanche, PyTorch, NumPy.
"""

import json
import sys
import time

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import EWC, Naive, Replay

STRATEGIES = {'Naive': Naive, 'EWC': EWC, 'Replay': Replay}


class _Tensors(torch.utils.data.TensorDataset):
  """Images and labels in memory, with the ``targets`` Avalanche reads the classes from."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    super().__init__(torch.from_numpy(x), torch.from_numpy(y).long())
    self.targets = self.tensors[1].tolist()


def mlp() -> torch.nn.Module:
  return torch.nn.Sequential(
      torch.nn.Flatten(),
      torch.nn.Linear(784, 256), torch.nn.ReLU(),
      torch.nn.Linear(256, 256), torch.nn.ReLU(),
      torch.nn.Linear(256, 10),
  )


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
  model.eval()
  return float((model(x).argmax(-1) == y).float().mean())


def run(data, settings, spec):
  torch.manual_seed(settings['seed'])
  train, test = _Tensors(data['train_x'], data['train_y']), _Tensors(data['test_x'], data['test_y'])
  order = [int(c) for c in data['class_order']]
  benchmark = nc_benchmark(
      train, test, n_experiences=len(order) // 2, task_labels=False, fixed_class_order=order, seed=settings['seed']
  )
  model = mlp()
  strategy = STRATEGIES[spec['strategy']](
      model=model,
      optimizer=torch.optim.Adam(model.parameters(), lr=settings['learning_rate']),
      criterion=torch.nn.CrossEntropyLoss(),
      train_mb_size=settings['batch_size'],
      train_epochs=settings['epochs'],
      device='cpu',
      evaluator=EvaluationPlugin(loggers=[]),
      **spec['kwargs'],
  )
  test_sets = [
      (torch.from_numpy(data['test_x'][data['test_task'] == k]), torch.from_numpy(data['test_y'][data['test_task'] == k]))
      for k in range(len(benchmark.train_stream))
  ]
  matrix = []
  begin = time.perf_counter()
  for k, experience in enumerate(benchmark.train_stream):
    assert sorted(experience.classes_in_this_experience) == sorted(set(test_sets[k][1].tolist())), k
    strategy.train(experience)
    matrix.append([accuracy(model, x, y) for x, y in test_sets])
  seconds = time.perf_counter() - begin
  return {'label': spec['label'], 'seconds': seconds, 'accuracy_matrix': matrix}


def main(data_path: str, spec_path: str, out_path: str) -> None:
  data = dict(np.load(data_path))
  with open(spec_path) as f:
    spec = json.load(f)
  runs = []
  for run_spec in spec['runs']:
    runs.append(run(data, spec['settings'], run_spec))
    print(f"avalanche {run_spec['label']}: {runs[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
  with open(out_path, 'w') as f:
    json.dump({'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), 'runs': runs}, f)


if __name__ == '__main__':
  main(*sys.argv[1:4])
