"""The student network with an explicit member axis, and its predictions.

BatchEnsemble BE-M for M > 1 (input [M, B, H, W, C]); for M = 1 the plain
network, applied to x[0] and given back a member axis, so that the single
network student is a real single network (no fast weights). With
`student.kind = 'latentbe'` the BatchEnsemble starts from identical members
(fast weights 1) with a shared classifier bias before s, and `plain_model`
is the single network it merges into (latentbe.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from divdistill_jax import augment, configlib, data, models
from divdistill_jax.models import conv


class Student:
  """The student of a config; every output has a leading member axis.

  Attributes:
    ensemble_size: M.
    kind: 'batchensemble' or 'latentbe'.
    model: the Flax module (BatchEnsemble, or plain for M = 1).
    plain_model: the plain network of the same architecture.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               bn_group_size: int | None = None, *,
               image_major: bool | None = None):
    info = data.dataset_info(config.data.name)
    self.ensemble_size = config.student.ensemble_size
    self.kind = config.student.kind
    plain = self.ensemble_size == 1
    latent = self.kind == "latentbe"
    self.model = models.get_model(
        config.model.name, num_classes=info.num_classes, mean=info.mean,
        std=info.std, dtype=config.model.dtype, bn_group_size=bn_group_size,
        ensemble_size=None if plain else self.ensemble_size,
        fast_init_std=0.0 if latent else config.student.fast_init_std,
        bias_mode="shared_before_s" if latent else "member",
        image_major=(
            (config.parallel.num_devices or jax.device_count()) > 1
            if image_major is None else image_major),
        **configlib.model_options(config))
    self.plain_model = models.get_model(
        config.model.name, num_classes=info.num_classes, mean=info.mean,
        std=info.std, dtype=config.model.dtype,
        **configlib.model_options(config))
    self._plain = plain

  def init(self, key, sample: jax.Array):
    """Variables from a float sample [B, H, W, C] (values unused)."""
    x = sample if self._plain else jnp.broadcast_to(
        sample, (self.ensemble_size, *sample.shape))
    return self.model.init(key, x, train=False)

  def tile(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [M, B, H, W, C]: every member sees the same images."""
    return jnp.broadcast_to(x, (self.ensemble_size, *x.shape))

  def apply(self, variables, x: jax.Array, train: bool):
    """x [M, B, H, W, C] -> (logits [M, B, K], new batch_stats or None)."""
    inputs = x[0] if self._plain else x
    if train:
      logits, new = self.model.apply(variables, inputs, train=True,
                                     mutable=["batch_stats"])
      new = new["batch_stats"]
    else:
      logits, new = self.model.apply(variables, inputs, train=False), None
    return (logits[None] if self._plain else logits), new


def predict_fn(student: Student):
  """Jitted eval-mode member probabilities of uint8 images.

  Returns:
    `(variables, images uint8 [B, H, W, C]) -> probs [M, B, K]`.
  """
  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def predict(variables, images):
    logits, _ = student.apply(
        variables, student.tile(augment.to_float(images)), train=False)
    return jax.nn.softmax(logits, axis=-1)
  return predict
