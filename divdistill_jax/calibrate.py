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

import functools
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from divdistill_jax import (augment, configlib, ensemble, fileio,
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


def _member_probs_fn(teacher_model, strategy: str):
  @jax.jit
  def probs(variables, x):
    return jax.nn.softmax(ensemble.apply_members(
        teacher_model, variables, x, strategy=strategy), -1)
  return probs


def teacher_kl(probs_fn, variables, images: np.ndarray,
               batch_size: int = 250) -> float:
  """Mean pairwise KL of the teachers on float images [N, H, W, C]."""
  out = [np.asarray(probs_fn(variables, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  return metrics.pairwise_kl(np.concatenate(out, axis=1))


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
  strategy = config.model.ensemble_strategy
  probs_fn = _member_probs_fn(teacher_model, strategy)
  train_x = augment.to_float(splits["train"][0][:num_examples])
  val_x = augment.to_float(splits["validation"][0][:num_examples])
  val_kl = teacher_kl(probs_fn, teacher_vars, val_x, batch_size)
  train_kl = teacher_kl(probs_fn, teacher_vars, train_x, batch_size)
  target = config.perturb.auto_target_ratio * val_kl
  group = config.student.bn_group_size
  if group is not None and batch_size % group:
    batch_size = group * max(1, batch_size // group)

  @functools.partial(jax.jit, static_argnames="method")
  def perturbed(variables, key, x, eta, method):
    def logits_fn(v, inputs):
      return teacher_model.apply(v, inputs, train=False)
    return perturb.perturb(
        method, key, x, logits_fn, variables, step_size=eta,
        temperature=config.kd.temperature,
        num_steps=config.perturb.num_steps, norm=config.perturb.norm,
        confidence_scaled=config.perturb.confidence_scaled,
        strategy=strategy,
        group_size=group if len(x) % (group or 1) == 0 else None)

  out = {"validation_kl": val_kl, "train_kl": train_kl, "target": target,
         "settings": settings(config), "methods": {}}
  for method in methods:
    if not calibratable(method):
      continue
    name = configlib.PERTURBATION_OF_METHOD[method]
    key = jax.random.fold_in(jax.random.key(config.seed), 17)

    def kl_of_eta(eta, name=name, key=key):
      x = np.concatenate([np.asarray(perturbed(
          teacher_vars, jax.random.fold_in(key, i), train_x[i:i + batch_size],
          eta, name)) for i in range(0, len(train_x), batch_size)])
      return teacher_kl(probs_fn, teacher_vars, x, batch_size)

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
  name = configlib.PERTURBATION_OF_METHOD[method]
  return name != "none" and not perturb.uses_student(name)


def load(teacher_dir: str) -> dict | None:
  path = os.path.join(teacher_dir, FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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


def resolve_step_size(config: ml_collections.ConfigDict, teacher_dir: str,
                      teacher_model, teacher_vars, splits: dict) -> float:
  """config.perturb.step_size, with 'auto' replaced by the calibrated eta."""
  step = config.perturb.step_size
  method = config.perturb.method
  if step != "auto":
    return float(step)
  if configlib.PERTURBATION_OF_METHOD[method] == "none":
    return 0.0
  if not calibratable(method):
    raise ValueError(
        f"config.perturb.step_size = 'auto' is not defined for {method!r}: "
        "it perturbs through the student, whose diversity changes during "
        "training. Give a number (the follow-up paper uses 1.0).")
  record = ensure(config, teacher_dir, teacher_model, teacher_vars, splits,
                  [method])
  return float(record["methods"][method]["step_size"])
