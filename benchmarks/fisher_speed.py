"""Speed of `sfa_jax.fisher.diagonal_fisher` against the textbook vmap-of-grads estimate.

The textbook estimate (and sfa_jax's before this benchmark) is `jax.vmap` of a per-example
gradient over a chunk of examples, squared and summed over the example axis. On XLA:CPU that sum
over the leading axis of a `(batch, parameters)` array is poorly vectorised and dominates the cost.
`diagonal_fisher` walks the examples in a loop instead, adding each squared gradient straight into
the running sums (`layerwise=False` times that loop alone), and by default takes the
parameters of Flax dense and convolution layers out of the loop: their squared per-example
gradients come from one batched backward pass (`(x^2)^T (delta^2)` for a dense layer, a batched
product of input patches and output gradients for a convolution). All three are timed here side by side, in one
process, on the same inputs (the MLP 784-256-256-10 and the SmallCNN of the MNIST experiments,
28x28x1 inputs, empirical Fisher), after one untimed call to compile; the figure is the best of
--repeats calls. Their results agree to float32 rounding, which the script checks.

  python benchmarks/fisher_speed.py --examples 800 --chunk 32
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfa_jax import fisher
from sfa_jax.models.cnn import SmallCNN
from sfa_jax.models.mlp import MLP


def vmap_fisher(logits_fn, params, inputs, labels, chunk):
  """The textbook estimate: per-example gradients by vmap, squared and summed over the chunk."""

  def log_likelihood(p, x, y):
    return jax.nn.log_softmax(logits_fn(p, x[None])[0])[y]

  @jax.jit
  def chunk_sum(p, x, y):
    grads = jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0))(p, x, y)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), grads)

  total = jax.tree.map(jnp.zeros_like, params)
  for start in range(0, len(labels), chunk):
    part = chunk_sum(params, inputs[start:start + chunk], labels[start:start + chunk])
    total = jax.tree.map(jnp.add, total, part)
  return jax.tree.map(lambda t: t / len(labels), total)


def best_time(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--examples', type=int, default=800)
  parser.add_argument('--chunk', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  inputs = rng.random((args.examples, 28, 28, 1), np.float32)
  labels = rng.integers(0, 10, args.examples).astype(np.int32)
  print(f'{jax.devices()[0].device_kind}, {args.examples} examples, chunk {args.chunk}')
  print(f"{'model':<10}{'vmap + sum':>12}{'loop':>9}{'loop + layerwise':>18}{'speed-up':>10}")
  for name, model in (('MLP', MLP(num_outputs=10)), ('SmallCNN', SmallCNN(num_outputs=10))):
    params = model.init(jax.random.key(0), inputs[:1])
    logits_fn = model.apply

    def ours(layerwise):
      return lambda: fisher.diagonal_fisher(
          logits_fn, params, inputs, labels, batch_size=args.chunk, layerwise=layerwise
      )

    textbook = lambda: vmap_fisher(logits_fn, params, inputs, labels, args.chunk)
    for variant in (ours(False), ours(True)):
      for a, b in zip(jax.tree.leaves(variant()), jax.tree.leaves(textbook())):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7 * float(jnp.max(b)))
    slow, loop, dense = (best_time(fn, args.repeats) for fn in (textbook, ours(False), ours(True)))
    print(f'{name:<10}{slow:>11.3f}s{loop:>8.3f}s{dense:>17.3f}s{slow / dense:>9.1f}x')

if __name__ == '__main__':
  main()
