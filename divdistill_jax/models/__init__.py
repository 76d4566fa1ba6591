"""Model registry: `get_model(name, ...)` for plain and BatchEnsemble nets."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from divdistill_jax.models import layers
from divdistill_jax.models.resnet import CifarResNet, PreActWideResNet

# name -> (family, keyword arguments). Explicit, so names are greppable.
_REGISTRY = {
    # Stem conv, BatchNorm, pooling and classifier only (no residual
    # blocks): the fastest-compiling network, for tests of the training steps.
    "resnet2_w4": (CifarResNet, dict(depth=2, width=4)),
    "resnet8": (CifarResNet, dict(depth=8)),
    # Half-width ResNet-8 (8/16/32 channels): the CPU quick start.
    "resnet8_w8": (CifarResNet, dict(depth=8, width=8)),
    "resnet14": (CifarResNet, dict(depth=14)),
    "resnet20": (CifarResNet, dict(depth=20)),
    "resnet32": (CifarResNet, dict(depth=32)),
    "resnet44": (CifarResNet, dict(depth=44)),
    "resnet56": (CifarResNet, dict(depth=56)),
    "wrn10x1": (PreActWideResNet, dict(depth=10, widen=1)),
    "wrn16x4": (PreActWideResNet, dict(depth=16, widen=4)),
    "wrn16x8": (PreActWideResNet, dict(depth=16, widen=8)),
    "wrn28x1": (PreActWideResNet, dict(depth=28, widen=1)),
    # The ICML 2022 follow-up's network (docs/SOURCES.md, Follow-up recipe).
    "wrn28x4": (PreActWideResNet, dict(depth=28, widen=4)),
    "wrn28x10": (PreActWideResNet, dict(depth=28, widen=10)),
}
MODEL_NAMES = tuple(_REGISTRY)

# ImageNet-free defaults; callers pass the dataset's constants.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.25, 0.25, 0.25)


def get_model(
    name: str,
    *,
    num_classes: int,
    ensemble_size: int | None = None,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    dtype: str = "float32",
    bn_group_size: int | None = None,
    fast_init_std: float = 0.5,
    bias_mode: str = "member",
    kernel_init: str = "fan_out_normal",
    bias_init: str = "uniform",
    bn_running_var: str = "unbiased",
    remat: str = "none",
    image_major: bool = False,
) -> nn.Module:
  """Builds a registered network.

  Args:
    name: one of `MODEL_NAMES`, e.g. 'resnet32', 'wrn28x10', 'wrn10x1'.
    num_classes: K, the number of logits.
    ensemble_size: None for the plain network (input [B, H, W, C], logits
      [B, K]); M for the BatchEnsemble variant (input [M, B, H, W, C], logits
      [M, B, K]).
    mean: per-channel pixel mean (its length is the channel count).
    std: per-channel pixel std.
    dtype: 'float32' or 'bfloat16' compute; parameters stay float32.
    bn_group_size: ghost-BN images per group (None = whole batch).
    fast_init_std: std of the N(1, std^2) BatchEnsemble fast-weight init
      (0 = all ones: LatentBE).
    bias_mode: BatchEnsemble classifier bias, 'member' (NeurIPS 2021) or
      'shared_before_s' (LatentBE); see `layers.BatchEnsembleDense`.
    kernel_init: 'fan_out_normal' (PyTorch recipe) or 'fan_in_truncated'
      (JAX's kaiming_normal, the follow-up's code); `layers.KERNEL_INITS`.
    bias_init: the plain classifier's bias, 'uniform' (PyTorch) or 'zeros'.
    bn_running_var: 'unbiased' (PyTorch) or 'biased' (giung2-jax) batch
      variance in the BatchNorm running statistics.
    remat: rematerialise every residual block in the backward pass:
      'none', 'full' (save only the block's input) or 'convs' (save the
      convolutions' outputs); `resnet.REMAT_POLICIES`.
    image_major: BatchEnsemble only: merge the member copies of the batch
      image-major in the convolutions (needed when the image axis is split
      over devices; `conv.merge_members`).

  Returns:
    A Linen module called as `model.apply(variables, x, train=...)`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; expected one of {MODEL_NAMES}.")
  family, kwargs = _REGISTRY[name]
  compute = jnp.dtype(dtype)
  norm = functools.partial(layers.BatchNorm, group_size=bn_group_size,
                           running_var=bn_running_var, dtype=compute)
  if ensemble_size is None:
    conv = functools.partial(layers.Conv, kernel_init=kernel_init,
                             dtype=compute)
    dense = functools.partial(layers.Dense, kernel_init=kernel_init,
                              bias_init=bias_init, dtype=compute)
  else:
    if ensemble_size < 1:
      raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}.")
    be = dict(ensemble_size=ensemble_size, fast_init_std=fast_init_std,
              kernel_init=kernel_init, dtype=compute)
    conv = functools.partial(layers.BatchEnsembleConv, image_major=image_major,
                             **be)
    dense = functools.partial(layers.BatchEnsembleDense, bias_mode=bias_mode,
                              **be)
  return family(num_classes=num_classes, conv=conv, dense=dense, norm=norm,
                mean=tuple(mean), std=tuple(std), remat=remat, **kwargs)
