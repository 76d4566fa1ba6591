"""Learning-rate schedules (stepped per epoch) and the SGD optimiser.

Matches the official PyTorch recipe (docs/SOURCES.md, Optimiser, Schedule):
coupled L2 added to the gradient, heavy-ball momentum with buf_0 = g, and two
parameter groups; BatchEnsemble fast weights (names starting with `fast_`) get
their own LR and no weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def warmup_linear_factor(epoch, milestones: Sequence[int],
                         warmup_factor: float = 0.01,
                         final_factor: float = 0.01):
  """WarmupLinearDecay factor of a 1-indexed epoch (giung2).

  Args:
    epoch: 1-indexed epoch (int or int array).
    milestones: (m0, m1, m2): warm-up until m0, constant until m1, linear
      decay to `final_factor` at m2.
    warmup_factor: factor at epoch 1.
    final_factor: factor from epoch m2 on.

  Returns:
    float32 factor(s).
  """
  m0, m1, m2 = milestones
  e = jnp.asarray(epoch, jnp.float32)
  warm = warmup_factor + (1 - warmup_factor) * (e - 1) / max(m0 - 1, 1)
  decay = final_factor + (1 - final_factor) * (m2 - e) / max(m2 - m1, 1)
  return jnp.where(e < m0, warm,
                   jnp.where(e < m1, 1.0,
                             jnp.where(e < m2, decay, final_factor)))


def cosine_factor(epoch, total_epochs: int, warmup_epochs: int = 0,
                  warmup_factor: float = 0.01):
  """Linear warm-up, then half-cosine to 0 at the end (1-indexed epoch)."""
  e = jnp.asarray(epoch, jnp.float32)
  warm = warmup_factor + (1 - warmup_factor) * (e - 1) / max(warmup_epochs, 1)
  progress = (e - 1 - warmup_epochs) / max(total_epochs - warmup_epochs, 1)
  cos = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
  return jnp.where(e < warmup_epochs + 1, warm, cos)


def epoch_schedule(base_lr: float, *, steps_per_epoch: int, total_epochs: int,
                   schedule: str = "warmup_linear",
                   milestones: Sequence[int] = (5, 150, 270),
                   warmup_factor: float = 0.01, final_factor: float = 0.01,
                   warmup_epochs: int = 5,
                   granularity: str = "epoch") -> optax.Schedule:
  """An optax schedule of the step count.

  Args:
    granularity: 'epoch' (official) keeps the LR constant within an epoch;
      'step' evaluates the same piecewise-linear factor at the fractional
      epoch `1 + count / steps_per_epoch`, so the warm-up ramps every step.
      Why it exists: with a one-epoch warm-up, 'epoch' jumps 100x at the
      epoch boundary, where the momentum buffer already holds the gradients
      of the barely trained network (README, quick start, "Warm-up").
  """
  if granularity not in ("epoch", "step"):
    raise ValueError(
        f"Unknown schedule granularity {granularity!r}; use 'epoch' or "
        "'step'.")

  def lr(count):
    if granularity == "epoch":
      epoch = count // steps_per_epoch + 1
    else:
      epoch = jnp.asarray(count, jnp.float32) / steps_per_epoch + 1
    if schedule == "warmup_linear":
      f = warmup_linear_factor(epoch, milestones, warmup_factor, final_factor)
    elif schedule == "cosine":
      f = cosine_factor(epoch, total_epochs, warmup_epochs, warmup_factor)
    elif schedule == "constant":
      f = jnp.ones((), jnp.float32)
    else:
      raise ValueError(f"Unknown schedule {schedule!r}.")
    return base_lr * f

  return lr


def is_fast_weight(path) -> bool:
  """True for BatchEnsemble fast weights (`fast_r`, `fast_s`)."""
  return any(getattr(k, "key", str(k)).startswith("fast_") for k in path)


def param_labels(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "fast" if is_fast_weight(p) else "default", params)


def decay_toward(weight_decay: float,
                 target: float) -> optax.GradientTransformation:
  """Coupled L2 toward `target`: g + weight_decay * (p - target)."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decay_toward needs the params.")
    return jax.tree.map(lambda g, p: g + weight_decay * (p - target),
                        updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def make_optimizer(*, steps_per_epoch: int, total_epochs: int,
                   learning_rate: float, fast_learning_rate: float,
                   weight_decay: float, fast_weight_decay: float = 0.0,
                   momentum: float = 0.9, nesterov: bool = False,
                   schedule: str = "warmup_linear",
                   milestones: Sequence[int] = (5, 150, 270),
                   warmup_factor: float = 0.01, final_factor: float = 0.01,
                   warmup_epochs: int = 5,
                   granularity: str = "epoch",
                   fast_decay_target: float = 0.0,
                   fast_grad_scale: float = 1.0,
                   ) -> optax.GradientTransformation:
  """SGD + coupled L2 with a separate fast-weight group.

  Because every transformation is elementwise, the same optimiser applied to
  M members' stacked parameters equals M independent optimisers.

  The fast group's update direction is
  fast_grad_scale * (g + fast_weight_decay * (p - fast_decay_target)):
  (1, 0) is the NeurIPS 2021 recipe (no decay); LatentBE uses
  fast_weight_decay = wd / M, target 1 and scale M, i.e. M g + wd (p - 1)
  (docs/SOURCES.md, Follow-up: LatentBE).
  """
  sched = dict(steps_per_epoch=steps_per_epoch, total_epochs=total_epochs,
               schedule=schedule, milestones=tuple(milestones),
               warmup_factor=warmup_factor, final_factor=final_factor,
               warmup_epochs=warmup_epochs, granularity=granularity)

  def group(lr, wd, target=0.0, scale=1.0):
    parts = [optax.add_decayed_weights(wd) if target == 0.0
             else decay_toward(wd, target)]
    if scale != 1.0:  # Only then: the default state layout stays as it was.
      parts.append(optax.scale(scale))
    parts.append(optax.sgd(epoch_schedule(lr, **sched),
                           momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)

  return optax.multi_transform(
      {"default": group(learning_rate, weight_decay),
       "fast": group(fast_learning_rate, fast_weight_decay, fast_decay_target,
                     fast_grad_scale)},
      param_labels)
