"""Step-time overhead of adaptive SFA (`sfa_jax.adaptive`), and the design it rejected.

One donated Adam step (``tx.update`` + ``optax.apply_updates``) on float32 params, between averages:

* ``adam``: the optimizer alone;
* ``adam+sfa``: ``sfa_jax.sfa`` (a fused multiply-add);
* ``adam+adaptive``: ``sfa_jax.adaptive.adaptive_sfa``, which decides on the drift of the params the
  step *starts* from, measured (and stored) by the previous step in the same pass as its multiply-add;
* ``adam+adaptive[landing]`` (rejected): decides on the drift of where the current step *lands*,
  so the reduction must finish before the multiply-add: a second pass over the params.

Timings are medians over interleaved rounds (each variant takes a turn in every round).

  python benchmarks/adaptive_overhead.py            # 4M params
  python benchmarks/adaptive_overhead.py --quick    # 250k params, a smoke test
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sfa_jax
from sfa_jax import adaptive
from sfa_jax import transforms


def adaptive_landing(threshold: float, beta: float, total_steps: int) -> optax.GradientTransformation:
  """The rejected rule: average when ``‖θ + u − θ_o‖ >= threshold·‖θ_o‖`` (same numbers otherwise)."""

  def init_fn(params):
    return adaptive.adaptive_sfa(threshold=threshold, beta=beta, min_p=0.1, total_steps=total_steps).init(params)

  def update_fn(updates, state, params):
    count = state.count + 1
    drift = adaptive.float_norm(jax.tree.map(lambda u, p, a: p + u - a, updates, params, state.anchor))
    now = adaptive.is_adaptive_averaging_step(count, state.last_average, drift, state.anchor_norm, threshold, 0.1, total_steps)
    new_updates = transforms.averaged_updates(updates, params, state.anchor, now, beta)
    return new_updates, state._replace(count=count, drift=drift,
                                       last_average=jnp.where(now, count, state.last_average))

  return optax.GradientTransformation(init_fn, update_fn)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--rounds', type=int, default=25)
  args = parser.parse_args()
  side, rounds = (250, 5) if args.quick else (1000, args.rounds)
  params = {f'w{i}': 0.01 * jax.random.normal(jax.random.key(i), (side, side)) for i in range(4)}
  never = dict(beta=0.5, total_steps=10**6)  # between averages: the drift never reaches 1e9·‖θ_o‖
  variants = {
      'adam': optax.adam(1e-3),
      'adam+sfa': optax.chain(optax.adam(1e-3), sfa_jax.sfa(p=1.0, **never)),
      'adam+adaptive': optax.chain(optax.adam(1e-3), adaptive.adaptive_sfa(threshold=1e9, **never)),
      'adam+adaptive[landing]': optax.chain(optax.adam(1e-3), adaptive_landing(1e9, **never)),
  }
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  steps, state = {}, {}
  for name, tx in variants.items():
    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    steps[name] = jax.jit(step, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    state[name] = (p, tx.init(p))
  times = {name: [] for name in variants}
  for r in range(rounds + 3):
    for name in variants:
      begin = time.perf_counter()
      state[name] = steps[name](*state[name], grads)
      jax.block_until_ready(state[name])
      if r >= 3:  # the first rounds compile and warm up
        times[name].append(time.perf_counter() - begin)
  base = statistics.median(times['adam'])
  print(f'{4 * side * side:,} float32 params, {rounds} rounds, {jax.devices()[0].platform}')
  print('| variant | median step | ÷ Adam |\n|---|---:|---:|')
  for name, values in times.items():
    print(f'| `{name}` | {statistics.median(values) * 1e3:.1f} ms | {statistics.median(values) / base:.3f} |')


if __name__ == '__main__':
  main()
