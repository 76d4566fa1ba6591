"""One distillation step, and the static options it runs with.

The official recipe (docs/SOURCES.md, "The student step"): augment, perturb
(through the frozen eval-mode teachers), teacher targets on the perturbed
images, a student pass on the clean images for CE and one on the perturbed
images for KD with BatchNorm statistics threaded clean -> perturbed (plain
KD uses one pass), the optax update. Teacher variables are an argument of
the step, never closure constants.

`perturb_options(config)` and `StepSpec.from_config(config)` are the one
translation of a config into what the numeric code takes: the step, the
step-size calibration, the Figure-1 analysis and the study all use them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from divdistill_jax import (accumulate, augment, ensemble, losses, perturb,
                            train)
from divdistill_jax.student import Student


def resolved_step_size(config: ml_collections.ConfigDict) -> float:
  """`config.perturb.step_size` as a number (1/255 units).

  Raises:
    ValueError: when it is still 'auto' (`calibrate.resolve` first).
  """
  step = config.perturb.step_size
  if step == "auto":
    raise ValueError("config.perturb.step_size = 'auto' must be resolved "
                     "first (calibrate.resolve).")
  return float(step)


def perturb_options(config: ml_collections.ConfigDict,
                    step_size: float | None = None) -> perturb.Options:
  """The perturbation settings of a config.

  Args:
    config: a distill config.
    step_size: eta in 1/255 units (may be traced); default the config's,
      which must be a number.

  Returns:
    perturb.Options with one ODS draw per student BatchNorm group (the
    official runs drew once per GPU).
  """
  p = config.perturb
  return perturb.Options(
      step_size=resolved_step_size(config) if step_size is None
      else step_size,
      temperature=config.kd.temperature, num_steps=p.num_steps, norm=p.norm,
      confidence_scaled=p.confidence_scaled,
      strategy=config.model.ensemble_strategy,
      group_size=config.student.bn_group_size, all_pairs=p.all_pairs)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static options of one distillation step (hashable).

  Attributes:
    method: a registered perturbation method (perturb.py; 'kd' = plain KD).
    perturb: the perturbation's settings.
    alpha: KD weight; the loss is (1 - alpha) CE + alpha T^2 KL.
    temperature: T of the KD targets and the student's KD logits.
    pairing: 'member' (student m <- teacher m) or 'mean'.
    padding: crop padding of the augmentation (0 = none).
    flip: random horizontal flips.
    strategy: 'vmap' or 'unroll' over teacher members.
    clean_pass: also run the student on the clean images (the CE term, and
      the official BatchNorm threading clean -> perturbed). Only alpha = 1
      may turn it off: the follow-up paper's recipe, one pass on the
      perturbed images.
    microbatches: k; the student's passes and gradient are accumulated over
      k microbatches of whole BatchNorm groups (accumulate.py). The
      perturbation and the teacher targets see the whole batch.
    shards: devices the batch is split over (each keeps its own images in
      every microbatch).
  """

  method: str
  perturb: perturb.Options
  alpha: float
  temperature: float
  pairing: str = "member"
  padding: int = 0
  flip: bool = False
  strategy: str = "unroll"
  clean_pass: bool = True
  microbatches: int = 1
  shards: int = 1

  def __post_init__(self):
    if not self.clean_pass and self.alpha != 1.0:
      raise ValueError("Skipping the clean pass drops the CE term: only "
                       f"kd.alpha = 1 allows it (got {self.alpha}).")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> StepSpec:
    """The StepSpec of a distill config whose step size is a number."""
    return cls(
        method=config.perturb.method, perturb=perturb_options(config),
        alpha=config.kd.alpha, temperature=config.kd.temperature,
        pairing=config.student.pairing, padding=config.data.crop_padding,
        flip=config.data.flip, strategy=config.model.ensemble_strategy,
        clean_pass=config.kd.clean_pass,
        microbatches=config.student.microbatches)


def student_train_step(state: train.TrainState, images, labels, base_key,
                       teacher_vars, *, student: Student, fused: Student | None,
                       teacher_model, tx, spec: StepSpec):
  """One distillation step.

  Args:
    state: the student's TrainState.
    images: uint8 [B, H, W, C]; labels: int32 [B].
    base_key: run key; the step key is fold_in(base_key, step).
    teacher_vars: stacked teacher variables (leading axis M_t).
    student: the Student; `fused` the same network with one BN group per
      pass (None = two sequential passes).
    teacher_model: the plain teacher network.
    tx: optimiser.
    spec: the step's static options.

  Returns:
    (new state, scalar metrics).
  """
  key = jax.random.fold_in(base_key, state.step)
  aug_key, perturb_key = jax.random.split(key)
  x = augment.augment(aug_key, images, padding=spec.padding, flip=spec.flip)
  m = student.ensemble_size
  tile = student.tile

  def student_logits(variables, inputs):
    return student.apply(variables, tile(inputs), train=False)[0]

  context = perturb.Context(
      ensemble.member_fn(teacher_model), teacher_vars, student_logits,
      {"params": state.params, "batch_stats": state.batch_stats})
  # Named scopes label the ops for profiles (experiments/profile_step.py).
  with jax.named_scope("perturbation"):
    x_kd = perturb.apply(spec.method, perturb_key, x, context, spec.perturb)
  with jax.named_scope("teachers"):
    teacher_logits = ensemble.apply_members(teacher_model, teacher_vars,
                                            x_kd, strategy=spec.strategy)
  temperature = spec.temperature
  targets = losses.distillation_targets(
      jax.lax.stop_gradient(teacher_logits), temperature, spec.pairing, m)

  def loss_fn(params, batch):
    x, x_kd, labels, targets = batch
    variables = {"params": params, "batch_stats": state.batch_stats}
    if perturb.is_identity(spec.method):
      clean, batch_stats = student.apply(variables, tile(x), train=True)
      kd_logits = clean
    elif not spec.clean_pass:
      kd_logits, batch_stats = student.apply(variables, tile(x_kd),
                                             train=True)
      clean = kd_logits  # CE has weight 1 - alpha = 0; metrics only.
    elif fused is not None:
      both, batch_stats = fused.apply(
          variables, tile(jnp.concatenate([x, x_kd])), train=True)
      clean, kd_logits = jnp.split(both, 2, axis=1)
    else:
      clean, batch_stats = student.apply(variables, tile(x), train=True)
      kd_logits, batch_stats = student.apply(
          {"params": params, "batch_stats": batch_stats}, tile(x_kd),
          train=True)
    loss, (ce, kd) = losses.distillation_loss(
        clean, labels, kd_logits, targets, alpha=spec.alpha,
        temperature=temperature)
    acc = (clean.argmax(-1) == labels[None]).mean()
    return loss, (batch_stats, ce, kd, acc)

  batch = (x, x_kd, labels, targets)
  k = spec.microbatches
  if k > 1:
    batch = tuple(accumulate.split(a, k, spec.shards, axis=axis)
                  for a, axis in zip(batch, (0, 0, 0, 1)))
  (loss, (batch_stats, ce, kd, acc)), grads = accumulate.mean_value_and_grad(
      loss_fn, state.params, batch, k)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)
  delta = (x_kd - x).reshape(x.shape[0], -1)
  metrics = {
      "loss": loss,
      "ce": ce, "kd": kd, "accuracy": acc,
      "perturbation_l2": jnp.linalg.norm(delta, axis=1).mean(),
      # Teachers' mutual information on the distillation inputs (T = 1):
      # how much diversity the student is shown.
      "teacher_mi": perturb.mutual_information(teacher_logits).mean(),
      "param_norm": optax.tree.norm(params),
  }
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics
