"""Data parallelism with jit over a 1-D 'data' mesh (no pmap).

The batch is sharded on its image axis and everything else is replicated;
XLA inserts the gradient all-reduce, and BatchNorm statistics are global.
Multi-host: each process loads its share of every global batch and
`global_batch` assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from divdistill_jax import data


def maybe_initialize_distributed(enabled: bool, *,
                                 coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` once for multi-process runs.

  Arguments left None are detected by JAX (TPU pods, SLURM, Open MPI,
  Kubernetes); elsewhere pass all three.
  """
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ('data',) mesh over the first `num_devices` devices (None = all)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices) or num_devices < 1:
      raise ValueError(
          f"parallel.num_devices={num_devices} but {len(devices)} devices "
          "are visible."
      )
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Shards axis `axis` of an `ndim`-d array over 'data'."""
  spec = [None] * ndim
  spec[axis] = "data"
  return NamedSharding(mesh, P(*spec))


def check_batch_size(global_batch: int, mesh: Mesh, what: str) -> None:
  """Raises a ValueError naming global / per-host / per-device sizes."""
  devices = mesh.devices.size
  processes = jax.process_count()
  if global_batch % devices or global_batch % processes:
    raise ValueError(
        f"{what}: global batch {global_batch} is not divisible by the "
        f"{devices} devices ({processes} processes): per host "
        f"{global_batch / processes:g}, per device "
        f"{global_batch / devices:g}. Use a multiple of {devices}."
    )


def check_bn_group_size(group_size: int | None, global_batch: int,
                        mesh: Mesh, what: str) -> None:
  """Ghost-BN groups must not straddle devices (one group = one GPU's share
  in the official multi-GPU runs)."""
  per_device = global_batch // mesh.devices.size
  if group_size is not None and per_device % group_size:
    raise ValueError(
        f"{what} = {group_size} does not divide the per-device batch of "
        f"{per_device} images ({global_batch} over {mesh.devices.size} "
        "devices). Use a divisor of the per-device batch, or None for "
        "whole-batch statistics.")


def global_batch(local: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
  """Host-local slice of a batch -> global array sharded on `axis`."""
  sharding = batch_sharding(mesh, local.ndim, axis)
  shape = list(local.shape)
  shape[axis] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def replicate(tree, mesh: Mesh):
  """Puts a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


class BatchGatherer:
  """Training batches by global indices, as global arrays on the mesh.

  With `on_device` the split is copied once to every device and a batch is
  gathered there (only the indices travel); otherwise each process gathers
  its share in host memory and transfers the images. Both give the same
  arrays.

  Args:
    images: uint8 [N, H, W, C], the whole split (every process).
    labels: int32 [N].
    mesh: the device mesh.
    on_device: keep the split on the devices.
    axis: the batch axis of the index arrays (1 for the teachers' [M, B]).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh, *,
               on_device: bool, axis: int = 0):
    self._images, self._labels = images, labels
    self._mesh, self._axis = mesh, axis
    self._gather = None
    if on_device:
      self._images = jax.device_put(images, replicated(mesh))
      self._labels = jax.device_put(labels, replicated(mesh))
      self._gather = {}

  def __call__(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """indices int [..., B] (global) -> (images [..., B, H, W, C], labels
    [..., B]) sharded on the batch axis."""
    axis, mesh = self._axis, self._mesh
    if self._gather is None:
      local = np.take(indices, data.process_slice(
          np.arange(indices.shape[axis]), jax.process_index(),
          jax.process_count()), axis)
      return (global_batch(self._images[local], mesh, axis),
              global_batch(self._labels[local], mesh, axis))
    ndim = indices.ndim
    if ndim not in self._gather:
      out = (batch_sharding(mesh, ndim + 3, axis),
             batch_sharding(mesh, ndim, axis))
      self._gather[ndim] = jax.jit(lambda x, y, i: (x[i], y[i]),
                                   out_shardings=out)
    return self._gather[ndim](self._images, self._labels,
                              np.asarray(indices, np.int32))

