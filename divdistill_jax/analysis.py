"""Teacher diversity on training, validation and perturbed training inputs.

The paper's Figure 1 argument: teacher members agree on the training images
they fit and disagree on held-out ones; perturbed training images should
bring the disagreement back. Writes per-example pairwise KL and
disagreement of the teachers for each input set to `diversity.npz`.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from divdistill_jax import (augment, configlib, ensemble, fileio, metrics,
                            perturb)


def teacher_diversity(config: ml_collections.ConfigDict, teacher_model,
                      teacher_vars, splits: dict, methods, *,
                      num_examples: int = 1000, batch_size: int = 250,
                      step_sizes: dict | None = None) -> dict:
  """Per-example teacher diversity on each input set.

  `step_sizes` maps a method to its eta (1/255 units); methods not in it use
  `config.perturb.step_size`, which must then be a number.

  Returns:
    {'kl_<set>': [N], 'dis_<set>': [N]} for sets 'train', 'validation' and
    'train+<method>' for each perturbation method.
  """
  strategy = config.model.ensemble_strategy

  @jax.jit
  def probs_fn(variables, x):
    return jax.nn.softmax(ensemble.apply_members(teacher_model, variables, x,
                                                 strategy=strategy), -1)

  @functools.partial(jax.jit, static_argnames="method")
  def perturbed(variables, key, x, step_size, method):
    def logits_fn(v, inputs):
      return teacher_model.apply(v, inputs, train=False)
    return perturb.perturb(
        method, key, x, logits_fn, variables,
        step_size=step_size, temperature=config.kd.temperature,
        num_steps=config.perturb.num_steps, norm=config.perturb.norm,
        confidence_scaled=config.perturb.confidence_scaled, strategy=strategy)

  def member_probs(images, method=None, step_size=None):
    out = []
    for start in range(0, len(images), batch_size):
      x = augment.to_float(images[start:start + batch_size])
      if method is not None:
        key = jax.random.fold_in(jax.random.key(config.seed), start)
        x = perturbed(teacher_vars, key, x, step_size, method)
      out.append(np.asarray(probs_fn(teacher_vars, x)))
    return np.concatenate(out, axis=1)

  sets = {"train": (splits["train"][0][:num_examples], None, None),
          "validation": (splits["validation"][0][:num_examples], None, None)}
  for method in methods:
    name = configlib.PERTURBATION_OF_METHOD[method]
    # Teacher-only perturbations: a student-dependent one has no student.
    if name != "none" and not perturb.uses_student(name):
      eta = float((step_sizes or {}).get(method, config.perturb.step_size))
      sets[f"train+{method}"] = (splits["train"][0][:num_examples], name,
                                 eta)
  out = {}
  for name, (images, method, eta) in sets.items():
    probs = member_probs(images, method, eta)
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
  return rms / (step_size / 255.0)
