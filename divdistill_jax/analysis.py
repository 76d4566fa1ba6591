"""Teacher diversity on training, validation and perturbed training inputs.

The paper's Figure 1 argument: teacher members agree on the training images
they fit and disagree on held-out ones; perturbed training images should
bring the disagreement back. Writes per-example pairwise KL and
disagreement of the teachers for each input set to `diversity.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np

from divdistill_jax import augment, ensemble, fileio, metrics, perturb, step
from divdistill_jax.models import conv


def teacher_perturbation(config: ml_collections.ConfigDict, teacher_model):
  """Perturbation through the teachers alone, with the config's settings.

  The options are `step.perturb_options(config)`, the training step's own,
  so ODS draws one member and output weights per student BatchNorm group as
  training does; a batch that the groups do not divide (the last one of a
  split) gets one draw.

  Returns:
    Jitted `(teacher_vars, key, x float [B, H, W, C], eta, method) -> x'`.
  """
  teacher_fn = ensemble.member_fn(teacher_model)

  @functools.partial(jax.jit, static_argnames="method",
                     compiler_options=conv.compiler_options())
  def perturbed(variables, key, x, eta, method):
    options = step.perturb_options(config, eta)
    if options.group_size is not None and len(x) % options.group_size:
      options = dataclasses.replace(options, group_size=None)
    return perturb.apply(method, key, x,
                         perturb.Context(teacher_fn, variables), options)
  return perturbed


def batch_size_for_groups(batch_size: int, group_size: int | None) -> int:
  """The largest multiple of the BatchNorm group <= batch_size (>= 1 group)."""
  if group_size is None or batch_size % group_size == 0:
    return batch_size
  return group_size * max(1, batch_size // group_size)


def perturb_images(perturbed, variables, images: np.ndarray, method: str,
                   eta: float, key: jax.Array, batch_size: int,
                   group_size: int | None) -> np.ndarray:
  """Float images [N, H, W, C] perturbed in batches (batch i's key is
  fold_in(key, its first index)); see `teacher_perturbation`."""
  batch_size = batch_size_for_groups(batch_size, group_size)
  return np.concatenate([np.asarray(perturbed(
      variables, jax.random.fold_in(key, i), images[i:i + batch_size], eta,
      method)) for i in range(0, len(images), batch_size)])


def member_probs(probs_fn, variables, images: np.ndarray,
                 batch_size: int) -> np.ndarray:
  """Teacher member probabilities [M, N, K] of float images, in batches."""
  return np.concatenate([np.asarray(probs_fn(variables,
                                             images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)], axis=1)


def teacher_diversity(config: ml_collections.ConfigDict, teacher_model,
                      teacher_vars, splits: dict, methods, *,
                      num_examples: int = 1000, batch_size: int = 250,
                      step_sizes: dict | None = None) -> dict:
  """Per-example teacher diversity on each input set.

  `step_sizes` maps a method to its eta (1/255 units); methods not in it use
  `config.perturb.step_size`, which must then be a number. Methods that
  need the student are left out (there is no student here).

  Returns:
    {'kl_<set>': [N], 'dis_<set>': [N]} for sets 'train', 'validation' and
    'train+<method>' for each perturbation method.
  """
  probs_fn = ensemble.probs_fn(teacher_model, config.model.ensemble_strategy)
  perturbed = teacher_perturbation(config, teacher_model)
  group = config.student.bn_group_size
  train_x = augment.to_float(splits["train"][0][:num_examples])
  sets = {"train": train_x,
          "validation": augment.to_float(
              splits["validation"][0][:num_examples])}
  for method in methods:
    if perturb.is_identity(method) or perturb.uses_student(method):
      continue
    eta = float((step_sizes or {}).get(method, config.perturb.step_size))
    sets[f"train+{method}"] = perturb_images(
        perturbed, teacher_vars, train_x, method, eta,
        jax.random.key(config.seed), batch_size, group)
  out = {}
  for name, images in sets.items():
    probs = member_probs(probs_fn, teacher_vars, images, batch_size)
    out[f"kl_{name}"] = metrics.pairwise_kl_per_example(probs)
    out[f"dis_{name}"] = metrics.disagreement_per_example(probs)
  return out


def write_teacher_diversity(path: str, values: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fileio.write_npz(path, **values)


def step_kept(x: np.ndarray, x_pert: np.ndarray,
              step_size: float) -> np.ndarray:
  """Fraction of an RMS-normalised step that survives clipping to [0, 1].

  ODS and the Gaussian step move every image by RMS `step_size / 255` per
  pixel before clipping (ODS exactly, Gaussian in expectation); pixels at
  0 or 1 (Fashion-MNIST's black background) lose the half of that step
  which points outside the range.

  Args:
    x: [B, H, W, C] clean images in [0, 1].
    x_pert: [B, H, W, C] the clipped perturbed images.
    step_size: eta in 1/255 units (> 0).

  Returns:
    [B] RMS(x_pert - x) / (step_size / 255) per image.
  """
  diff = np.asarray(x_pert, np.float64) - np.asarray(x, np.float64)
  rms = np.sqrt((diff.reshape(len(diff), -1) ** 2).mean(1))
  return rms / perturb.to_pixels(step_size)
