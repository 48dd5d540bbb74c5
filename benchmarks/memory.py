"""Peak memory of a training task per method, in multiples of the parameter bytes.

  python benchmarks/memory.py [--json benchmarks/memory_cpu.json] [--skip-run]

For each method (finetune, sfa, l2, ewc, replay) and model (``SmallCNN`` on MNIST-shaped batches of
64; a small Llama decoder, 4 layers of width 256 and 4096 tokens, on 64 sequences of 128 tokens,
the labels being the tokens themselves: the memory, not the task, is measured here), the train step is built exactly as
:func:`sfa_jax.engine.run.run_sequence` builds it (the method's Optax chain around Adam, the method
switched on as on task 1) and measured two ways:

* **resident**: the bytes of ``jax.live_arrays()`` once params and optimizer state exist, minus
  those before: what stays in memory for the whole task (params, Adam's two moments, and the
  method's anchor / Fisher);
* **step peak**: from the compiled step's ``memory_analysis()``: arguments + outputs − aliased
  (donated) bytes + XLA's temporaries (gradients, activations). Batches are included; they are
  small next to the params here.

``replay`` trains with the same step as fine-tuning: its extra memory is the stored examples (a
tenth of each past task), reported in bytes beside the multiples. Then, unless ``--skip-run``,
``run_sequence`` itself runs each method on the MNIST pair with the CNN for one epoch, and the
largest ``jax.live_arrays()`` total seen after any step, minus the bytes before the run, is
reported as well: it adds what the trainer keeps beside the optimizer state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfa_jax import engine, models, tasks
from sfa_jax.engine import callbacks, loop, methods, steps
from sfa_jax.models.llama import Llama, LlamaConfig

METHODS = ('finetune', 'sfa', 'l2', 'ewc', 'replay')


def live_bytes() -> int:
  """Bytes of every live JAX array (each shard counted once)."""
  return sum(a.nbytes for a in jax.live_arrays())


def tree_bytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


class _LMLoss:
  """A decoder as the trainer's ``model``: ``apply(variables, tokens, task_id, train)`` -> logits."""

  def __init__(self, config: LlamaConfig):
    self.model = Llama(config)

  def init(self, key, tokens, **_):
    return self.model.init(key, tokens)

  def apply(self, variables, tokens, task_id=None, train=False, mutable=None):
    del task_id, train, mutable
    return self.model.apply(variables, tokens)


def _setups():
  """``(name, model, x, y)``: each model with one training batch."""
  rng = np.random.default_rng(0)
  cnn = models.make_model('cnn', 10)
  x_img = rng.random((64, 28, 28, 1), np.float32)
  y_img = rng.integers(0, 10, 64).astype(np.int32)
  config = LlamaConfig.tiny(vocab_size=4096, dim=256, num_layers=4, ffn_dim=768)
  lm = _LMLoss(config)
  tokens = rng.integers(0, 4096, (64, 128)).astype(np.int32)
  return [('cnn', cnn, x_img, y_img), (f'llama({config.num_layers} layers, dim {config.dim})', lm, tokens, tokens)]


def measure_step(model, x, y, method_name: str) -> dict:
  """Resident and step-peak bytes of one method's train step on one batch."""
  gc.collect()
  before = live_bytes()
  variables = model.init(jax.random.key(0), x[:1], task_id=np.zeros(1, np.int32), train=False)
  params, model_state = models.split_variables(variables)
  method = engine.make_method(method_name)
  tx = method.transform(optax.adam(1e-3))
  run = loop.RunState(params, model_state, jax.jit(tx.init)(params), method.init_extras(params, model_state, 2))
  if method_name == 'ewc':
    run = run._replace(extras={'fisher': jax.tree.map(jnp.ones_like, params)})
  opt_state = method.prepare_optimizer(run.opt_state, run, methods.Boundary(1, 2, 100, fisher=None))
  del run, variables
  gc.collect()
  resident = live_bytes() - before
  step = steps.jitted_train_step(model, tx)
  mask = np.ones(y.shape, bool)
  ids = np.zeros(x.shape[0], np.int32)
  compiled = step.lower(params, model_state, opt_state, x, y, mask, ids).compile()
  analysis = compiled.memory_analysis()
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
          + analysis.temp_size_in_bytes)
  param_bytes = tree_bytes(params)
  result = {
      'param_bytes': param_bytes,
      'resident_bytes': resident,
      'resident_x': resident / param_bytes,
      'step_peak_bytes': peak,
      'step_peak_x': peak / param_bytes,
      'temp_bytes': analysis.temp_size_in_bytes,
      'argument_bytes': analysis.argument_size_in_bytes,
      'alias_bytes': analysis.alias_size_in_bytes,
  }
  del params, model_state, opt_state, compiled, step
  gc.collect()
  return result


def measure_run(method_name: str) -> dict:
  """The largest live bytes after any step of ``run_sequence`` (CNN, MNIST pair, one epoch)."""
  stream = tasks.make_stream('mnist-pair')
  config = engine.TrainConfig(model='cnn', epochs_per_task=1, batch_size=64)
  gc.collect()
  before = live_bytes()
  peak = {'task1': 0}

  def progress(event):
    if isinstance(event, callbacks.StepEvent) and event.task == 1 and event.step % 10 == 1:
      peak['task1'] = max(peak['task1'], live_bytes() - before)

  engine.run_sequence(stream, engine.make_method(method_name), config, callbacks=progress)
  return {'run_live_bytes': peak['task1']}


def replay_memory_bytes() -> int:
  """Bytes of replay's memory on the MNIST pair's second task: a tenth of the first task's examples."""
  task = tasks.make_stream('mnist-pair')[0]
  subset = tasks.subsample(task.train, 0.1, seed=0)
  return subset.x.nbytes + subset.y.nbytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='also write the figures here')
  parser.add_argument('--skip-run', action='store_true', help='skip the run_sequence measurement')
  args = parser.parse_args()
  load = os.getloadavg()
  begin = time.perf_counter()
  results = {'backend': jax.default_backend(), 'jax': jax.__version__, 'loadavg_before': load, 'models': {}}
  for name, model, x, y in _setups():
    rows = {}
    for method in METHODS:
      rows[method] = measure_step(model, x, y, method)
      if name == 'cnn' and not args.skip_run:
        rows[method].update(measure_run(method))
        rows[method]['run_live_x'] = rows[method]['run_live_bytes'] / rows[method]['param_bytes']
    results['models'][name] = rows
  results['replay_memory_bytes_mnist_pair'] = replay_memory_bytes()
  results['seconds'] = time.perf_counter() - begin
  print(markdown(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


def markdown(results: dict) -> str:
  lines = []
  for name, rows in results['models'].items():
    first = next(iter(rows.values()))
    lines += ['', f"**{name}**: {first['param_bytes'] / 2**20:.2f} MiB of float32 params", '',
              '| method | resident ÷ params | step peak ÷ params | run_sequence live ÷ params |',
              '|---|---:|---:|---:|']
    for method, r in rows.items():
      run = f"{r['run_live_x']:.2f}" if 'run_live_x' in r else '—'
      lines.append(f"| {method} | {r['resident_x']:.2f} | {r['step_peak_x']:.2f} | {run} |")
  lines.append(f"\nreplay's memory on the MNIST pair's second task: {results['replay_memory_bytes_mnist_pair'] / 2**20:.2f} MiB")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
