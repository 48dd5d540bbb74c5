"""Task streams on real data for continual learning: splits, settings, sources and batching.

Build a stream by name, then train on its tasks in order::

  from sfa_jax import tasks

  stream = tasks.make_stream('split-mnist', setting='class-incremental', seed=0)
  for task in stream:
    for epoch in range(num_epochs):
      batches = tasks.epoch_batches(task.train, batch_size=128, seed=0, epoch=epoch)
      ...  # lax.scan a train step over batches.x, batches.y, batches.mask

One module per idea:

* :mod:`~sfa_jax.tasks.stream`: ``Split``, ``Task``, ``TaskStream``, and the evaluation settings
  with their label mappings;
* :mod:`~sfa_jax.tasks.catalog`: the named streams, their data sets, sources and task counts, and
  the settings, as plain data (standard library only);
* :mod:`~sfa_jax.tasks.registry`: :func:`make_stream`, which builds a named stream;
* :mod:`~sfa_jax.tasks.builders`: split and permuted streams over any data source (custom data);
* :mod:`~sfa_jax.tasks.batching`: shuffled epochs of one static batch shape, stratified subsets;
* data sources: :mod:`~sfa_jax.tasks.source` (the interface, in-memory data),
  :mod:`~sfa_jax.tasks.offline` (bundled MNIST, scikit-learn digits), :mod:`~sfa_jax.tasks.idx`
  (Fashion-MNIST IDX files) and :mod:`~sfa_jax.tasks.tfds_data` (tfds array_record data, read
  without TensorFlow).

Importing this package loads nothing: each name loads its module when first used.
"""

from sfa_jax import _lazy

# Every public name and its module, imported when first used (PEP 562).
_EXPORTS = {
    'Batches': 'batching',
    'epoch_batches': 'batching',
    'epoch_indices': 'batching',
    'eval_batches': 'batching',
    'num_batches': 'batching',
    'subsample': 'batching',
    'permuted_stream': 'builders',
    'pixel_permutations': 'builders',
    'split_classes': 'builders',
    'split_stream': 'builders',
    'fashion_mnist_source': 'idx',
    'read_idx': 'idx',
    'digits_source': 'offline',
    'mnist_source': 'offline',
    'CLASS_INCREMENTAL': 'catalog',
    'DOMAIN_INCREMENTAL': 'catalog',
    'SETTINGS': 'catalog',
    'SOURCES': 'catalog',
    'STREAMS': 'catalog',
    'TASK_INCREMENTAL': 'catalog',
    'list_streams': 'catalog',
    'make_stream': 'registry',
    'DataSource': 'source',
    'in_memory_source': 'source',
    'Split': 'stream',
    'Task': 'stream',
    'TaskStream': 'stream',
    'split_from_batches': 'stream',
    'stream_of': 'stream',
    'tfds_source': 'tfds_data',
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
