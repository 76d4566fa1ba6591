"""What a job needs around the training loop: the process's JAX settings,
the data splits of a config, predictions over a whole split on the mesh."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import jax
import ml_collections
import numpy as np

from divdistill_jax import data, parallel


# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# A trim threshold of -1 never returns free memory to the kernel (mallopt(3)).
_NEVER_TRIM = -1


def keep_freed_cpu_memory() -> bool:
  """Lets each XLA:CPU step reuse the memory the step before freed.

  A step allocates its temporaries when it starts and frees them when it
  ends (1.8 GiB for the ResNet-32 BE-4 student at 128 x 4 images). glibc
  maps blocks that large with mmap and unmaps them on free, so every step
  faulted all of those pages in again and the kernel zeroed each one:
  500k page faults and 1.0-1.3 s of system CPU in a 3.8 s step
  (experiments/BENCHMARKS.md, "CPU step"). Two settings keep the pages:

  - JAX's CPU client runs a computation on the calling thread
    (`jax_cpu_enable_async_dispatch` off), so its temporaries come from
    glibc's main arena: the other threads' arenas map blocks over 64 MiB
    with mmap whatever mallopt says.
  - The heap no longer maps blocks (M_MMAP_MAX 0: it grows with brk
    instead) and keeps the memory freed at its top (M_TRIM_THRESHOLD -1)
    rather than returning it to the kernel.

  The costs: the process keeps its peak heap until it exits, and Python
  waits for each CPU computation to finish before it goes on (the next
  batch is prepared after the step, not during it). Call it before JAX
  starts its backend (after `jax.distributed.initialize`): the client
  reads the dispatch setting when it is created. The dispatch setting
  concerns computations on the CPU only; the heap settings are applied
  only when the default backend is the CPU and the C library is glibc.

  Returns:
    Whether the heap settings were applied.
  """
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if (jax.default_backend() != "cpu" or sys.platform != "linux"
      or platform.libc_ver()[0] != "glibc"):
    return False
  libc = ctypes.CDLL(None)  # The process's C library.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)
              and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def setup_runtime(config: ml_collections.ConfigDict) -> None:
  """Process-wide JAX settings: distributed init, host memory on a CPU,
  RNG, compilation cache."""
  p = config.parallel
  parallel.maybe_initialize_distributed(
      p.distributed, coordinator_address=p.coordinator_address,
      num_processes=p.num_processes, process_id=p.process_id)
  if config.cpu_keep_freed_memory:
    keep_freed_cpu_memory()
  # Fix the RNG implementation so random streams do not change with JAX's
  # default.
  jax.config.update("jax_threefry_partitionable", True)
  cache_dir = config.compile_cache_dir or os.environ.get(
      "DIVDISTILL_COMPILE_CACHE")
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache_dir))
    # Reading an entry takes milliseconds: keep even the small programs
    # (a rerun or resume compiles dozens of them).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_splits(config: ml_collections.ConfigDict) -> dict:
  """{'train', 'validation', 'test'}: (uint8 images, labels), subset."""
  splits = data.load_dataset(config.data.name, data_dir=config.data.data_dir)
  return data.subset(splits, {"train": config.data.train_size,
                              "validation": config.data.validation_size,
                              "test": config.data.test_size})


def predict_split(predict_fn, variables, images: np.ndarray,
                  mesh, batch_size: int) -> np.ndarray:
  """Member probabilities [M, N, K] over a whole split (padded, masked).

  `predict_fn(variables, uint8 images [B, H, W, C]) -> [M, B, K]` (jitted).
  """
  per_device = -(-batch_size // mesh.devices.size)
  batch_size = per_device * mesh.devices.size
  outs = []
  for batch in data.eval_batches(images, np.zeros(len(images), np.int32),
                                 batch_size):
    local = data.process_slice(batch.images, jax.process_index(),
                               jax.process_count())
    probs = predict_fn(variables, parallel.global_batch(local, mesh))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      probs = multihost_utils.process_allgather(probs, tiled=True)
    outs.append(np.asarray(probs, np.float32)[:, batch.mask])
  return np.concatenate(outs, axis=1)


def partial_last_batch(n: int, batch_size: int, group_size: int | None,
                       config: ml_collections.ConfigDict,
                       mesh) -> tuple[int, int | None] | None:
  """The epoch's partial last step, when `data.drop_remainder` is False.

  Returns:
    (its images, its BatchNorm group: one replica's remainder, or None for
    whole-batch statistics), or None when every step is full.

  Raises:
    ValueError: that batch or its groups do not fit the devices.
  """
  replicas = config.data.sampler_replicas
  last = data.last_batch_size(n, batch_size, replicas=replicas,
                              drop_remainder=config.data.drop_remainder)
  if last == batch_size:
    return None
  group = None if group_size is None else last // replicas
  what = "the partial last batch of an epoch (data.drop_remainder=False)"
  parallel.check_batch_size(last, mesh, what)
  parallel.check_bn_group_size(group, last, mesh, what)
  return last, group
