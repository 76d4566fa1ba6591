"""On-device training augmentation: random crop with zero padding and flip.

Runs inside the jitted step on uint8 batches, one key per example, and
returns float32 images in [0, 1] (normalisation is the model's first op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, C] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def _augment_one(key: jax.Array, image: jax.Array, padding: int,
                 flip: bool) -> jax.Array:
  h, w, _ = image.shape
  crop_key, flip_key = jax.random.split(key)
  if padding > 0:
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  return image


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4,
            flip: bool = True) -> jax.Array:
  """Random crop (zero padding) + horizontal flip, then scale to [0, 1].

  Args:
    key: PRNG key; each example gets its own sub-key.
    images: uint8 [..., B, H, W, C] (any leading axes, e.g. [M, B, ...]).
    padding: pixels of zero padding on each side before the crop (0 = none).
    flip: flip each image horizontally with probability 0.5.

  Returns:
    float32 [..., B, H, W, C] in [0, 1].
  """
  lead, image_shape = images.shape[:-3], images.shape[-3:]
  flat = images.reshape((-1, *image_shape))
  keys = jax.random.split(key, flat.shape[0])
  out = jax.vmap(lambda k, x: _augment_one(k, x, padding, flip))(keys, flat)
  return to_float(out.reshape((*lead, *image_shape)))
