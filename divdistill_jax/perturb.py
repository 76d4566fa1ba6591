"""Input perturbations for distillation; pure, jit-able functions.

All work in [0, 1] pixel space (the model normalises internally) and clip to
[0, 1]. `step_size` is in 1/255 units, so 1.0 is the paper's eta = 1/255.

  none          x unchanged (plain KD).
  gaussian      x + eta * N(0, I)                         (PAPER_SPEC 5.1)
  ods           one random teacher member m per batch; w ~ U(-1, 1)^K per
                example; x + eta * sqrt(D) * d / |d|_2 with
                d = grad_x <w, softmax(f_m(x) / T)>       (PAPER_SPEC 5.2)
  confods       ods with each example's step scaled by max_k softmax(f_m(x)/T)
                                                          (PAPER_SPEC 5.3)
  disagreement  ours: `num_steps` ascent steps of total size eta on the
                teachers' mutual disagreement mean_m KL(p_m || p_bar) at
                temperature T, through all members, normalised like ODS.

`norm='linf'` replaces the L2-normalised direction by sign(d) (every pixel
moves by exactly eta).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from divdistill_jax import ensemble

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]
METHODS = ("none", "gaussian", "ods", "confods", "disagreement")


def normalised_direction(grad: jax.Array, norm: str = "l2") -> jax.Array:
  """Per-example direction with RMS 1 per pixel.

  Args:
    grad: [B, H, W, C] gradient.
    norm: 'l2' -> sqrt(D) * g / max(|g|_2, 1e-12); 'linf' -> sign(g).

  Returns:
    [B, H, W, C] direction.
  """
  if norm == "linf":
    return jnp.sign(grad)
  if norm != "l2":
    raise ValueError(f"Unknown norm {norm!r}; use 'l2' or 'linf'.")
  flat = grad.reshape(grad.shape[0], -1)
  length = jnp.linalg.norm(flat, axis=1)
  scale = jnp.sqrt(flat.shape[1]) / jnp.maximum(length, 1e-12)
  return grad * scale.reshape((-1,) + (1,) * (grad.ndim - 1))


def gaussian(key: jax.Array, x: jax.Array, *, step_size: float) -> jax.Array:
  """x + (step_size / 255) * N(0, I), clipped to [0, 1]."""
  noise = jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(x + step_size / 255.0 * noise, 0.0, 1.0)


def ods(key: jax.Array, x: jax.Array, logits_fn: LogitsFn,
        teacher_params: PyTree, *, step_size: float, temperature: float,
        confidence_scaled: bool = False, norm: str = "l2",
        group_size: int | None = None) -> jax.Array:
  """Output Diversified Sampling through one random teacher member.

  Args:
    key: PRNG key (member index and the random output weights w).
    x: [B, H, W, C] images in [0, 1].
    logits_fn: `(member_params, x) -> [B, K]` for ONE member.
    teacher_params: stacked member params (leading axis M).
    step_size: eta in 1/255 units.
    temperature: T of softmax(f_m(x) / T).
    confidence_scaled: ConfODS (scale each example's step by the member's
      max tempered probability on x).
    norm: 'l2' (official) or 'linf'.
    group_size: None = one member and one draw of w for the whole batch;
      an integer g = one member and one w per group of g images, group i
      drawn from `jax.random.split(key, B // g)[i]`. The official multi-GPU
      runs drew per GPU, so the groups reproduce their joint distribution.

  Returns:
    Perturbed images [B, H, W, C] in [0, 1] (no gradient).
  """
  if group_size is not None and group_size != x.shape[0]:
    groups = _num_groups(x.shape[0], group_size)
    keys = jax.random.split(key, groups)
    # A loop, not vmap: each group's member is a traced index, and vmap
    # over gathered member parameters turns every conv into a batched-kernel
    # conv (20x slower on XLA:CPU, ensemble.py).
    return jnp.concatenate([
        ods(keys[g], x[g * group_size:(g + 1) * group_size], logits_fn,
            teacher_params, step_size=step_size, temperature=temperature,
            confidence_scaled=confidence_scaled, norm=norm)
        for g in range(groups)])
  member_key, w_key = jax.random.split(key)
  num = ensemble.num_members(teacher_params)
  m = jax.random.randint(member_key, (), 0, num)
  params = ensemble.select_member(teacher_params, m)

  def probs_fn(inputs):
    return jax.nn.softmax(logits_fn(params, inputs).astype(jnp.float32)
                          / temperature, axis=-1)

  probs, vjp = jax.vjp(probs_fn, x)
  w = jax.random.uniform(w_key, probs.shape, jnp.float32, -1.0, 1.0)
  (grad,) = vjp(w)
  step = step_size / 255.0 * normalised_direction(grad, norm)
  if confidence_scaled:
    step = step * probs.max(-1).reshape((-1,) + (1,) * (x.ndim - 1))
  return jax.lax.stop_gradient(jnp.clip(x + step, 0.0, 1.0))


def _num_groups(batch: int, group_size: int) -> int:
  if group_size < 1 or batch % group_size:
    raise ValueError(
        f"ODS group_size={group_size} must divide the batch of {batch} "
        "images.")
  return batch // group_size


def mutual_information(logits: jax.Array, temperature: float = 1.0):
  """Per-example mean_m KL(p_m || p_bar) of member logits [M, B, K] -> [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
  log_mean = jax.nn.logsumexp(logp, axis=0) - jnp.log(logp.shape[0])
  return (jnp.exp(logp) * (logp - log_mean)).sum(-1).mean(0)


def disagreement(key: jax.Array, x: jax.Array, logits_fn: LogitsFn,
                 teacher_params: PyTree, *, step_size: float,
                 temperature: float, num_steps: int = 1,
                 confidence_scaled: bool = False, norm: str = "l2",
                 strategy: str = "vmap") -> jax.Array:
  """Ascends the teachers' mutual disagreement (our method).

  Each of `num_steps` steps moves every example by step_size / num_steps
  (in 1/255 units, RMS per pixel) along the normalised gradient of
  mean_m KL(p_m || p_bar), then clips to [0, 1]. With `confidence_scaled`
  each step is scaled by max_k p_bar(x) on the clean input, as ConfODS does.
  `key` is unused (the method is deterministic) but kept for the common
  signature.
  """
  del key
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")

  def all_logits(inputs):
    return ensemble.map_members(lambda p: logits_fn(p, inputs),
                                teacher_params, strategy=strategy)

  def objective(inputs):
    logits = all_logits(inputs)
    return mutual_information(logits, temperature).sum(), logits

  scale = step_size / 255.0 / num_steps
  if confidence_scaled:
    p_bar = jax.nn.softmax(all_logits(x) / temperature, -1).mean(0)
    scale = scale * p_bar.max(-1).reshape((-1,) + (1,) * (x.ndim - 1))

  # A Python loop: num_steps is small and static, and unrolled steps
  # compiled 2x faster per step than a fori_loop on CPU (benchmark.py).
  out = x
  for _ in range(num_steps):
    grad, _ = jax.grad(objective, has_aux=True)(out)
    out = jnp.clip(out + scale * normalised_direction(grad, norm), 0.0, 1.0)
  return jax.lax.stop_gradient(out)


def perturb(method: str, key: jax.Array, x: jax.Array, logits_fn: LogitsFn,
            teacher_params: PyTree, *, step_size: float, temperature: float,
            num_steps: int = 1, norm: str = "l2",
            confidence_scaled: bool = False,
            strategy: str = "vmap",
            group_size: int | None = None) -> jax.Array:
  """Dispatches to a perturbation method (see the module docstring).

  Args:
    method: 'none', 'gaussian', 'ods', 'confods' or 'disagreement'.
    key: PRNG key.
    x: [B, H, W, C] images in [0, 1].
    logits_fn: `(member_params, x) -> [B, K]` applying ONE member.
    teacher_params: stacked teacher params, leading axis M.
    step_size: in 1/255 units (1.0 = the paper's eta).
    temperature: T for the tempered teacher probabilities.
    num_steps: ascent steps (disagreement only).
    norm: 'l2' or 'linf'.
    confidence_scaled: disagreement only (ConfODS is `method='confods'`).
    strategy: 'vmap' or 'unroll' over members (disagreement only).
    group_size: ods / confods only: one random member and output weights
      per group of this many images (None = one draw for the batch).

  Returns:
    x_perturbed [B, H, W, C] in [0, 1].
  """
  if method == "none":
    return x
  if method == "gaussian":
    return gaussian(key, x, step_size=step_size)
  if method in ("ods", "confods"):
    return ods(key, x, logits_fn, teacher_params, step_size=step_size,
               temperature=temperature, norm=norm,
               confidence_scaled=method == "confods", group_size=group_size)
  if method == "disagreement":
    return disagreement(key, x, logits_fn, teacher_params,
                        step_size=step_size, temperature=temperature,
                        num_steps=num_steps, norm=norm,
                        confidence_scaled=confidence_scaled,
                        strategy=strategy)
  raise ValueError(f"Unknown perturbation {method!r}; use one of {METHODS}.")
