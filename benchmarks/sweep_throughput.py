"""Throughput of a vectorised sweep (`sfa_jax.engine.sweep.run_sweep`) against the same runs one by one.

An 8-configuration SFA sweep (p in {0.1, 0.25, 0.5, 1} x beta in {0.25, 0.5}, or with --seeds 2:
p x seeds 0, 1) on the MNIST task pair (bundled 5000-image MNIST, MLP 784-256-256-10, Adam 1e-3,
batch 64, 2 epochs per task), against 8 calls of `engine.run_sequence`, measured side by side:

* cold: each variant in a fresh process with the persistent compilation cache off (compilation
  included, as a user's first run);
* warm: each variant in a fresh process whose persistent compilation cache was filled by an
  earlier run of the same variant.

Each process times only the training and evaluation (data loaded and imports done before the
clock starts). The rounds interleave the variants; the figures are medians over rounds. A third
measurement, `steps`, times the compiled train step alone (steady state, no Python loop): one
configuration's step against the 8-configuration vectorised step, to tell compute from overhead.

  python benchmarks/sweep_throughput.py --rounds 3 --json benchmarks/sweep_throughput_cpu.json
"""

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ('sequential', 'sweep')


GRIDS = {  # configurations: SFA's (p, beta) values
    8: ((0.1, 0.25, 0.5, 1.0), (0.25, 0.5)),
    64: ((0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0), (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)),
}


def _configurations(seeds: int, size: int = 8):
  from sfa_jax import engine
  from sfa_jax.cli.presets import DEMO_DEFAULTS

  config = dataclasses.replace(DEMO_DEFAULTS['config'], eval_every=0)
  p_values, betas = GRIDS[size]
  if seeds > 1:
    return engine.grid('sfa', p=p_values, beta=(0.25,), seeds=tuple(range(seeds)), config=config)
  return engine.grid('sfa', p=p_values, beta=betas, config=config)


def _stream(source: str):
  from sfa_jax import tasks

  stream = tasks.make_stream('mnist-pair', source=source)
  for i in range(len(stream)):
    stream[i]  # load the data before the clock starts
  return stream


def worker(variant: str, cache: str | None, seeds: int, source: str, size: int = 8) -> dict:
  """One measurement in this (fresh) process: wall seconds of the variant, and its accuracy matrices."""
  from sfa_jax.engine import compile_cache
  from sfa_jax import engine

  if cache:
    compile_cache.enable_compilation_cache(cache)
  stream = _stream(source)
  configurations = _configurations(seeds, size)
  begin = time.perf_counter()
  if variant == 'sweep':
    results = engine.run_sweep(stream, configurations)
  else:
    results = [engine.run_sequence(stream, method, config) for method, config in configurations]
  seconds = time.perf_counter() - begin
  return {
      'seconds': seconds,
      'train_seconds': sum(r.seconds['train'] for r in results) if variant == 'sequential' else results[0].seconds['train'],
      'matrices': [r.accuracy_matrix for r in results],
  }


def step_worker(seeds: int, source: str, size: int = 8, repeats: int = 30) -> dict:
  """Median time of one configuration's compiled train step and of the vectorised step of all of them."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sfa_jax import engine
  from sfa_jax import models
  from sfa_jax.engine import loop
  from sfa_jax.engine import steps
  from sfa_jax.engine import methods

  stream = _stream(source)
  configurations = _configurations(seeds, size)
  method, config = configurations[0]
  model = engine.run.build_model(stream, config)
  data = stream[1].train
  params, model_state = models.split_variables(
      model.init(jax.random.key(0), data.x[:1], task_id=np.zeros(1, np.int32), train=False)
  )
  tx = method.transform(config.make_optimizer())
  run = loop.RunState(params, model_state, tx.init(params), method.init_extras(params, model_state, 2))
  opt_state = method.prepare_optimizer(run.opt_state, run, methods.Boundary(1, 2, 62, fisher=None))
  batch = (data.x[: config.batch_size], data.y[: config.batch_size], np.ones(config.batch_size, bool),
           np.ones(config.batch_size, np.int32))
  count = len(configurations)
  stack = lambda tree: jax.tree.map(lambda leaf: jnp.stack([leaf] * count), tree)
  data_axis = None if seeds == 1 else 0
  stacked_batch = batch if seeds == 1 else tuple(np.stack([b] * count) for b in batch)
  single = steps.jitted_train_step(model, tx)
  vectorised = jax.jit(
      jax.vmap(steps.make_train_step(model, tx), in_axes=(0, 0, 0, data_axis, data_axis, None, data_axis)),
      donate_argnums=(0, 2),
  )
  out = {}
  for name, step, state in (('single', single, (params, model_state, opt_state)),
                            ('vectorised', vectorised, (stack(params), stack(model_state), stack(opt_state)))):
    x, y, _, ids = batch if name == 'single' else stacked_batch
    times = []
    for i in range(repeats + 3):
      begin = time.perf_counter()
      p, s, o, _, _ = step(*state, x, y, batch[2], ids)
      jax.block_until_ready(p)
      if i >= 3:
        times.append(time.perf_counter() - begin)
      state = (p, s, o)
    out[name] = statistics.median(times)
  out['vectorised_over_single'] = out['vectorised'] / out['single']
  return out


def _spawn(args: list[str]) -> dict:
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')  # the device_suite.sh sets it (empty: JAX's own choice)
  done = subprocess.run([sys.executable, __file__] + args, capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    raise RuntimeError(f'worker {args} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seeds', type=int, default=1, help='1: p x beta, one seed; 2: p x seeds 0, 1')
  parser.add_argument('--source', default='offline', choices=('offline', 'digits'),
                      help="offline: MNIST-5k (28x28); digits: scikit-learn's 8x8 digits (a tiny, overhead-bound job)")
  parser.add_argument('--configurations', type=int, default=8, choices=tuple(GRIDS),
                      help='8: p x beta as above; 64: 8 p x 8 beta (for an accelerator)')
  parser.add_argument('--json', help='write the figures here')
  parser.add_argument('--worker', choices=VARIANTS + ('steps',), help=argparse.SUPPRESS)
  parser.add_argument('--cache', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == 'steps':
    print(json.dumps(step_worker(args.seeds, args.source, args.configurations)))
    return
  if args.worker:
    print(json.dumps(worker(args.worker, args.cache, args.seeds, args.source, args.configurations)))
    return

  load_before = os.getloadavg()
  caches = {variant: tempfile.mkdtemp(prefix=f'sweep_bench_{variant}_') for variant in VARIANTS}
  base = ['--seeds', str(args.seeds), '--source', args.source, '--configurations', str(args.configurations)]
  for variant in VARIANTS:  # fill each variant's cache once (not measured)
    _spawn(['--worker', variant, '--cache', caches[variant]] + base)
  times = {f'{mode}_{variant}': [] for mode in ('cold', 'warm') for variant in VARIANTS}
  train = {key: [] for key in times}
  matrices = {}
  for round_index in range(args.rounds):
    for mode in ('cold', 'warm'):
      for variant in VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]:
        extra = ['--cache', caches[variant]] if mode == 'warm' else []
        result = _spawn(['--worker', variant] + extra + base)
        times[f'{mode}_{variant}'].append(result['seconds'])
        train[f'{mode}_{variant}'].append(result['train_seconds'])
        matrices[variant] = result['matrices']
        print(f'round {round_index} {mode:4} {variant:10} {result["seconds"]:7.2f} s', file=sys.stderr, flush=True)
  steps = _spawn(['--worker', 'steps'] + base)
  for folder in caches.values():
    shutil.rmtree(folder, ignore_errors=True)
  import numpy as np

  difference = float(np.max(np.abs(np.asarray(matrices['sweep']) - np.asarray(matrices['sequential']))))
  medians = {key: statistics.median(values) for key, values in times.items()}
  figures = {
      'setup': (('mnist-pair (MNIST-5k), MLP 784-256-256-10' if args.source == 'offline' else
                 "mnist-pair (sklearn 8x8 digits), MLP 64-256-256-10") + ', Adam 1e-3, batch 64, 2 epochs per task, '
                + f'{len(_configurations(args.seeds, args.configurations))} SFA '
                + ('configurations (p x seeds)' if args.seeds > 1 else 'configurations (p x beta, seed 0)')),
      'rounds': args.rounds,
      'median_seconds': medians,
      'median_train_seconds': {key: statistics.median(values) for key, values in train.items()},
      'all_seconds': times,
      'speedup_cold': medians['cold_sequential'] / medians['cold_sweep'],
      'speedup_warm': medians['warm_sequential'] / medians['warm_sweep'],
      'step_seconds': steps,
      'max_accuracy_difference': difference,
      'loadavg_before': load_before,
      'loadavg_after': os.getloadavg(),
      'cpu_count': os.cpu_count(),
  }
  print(json.dumps(figures, indent=1))
  print(f"\nspeed-up of the sweep over {args.configurations} sequential runs: cold {figures['speedup_cold']:.2f}x, warm "
        f"{figures['speedup_warm']:.2f}x (goal >= 4x); train step: the {args.configurations}-configuration step takes "
        f"{steps['vectorised_over_single']:.2f}x one configuration's; accuracy matrices differ by at most {difference:.1e}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  main()
