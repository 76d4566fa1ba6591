"""The NHWC convolution of every network, with a faster kernel gradient on CPU.

XLA:CPU computes a convolution's kernel gradient as a convolution whose
"kernel" is the whole output-gradient image and whose output is k x k. Its
library kernels are not made for that shape: at the CIFAR shapes it runs at
2 to 20 GFLOP/s, 10 to 25 times slower than the forward convolution
(experiments/BENCHMARKS.md, "CPU step"). The same sum,

  dW[i, j, c, d] = sum_{n, h, w} x_pad[n, s h + i, s w + j, c] g[n, h, w, d],

is k * k matrix products [C, N H W] x [N H W, D], one per kernel tap. On CPU
`conv2d` computes it that way (for inputs of MATMUL_MIN_BYTES or more),
streamed over chunks of images small enough to stay in cache; on every
other platform, and for the forward pass and the input gradient
everywhere, it is XLA's own convolution. Only the order of the float
additions differs (tests/test_conv.py).

`compiler_options()` gives the jitted steps and predictions on a CPU
XLA's Eigen convolutions instead of YNNPACK's, which are slower at our
shapes (the same convolutions, another library's rounding).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

# Input bytes of the images one matrix-product chunk reads: a chunk's taps
# then stay in the 1 MiB L2 cache of a CPU core.
CHUNK_BYTES = 512 * 1024
# Below this many input bytes a convolution keeps XLA's kernel gradient:
# the gain is small there (experiments/BENCHMARKS.md) and the unrolled taps
# cost compile time, which small programs (tests, smoke runs) are made of.
MATMUL_MIN_BYTES = 1 << 20
# How the kernel gradient is computed on CPU, read when a step is traced:
# 'auto' (ours from MATMUL_MIN_BYTES of input up), 'matmul' (always ours)
# or 'xla' (never; the benchmark's before/after). Set with `cpu_kernel_grad`.
CPU_KERNEL_GRADS = ("auto", "matmul", "xla")
_CPU_KERNEL_GRAD = ["auto"]
# XLA:CPU (jaxlib 0.10) hands matrix products, reductions and convolutions
# (those with 32 channels or more, in our tests) to YNNPACK. At the
# ResNet-32 stage-2 and stage-3 shapes (512 images) its convolutions took
# 25-28 ms where XLA's Eigen convolutions took 14-15 ms, the strided one
# 38-40 against 10-16 ms (experiments/BENCHMARKS.md, "CPU step"). The
# programs that run a network keep YNNPACK for the other two only.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """`jax.jit` compiler options for the programs that run a network.

  `CPU_COMPILER_OPTIONS` when the default backend is the CPU and its XLA
  knows the option (it is experimental: another jaxlib may not); None, XLA's
  defaults, otherwise. Call it after `jax.distributed.initialize`: it
  starts the backend.
  """
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:
    return None
  return CPU_COMPILER_OPTIONS


@contextlib.contextmanager
def cpu_kernel_grad(how: str):
  """Traces steps inside the block with the CPU kernel gradient `how`.

  It applies to functions traced in the block: a jitted function traced
  before keeps the gradient it was traced with.
  """
  if how not in CPU_KERNEL_GRADS:
    raise ValueError(f"Unknown CPU kernel gradient {how!r}; use one of "
                     f"{CPU_KERNEL_GRADS}.")
  before = _CPU_KERNEL_GRAD[0]
  _CPU_KERNEL_GRAD[0] = how
  try:
    yield
  finally:
    _CPU_KERNEL_GRAD[0] = before


def _conv(x: jax.Array, kernel: jax.Array, strides: int,
          padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def num_chunks(images: int, bytes_per_image: int,
               chunk_bytes: int = CHUNK_BYTES) -> int:
  """The fewest chunks, dividing `images`, of at most `chunk_bytes` each.

  One image per chunk when a single image is already larger.
  """
  want = min(max(-(-images * bytes_per_image // chunk_bytes), 1), images)
  return next(n for n in range(want, images + 1) if images % n == 0)


def kernel_grad_by_matmul(x: jax.Array, g: jax.Array, kernel_size: int,
                          strides: int, padding: int,
                          chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """The kernel gradient of `_conv` as k * k matrix products per chunk.

  Chunk j holds images j, j + n, j + 2n, ... (n chunks): when the image axis
  is split over devices every device keeps its own images in every chunk.

  Args:
    x: the convolution's input [N, H, W, C].
    g: the gradient of its output [N, H', W', D].
    kernel_size: k (square kernels).
    strides: s.
    padding: symmetric zero padding p.
    chunk_bytes: input bytes per chunk.

  Returns:
    dL/dW [k, k, C, D] in float32.
  """
  b, h, w, c = x.shape
  _, ho, wo, d = g.shape
  k, s, p = kernel_size, strides, padding
  n = num_chunks(b, h * w * c * x.dtype.itemsize, chunk_bytes)

  def chunk(j, acc):
    # Reshaped inside the loop: outside it the reshape is a fusible
    # consumer of x, and XLA:CPU then computes x (a BatchEnsemble input
    # x * r and the chain before it) a second time in the chunk layout
    # (bytes accessed by a ResNet-32 KD step, XLA's cost model: 31.5 ->
    # 29.3 GB; its time did not change beyond the VM's spread).
    xs = x.reshape(b // n, n, h, w, c)
    gs = g.reshape(b // n, n, ho, wo, d)
    xc = jax.lax.dynamic_index_in_dim(xs, j, axis=1, keepdims=False)
    gc = jax.lax.dynamic_index_in_dim(gs, j, axis=1, keepdims=False)
    xp = jnp.pad(xc, ((0, 0), (p, p), (p, p), (0, 0)))
    gm = gc.reshape(-1, d)
    taps = [xp[:, i:i + s * (ho - 1) + 1:s, t:t + s * (wo - 1) + 1:s, :]
            for i in range(k) for t in range(k)]
    prods = [jnp.dot(tap.reshape(-1, c).T, gm,
                     preferred_element_type=jnp.float32) for tap in taps]
    return acc + jnp.stack(prods).reshape(k, k, c, d)

  return jax.lax.fori_loop(0, n, chunk, jnp.zeros((k, k, c, d), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: int,
           padding: int) -> jax.Array:
  """NHWC x HWIO convolution with symmetric padding; x, kernel same dtype.

  Args:
    x: [N, H, W, C].
    kernel: [k, k, C, D].
    strides: s.
    padding: p on each side of H and W.

  Returns:
    [N, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, D].
  """
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  # Which inputs are differentiated: a gradient nobody asked for (the
  # kernel's in a perturbation step, the images' in a training step) is
  # never built, so it cannot cost time or count as FLOPs.
  need = (x.perturbed, kernel.perturbed)
  return _conv(x.value, kernel.value, strides, padding), (x.value,
                                                          kernel.value, need)


def _transpose(linear, like: jax.Array, g: jax.Array) -> jax.Array:
  """The gradient of the linear map `linear` at an input shaped `like`."""
  return jax.linear_transpose(
      linear, jax.ShapeDtypeStruct(like.shape, like.dtype))(g)[0]


def _conv2d_bwd(strides, padding, res, g):
  x, kernel, (need_x, need_kernel) = res
  if type(g) is jax.custom_derivatives.SymbolicZero:  # pylint: disable=unidiomatic-typecheck
    return None, None
  dx = (_transpose(lambda v: _conv(v, kernel, strides, padding), x, g)
        if need_x else None)
  if not need_kernel:
    return dx, None

  def native(x, g):
    return _transpose(lambda w: _conv(x, w, strides, padding), kernel, g)

  def by_matmul(x, g):
    return kernel_grad_by_matmul(x, g, kernel.shape[0], strides,
                                 padding).astype(kernel.dtype)

  how = _CPU_KERNEL_GRAD[0]
  if how == "xla" or (how == "auto"
                      and x.size * x.dtype.itemsize < MATMUL_MIN_BYTES):
    return dx, native(x, g)
  dw = jax.lax.platform_dependent(x, g, cpu=by_matmul, default=native)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd, symbolic_zeros=True)
