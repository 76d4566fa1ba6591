"""Cross-entropy, tempered KL and the distillation objective (docs/SOURCES.md,
Loss).

All functions take logits with a trailing class axis and return means over
every leading (member, example) row, like PyTorch's `reduction="batchmean"`
on the member-major [M * B, K] tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean CE. logits [..., K] (any leading axes), labels int [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()


def kl_to_target(target_probs: jax.Array, logits: jax.Array,
                 temperature: float) -> jax.Array:
  """Mean over rows of KL(target || softmax(logits / T)), summed over K.

  Args:
    target_probs: [..., K] target distribution (already tempered).
    logits: [..., K] student logits.
    temperature: T.

  Returns:
    Scalar; 0 when the tempered student equals the target.
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  p = target_probs.astype(jnp.float32)
  logp = jnp.log(jnp.where(p > 0, p, 1.0))
  return (p * (logp - logq)).sum(-1).mean()


def distillation_targets(teacher_logits: jax.Array, temperature: float,
                         pairing: str, student_members: int) -> jax.Array:
  """Tempered teacher targets for every student member.

  Args:
    teacher_logits: [M_t, B, K].
    temperature: T.
    pairing: 'member' (student member m <- teacher m; needs M_s == M_t) or
      'mean' (every student member <- the mean of the teachers' tempered
      probabilities).
    student_members: M_s.

  Returns:
    Targets [M_s, B, K].
  """
  probs = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  if pairing == "member":
    if teacher_logits.shape[0] != student_members:
      raise ValueError(
          f"pairing='member' needs as many student members as teachers: "
          f"{student_members} vs {teacher_logits.shape[0]}."
      )
    return probs
  if pairing == "mean":
    return jnp.broadcast_to(probs.mean(0), (student_members, *probs.shape[1:]))
  raise ValueError(f"Unknown pairing {pairing!r}; use 'member' or 'mean'.")


def distillation_loss(clean_logits: jax.Array, labels: jax.Array,
                      kd_logits: jax.Array, targets: jax.Array, *,
                      alpha: float, temperature: float):
  """(1 - alpha) * CE(clean) + alpha * T^2 * KL(targets || student(kd input)).

  Args:
    clean_logits: student logits on clean inputs [M, B, K].
    labels: int labels [B] (shared by all members).
    kd_logits: student logits on the distillation inputs [M, B, K].
    targets: tempered teacher targets [M, B, K].
    alpha: KD weight.
    temperature: T.

  Returns:
    (loss, (ce, kd)) scalars.
  """
  labels = jnp.broadcast_to(labels, clean_logits.shape[:-1])
  ce = cross_entropy(clean_logits, labels)
  kd = kl_to_target(targets, kd_logits, temperature)
  return (1 - alpha) * ce + alpha * temperature**2 * kd, (ce, kd)
