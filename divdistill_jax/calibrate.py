"""Diversity-matched step size (`--config.perturb.step_size=auto`).

The paper's Figure 1 argument, made operational: teacher members that fit
their training images agree on them and disagree on held-out images, and a
perturbation should bring back the held-out level of disagreement. For each
perturbation method we search the step size eta at which the teachers' mean
pairwise KL on perturbed training images equals `target_ratio` times their
KL on validation images. The search uses a fixed key, so the perturbation
draws are the same at every eta and the KL is a smooth function of eta: a
log-spaced grid brackets the target, then bisection in log eta refines it.
A target outside the grid's range is reported and clipped to its end.

The result (value, target, status and the whole KL-vs-eta curve) is written
once per teachers workdir to `step_size.json` and reused by every student.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from divdistill_jax import (analysis, augment, ensemble, fileio,
                            logging_utils, metrics, perturb)

FILENAME = "step_size.json"
# Step sizes in 1/255 units: 0.25 (a quarter grey level) to 128 (half the
# pixel range, where clipping saturates every method).
GRID = tuple(0.25 * 2.0**k for k in range(10))
REFINE_STEPS = 6


def find_step_size(kl_of_eta: Callable[[float], float], target: float, *,
                   grid: Sequence[float] = GRID,
                   refine_steps: int = REFINE_STEPS) -> dict:
  """The eta with kl_of_eta(eta) = target, assuming KL grows with eta.

  Args:
    kl_of_eta: teacher diversity at a step size (deterministic).
    target: the diversity to reach.
    grid: increasing step sizes that bracket the search.
    refine_steps: bisection steps in log eta inside the bracket.

  Returns:
    {'step_size', 'kl' (at that eta), 'target', 'status' ('found',
    'clipped_low': even the smallest eta overshoots, 'clipped_high': the
    largest eta falls short), 'curve': {'eta': [...], 'kl': [...]}} with
    every evaluated point, sorted by eta.
  """
  points = {}

  def kl(eta):
    if eta not in points:
      points[eta] = float(kl_of_eta(eta))
    return points[eta]

  for eta in grid:
    kl(eta)
  above = [eta for eta in grid if points[eta] >= target]
  if not above:
    status, best = "clipped_high", grid[-1]
  elif above[0] == grid[0]:
    status, best = "clipped_low", grid[0]
  else:
    status = "found"
    hi = above[0]
    lo = grid[grid.index(hi) - 1]
    for _ in range(refine_steps):
      mid = math.sqrt(lo * hi)
      lo, hi = (mid, hi) if kl(mid) < target else (lo, mid)
    # Linear in log eta between the last bracket's ends.
    k_lo, k_hi = points[lo], points[hi]
    frac = 0.0 if k_hi == k_lo else (target - k_lo) / (k_hi - k_lo)
    best = float(math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo))))
    kl(best)
  etas = sorted(points)
  return {"step_size": best, "kl": points[best], "target": float(target),
          "status": status,
          "curve": {"eta": etas, "kl": [points[e] for e in etas]}}


def teacher_kl(probs_fn, variables, images: np.ndarray,
               batch_size: int = 250) -> float:
  """Mean pairwise KL of the teachers on float images [N, H, W, C]."""
  return metrics.pairwise_kl(analysis.member_probs(probs_fn, variables,
                                                   images, batch_size))


def settings(config: ml_collections.ConfigDict) -> dict:
  """Everything the calibration depends on besides the teachers."""
  p = config.perturb
  return {"target_ratio": p.auto_target_ratio, "temperature":
          config.kd.temperature, "num_steps": p.num_steps, "norm": p.norm,
          "confidence_scaled": p.confidence_scaled,
          "group_size": config.student.bn_group_size,
          "num_examples": p.auto_num_examples, "seed": config.seed,
          "train_size": config.data.train_size,
          "validation_size": config.data.validation_size}


def calibrate(config: ml_collections.ConfigDict, teacher_model, teacher_vars,
              splits: dict, methods: Sequence[str], *,
              num_examples: int | None = None,
              batch_size: int = 250) -> dict:
  """Diversity-matched step size for each perturbation method.

  Args:
    config: the student config (perturbation and KD settings).
    teacher_model: the plain teacher network.
    teacher_vars: stacked teacher variables.
    splits: {'train': (images, labels), 'validation': (images, labels)}.
    methods: config method names; 'kd' is skipped.
    num_examples: training and validation images used (default
      `config.perturb.auto_num_examples`).
    batch_size: images per perturbation call.

  Returns:
    {'validation_kl', 'train_kl', 'target', 'settings', 'methods':
    {method: find_step_size's record}}.
  """
  num_examples = num_examples or config.perturb.auto_num_examples
  probs_fn = ensemble.probs_fn(teacher_model, config.model.ensemble_strategy)
  train_x = augment.to_float(splits["train"][0][:num_examples])
  val_x = augment.to_float(splits["validation"][0][:num_examples])
  val_kl = teacher_kl(probs_fn, teacher_vars, val_x, batch_size)
  train_kl = teacher_kl(probs_fn, teacher_vars, train_x, batch_size)
  target = config.perturb.auto_target_ratio * val_kl
  group = config.student.bn_group_size
  perturbed = analysis.teacher_perturbation(config, teacher_model)

  out = {"validation_kl": val_kl, "train_kl": train_kl, "target": target,
         "settings": settings(config), "methods": {}}
  for method in methods:
    if not calibratable(method):
      continue
    key = jax.random.fold_in(jax.random.key(config.seed), 17)

    def kl_of_eta(eta, method=method, key=key):
      x = analysis.perturb_images(perturbed, teacher_vars, train_x, method,
                                  eta, key, batch_size, group)
      return teacher_kl(probs_fn, teacher_vars, x,
                        analysis.batch_size_for_groups(batch_size, group))

    record = find_step_size(kl_of_eta, target)
    out["methods"][method] = record
    logging_utils.log(
        f"   step size for {method}: eta = {record['step_size']:.3g}/255 "
        f"({record['status']}; teacher KL on perturbed train "
        f"{record['kl']:.3f}, target {target:.3f} = "
        f"{config.perturb.auto_target_ratio:g} x validation {val_kl:.3f}, "
        f"clean train {train_kl:.3f})")
  return out


def calibratable(method: str) -> bool:
  """Methods through the teachers alone: not KD, not the student-dependent
  tdiv_sdiv (its diversity changes as the student trains)."""
  return not perturb.is_identity(method) and not perturb.uses_student(method)


def load(teacher_dir: str) -> dict | None:
  """The saved calibration, or None (missing; damaged: said in one line and
  then computed again)."""
  path = os.path.join(teacher_dir, FILENAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    if {"settings", "methods"} <= set(record):
      return record
  except (OSError, ValueError, TypeError):
    pass
  logging_utils.log(f"   {path} is damaged: the calibration is computed "
                    "again")
  return None


def ensure(config: ml_collections.ConfigDict, teacher_dir: str, teacher_model,
           teacher_vars, splits: dict, methods: Sequence[str]) -> dict:
  """The teachers' calibration for `methods`, computed where missing.

  A saved calibration of other settings (temperature, target ratio, ...) is
  recomputed. Written atomically to `teacher_dir/step_size.json`.
  """
  saved = load(teacher_dir)
  if saved is not None and saved["settings"] != settings(config):
    saved = None  # Another calibration: redo every method.
  known = saved["methods"] if saved is not None else {}
  missing = [m for m in methods if calibratable(m) and m not in known]
  if saved is not None and not missing:
    return saved
  logging_utils.log(f"== diversity-matched step sizes -> "
                    f"{os.path.join(teacher_dir, FILENAME)}")
  fresh = calibrate(config, teacher_model, teacher_vars, splits, missing)
  fresh["methods"] = {**known, **fresh["methods"]}
  fileio.write_json(os.path.join(teacher_dir, FILENAME), fresh, indent=2)
  return fresh


def resolve(config: ml_collections.ConfigDict, teacher_dir: str,
            teacher_model, teacher_vars,
            splits: dict) -> ml_collections.ConfigDict:
  """The config with `perturb.step_size` a number: the one place where
  'auto' becomes the calibrated eta (computed or read from the teachers'
  `step_size.json`).

  Returns:
    `config` itself when its step size is a number, else a locked copy
    (plain KD gets 0.0: it has no step).

  Raises:
    ValueError: 'auto' for a method that perturbs through the student.
  """
  step = config.perturb.step_size
  if step != "auto":
    return config
  method = config.perturb.method
  if perturb.is_identity(method):
    eta = 0.0
  elif not calibratable(method):
    raise ValueError(
        f"config.perturb.step_size = 'auto' is not defined for {method!r}: "
        "it perturbs through the student, whose diversity changes during "
        "training. Give a number (the follow-up paper uses 1.0).")
  else:
    record = ensure(config, teacher_dir, teacher_model, teacher_vars, splits,
                    [method])
    eta = float(record["methods"][method]["step_size"])
  # deepcopy keeps the field's `object` type ('auto' -> float is allowed).
  resolved = copy.deepcopy(config)
  resolved.unlock()
  resolved.perturb.step_size = eta
  resolved.lock()
  return resolved
