"""What a job needs around the training loop: the process's JAX settings,
the data splits of a config, predictions over a whole split on the mesh."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from divdistill_jax import data, parallel


def setup_runtime(config: ml_collections.ConfigDict) -> None:
  """Process-wide JAX settings: distributed init, RNG, compilation cache."""
  p = config.parallel
  parallel.maybe_initialize_distributed(
      p.distributed, coordinator_address=p.coordinator_address,
      num_processes=p.num_processes, process_id=p.process_id)
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
