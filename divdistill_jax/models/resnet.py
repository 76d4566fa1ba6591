"""CIFAR ResNet (post-activation) and pre-activation Wide ResNet.

Both follow the official giung2 code exactly (docs/SOURCES.md, Models). Conv,
dense and norm layers are injected (`ModuleDef`s), so one definition builds
the plain teacher (input [B, H, W, C]) and the BatchEnsemble student (input
[M, B, H, W, C]). Images come in as floats in [0, 1]; normalisation is the
first op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from divdistill_jax.models import layers

ModuleDef = Callable[..., nn.Module]

# What a rematerialised residual block keeps for the backward pass: nothing
# but its input ('full': its forward runs again), or its convolutions'
# outputs ('convs': only the norms and activations run again).
REMAT_POLICIES = {
    "full": None,
    "convs": jax.checkpoint_policies.save_only_these_names("conv_out"),
}


def remat_block(block: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block`, rematerialised per `remat` ('none' returns it unchanged)."""
  if remat == "none":
    return block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat {remat!r}; use 'none' or one of "
                     f"{tuple(REMAT_POLICIES)}.")
  return nn.remat(block, policy=REMAT_POLICIES[remat])


def _conv_out(x: jax.Array) -> jax.Array:
  """Names a convolution's output for the 'convs' remat policy."""
  return checkpoint_name(x, "conv_out")


def _gap(x: jax.Array) -> jax.Array:
  return x.mean(axis=(-3, -2))


def _option_a_shortcut(x: jax.Array, features: int, strides: int):
  """Parameter-free shortcut: subsample by stride, zero channels appended."""
  x = x[..., ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra:
    pad = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
    x = jnp.pad(x, pad)
  return x


class ResNetBlock(nn.Module):
  """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv_out(self.conv(self.features, kernel_size=3,
                            strides=self.strides)(x))
    h = nn.relu(self.norm()(h))
    h = _conv_out(self.conv(self.features, kernel_size=3, strides=1)(h))
    h = self.norm()(h)
    return nn.relu(h + _option_a_shortcut(x, self.features, self.strides))


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for CIFAR: widths 16/32/64, option-A shortcuts."""

  depth: int
  num_classes: int
  conv: ModuleDef
  dense: ModuleDef
  norm: ModuleDef
  mean: Sequence[float]
  std: Sequence[float]
  width: int = 16
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6:
      raise ValueError(f"ResNet depth must be 6n+2, got {self.depth}.")
    blocks = (self.depth - 2) // 6
    norm = _bind_norm(self.norm, train)
    block_cls = remat_block(ResNetBlock, self.remat)
    x = layers.Normalize(self.mean, self.std)(x)
    x = nn.relu(norm()(self.conv(self.width, kernel_size=3, strides=1)(x)))
    for stage in range(3):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(self.width * 2**stage, strides, self.conv, norm,
                      name=f"ResNetBlock_{stage * blocks + block}")(x)
    return self.dense(self.num_classes)(_gap(x)).astype(jnp.float32)


class PreActBlock(nn.Module):
  """Pre-activation block; the projection sees the RAW block input (giung2)."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv
    h = _conv_out(conv(self.features, kernel_size=3, strides=self.strides)(
        nn.relu(self.norm()(x))))
    h = _conv_out(conv(self.features, kernel_size=3, strides=1)(
        nn.relu(self.norm()(h))))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv_out(self.conv(self.features, kernel_size=1,
                              strides=self.strides)(x))
    return h + x


class PreActWideResNet(nn.Module):
  """WRN-d-k, giung2 variant: no stem BN, no dropout, BN-ReLU head."""

  depth: int
  widen: int
  num_classes: int
  conv: ModuleDef
  dense: ModuleDef
  norm: ModuleDef
  mean: Sequence[float]
  std: Sequence[float]
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {self.depth}.")
    blocks = (self.depth - 4) // 6
    norm = _bind_norm(self.norm, train)
    block_cls = remat_block(PreActBlock, self.remat)
    x = layers.Normalize(self.mean, self.std)(x)
    x = self.conv(16, kernel_size=3, strides=1)(x)
    for stage in range(3):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(16 * self.widen * 2**stage, strides, self.conv, norm,
                      name=f"PreActBlock_{stage * blocks + block}")(x)
    x = nn.relu(norm()(x))
    return self.dense(self.num_classes)(_gap(x)).astype(jnp.float32)


def _bind_norm(norm: ModuleDef, train: bool) -> ModuleDef:
  def make(**kwargs: Any) -> nn.Module:
    return norm(use_running_average=not train, **kwargs)
  return make
