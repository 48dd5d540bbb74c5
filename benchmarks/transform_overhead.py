"""Step-time overhead of the SFA, L2 and EWC transforms, as ratios measured side by side in one run.

Three measurements:

1. Optimizer-only: one donated Adam step (``tx.update`` + ``optax.apply_updates``) on 8M float32
   params (``--params``), with and without each transform, between SFA's averaging steps: SFA's
   branchless multiply-add (``adam+sfa``, what a sweep's lanes run) and the step the engine runs
   between the averages of a single run, ``tx.update(..., may_average=False)``, which does not
   read the anchor (``adam+sfa[may_average=False]``). It also times the two
   alternatives to the multiply-add that ``sfa_jax.sfa`` uses, which this benchmark rejected:
   ``jax.lax.cond`` over the update tree (``sfa[cond]``) and a ``jnp.where`` select (``sfa[where]``).
2. Full train step: forward, backward and update of ``sfa_jax.models.SmallCNN`` on a batch of real
   MNIST digits (the bundled 5000-image set), with and without each transform.
3. The averaging step: SFA's update at an averaging step (``p`` = 1/T, so every step averages), its
   effective bandwidth (bytes read and written by the update, counted below) against a plain
   device copy of the same number of bytes.

Timings are medians over interleaved rounds (each variant takes a turn in every round, so a slow
period of the machine hits all of them alike). Run:

  python benchmarks/transform_overhead.py            # full (about 2 minutes on 2 CPU cores)
  python benchmarks/transform_overhead.py --quick    # smaller, a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sfa_jax
from sfa_jax import models
from sfa_jax import tasks
from sfa_jax import transforms


def sfa_rejected(select: str, p: float, beta: float, total_steps: int) -> optax.GradientTransformation:
  """SFA with the two alternatives to the library's multiply-add: ``lax.cond`` or ``jnp.where``.

  ``select='cond'`` runs ``jax.lax.cond`` over the whole update tree; ``select='where'`` computes the
  averaged update everywhere and picks it with ``jnp.where``. Both give the same numbers as
  ``sfa_jax.sfa``; they differ only in speed, which is what this benchmark measures.
  """

  def init_fn(params):
    return sfa_jax.sfa(p=p, beta=beta, total_steps=total_steps).init(params)

  def averaged(updates, params, anchor):
    return jax.tree.map(lambda u, prm, a: beta * (a - prm) + (1 - beta) * u, updates, params, anchor)

  def update_fn(updates, state, params):
    count = optax.safe_increment(state.count)
    now = transforms.is_averaging_step(count, p, total_steps)
    if select == 'cond':
      new_updates = jax.lax.cond(now, lambda args: averaged(*args), lambda args: args[0],
                                 (updates, params, state.anchor))
    else:
      new_updates = jax.tree.map(lambda avg, u: jnp.where(now, avg, u),
                                 averaged(updates, params, state.anchor), updates)
    return new_updates, state._replace(count=count, averaged=now)

  return optax.GradientTransformation(init_fn, update_fn)


def _make_params(total: int, num_leaves: int, key: jax.Array) -> dict[str, jax.Array]:
  side = int(np.sqrt(total / num_leaves))
  keys = jax.random.split(key, num_leaves)
  return {f'w{i}': 0.01 * jax.random.normal(k, (side, side), jnp.float32) for i, k in enumerate(keys)}


def _tree_bytes(tree: Any) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int) -> dict[str, float]:
  """Median seconds per step of each variant; every round runs every variant once, in turn."""
  samples: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(steps_per_round):
        step()
      samples[name].append((time.perf_counter() - start) / steps_per_round)
  return {name: statistics.median(values) for name, values in samples.items()}


class _DonatedLoop:
  """Keeps (params, opt_state) alive between calls of a donating jitted step."""

  def __init__(self, tx: optax.GradientTransformation, params: Any, step_inputs: tuple, **update_args: Any):
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)
    self.inputs = step_inputs

    def step(params, state, *inputs):
      grads = self.grad_fn(params, *inputs)
      updates, state = tx.update(grads, state, params, **update_args)
      return optax.apply_updates(params, updates), state

    self.step_fn = jax.jit(step, donate_argnums=(0, 1))

  grad_fn: Callable[..., Any]

  def __call__(self) -> None:
    self.params, self.state = self.step_fn(self.params, self.state, *self.inputs)
    jax.block_until_ready(self.params)


SKIP = 'adam+sfa[may_average=False]'  # the engine's steps between SFA's averages


def _update_args(name: str) -> dict[str, Any]:
  return {'may_average': False} if name == SKIP else {}


def optimizer_only(num_params: int, rounds: int, steps_per_round: int) -> dict[str, Any]:
  key = jax.random.key(0)
  params = _make_params(num_params, 4, key)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  fisher = jax.tree.map(jnp.ones_like, params)
  never = 10**9  # total_steps far beyond the run: no step averages
  adam = optax.adam(1e-3)
  variants = {
      'adam': adam,
      'adam+sfa': optax.chain(adam, sfa_jax.sfa(p=1.0, beta=0.5, total_steps=never)),
      SKIP: optax.chain(adam, sfa_jax.sfa(p=1.0, beta=0.5, total_steps=never)),
      'adam+sfa[where]': optax.chain(adam, sfa_rejected('where', p=1.0, beta=0.5, total_steps=never)),
      'adam+sfa[cond]': optax.chain(adam, sfa_rejected('cond', p=1.0, beta=0.5, total_steps=never)),
      'l2+adam': optax.chain(sfa_jax.l2(1e-2), adam),
      'ewc+adam': optax.chain(sfa_jax.ewc(fisher, 1e-2), adam),
  }
  loops = {}
  for name, tx in variants.items():
    loop = _DonatedLoop(tx, params, (grads,), **_update_args(name))
    loop.grad_fn = lambda p, g: g
    loop()  # compile and warm up
    loops[name] = loop
  times = _time_interleaved(loops, rounds, steps_per_round)
  return {
      'num_params': sum(x.size for x in jax.tree.leaves(params)),
      'seconds': times,
      'ratio_vs_adam': {name: t / times['adam'] for name, t in times.items()},
  }


def full_train_step(batch_size: int, rounds: int, steps_per_round: int) -> dict[str, Any]:
  train = tasks.make_stream('mnist-pair')[0].train
  x, y = jnp.asarray(train.x[:batch_size]), jnp.asarray(train.y[:batch_size])
  model = models.SmallCNN(num_outputs=10)
  params = model.init(jax.random.key(0), x[:1])['params']
  fisher = jax.tree.map(jnp.ones_like, params)

  def loss_grad(params, x, y):
    def loss(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(params)

  never = 10**9
  adam = optax.adam(1e-3)
  variants = {
      'adam': adam,
      'adam+sfa': optax.chain(adam, sfa_jax.sfa(p=1.0, beta=0.5, total_steps=never)),
      SKIP: optax.chain(adam, sfa_jax.sfa(p=1.0, beta=0.5, total_steps=never)),
      'l2+adam': optax.chain(sfa_jax.l2(1e-2), adam),
      'ewc+adam': optax.chain(sfa_jax.ewc(fisher, 1e-2), adam),
  }
  loops = {}
  for name, tx in variants.items():
    loop = _DonatedLoop(tx, params, (x, y), **_update_args(name))
    loop.grad_fn = loss_grad
    loop()
    loops[name] = loop
  times = _time_interleaved(loops, rounds, steps_per_round)
  return {
      'model': 'SmallCNN',
      'num_params': sum(p.size for p in jax.tree.leaves(params)),
      'batch_size': batch_size,
      'seconds': times,
      'ratio_vs_adam': {name: t / times['adam'] for name, t in times.items()},
  }


def averaging_bandwidth(num_params: int, rounds: int, steps_per_round: int) -> dict[str, Any]:
  params = _make_params(num_params, 4, jax.random.key(1))
  updates = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  tx = sfa_jax.sfa(p=1e-9, beta=0.5, total_steps=10**9)  # period 1: every step averages
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def averaging_update(updates, state, params):
    return tx.update(updates, state, params)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def plain_copy(tree):
    return jax.tree.map(lambda x: x + 0, tree), jax.tree.map(lambda x: x * 1, tree)

  holder = {'u': updates, 'copy': jax.tree.map(jnp.copy, params)}

  def run_average():
    new_updates, _ = averaging_update(holder['u'], state, params)
    holder['u'] = jax.block_until_ready(new_updates)

  def run_copy():
    a, _ = plain_copy(holder['copy'])
    holder['copy'] = jax.block_until_ready(a)

  run_average(), run_copy()
  times = _time_interleaved({'sfa_average': run_average, 'copy': run_copy}, rounds, steps_per_round)
  tree_bytes = _tree_bytes(params)
  # The averaging update reads updates, params and anchor and writes updates: 4 tree-sized passes.
  # The reference reads one tree and writes two: 3 passes (an XLA copy of a donated buffer that is
  # returned as-is would be free, so it is made to write new values).
  average_gbs = 4 * tree_bytes / times['sfa_average'] / 1e9
  copy_gbs = 3 * tree_bytes / times['copy'] / 1e9
  return {
      'tree_bytes': tree_bytes,
      'seconds': times,
      'average_GBps': average_gbs,
      'copy_GBps': copy_gbs,
      'bandwidth_ratio': average_gbs / copy_gbs,
  }


def machine_description() -> str:
  """CPU model and core count (or the accelerator), and the jax version."""
  cpu = platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  except OSError:
    pass
  device = jax.devices()[0]
  where = f'{cpu}, {os.cpu_count()} cores' if device.platform == 'cpu' else f'{device.device_kind} ({cpu} host)'
  return f'{where}, jax {jax.__version__}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='small sizes, few rounds: a smoke test')
  parser.add_argument('--json', help='also write the results to this JSON file')
  parser.add_argument('--params', type=int, default=8_000_000, help='params of the optimizer-only step')
  args = parser.parse_args()
  num_params = 2_000_000 if args.quick else args.params
  rounds = 3 if args.quick else 15
  results = {
      'machine': machine_description(),
      'optimizer_only': optimizer_only(num_params, rounds, steps_per_round=2 if args.quick else 5),
      'full_train_step': full_train_step(128, rounds, steps_per_round=3 if args.quick else 10),
      'averaging_step': averaging_bandwidth(num_params, rounds, steps_per_round=2 if args.quick else 5),
  }
  print(f"machine: {results['machine']}")
  for section in ('optimizer_only', 'full_train_step'):
    print(f'\n{section} ({results[section]["num_params"]:,} params): median step time ratio vs adam')
    for name, ratio in results[section]['ratio_vs_adam'].items():
      print(f'  {name:30s} {ratio:6.3f}x   ({results[section]["seconds"][name] * 1e3:8.2f} ms)')
  avg = results['averaging_step']
  print(
      f"\naveraging step: {avg['average_GBps']:.1f} GB/s effective vs plain copy {avg['copy_GBps']:.1f} GB/s"
      f" (ratio {avg['bandwidth_ratio']:.2f})"
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
