"""Time per optimizer step of the engine (`engine.run_sequence`) against a hand-written JAX loop.

Both train SFA (p = 0.25, beta = 0.25) on the MNIST task pair, or with `--stream permuted` on 20
permuted-MNIST tasks (bundled MNIST-5k; `--source digits` and `--quick`: scikit-learn's 8x8 digits) with the default MLP and the demo's config
(`sfa_jax.cli.presets.DEMO_DEFAULTS['config']`: Adam 1e-3, batch 64, 2 epochs per task) with
`eval_every=0`, and evaluate every task after each task:

* engine: `engine.run_sequence(stream, engine.make_method('sfa', p=0.25, beta=0.25), config)`;
* hand: no engine. The same model (`engine.run.build_model`), the same optax chain
  (`method.transform(config.make_optimizer())`, its state reset at each task start as the config's
  `reset_optimizer` says, and re-anchored with `sfa_jax.reanchor(opt_state, params, total_steps=T)`
  from the second task on), the same batches (`tasks.epoch_indices` with the engine's per-task
  seed `seed * 1000 + task`), but each task's T steps run as one `jax.lax.scan` over the task's
  batches, gathered and stacked on the host beforehand, inside one `jax.jit` (params and optimizer
  state donated); one jitted call evaluates all test sets, padded to one shape. Both start from the
  stream: the hand loop builds its tasks and stacks its test sets inside its clock, as
  `run_sequence` builds its tasks and test batches inside its own.

Two figures, each per optimizer step (seconds of training over the run's steps) and for the whole
run (initialisation, training and evaluation):

* warm: one process, both variants compiled by a first run of each (not measured), then
  `--rounds` rounds, the order of the two alternating;
* cold: every run in a fresh process with the persistent compilation cache off (imports and data
  loading before the clock), so compilation is included, rounds interleaved.

Training seconds: the engine's `result.seconds['train']` (from its first batch to the
`block_until_ready` of the task's last step, per task); the hand loop's, from gathering its
batches to `jax.block_until_ready` of the scan's result, per task. Both accuracy matrices are
printed and compared.

The breakdown (`steps` worker, warm, one process, the second task's steps 4 times over per
measurement, interleaved rounds) tells where the engine's time per step goes: the engine itself;
the scan with and without its host stacking; the engine's own compiled step
(`engine.steps.jitted_train_step`) driven by a bare Python loop on batches already on the device,
then on NumPy batches gathered per step (the engine's feed before its fused chunks); the host
gathering alone; what a warm engine run still compiles
(`jax_log_compiles`); and a profile of a warm engine run.

  python benchmarks/engine_overhead.py --rounds 9 [--source digits] [--stream permuted] [--json figures.json]
  python benchmarks/engine_overhead.py --against /tmp/old ...   # also the cold engine of another checkout
  python benchmarks/engine_overhead.py --quick      # digits, 2 warm rounds, no cold runs: a smoke test
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = ('engine', 'hand')


STREAMS = {'pair': ('mnist-pair', {}), 'permuted': ('permuted-mnist', {'num_tasks': 20})}


def setup(source: str, stream_name: str = 'pair'):
  """The stream (its data loaded), the method and the config of both variants."""
  from sfa_jax import engine
  from sfa_jax import tasks
  from sfa_jax.cli.presets import DEMO_DEFAULTS

  name, options = STREAMS[stream_name]
  stream = tasks.make_stream(name, source=source, **options)
  for i in range(len(stream)):
    stream[i]  # load the data before the clock starts
  config = dataclasses.replace(DEMO_DEFAULTS['config'], eval_every=0)
  return stream, engine.make_method('sfa', p=0.25, beta=0.25), config


def run_engine(stream, method, config) -> dict:
  from sfa_jax import engine

  begin = time.perf_counter()
  result = engine.run_sequence(stream, method, config)
  seconds = time.perf_counter() - begin
  return {'seconds': seconds, 'train_seconds': result.seconds['train'], 'steps': sum(result.steps_per_task),
          'engine_seconds': dict(result.seconds),
          'matrix': [list(map(float, row)) for row in result.accuracy_matrix]}


class HandLoop:
  """The same training with no engine: one ``lax.scan`` per task inside one ``jit``.

  Built once per process (like the engine's kept step): later runs reuse the compiled programs.
  """

  def __init__(self, stream, method, config):
    import jax
    import jax.numpy as jnp
    import optax

    from sfa_jax import engine

    self.stream, self.config = stream, config
    self._load()
    model = engine.run.build_model(stream, config)
    tx = method.transform(config.make_optimizer())

    def loss_fn(params, x, y, ids):
      logits = model.apply({'params': params}, x, task_id=ids, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_task(params, opt_state, xs, ys, ids):
      def body(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys, ids))
      return params, opt_state, losses

    def correct_counts(params, xs, ys, mask, ids):  # every test set at once: (tasks, examples)
      logits = jax.vmap(lambda x, i: model.apply({'params': params}, x, task_id=i, train=False))(xs, ids)
      return jnp.sum((jnp.argmax(logits, -1) == ys) & mask, axis=1)

    sample = self.tasks[0].train.x[:1]
    self.init = jax.jit(lambda key: model.init(key, sample, task_id=jnp.zeros(1, jnp.int32), train=False)['params'])
    self.tx_init = jax.jit(tx.init)
    self.train_task = jax.jit(train_task, donate_argnums=(0, 1))
    self.correct_counts = jax.jit(correct_counts)

  def _load(self) -> None:
    """Builds the stream's tasks and stacks their test sets, padded to one shape, as a run starts."""
    import numpy as np

    self.tasks = [self.stream[i] for i in range(len(self.stream))]
    size = max(len(t.test.y) for t in self.tasks)
    pad = lambda a: np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])
    self.test = (np.stack([pad(t.test.x) for t in self.tasks]), np.stack([pad(t.test.y) for t in self.tasks]),
                 np.stack([np.arange(size) < len(t.test.y) for t in self.tasks]),
                 np.stack([np.full(size, t.index, np.int32) for t in self.tasks]))
    self.test_sizes = np.array([len(t.test.y) for t in self.tasks])

  def order(self, k: int):
    """Task ``k``'s example indices, ``(T, B)``: the engine's order (seed ``seed * 1000 + k``, per epoch)."""
    import numpy as np

    from sfa_jax import tasks

    n, b = len(self.tasks[k].train.y), self.config.batch_size
    return np.concatenate([tasks.epoch_indices(n, b, seed=self.config.seed * 1000 + k, epoch=e)[0]
                           for e in range(self.config.epochs_per_task)])

  def batches(self, k: int):
    """Task ``k``'s batches, stacked: ``(T, B, ...)`` inputs, labels and task ids."""
    import numpy as np

    data, order = self.tasks[k].train, self.order(k)
    return data.x[order], data.y[order], np.full(order.shape, self.tasks[k].index, np.int32)

  def run(self) -> dict:
    import jax
    import numpy as np

    import sfa_jax

    begin = time.perf_counter()
    self._load()  # from the stream, as run_sequence starts: its tasks are built inside the clock too
    params = self.init(jax.random.key(self.config.seed))
    matrix, train_seconds, steps = [], 0.0, 0
    for k in range(len(self.tasks)):
      opt_state = self.tx_init(params)  # reset_optimizer=True
      if k > 0:
        opt_state = sfa_jax.reanchor(opt_state, params, total_steps=len(self.order(k)))
      start = time.perf_counter()  # the engine's clock, too, starts after the task's start hooks
      xs, ys, ids = self.batches(k)
      params, opt_state, losses = self.train_task(params, opt_state, xs, ys, ids)
      jax.block_until_ready((params, opt_state))
      train_seconds += time.perf_counter() - start
      steps += len(ys)
      matrix.append([float(a) for a in np.asarray(self.correct_counts(params, *self.test)) / self.test_sizes])
    return {'seconds': time.perf_counter() - begin, 'train_seconds': train_seconds, 'steps': steps, 'matrix': matrix}


def warm_worker(source: str, rounds: int, stream_name: str = 'pair') -> dict:
  stream, method, config = setup(source, stream_name)
  hand = HandLoop(stream, method, config)
  runs = {'engine': lambda: run_engine(stream, method, config), 'hand': hand.run}
  for run in runs.values():
    run()  # compile (not measured)
  out = {variant: [] for variant in VARIANTS}
  for r in range(rounds):
    for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
      out[variant].append(runs[variant]())
  return out


def cold_worker(variant: str, source: str, stream_name: str = 'pair') -> dict:
  stream, method, config = setup(source, stream_name)
  begin = time.perf_counter()
  result = run_engine(stream, method, config) if variant == 'engine' else HandLoop(stream, method, config).run()
  result['seconds'] = time.perf_counter() - begin  # the hand loop's building (and its compilations) included
  return result


def steps_worker(source: str, rounds: int, stream_name: str = 'pair', passes: int = 4) -> dict:
  """Where the engine's time per step goes: median seconds per step of ways to run the same steps.

  The second task's steps (SFA active), each way ``passes`` times over per measurement, and the
  parts alone (host gathering); ``rounds`` interleaved rounds.
  """
  import cProfile
  import io
  import logging
  import pstats
  import re

  import jax
  import numpy as np

  from sfa_jax import engine
  from sfa_jax.engine import steps

  stream, method, config = setup(source, stream_name)
  hand = HandLoop(stream, method, config)
  model = engine.run.build_model(stream, config)
  tx = method.transform(config.make_optimizer())
  step = steps.jitted_train_step(model, tx)  # the engine's step, compiled the same way
  k = 1  # the second task: SFA active, averaging
  xs, ys, ids = hand.batches(k)
  data, b, order = hand.tasks[k].train, config.batch_size, hand.order(k)
  task_ids = np.full(len(data.y), k, np.int32)
  mask = np.ones(b, bool)
  dev = [jax.device_put((xs[i], ys[i], mask, ids[i])) for i in range(len(ys))]
  stacked = jax.device_put((xs, ys, ids))
  steps = passes * len(ys)  # each measurement: the task's steps, `passes` times over

  def fresh():
    import sfa_jax

    params = hand.init(jax.random.key(0))
    opt_state = sfa_jax.reanchor(hand.tx_init(params), params, total_steps=len(ys))
    return jax.block_until_ready((params, {}, opt_state))

  def loop_device():  # the engine's step, batches already on the device
    params, ms, opt_state = fresh()
    begin = time.perf_counter()
    for _ in range(passes):
      for batch in dev:
        params, ms, opt_state, loss, acc = step(params, ms, opt_state, *batch)
    jax.block_until_ready(params)
    return time.perf_counter() - begin

  def loop_numpy():  # the engine's step fed as the engine feeds it: NumPy batches gathered per step
    params, ms, opt_state = fresh()
    begin = time.perf_counter()
    for _ in range(passes):
      for rows in order:
        params, ms, opt_state, loss, acc = step(params, ms, opt_state, data.x[rows], data.y[rows], mask, task_ids[rows])
    jax.block_until_ready(params)
    return time.perf_counter() - begin

  def scan():  # the hand loop: host gathering and transfer of the stacked batches, one scan
    params, _, opt_state = fresh()
    begin = time.perf_counter()
    for _ in range(passes):
      params, opt_state, _ = hand.train_task(params, opt_state, *hand.batches(k))
    jax.block_until_ready((params, opt_state))
    return time.perf_counter() - begin

  def scan_device():  # the scan alone, its batches already on the device
    params, _, opt_state = fresh()
    begin = time.perf_counter()
    for _ in range(passes):
      params, opt_state, _ = hand.train_task(params, opt_state, *stacked)
    jax.block_until_ready((params, opt_state))
    return time.perf_counter() - begin

  def gather_only():  # the engine's per-step NumPy fancy indexing alone
    begin = time.perf_counter()
    for _ in range(passes):
      for rows in order:
        data.x[rows], data.y[rows], task_ids[rows]
    return time.perf_counter() - begin

  def stack_only():  # the scan's host gathering and transfer alone
    begin = time.perf_counter()
    for _ in range(passes):
      jax.block_until_ready(jax.device_put(hand.batches(k)))
    return time.perf_counter() - begin

  def engine():  # a whole run_sequence; its training seconds scaled to `steps` steps
    result = run_engine(stream, method, config)
    return result['train_seconds'] * steps / result['steps']

  ways = {'engine': engine, 'scan': scan, 'scan_device_batches': scan_device, 'loop_device_batches': loop_device,
          'loop_numpy_batches': loop_numpy, 'gather_only': gather_only, 'stack_only': stack_only}
  for way in ways.values():
    way()
  times = {name: [] for name in ways}
  for r in range(rounds):
    for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
      times[name].append(ways[name]() / steps)
  # What a warm engine run (its train step and evaluator kept from earlier runs) still compiles.
  log = io.StringIO()
  handler = logging.StreamHandler(log)
  logging.getLogger('jax').addHandler(handler)
  jax.config.update('jax_log_compiles', True)
  run_engine(stream, method, config)
  jax.config.update('jax_log_compiles', False)
  logging.getLogger('jax').removeHandler(handler)
  compiles = [(m.group(1), float(m.group(2))) for m in
              re.finditer(r'Finished XLA compilation of (.*?) in ([0-9.e-]+) sec', log.getvalue())]
  profile = cProfile.Profile()
  profile.enable()
  run_engine(stream, method, config)
  profile.disable()
  text = io.StringIO()
  pstats.Stats(profile, stream=text).sort_stats('tottime').print_stats(12)
  return {'per_step_median': {name: statistics.median(v) for name, v in times.items()}, 'all': times,
          'warm_run_compiles': compiles, 'profile': text.getvalue()}


def _spawn(args: list[str], cold: bool = False, checkout: str | None = None) -> dict:
  """A worker in a fresh process: this script, or (``checkout``) another checkout's, on its own code."""
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')  # the device_suite.sh sets it (empty: JAX's own choice)
  if cold:
    env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
    env.pop('JAX_COMPILATION_CACHE_DIR', None)
  script = os.path.abspath(__file__)
  if checkout is not None:
    env['PYTHONPATH'] = os.path.abspath(checkout)
    script = os.path.join(os.path.abspath(checkout), 'benchmarks', os.path.basename(__file__))
  done = subprocess.run([sys.executable, script] + args, capture_output=True, text=True, env=env, check=False,
                        cwd=None if checkout is None else os.path.abspath(checkout))
  if done.returncode:
    raise RuntimeError(f'worker {args} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
  import jax

  model = platform.processor() or ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'nproc': os.cpu_count(), 'cpu': model, 'jax': jax.__version__, 'backend': jax.default_backend(),
          'python': platform.python_version()}


def _median(runs: list[dict], key: str, per_step: bool) -> float:
  return statistics.median(r[key] / r['steps'] if per_step else r[key] for r in runs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rounds', type=int, default=7, help='interleaved rounds (each variant once a round)')
  parser.add_argument('--cold-rounds', type=int, default=None, help='rounds of fresh processes (default: --rounds)')
  parser.add_argument('--source', default='offline', choices=('offline', 'digits'))
  parser.add_argument('--stream', default='pair', choices=tuple(STREAMS),
                      help='pair: the MNIST task pair; permuted: 20 permuted-MNIST tasks')
  parser.add_argument('--quick', action='store_true', help='digits, 2 warm rounds, no cold runs, no breakdown')
  parser.add_argument('--no-breakdown', action='store_true')
  parser.add_argument('--json', help='write the figures here')
  parser.add_argument('--against', metavar='CHECKOUT',
                      help="also time, cold, the engine of another checkout (e.g. `git worktree add /tmp/old REV`) in "
                           "every cold round: this engine's cold whole run over that one's (the MNIST pair or digits)")
  parser.add_argument('--worker', choices=('warm', 'cold', 'steps'), help=argparse.SUPPRESS)
  parser.add_argument('--variant', choices=VARIANTS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.source, args.rounds, args.cold_rounds, args.no_breakdown = 'digits', 2, 0, True
  if args.worker == 'warm':
    print(json.dumps(warm_worker(args.source, args.rounds, args.stream)))
    return
  if args.worker == 'cold':
    print(json.dumps(cold_worker(args.variant, args.source, args.stream)))
    return
  if args.worker == 'steps':
    print(json.dumps(steps_worker(args.source, args.rounds, args.stream)))
    return

  import numpy as np

  cold_rounds = args.rounds if args.cold_rounds is None else args.cold_rounds
  load_before = os.getloadavg()
  base = ['--source', args.source, '--stream', args.stream, '--rounds', str(args.rounds)]
  # --quick measures in this process (a smoke test: one interpreter start less); else in a fresh one.
  warm = warm_worker(args.source, args.rounds, args.stream) if args.quick else _spawn(['--worker', 'warm'] + base)
  print(f'warm: {args.rounds} rounds done', file=sys.stderr, flush=True)
  cold = {variant: [] for variant in VARIANTS}
  against = []  # the other checkout's engine, cold, in the same rounds
  for r in range(cold_rounds):
    for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
      cold[variant].append(_spawn(['--worker', 'cold', '--variant', variant] + base, cold=True))
      print(f'cold round {r} {variant:6} {cold[variant][-1]["seconds"]:6.2f} s', file=sys.stderr, flush=True)
    if args.against:
      against.append(_spawn(['--worker', 'cold', '--variant', 'engine', '--source', args.source], cold=True,
                            checkout=args.against))
      print(f'cold round {r} against {against[-1]["seconds"]:6.2f} s', file=sys.stderr, flush=True)
  breakdown = None if args.no_breakdown else _spawn(['--worker', 'steps'] + base)

  figures = {'machine': machine(), 'setup': {
      'stream': STREAMS[args.stream][0] + f' {STREAMS[args.stream][1] or ""} ' + ('(bundled MNIST-5k, MLP 784-256-256-10)' if args.source == 'offline'
                                 else '(sklearn 8x8 digits, MLP 64-256-256-10)'),
      'method': 'sfa p=0.25 beta=0.25', 'config': 'DEMO_DEFAULTS config, eval_every=0 (Adam 1e-3, batch 64, 2 epochs a task)',
      'steps': warm['engine'][0]['steps'], 'rounds': args.rounds, 'cold_rounds': cold_rounds}}
  matrices = {v: np.asarray(warm[v][-1]['matrix']) for v in VARIANTS}
  for v in VARIANTS:  # every run of a variant gives the same matrix
    for r in warm[v] + cold[v]:
      assert np.array_equal(np.asarray(r['matrix']), matrices[v]), f'{v}: runs disagree'
  difference = float(np.max(np.abs(matrices['engine'] - matrices['hand'])))
  table = {}
  for mode, runs in (('warm', warm), ('cold', cold)):
    if not runs['engine']:
      continue
    row = {}
    for what, key, per_step in (('train_per_step', 'train_seconds', True), ('run_seconds', 'seconds', False)):
      e, h = _median(runs['engine'], key, per_step), _median(runs['hand'], key, per_step)
      row[what] = {'engine': e, 'hand': h, 'ratio': e / h}
    row['all_train_seconds'] = {v: [r['train_seconds'] for r in runs[v]] for v in VARIANTS}
    row['all_run_seconds'] = {v: [r['seconds'] for r in runs[v]] for v in VARIANTS}
    table[mode] = row
  figures.update(table=table, matrices={v: m.tolist() for v, m in matrices.items()},
                 max_matrix_difference=difference, loadavg_before=load_before, loadavg_after=os.getloadavg())
  if against:
    for r in against:
      assert np.array_equal(np.asarray(r['matrix']), matrices['engine']), 'the other checkout trains another matrix'
    before = statistics.median(r['seconds'] for r in against)
    figures['against'] = {'checkout': args.against, 'cold_run_seconds': [r['seconds'] for r in against], 'median': before,
                          'ratio': table['cold']['run_seconds']['engine'] / before}
  if breakdown:
    figures['breakdown_per_step'] = breakdown['per_step_median']
    figures['breakdown_all'] = breakdown['all']
    figures['warm_run_compiles'] = breakdown['warm_run_compiles']

  m = figures['machine']
  print(f"machine: {m['nproc']} CPUs, {m['cpu']}, jax {m['jax']} ({m['backend']}); load {load_before[0]:.1f} -> "
        f"{figures['loadavg_after'][0]:.1f}")
  print(f"{figures['setup']['stream']}, {figures['setup']['method']}, {figures['setup']['steps']} steps; "
        f"medians of {args.rounds} warm / {cold_rounds} cold interleaved rounds")
  print(f"{'':5} {'':15} {'engine':>10} {'hand scan':>10} {'ratio':>7}")
  for mode, row in table.items():
    t, s = row['train_per_step'], row['run_seconds']
    print(f"{mode:5} {'per step':15} {t['engine'] * 1e3:8.3f}ms {t['hand'] * 1e3:8.3f}ms {t['ratio']:6.3f}x")
    print(f"{mode:5} {'whole run':15} {s['engine']:9.3f}s {s['hand']:9.3f}s {s['ratio']:6.3f}x")
  for v in VARIANTS:
    print(f'accuracy matrix, {v:6}: {matrices[v].round(6).tolist()}')
  print(f'accuracy matrices: max difference {difference:.1e} ({"agree" if difference <= 1e-5 else "DIFFER"})')
  if breakdown:
    print('breakdown, warm, ms per step (median):')
    for name, value in breakdown['per_step_median'].items():
      print(f'  {name:22} {value * 1e3:7.3f}')
    print('compiled during a warm engine run:', ', '.join(f'{name} {sec:.3f}s' for name, sec in breakdown['warm_run_compiles'])
          or 'nothing')
    print('profile of a warm engine run (tottime):')
    print('\n'.join(line for line in breakdown['profile'].splitlines()[:30] if line.strip()))
  if against:
    a = figures['against']
    print(f"cold whole run against {a['checkout']}: {table['cold']['run_seconds']['engine']:.3f}s / {a['median']:.3f}s = "
          f"{a['ratio']:.3f}x (same matrix)")
  print(f"ratio warm {table['warm']['train_per_step']['ratio']:.3f}x" +
        (f", cold {table['cold']['train_per_step']['ratio']:.3f}x" if 'cold' in table else '') + ' (goal <= 1.05x warm)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  main()
