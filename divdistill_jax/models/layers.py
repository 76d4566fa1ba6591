"""Layers shared by the plain and BatchEnsemble networks.

Plain layers take `[..., B, H, W, C]` (convs) or `[..., B, F]` (dense).
BatchEnsemble layers take an explicit leading member axis `[M, B, ...]`: one
shared kernel W, and per member m an input scale `fast_r[m]` and an output
scale `fast_s[m]`, so member m computes `((x * r_m) conv W) * s_m`, which is
the conv with kernel `W * (r_m s_m^T)` (Wen et al. 2020; docs/SOURCES.md,
BatchEnsemble).
Fast-weight names start with `fast_` so the optimiser can group them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from divdistill_jax.models import conv

Dtype = Any

# Kaiming normal, fan_out, gain sqrt(2) (docs/SOURCES.md, Initialisation).
# Flax's fan_out of a (kh, kw, in, out) kernel is kh * kw * out, as in
# PyTorch.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Kernel initialisers by name: 'fan_out_normal' is the PyTorch recipe of the
# NeurIPS 2021 code; 'fan_in_truncated' is JAX's `kaiming_normal()` (fan_in,
# normal truncated at 2 std, rescaled to keep the variance), which the
# follow-up's code (giung2-jax `giung2/layers/conv.py`, `linear.py`) uses.
KERNEL_INITS = {"fan_out_normal": he_fan_out,
                "fan_in_truncated": nn.initializers.kaiming_normal()}
# Classifier bias of the plain network: PyTorch's default uniform, or zeros
# (giung2-jax `linear.py`).
BIAS_INITS = ("uniform", "zeros")
# BatchNorm running variance: PyTorch's unbiased batch variance, or the
# biased one (giung2-jax `norm.py`: E[x^2] - E[x]^2).
RUNNING_VARS = ("unbiased", "biased")


def _kernel_init(name: str):
  if name not in KERNEL_INITS:
    raise ValueError(f"Unknown kernel_init {name!r}; use one of "
                     f"{tuple(KERNEL_INITS)}.")
  return KERNEL_INITS[name]


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_around_one(std: float):
  """N(1, std^2) init of the fast weights (official ALPHA/GAMMA init)."""

  def init(key, shape, dtype=jnp.float32):
    return 1.0 + std * jax.random.normal(key, shape, dtype)

  return init


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: int,
           dtype: Dtype) -> jax.Array:
  """NHWC conv with symmetric zero padding over any leading batch axes."""
  y = conv.conv2d(conv.merge_members(x, False).astype(dtype),
                  kernel.astype(dtype), strides, padding)
  return conv.split_members(y, x.shape[:-3], False)


class Conv(nn.Module):
  """Bias-free conv with PyTorch-style symmetric padding (giung2 layers)."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  kernel_init: str = "fan_out_normal"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", _kernel_init(self.kernel_init),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    return conv2d(x, kernel, self.strides, (k - 1) // 2, self.dtype)


class Dense(nn.Module):
  """Classifier: Kaiming weight, PyTorch-default (or zero) bias."""

  features: int
  kernel_init: str = "fan_out_normal"
  bias_init: str = "uniform"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _kernel_init(self.kernel_init),
                        (fan_in, self.features), jnp.float32)
    if self.bias_init not in BIAS_INITS:
      raise ValueError(f"Unknown bias_init {self.bias_init!r}; use one of "
                       f"{BIAS_INITS}.")
    bias_init = (torch_linear_bias_init(fan_in) if self.bias_init == "uniform"
                 else nn.initializers.zeros)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


def _check_members(x: jax.Array, ensemble_size: int, min_ndim: int, name):
  if x.ndim < min_ndim or x.shape[0] != ensemble_size:
    raise ValueError(
        f"{name} expects inputs [M={ensemble_size}, B, ...] with at least "
        f"{min_ndim} axes, got shape {x.shape}."
    )


class BatchEnsembleConv(nn.Module):
  """BatchEnsemble conv: input [M, B, H, W, C_in] -> [M, B, H', W', C_out]."""

  features: int
  ensemble_size: int
  kernel_size: int = 3
  strides: int = 1
  fast_init_std: float = 0.5
  kernel_init: str = "fan_out_normal"
  dtype: Dtype = jnp.float32
  # Merge the member copies image-major (a batch split over devices).
  image_major: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_members(x, self.ensemble_size, 5, "BatchEnsembleConv")
    m, k, c_in = self.ensemble_size, self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", _kernel_init(self.kernel_init),
                        (k, k, c_in, self.features), jnp.float32)
    init = normal_around_one(self.fast_init_std)
    r = self.param("fast_r", init, (m, c_in), jnp.float32)
    s = self.param("fast_s", init, (m, self.features), jnp.float32)
    return conv.batch_ensemble_conv2d(x, kernel, r, s, self.strides,
                                      (k - 1) // 2, self.dtype,
                                      self.image_major)


BIAS_MODES = ("member", "shared_before_s")


class BatchEnsembleDense(nn.Module):
  """BatchEnsemble classifier: [M, B, F] -> [M, B, K].

  bias_mode 'member' (NeurIPS 2021, official `ensemble_bias`): a per-member
  bias initialised to zero, added after s_m: s_m * (W (r_m * x)) + b_m.
  'shared_before_s' (LatentBE, ICML 2022; docs/SOURCES.md): one bias
  `bias` shared by the members, added before s_m: s_m * (W (r_m * x) + b).
  """

  features: int
  ensemble_size: int
  fast_init_std: float = 0.5
  bias_mode: str = "member"
  kernel_init: str = "fan_out_normal"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_members(x, self.ensemble_size, 3, "BatchEnsembleDense")
    if self.bias_mode not in BIAS_MODES:
      raise ValueError(f"Unknown bias_mode {self.bias_mode!r}; use one of "
                       f"{BIAS_MODES}.")
    m, fan_in = self.ensemble_size, x.shape[-1]
    kernel = self.param("kernel", _kernel_init(self.kernel_init),
                        (fan_in, self.features), jnp.float32)
    init = normal_around_one(self.fast_init_std)
    r = self.param("fast_r", init, (m, fan_in), jnp.float32)
    s = self.param("fast_s", init, (m, self.features), jnp.float32)
    x = (x * r[:, None, :]).astype(self.dtype)
    y = jnp.einsum("mbf,fk->mbk", x, kernel.astype(self.dtype))
    s = s[:, None, :].astype(self.dtype)
    if self.bias_mode == "shared_before_s":
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        jnp.float32)
      return (y + bias.astype(self.dtype)) * s
    bias = self.param("member_bias", nn.initializers.zeros,
                      (m, self.features), jnp.float32)
    return y * s + bias[:, None, :].astype(self.dtype)


class BatchNorm(nn.Module):
  """BatchNorm over feature maps `[..., B, H, W, C]` with ghost groups.

  In training mode the statistics are taken over every axis but C, in
  groups of `group_size` images along the B axis (all leading axes, e.g. the
  M member copies of those images, are in the same group). `None` = one
  group, the whole (global) batch. Running statistics: momentum 0.1 in
  PyTorch's convention, and the unbiased batch variance as PyTorch keeps it
  (`running_var='unbiased'`) or the biased one as giung2-jax does
  ('biased'); with several groups the update is the mean over groups.
  Statistics are computed in float32.
  """

  use_running_average: bool
  group_size: int | None = None
  running_var: str = "unbiased"
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean_var = self.variable("batch_stats", "mean", jnp.zeros, (c,),
                             jnp.float32)
    var_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      y = (xf - mean_var.value) * jax.lax.rsqrt(var_var.value + self.epsilon)
      y = y * scale + bias
    else:
      y, mean, var = batch_norm(xf, scale, bias, self.group_size,
                                self.epsilon)
      count = _group_axes(x.shape, self.group_size)[2]
      if not self.is_initializing():
        if self.running_var not in RUNNING_VARS:
          raise ValueError(f"Unknown running_var {self.running_var!r}; use "
                           f"one of {RUNNING_VARS}.")
        if self.running_var == "unbiased":
          var = var * count / max(count - 1, 1)
        mean_var.value = (self.momentum * mean_var.value
                          + (1 - self.momentum) * mean.mean(0))
        var_var.value = (self.momentum * var_var.value
                         + (1 - self.momentum) * var.mean(0))
    return y.astype(self.dtype)


def _group_axes(shape: tuple[int, ...], group_size: int | None):
  """(grouped shape, axes each group's statistics are taken over, count)."""
  lead, b, rest = shape[:-4], shape[-4], shape[-3:]
  g = b if group_size is None else group_size
  if g <= 0 or b % g:
    raise ValueError(
        f"BatchNorm group_size={group_size} must divide the batch of {b} "
        "images."
    )
  grouped = (*lead, b // g, g, *rest)
  axes = tuple(a for a in range(len(grouped) - 1) if a != len(lead))
  return grouped, axes, int(np.prod([grouped[a] for a in axes]))


def _batch_norm_forward(x, scale, bias, group_size, epsilon):
  """(output, group means [G, C], group variances [G, C]), and the
  keepdims mean and 1 / std the gradient needs."""
  grouped, axes, _ = _group_axes(x.shape, group_size)
  xg = x.reshape(grouped)
  mean = xg.mean(axes, keepdims=True)
  var = jnp.square(xg - mean).mean(axes, keepdims=True)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = ((xg - mean) * rstd).reshape(x.shape) * scale + bias
  c = x.shape[-1]
  return (y, mean.reshape(-1, c), var.reshape(-1, c)), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               group_size: int | None, epsilon: float):
  """Training-mode BatchNorm of [..., B, H, W, C] per group of images.

  The statistics of a group are taken over every axis but C, for
  `group_size` images along B and all leading axes (`None`: one group).

  Its gradient is written out, as PyTorch's BatchNorm backward is: the two
  per-channel sums sum(g) and sum(g * x_hat) give the scale's, the bias's
  and the input's gradients. Autodiff of the mean and variance makes
  XLA:CPU pass over the image tensors more often (the ResNet-32 student
  step's bytes accessed, by XLA's cost model: 37.4 GB with autodiff, 31.5
  GB with this; experiments/BENCHMARKS.md, "CPU step"). Only the order of
  float additions differs (tests/test_models.py).

  Args:
    x: [..., B, H, W, C] float32.
    scale: [C].
    bias: [C].
    group_size: images per group (dividing B), or None.
    epsilon: added to the variance.

  Returns:
    (x_hat * scale + bias [..., B, H, W, C], group means [G, C], group
    biased variances [G, C]).
  """
  return _batch_norm_forward(x, scale, bias, group_size, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, group_size, epsilon):
  out, (mean, rstd) = _batch_norm_forward(x.value, scale.value, bias.value,
                                          group_size, epsilon)
  return out, (x.value, scale.value, mean, rstd)


def _batch_norm_bwd(group_size, epsilon, res, cotangents):
  del epsilon
  x, scale, mean, rstd = res
  g, g_mean, g_var = cotangents
  zero = jax.custom_derivatives.SymbolicZero
  grouped, axes, count = _group_axes(x.shape, group_size)
  xg = x.reshape(grouped)
  x_hat = (xg - mean) * rstd
  dx = jnp.zeros_like(xg)
  d_scale = d_bias = jnp.zeros_like(scale)
  if type(g) is not zero:  # pylint: disable=unidiomatic-typecheck
    gg = g.reshape(grouped)
    sum_g = gg.sum(axes, keepdims=True)
    sum_gx = (gg * x_hat).sum(axes, keepdims=True)
    dx = (scale * rstd) * (gg - (sum_g + x_hat * sum_gx) / count)
    d_bias = sum_g.reshape(-1, scale.shape[0]).sum(0)
    d_scale = sum_gx.reshape(-1, scale.shape[0]).sum(0)
  # The group statistics are outputs too (for the running averages), so
  # their cotangents, symbolic zeros in a training step, are honoured.
  shape = mean.shape
  if type(g_mean) is not zero:  # pylint: disable=unidiomatic-typecheck
    dx = dx + g_mean.reshape(shape) / count
  if type(g_var) is not zero:  # pylint: disable=unidiomatic-typecheck
    dx = dx + g_var.reshape(shape) * 2 * (xg - mean) / count
  return dx.reshape(x.shape), d_scale, d_bias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


class Normalize(nn.Module):
  """(x - mean) / std per channel: the first op of every network."""

  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != len(self.mean):
      raise ValueError(
          f"Images have {x.shape[-1]} channels but the model was built for "
          f"{len(self.mean)} (shape {x.shape}); check config.data.name."
      )
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (x.astype(jnp.float32) - mean) / std
