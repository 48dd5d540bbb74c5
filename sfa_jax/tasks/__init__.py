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
* :mod:`~sfa_jax.tasks.registry`: the named streams and :func:`make_stream`;
* :mod:`~sfa_jax.tasks.builders`: split and permuted streams over any data source (custom data);
* :mod:`~sfa_jax.tasks.batching`: shuffled epochs of one static batch shape, stratified subsets;
* data sources: :mod:`~sfa_jax.tasks.source` (the interface, in-memory data),
  :mod:`~sfa_jax.tasks.offline` (bundled MNIST, scikit-learn digits), :mod:`~sfa_jax.tasks.idx`
  (Fashion-MNIST IDX files) and :mod:`~sfa_jax.tasks.tfds_data` (tfds array_record data, read
  without TensorFlow).
"""

from sfa_jax.tasks.batching import Batches
from sfa_jax.tasks.batching import epoch_batches
from sfa_jax.tasks.batching import epoch_indices
from sfa_jax.tasks.batching import eval_batches
from sfa_jax.tasks.batching import num_batches
from sfa_jax.tasks.batching import subsample
from sfa_jax.tasks.builders import permuted_stream
from sfa_jax.tasks.builders import pixel_permutations
from sfa_jax.tasks.builders import split_classes
from sfa_jax.tasks.builders import split_stream
from sfa_jax.tasks.idx import fashion_mnist_source
from sfa_jax.tasks.idx import read_idx
from sfa_jax.tasks.offline import digits_source
from sfa_jax.tasks.offline import mnist_source
from sfa_jax.tasks.registry import SOURCES
from sfa_jax.tasks.registry import STREAMS
from sfa_jax.tasks.registry import list_streams
from sfa_jax.tasks.registry import make_stream
from sfa_jax.tasks.source import DataSource
from sfa_jax.tasks.source import in_memory_source
from sfa_jax.tasks.stream import CLASS_INCREMENTAL
from sfa_jax.tasks.stream import DOMAIN_INCREMENTAL
from sfa_jax.tasks.stream import SETTINGS
from sfa_jax.tasks.stream import TASK_INCREMENTAL
from sfa_jax.tasks.stream import Split
from sfa_jax.tasks.stream import Task
from sfa_jax.tasks.stream import TaskStream
from sfa_jax.tasks.stream import split_from_batches
from sfa_jax.tasks.stream import stream_of
from sfa_jax.tasks.tfds_data import tfds_source
