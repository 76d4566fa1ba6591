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
