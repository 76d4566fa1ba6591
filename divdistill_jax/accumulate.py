"""Gradient accumulation over whole BatchNorm groups (`*.microbatches`).

With ghost BatchNorm every group of images is normalised by its own
statistics, so a step's loss is the mean of independent per-group losses.
Splitting the batch into k microbatches of whole groups and averaging their
losses, gradients and BatchNorm running-statistic updates therefore gives
the step of the whole batch (to float rounding) while holding the
activations of one microbatch at a time: the 4-GPU recipe on one card.

The running statistics are exact too: an update is
`momentum * old + (1 - momentum) * mean over groups`, linear in the group
statistics, so the mean of the microbatches' updates (each from the same
`old`) is the whole batch's update; the same holds for the clean ->
perturbed threading of the student's two passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def check(batch: int, microbatches: int, group_size: int | None,
          shards: int, what: str) -> None:
  """Raises a ValueError unless `microbatches` splits every device's share of
  `batch` images into whole BatchNorm groups.

  Args:
    batch: the global batch (images per member).
    microbatches: k >= 1.
    group_size: images per BatchNorm group (None = the whole batch).
    shards: devices the batch is split over.
    what: the config field, for the message ('student.microbatches').
  """
  if microbatches < 1:
    raise ValueError(f"{what} = {microbatches} must be >= 1.")
  if microbatches == 1:
    return
  if group_size is None:
    raise ValueError(
        f"{what} = {microbatches} needs BatchNorm groups: with whole-batch "
        "statistics a microbatch would be normalised by its own statistics, "
        "not the batch's. Set the role's bn_group_size (e.g. the per-GPU "
        "batch of the recipe) or use 1.")
  per_device = batch // shards
  if per_device % (microbatches * group_size):
    raise ValueError(
        f"{what} = {microbatches} does not split the per-device batch of "
        f"{per_device} images into whole BatchNorm groups of {group_size}: "
        f"the per-device batch must be a multiple of {microbatches} x "
        f"{group_size}.")


def for_partial_batch(batch: int, group_size: int | None, microbatches: int,
                      shards: int) -> int:
  """Microbatches for an epoch's partial last batch: the largest divisor of
  `microbatches` that still splits each device's share into whole groups
  (1 with whole-batch statistics). Any such split is exact."""
  if group_size is None:
    return 1
  return math.gcd(microbatches, batch // shards // group_size)


def split(x: jax.Array, microbatches: int, shards: int = 1,
          axis: int = 0) -> jax.Array:
  """[..., B, ...] -> [k, ..., B / k, ...], k = `microbatches`.

  Microbatch j holds the j-th k-th of every shard's images (shard = one
  device's contiguous share of the batch axis), so its images stay on the
  devices that hold them, and contiguous groups stay whole when
  B / (shards * k) is a multiple of the group size.

  Args:
    x: array with the batch on `axis`.
    microbatches: k; must divide B / shards.
    shards: devices the batch axis is split over.
    axis: the batch axis.
  """
  x = jnp.moveaxis(x, axis, 0)
  b, rest = x.shape[0], x.shape[1:]
  n = b // (shards * microbatches)
  x = x.reshape(shards, microbatches, n, *rest).swapaxes(0, 1)
  x = x.reshape(microbatches, shards * n, *rest)
  return jnp.moveaxis(x, 1, axis + 1)


def mean_value_and_grad(loss_fn: Callable[..., tuple[jax.Array, PyTree]],
                        params: PyTree, batch: PyTree,
                        microbatches: int) -> tuple[tuple[jax.Array, PyTree],
                                                    PyTree]:
  """`value_and_grad(loss_fn, has_aux=True)(params, batch)`, accumulated.

  Args:
    loss_fn: `(params, batch) -> (loss, aux)`, the loss a mean over the
      batch's images and every array leaf of aux a mean too (or linear in
      the batch's groups, like BatchNorm running statistics).
    params: differentiated parameters.
    batch: pytree whose leaves have a leading microbatch axis of length k
      (`split`), or plain leaves when k = 1.
    microbatches: k; 1 calls `loss_fn` once on `batch` as it is.

  Returns:
    ((loss, aux), grads), each the mean over the k microbatches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch)

  def body(total, micro):
    out = grad_fn(params, micro)
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda a: a[0], batch)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first))
  # A scan, not a Python loop: XLA then holds one microbatch's activations.
  total, _ = jax.lax.scan(body, zeros, batch)
  return jax.tree.map(lambda t: t / microbatches, total)
