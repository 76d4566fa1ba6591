"""Input perturbations for distillation; pure, jit-able functions.

All work in [0, 1] pixel space (the model normalises internally) and clip to
[0, 1]. `step_size` is in 1/255 units, so 1.0 is the paper's eta = 1/255.

  kd            x unchanged (plain KD; 'none' is accepted too).
  gaussian      x + eta * N(0, I)                         (SOURCES.md)
  ods           one random teacher member m per batch; w ~ U(-1, 1)^K per
                example; x + eta * sqrt(D) * d / |d|_2 with
                d = grad_x <w, softmax(f_m(x) / T)>       (SOURCES.md)
  confods       ods with each example's step scaled by max_k softmax(f_m(x)/T)
                                                          (SOURCES.md)
  disagreement  ours: `num_steps` ascent steps of total size eta on the
                teachers' mutual disagreement mean_m KL(p_m || p_bar) at
                temperature T, through all members, normalised like ODS.
  tdiv_sdiv     Nam et al. (ICML 2022): ascend the divergence of a random
                teacher pair minus that of the same student pair (needs the
                student; SOURCES.md).

Every method is registered under its config name with one signature,
`fn(key, x, Context, Options) -> x'`, its table label and what it needs;
`apply` runs one by name and `perturb` is the keyword form. A new method
is one function and `@register(name)`: it is then a valid
`config.perturb.method` and pipeline entry, with a table row.

`norm='linf'` replaces the L2-normalised direction by sign(d) (every pixel
moves by exactly eta).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from divdistill_jax import configlib, ensemble

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]
StudentFn = Callable[[PyTree, jax.Array], jax.Array]


def to_pixels(step_size):
  """A step size in 1/255 units -> pixel units in [0, 1] (eta / 255)."""
  return step_size / 255.0


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
  return jnp.clip(x + to_pixels(step_size) * noise, 0.0, 1.0)


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
    # conv, which XLA:CPU runs slowly (experiments/BENCHMARKS.md).
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
  step = to_pixels(step_size) * normalised_direction(grad, norm)
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

  scale = to_pixels(step_size) / num_steps
  if confidence_scaled:
    p_bar = jax.nn.softmax(all_logits(x) / temperature, -1).mean(0)
    scale = scale * p_bar.max(-1).reshape((-1,) + (1,) * (x.ndim - 1))

  # A Python loop: num_steps is small and static, and unrolled steps run
  # faster than a fori_loop on CPU (experiments/BENCHMARKS.md).
  out = x
  for _ in range(num_steps):
    grad, _ = jax.grad(objective, has_aux=True)(out)
    out = jnp.clip(out + scale * normalised_direction(grad, norm), 0.0, 1.0)
  return jax.lax.stop_gradient(out)


def tdiv_sdiv(key: jax.Array, x: jax.Array, logits_fn: LogitsFn,
              teacher_params: PyTree, student_fn: StudentFn,
              student_variables: PyTree, *, step_size: float,
              num_steps: int = 1, norm: str = "l2", all_pairs: bool = False,
              strategy: str = "vmap") -> jax.Array:
  """Teacher divergence minus student divergence (Nam et al., ICML 2022).

  For an ordered pair (i, j) of members, drawn once per call from `key`
  (the same pair for teachers and student), the objective per example is

    L(x) = CE(sg(p^T_j), p^T_i) - CE(sg(p^S_j), p^S_i),

  with CE(q, p) = -sum_k q_k log p_k at temperature 1, teachers and student in
  eval mode (docs/SOURCES.md, Follow-up: TDiv-SDiv). `num_steps` ascent steps
  of step_size / num_steps each (1/255 units, RMS per pixel; official: one step
  of 1) along the normalised gradient, clipped to [0, 1]: the teachers are
  pushed apart and the student members together. With `all_pairs` the objective
  is the mean over every ordered pair i != j (our variant).

  Args:
    key: PRNG key (the pair).
    x: [B, H, W, C] images in [0, 1].
    logits_fn: `(member_params, x) -> [B, K]` for ONE teacher.
    teacher_params: stacked teacher params (leading axis M).
    student_fn: `(student_variables, x) -> [M, B, K]` eval-mode logits of
      every student member.
    student_variables: the student's current variables (not updated here).
    step_size: total eta in 1/255 units.
    num_steps: ascent steps.
    norm: 'l2' (official) or 'linf'.
    all_pairs: average over all ordered pairs instead of one random pair.
    strategy: 'vmap' or 'unroll' over teacher members (all_pairs only).

  Returns:
    Perturbed images [B, H, W, C] in [0, 1] (no gradient).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  num = ensemble.num_members(teacher_params)
  i, j = jax.random.choice(key, num, shape=(2,), replace=False)

  def pair_divergence(logp_i, logp_j):
    """Per-example CE of member i to the stop-gradient member j."""
    return -(jax.lax.stop_gradient(jnp.exp(logp_j)) * logp_i).sum(-1)

  def objective(inputs):
    s_logp = jax.nn.log_softmax(
        student_fn(student_variables, inputs).astype(jnp.float32), -1)
    if s_logp.shape[0] != num:
      raise ValueError(
          f"tdiv_sdiv pairs teacher and student members: {num} teachers "
          f"but {s_logp.shape[0]} student members.")
    if all_pairs:
      t_logp = jax.nn.log_softmax(ensemble.map_members(
          lambda p: logits_fn(p, inputs), teacher_params,
          strategy=strategy).astype(jnp.float32), -1)
      total = 0.0
      for a in range(num):
        for b in range(num):
          if a != b:
            total += (pair_divergence(t_logp[a], t_logp[b])
                      - pair_divergence(s_logp[a], s_logp[b]))
      per_example = total / (num * (num - 1))
    else:
      # Only teachers i and j run; the gradient flows through i alone.
      t_i, t_j = (jax.nn.log_softmax(logits_fn(
          ensemble.select_member(teacher_params, m), inputs).astype(
              jnp.float32), -1) for m in (i, j))
      per_example = (pair_divergence(t_i, t_j)
                     - pair_divergence(s_logp[i], s_logp[j]))
    # A sum over examples: each example's gradient is its own objective's.
    return per_example.sum()

  scale = to_pixels(step_size) / num_steps
  out = x
  for _ in range(num_steps):
    grad = jax.grad(objective)(out)
    out = jnp.clip(out + scale * normalised_direction(grad, norm), 0.0, 1.0)
  return jax.lax.stop_gradient(out)


# ------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Options:
  """A perturbation's settings (static and hashable: part of a step spec).

  The defaults are `configlib.base_config()`'s (tested); `step.
  perturb_options(config)` builds the Options of a config, and the keyword
  form `perturb` takes its defaults from here.

  Attributes:
    step_size: eta in 1/255 units (1.0 = the paper's 1/255).
    temperature: T of the tempered teacher probabilities (ODS, ConfODS,
      disagreement; TDiv-SDiv uses T = 1).
    num_steps: ascent steps (disagreement, tdiv_sdiv).
    norm: 'l2' or 'linf'.
    confidence_scaled: disagreement only (ConfODS is its own method).
    strategy: 'vmap' or 'unroll' over teacher members.
    group_size: ods / confods: one member and w per group of images.
    all_pairs: tdiv_sdiv over every ordered member pair.
  """

  step_size: float = 1.0
  temperature: float = 4.0
  num_steps: int = 1
  norm: str = "l2"
  confidence_scaled: bool = False
  strategy: str = "unroll"
  group_size: int | None = None
  all_pairs: bool = False


@dataclasses.dataclass(frozen=True)
class Context:
  """The networks a perturbation may look through (arrays may be traced).

  Attributes:
    teacher_fn: `(member_params, x) -> [B, K]` applying ONE teacher.
    teacher_params: stacked teacher variables, leading axis M.
    student_fn: `(variables, x) -> [M, B, K]` eval-mode student logits, for
      methods that look at the student (None otherwise).
    student_variables: the student's current variables.
  """

  teacher_fn: LogitsFn | None
  teacher_params: PyTree
  student_fn: StudentFn | None = None
  student_variables: PyTree | None = None


Method = Callable[[jax.Array, jax.Array, Context, Options], jax.Array]


@dataclasses.dataclass(frozen=True)
class Registered:
  """A registered perturbation and what the rest of the code asks of it.

  Attributes:
    fn: `fn(key, x, context, options) -> x'`.
    label: the table's row suffix ('KD+ODS').
    uses_student: it looks through the current student (its Context needs
      `student_fn`); such a method cannot be calibrated on the teachers
      alone.
    identity: x' = x (plain KD): the student step runs one pass on the
      clean images.
  """

  fn: Method
  label: str
  uses_student: bool = False
  identity: bool = False


_REGISTRY: dict[str, Registered] = {}
# The public keyword form's older name for plain KD.
_ALIASES = {"none": "kd"}


def register(name: str, *, label: str | None = None,
             uses_student: bool = False, identity: bool = False):
  """Decorator: `fn(key, x, context, options) -> x_perturbed` as `name`.

  The name becomes a valid `config.perturb.method` and pipeline entry, and
  the table labels its rows `label` (default 'KD+<name>'). Nothing else
  needs an edit.
  """
  def wrap(fn: Method) -> Method:
    if name in _REGISTRY or name in _ALIASES:
      raise ValueError(f"Perturbation {name!r} is already registered.")
    _REGISTRY[name] = Registered(fn, label or f"KD+{name}", uses_student,
                                 identity)
    configlib.add_method(name)
    return fn
  return wrap


def methods() -> tuple[str, ...]:
  """Every registered method name, built-in ones first."""
  return tuple(_REGISTRY)


def uses_student(method: str) -> bool:
  """True when the method needs the student in its Context."""
  return _lookup(method).uses_student


def is_identity(method: str) -> bool:
  """True for plain KD: the method leaves the images unchanged."""
  return _lookup(method).identity


def label(method: str) -> str:
  """The table's name of a method ('KD', 'KD+ConfODS')."""
  return _lookup(method).label


def _lookup(method: str) -> Registered:
  method = _ALIASES.get(method, method)
  if method not in _REGISTRY:
    raise ValueError(
        f"Unknown perturbation {method!r}; use one of {methods()}.")
  return _REGISTRY[method]


register("kd", label="KD", identity=True)(lambda key, x, ctx, o: x)
register("gaussian", label="KD+Gaussian")(
    lambda key, x, ctx, o: gaussian(key, x, step_size=o.step_size))


@register("ods", label="KD+ODS")
def _ods(key, x, ctx: Context, o: Options):
  return ods(key, x, ctx.teacher_fn, ctx.teacher_params,
             step_size=o.step_size, temperature=o.temperature, norm=o.norm,
             group_size=o.group_size)


@register("confods", label="KD+ConfODS")
def _confods(key, x, ctx: Context, o: Options):
  return ods(key, x, ctx.teacher_fn, ctx.teacher_params,
             step_size=o.step_size, temperature=o.temperature, norm=o.norm,
             confidence_scaled=True, group_size=o.group_size)


@register("disagreement", label="KD+Disagreement")
def _disagreement(key, x, ctx: Context, o: Options):
  return disagreement(key, x, ctx.teacher_fn, ctx.teacher_params,
                      step_size=o.step_size, temperature=o.temperature,
                      num_steps=o.num_steps, norm=o.norm,
                      confidence_scaled=o.confidence_scaled,
                      strategy=o.strategy)


@register("tdiv_sdiv", label="KD+TDiv-SDiv", uses_student=True)
def _tdiv_sdiv(key, x, ctx: Context, o: Options):
  if ctx.student_fn is None:
    raise ValueError("tdiv_sdiv needs the student: give the Context a "
                     "student_fn and student_variables.")
  return tdiv_sdiv(key, x, ctx.teacher_fn, ctx.teacher_params, ctx.student_fn,
                   ctx.student_variables, step_size=o.step_size,
                   num_steps=o.num_steps, norm=o.norm,
                   all_pairs=o.all_pairs, strategy=o.strategy)


def apply(method: str, key: jax.Array, x: jax.Array, context: Context,
          options: Options) -> jax.Array:
  """Runs a registered perturbation: x [B, H, W, C] in [0, 1] -> x'."""
  return _lookup(method).fn(key, x, context, options)


def perturb(method: str, key: jax.Array, x: jax.Array, logits_fn: LogitsFn,
            teacher_params: PyTree, *, step_size: float, temperature: float,
            num_steps: int = Options.num_steps, norm: str = Options.norm,
            confidence_scaled: bool = Options.confidence_scaled,
            strategy: str = Options.strategy,
            group_size: int | None = Options.group_size,
            student_fn: StudentFn | None = None,
            student_variables: PyTree | None = None,
            all_pairs: bool = Options.all_pairs) -> jax.Array:
  """Runs perturbation `method` (see the module docstring and `apply`).

  Args:
    method: a registered name: 'kd' (or 'none'), 'gaussian', 'ods',
      'confods', 'disagreement', 'tdiv_sdiv'.
    key: PRNG key.
    x: [B, H, W, C] images in [0, 1].
    logits_fn: `(member_params, x) -> [B, K]` applying ONE teacher.
    teacher_params: stacked teacher params, leading axis M.
    step_size: in 1/255 units (1.0 = the paper's eta).
    temperature: T for the tempered teacher probabilities.
    num_steps: ascent steps (disagreement, tdiv_sdiv).
    norm: 'l2' or 'linf'.
    confidence_scaled: disagreement only (ConfODS is `method='confods'`).
    strategy: 'vmap' or 'unroll' over teacher members.
    group_size: ods / confods only: one random member and output weights
      per group of this many images (None = one draw for the batch).
    student_fn, student_variables: the student, for tdiv_sdiv.
    all_pairs: tdiv_sdiv over every ordered member pair.

  Returns:
    x_perturbed [B, H, W, C] in [0, 1].
  """
  context = Context(logits_fn, teacher_params, student_fn, student_variables)
  options = Options(step_size=step_size, temperature=temperature,
                    num_steps=num_steps, norm=norm,
                    confidence_scaled=confidence_scaled, strategy=strategy,
                    group_size=group_size, all_pairs=all_pairs)
  return apply(method, key, x, context, options)
