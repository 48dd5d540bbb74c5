"""Multi-device training on JAX's own engine: data parallel batches, FSDP-sharded params and state.

The sequence trainer takes a device mesh, ``engine.run_sequence(stream, method, config,
mesh=mesh)``, and runs the same jitted train step on sharded inputs; XLA's SPMD partitioner
inserts the communication. Two mesh axes have a meaning:

* ``'data'``: every batch is split along its first dimension over this axis (data parallel);
* ``'fsdp'``: the batch is split over it too, and every large leaf of the params, of the model
  state and of the optimizer state (Adam's moments, SFA's, L2's and EWC's anchor, EWC's Fisher) is
  split along its largest dimension divisible by the axis size (fully sharded data parallel:
  each device holds ``1/n`` of the model and of its anchor). Without an ``'fsdp'`` axis the
  ``'data'`` axis shards the leaves (ZeRO-3 over the data-parallel devices).

Leaves smaller than :data:`FSDP_MIN_SIZE` elements, scalars (step counters, injected
hyper-parameters) and leaves with no divisible dimension are replicated. The rule depends only on a
leaf's shape, so a parameter, its gradient, its Adam moments, its anchor and its Fisher all get
the same sharding and the transforms' update is elementwise on local shards: SFA, L2 and EWC add
no communication (``tests/test_distributed.py`` checks the compiled step for all-gathers). The
forward and backward passes gather each sharded weight when they use it, as FSDP does.

Example, 8 devices as 2-way data parallel times 4-way FSDP::

  from sfa_jax import engine, tasks
  from sfa_jax.engine import distributed
  mesh = distributed.make_mesh('data=2,fsdp=4')
  stream, method = tasks.make_stream('split-mnist'), engine.make_method('sfa')
  config = engine.TrainConfig(batch_size=64)
  result = engine.run_sequence(stream, method, config, mesh=mesh)

or from the command line, ``sfa-jax run --stream split-mnist --method sfa --mesh data=2,fsdp=4``.
On a CPU the devices can be simulated: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

Multi-host: GPU clusters and TPU pods
-------------------------------------
JAX runs one process per host; each process sees its own devices and :func:`make_mesh` spans
the devices of all processes (``jax.devices()`` is global after initialisation). Call
``jax.distributed.initialize()`` before anything else touches JAX, in every process, then build
the mesh and train exactly as on one host. Every process runs the same program on the same data
(streams, shuffles and replay memories are seeded, so all processes build the same global batch)
and :func:`place` hands each device its own slice of it.

* **TPU pod** (e.g. a v5e-32 slice of 8 hosts): ``jax.distributed.initialize()`` needs no
  argument there; start the same script on every host::

    gcloud compute tpus tpu-vm ssh my-pod --zone=us-west4-a --worker=all \\
      --command='python3 train.py'

* **GPU cluster under SLURM** (2 nodes of 8 GPUs): ``jax.distributed.initialize()`` reads SLURM's
  environment; one process per node::

    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 python3 train.py

* **GPU cluster without a scheduler**: name the coordinator (process 0's host and a free port),
  the process count and each process's rank::

    # on host i of N (i = 0 .. N-1):
    python3 train.py  # with jax.distributed.initialize(coordinator_address='host0:1234',
                      #                                 num_processes=N, process_id=i)

* **Several processes on one machine**, CPU only (how ``tests/test_multiprocess.py`` runs it:
  Gloo collectives, JAX's default on CPU, and simulated devices)::

    # process i of 2 (i = 0, 1), each with
    # XLA_FLAGS=--xla_force_host_platform_device_count=2:
    jax.distributed.initialize(coordinator_address='localhost:1234', num_processes=2,
                               process_id=i)
    mesh = distributed.make_mesh('fsdp=4')  # the 4 devices of both processes

with ``train.py``::

  import jax
  jax.distributed.initialize()            # first: before any other JAX call
  from sfa_jax import engine, tasks
  from sfa_jax.engine import distributed
  axes = {'data': jax.process_count(), 'fsdp': jax.local_device_count()}
  mesh = distributed.make_mesh(axes)
  stream, method = tasks.make_stream('split-mnist'), engine.make_method('sfa')
  result = engine.run_sequence(stream, method, mesh=mesh)
  if jax.process_index() == 0:
    print(result.accuracy_matrix)         # every process holds the same results

Putting ``'fsdp'`` on the devices of one host and ``'data'`` across hosts keeps the parameter
gathers on the fast intra-host links (each host then holds a whole copy of the model, split over
its own devices); an ``'fsdp'`` axis over the devices of every host splits the model and its
anchor between the hosts. A checkpointer's folder must be one that every process sees (a shared
file system or a bucket): each process writes the shards it holds, and the checksums of arrays
spread over several processes are computed where their shards are
(:func:`sfa_jax.engine.checkpoint.fold64_checksum`).

``tests/test_multiprocess.py`` runs this path on one machine: two processes, 2 simulated CPU
devices each, one SFA run on an ``'fsdp=4'`` mesh spanning both: the accuracy matrix of one
device, the params and the anchor split between the processes, a checkpoint written by both, and
a run killed after a checkpoint resumed to the same result bit for bit. GPU clusters and TPU pods
run the same code but are not run here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfa_jax.engine.mesh_spec import AXES, DATA, FSDP, check_axes, parse_mesh_spec  # noqa: F401  (the public names here too)

# Leaves with fewer elements are replicated: sharding them saves little memory and costs a gather.
FSDP_MIN_SIZE = 1024


def make_mesh(axes: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A device mesh with ``'data'`` and/or ``'fsdp'`` axes over all the devices.

  Args:
    axes: axis sizes, e.g. ``{'data': 2, 'fsdp': 4}`` or the string ``'data=2,fsdp=4'``; their
      product must equal the number of devices.
    devices: the devices to lay out; ``None`` means ``jax.devices()`` (every process's devices
      after ``jax.distributed.initialize()``).

  Returns:
    A ``jax.sharding.Mesh`` with the axes in the order given.

  Raises:
    ValueError: on unknown axes, sizes below 1, or a product different from the device count.

  Example:
    >>> from sfa_jax.engine.distributed import make_mesh
    >>> dict(make_mesh({'data': 1}).shape)
    {'data': 1}
  """
  if isinstance(axes, str):
    axes = parse_mesh_spec(axes)
  check_axes(axes)
  devices = list(jax.devices() if devices is None else devices)
  if math.prod(axes.values()) != len(devices):
    raise ValueError(f'mesh {dict(axes)} needs {math.prod(axes.values())} devices; there are {len(devices)}.')
  grid = np.array(devices, dtype=object).reshape(tuple(axes.values()))
  return Mesh(grid, tuple(axes))


def _check_mesh(mesh: Any) -> None:
  if not isinstance(mesh, Mesh):
    raise TypeError(f'mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.')
  check_axes(dict(mesh.shape))


def _shard_axis(mesh: Mesh) -> str:
  return FSDP if FSDP in mesh.shape else DATA


def leaf_sharding(shape: Sequence[int], mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  """The FSDP sharding of one leaf: its largest dimension divisible by the shard axis, or replicated.

  Args:
    shape: the leaf's shape.
    mesh: a mesh from :func:`make_mesh`; the shard axis is ``'fsdp'``, or ``'data'`` without it.
    min_size: leaves with fewer elements are replicated.

  Returns:
    A ``NamedSharding`` on ``mesh``.

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh``.
    ValueError: if its axes are not among ``'data'`` and ``'fsdp'``.

  Example:
    >>> from sfa_jax.engine.distributed import leaf_sharding, make_mesh
    >>> tuple(leaf_sharding((784, 256), make_mesh({'fsdp': 1})).spec)
    ()
  """
  _check_mesh(mesh)
  axis = _shard_axis(mesh)
  count = mesh.shape[axis]
  spec = [None] * len(shape)
  if count > 1 and math.prod(shape) >= min_size:
    divisible = [i for i, size in enumerate(shape) if size % count == 0]
    if divisible:
      spec[max(divisible, key=lambda i: (shape[i], -i))] = axis
  while spec and spec[-1] is None:  # the form jit's outputs carry: equal specs, no recompilation
    spec.pop()
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """:func:`leaf_sharding` of every array leaf of ``tree`` (params, model state, optimizer state).

  Args:
    tree: a pytree of arrays (``jax.Array``, NumPy arrays or ``jax.ShapeDtypeStruct``).
    mesh: a mesh from :func:`make_mesh`.
    min_size: leaves with fewer elements are replicated.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``tree``.

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh``, or a leaf has no shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine.distributed import make_mesh, tree_shardings
    >>> shardings = tree_shardings({'w': jnp.zeros((4, 2))}, make_mesh({'data': 1}))
    >>> shardings['w'].is_fully_replicated
    True
  """
  def sharding(leaf):
    if not hasattr(leaf, 'shape'):
      raise TypeError(f'every leaf must be an array; got {type(leaf).__name__}.')
    return leaf_sharding(leaf.shape, mesh, min_size)

  return jax.tree.map(sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its first dimension split over every axis of ``mesh``.

  Args:
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    ``NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))`` (the axes the mesh has, in its order).

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh``.

  Example:
    >>> from sfa_jax.engine.distributed import batch_sharding, make_mesh
    >>> tuple(batch_sharding(make_mesh({'data': 1})).spec)
    ('data',)
  """
  _check_mesh(mesh)
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of an array every device of ``mesh`` holds whole (a task's examples, the test sets).

  Example:
    >>> from sfa_jax.engine.distributed import make_mesh, replicated
    >>> tuple(replicated(make_mesh({'data': 1})).spec)
    ()
  """
  _check_mesh(mesh)
  return NamedSharding(mesh, PartitionSpec())


def _put(leaf: Any, sharding: NamedSharding) -> jax.Array:
  """``leaf`` with ``sharding``: a no-op when it has it already; works across processes."""
  if isinstance(leaf, jax.Array):
    if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
      return leaf
    if jax.process_count() == 1 or not leaf.is_fully_addressable:
      return jax.device_put(leaf, sharding)
  host = np.asarray(leaf)
  if jax.process_count() == 1:
    return jax.device_put(host, sharding)
  # Every process holds the same global value: each fills its own devices' slices.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, shardings: Any) -> Any:
  """Puts every leaf of ``tree`` on its sharding (leaves already there are not copied).

  With several processes each process passes the same global value and fills only its own
  devices (``jax.make_array_from_callback``).

  Args:
    tree: a pytree of arrays.
    shardings: a matching pytree of ``Sharding`` (e.g. from :func:`tree_shardings`), or one
      sharding for every leaf.

  Returns:
    The placed tree.

  Raises:
    ValueError: if the structures differ or a dimension does not divide over its mesh axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine.distributed import batch_sharding, make_mesh, place
    >>> x = place(jnp.zeros((8, 3)), batch_sharding(make_mesh({'data': 1})))
    >>> x.shape
    (8, 3)
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: _put(leaf, shardings), tree)
  return jax.tree.map(_put, tree, shardings)


def uncommitted(leaf: Any) -> Any:
  """``leaf`` as an uncommitted array on the default device when it is a committed one of this process.

  ``jax.jit`` compiles a program anew for committed arguments: a run without a mesh keeps its state
  uncommitted, as its initialisation makes it, so that the programs compiled for it (in the
  background, from zeros) serve every start, a restored checkpoint's or a user's arrays. Orbax and
  ``jax.device_put(x, device)`` commit; the leaf goes through the host once. A typed PRNG key, an
  array spread over processes and anything else are returned as they are.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.engine.distributed import uncommitted
    >>> x = jax.device_put(jnp.arange(3.0), jax.devices()[0])
    >>> x.committed, uncommitted(x).committed, uncommitted(x).tolist()
    (True, False, [0.0, 1.0, 2.0])
  """
  if (isinstance(leaf, jax.Array) and leaf.committed and leaf.is_fully_addressable
      and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)):
    return jax.device_put(np.asarray(leaf))
  return leaf


def shard(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
  """``tree`` (params, model state or optimizer state) placed with its FSDP :func:`tree_shardings`.

  Args:
    tree: a pytree of arrays.
    mesh: a mesh from :func:`make_mesh`.
    min_size: leaves with fewer elements are replicated.

  Returns:
    The sharded tree.

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh``.

  Example:
    >>> import jax.numpy as jnp
    >>> from sfa_jax.engine.distributed import make_mesh, shard
    >>> shard({'w': jnp.ones((64, 32))}, make_mesh({'fsdp': 1}))['w'].shape
    (64, 32)
  """
  return place(tree, tree_shardings(tree, mesh, min_size))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Every array of ``batch`` split along its first dimension over all the mesh's devices.

  Args:
    batch: a pytree of arrays with a common first (batch) dimension.
    mesh: a mesh from :func:`make_mesh`.

  Returns:
    The placed batch.

  Raises:
    ValueError: if a batch dimension does not divide by the number of devices of the mesh.

  Example:
    >>> import numpy as np
    >>> from sfa_jax.engine.distributed import make_mesh, shard_batch
    >>> shard_batch({'x': np.zeros((4, 2))}, make_mesh({'data': 1}))['x'].shape
    (4, 2)
  """
  sharding = batch_sharding(mesh)
  for leaf in jax.tree.leaves(batch):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % mesh.size:
      raise ValueError(
          f'the batch dimension ({np.shape(leaf)[:1]}) must divide over the {mesh.size} devices of the mesh: '
          f'choose a batch_size that is a multiple of {mesh.size}.'
      )
  return place(batch, sharding)


def shard_step(
    step: Callable[..., Any],
    mesh: Mesh,
    *,
    state_argnums: Sequence[int] = (0, 1, 2),
    min_size: int = FSDP_MIN_SIZE,
) -> Callable[..., Any]:
  """Runs a jitted train step on ``mesh``: state arguments FSDP-sharded, the others batch-sharded.

  The step itself is unchanged (the same ``jax.jit`` function, same donation): its inputs carry
  the shardings and XLA partitions it. Arguments that already have their sharding, such as the
  previous step's outputs, are passed through without a copy, so the step compiles once.

  Args:
    step: e.g. :func:`sfa_jax.engine.steps.make_train_step`'s ``(params, model_state, opt_state, x,
      y, mask, task_ids) -> ...``.
    mesh: a mesh from :func:`make_mesh`.
    state_argnums: the positions of the arguments sharded with :func:`shard`; every other
      argument is a batch (:func:`shard_batch`).
    min_size: leaves with fewer elements are replicated.

  Returns:
    A function with the signature of ``step``.

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sfa_jax.engine.distributed import make_mesh, shard_step
    >>> add = jax.jit(lambda w, x: w + x.sum())
    >>> step = shard_step(add, make_mesh({'data': 1}), state_argnums=(0,))
    >>> float(step(jnp.zeros(()), jnp.ones(4)))
    4.0
  """
  _check_mesh(mesh)
  state_argnums = frozenset(state_argnums)

  def sharded_step(*args):
    placed = [
        shard(arg, mesh, min_size) if i in state_argnums else shard_batch(arg, mesh) for i, arg in enumerate(args)
    ]
    return step(*placed)

  return sharded_step
