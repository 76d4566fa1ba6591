"""The NHWC convolution of every network, with a faster kernel gradient on CPU.

XLA:CPU computes a convolution's kernel gradient as a convolution whose
"kernel" is the whole output-gradient image and whose output is k x k. Its
library kernels are not made for that shape: at the CIFAR shapes it runs at
2 to 20 GFLOP/s, 10 to 25 times slower than the forward convolution
(experiments/BENCHMARKS.md, "CPU step"). The same sum,

  dW[i, j, c, d] = sum_{n, h, w} x_pad[n, s h + i, s w + j, c] g[n, h, w, d],

is matrix products over chunks of images small enough to stay in cache
(`kernel_grads_by_matmul`). On CPU `conv2d` computes it that way (for
inputs of MATMUL_MIN_BYTES or more); on every other platform, and for the
forward pass and the input gradient everywhere, it is XLA's own
convolution. Only the order of the float additions differs
(tests/test_conv.py).

`batch_ensemble_conv2d` is the BatchEnsemble convolution with its gradient
written out: on a CPU the fast weights' gradients come from per-member
kernel gradients (`kernel_grads_by_matmul`), kernel-sized sums instead of
autodiff's activation-sized products.

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
# Part of jit's cache key: a jitted step traced under one is traced again
# under another.
CPU_KERNEL_GRADS = ("auto", "matmul", "xla")
_CPU_KERNEL_GRAD = jax.make_user_context("auto")
# XLA:CPU (jaxlib 0.10) hands matrix products, reductions and convolutions
# (those with 32 channels or more, in our tests) to YNNPACK. At the
# ResNet-32 stage-2 and stage-3 shapes (512 images) its convolutions took
# 25-28 ms where XLA's Eigen convolutions took 14-15 ms, the strided one
# 38-40 against 10-16 ms (experiments/BENCHMARKS.md, "CPU step"). The
# programs that run a network keep YNNPACK for the other two only. A
# reduction's YNNPACK fusion still takes in the chain of single-use
# operations before it: in an eval-mode forward (the teachers' targets, a
# prediction) the global average pool takes in ResNet-32's last four
# convolutions, measured no slower there than XLA's own.
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
  """Runs steps inside the block with the CPU kernel gradient `how`.

  The setting is part of jit's cache key: a jitted function called in the
  block is traced again if it was traced under another setting.
  """
  if how not in CPU_KERNEL_GRADS:
    raise ValueError(f"Unknown CPU kernel gradient {how!r}; use one of "
                     f"{CPU_KERNEL_GRADS}.")
  with _CPU_KERNEL_GRAD(how):
    yield


def _xla_kernel_grad(input_bytes: int) -> bool:
  """Whether a convolution with `input_bytes` of input keeps XLA's kernel
  gradient on every platform, as `cpu_kernel_grad` and MATMUL_MIN_BYTES
  say (read when the step is traced)."""
  how = _CPU_KERNEL_GRAD.value
  return how == "xla" or (how == "auto" and input_bytes < MATMUL_MIN_BYTES)


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


def _chunk_kernel_grad(xc: jax.Array, gc: jax.Array, k: int, s: int,
                       p: int) -> jax.Array:
  """A chunk's kernel gradient in one matrix product per row phase.

  Kernel tap (i, t) pairs padded input pixel (s h + i, s w + t) with output
  pixel (h, w). The column shifts t go on the input, k strided copies side
  by side: X[n, r, w, (t, c)] = x_pad[n, r, s w + t, c]. The row shifts go
  on the gradient: with i = s q + f and u = h + q,

    dW[s q + f, t, c, d] = sum_{n, u, w} X[n, s u + f, w, (t, c)]
                                         g[n, u - q, w, d]

  (g zero outside its rows), so each row phase f < s is one product
  [k C, R] x [R, Q D] of the input's rows s u + f and Q row-shifted
  copies of g side by side. A stride-1 convolution is one product
  [k C, R] x [R, k D]: 2 k copies of the chunk instead of k * k tap
  copies, and products k times wider than one per tap, a shape XLA:CPU's
  matrix products run about twice as fast (experiments/BENCHMARKS.md,
  "CPU step"). The rows of padding a phase adds are multiplied too.

  Args:
    xc: the chunk's input [N, H, W, C].
    gc: its output gradient [N, H', W', D].
    k, s, p: kernel size, stride, padding.

  Returns:
    [k, k, C, D] in float32.
  """
  c, d = xc.shape[-1], gc.shape[-1]
  _, ho, wo, _ = gc.shape
  xp = jnp.pad(xc, ((0, 0), (p, p), (p, p), (0, 0)))
  cols = jnp.concatenate([xp[:, :, t:t + s * (wo - 1) + 1:s] for t in range(k)],
                         axis=-1)
  taps = [None] * k
  for f in range(min(s, k)):
    shifts = -(-(k - f) // s)  # the q with s q + f < k
    rows = ho + shifts - 1  # the u that meet some row of g
    xf = cols[:, f:f + s * (rows - 1) + 1:s]
    # Rows past the padded input meet only g's zero rows.
    xf = jnp.pad(xf, ((0, 0), (0, rows - xf.shape[1]), (0, 0), (0, 0)))
    gp = jnp.pad(gc, ((0, 0), (shifts - 1, shifts - 1), (0, 0), (0, 0)))
    gq = jnp.concatenate([gp[:, shifts - 1 - q:shifts - 1 - q + rows]
                          for q in range(shifts)], axis=-1)
    prod = jax.lax.dot_general(xf.reshape(-1, k * c),
                               gq.reshape(-1, shifts * d),
                               (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
    prod = prod.reshape(k, c, shifts, d)
    for q in range(shifts):
      taps[s * q + f] = prod[:, :, q]  # [t, c, d] of row tap s q + f
  return jnp.stack(taps)


def kernel_grads_by_matmul(x: jax.Array, g: jax.Array, kernel_size: int,
                           strides: int, padding: int,
                           chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """Per-member kernel gradients of `_conv` as matrix products.

  Member m's gradient sums over its own images only. Each loop step takes
  one chunk of one member: chunk j of member m holds its images j, j + n,
  j + 2n, ... (n chunks per member), so when the image axis is split over
  devices every device keeps its own images in every chunk. A chunk's sum
  is `_chunk_kernel_grad`.

  Args:
    x: the convolution's input [M, B, H, W, C].
    g: the gradient of its output [M, B, H', W', D].
    kernel_size: k (square kernels).
    strides: s.
    padding: symmetric zero padding p.
    chunk_bytes: input bytes per chunk.

  Returns:
    dL/dW of each member's images [M, k, k, C, D] in float32.
  """
  m, b, h, w, c = x.shape
  _, _, ho, wo, d = g.shape
  k, s, p = kernel_size, strides, padding
  n = num_chunks(b, h * w * c * x.dtype.itemsize, chunk_bytes)

  def chunk(step, acc):
    # One member (a plain convolution's gradient) keeps the plain loop:
    # no member index, no per-member slice of the sum.
    member, j = (0, step) if m == 1 else (step // n, step % n)
    # Reshaped inside the loop: outside it the reshape is a fusible
    # consumer of x, and XLA:CPU then computes x (a BatchEnsemble input
    # x * r and the chain before it) a second time in the chunk layout
    # (bytes accessed by a ResNet-32 KD step, XLA's cost model: 31.5 ->
    # 29.3 GB; its time did not change beyond the VM's spread).
    xc = jax.lax.dynamic_slice(x.reshape(m, b // n, n, h, w, c),
                               (member, 0, j, 0, 0, 0),
                               (1, b // n, 1, h, w, c))
    gc = jax.lax.dynamic_slice(g.reshape(m, b // n, n, ho, wo, d),
                               (member, 0, j, 0, 0, 0),
                               (1, b // n, 1, ho, wo, d))
    xc, gc = xc.reshape(b // n, h, w, c), gc.reshape(b // n, ho, wo, d)
    update = _chunk_kernel_grad(xc, gc, k, s, p)[None]
    if m == 1:
      return acc + update
    start = (member, 0, 0, 0, 0)
    total = jax.lax.dynamic_slice(acc, start, (1, k, k, c, d)) + update
    return jax.lax.dynamic_update_slice(acc, total, start)

  return jax.lax.fori_loop(0, m * n, chunk,
                           jnp.zeros((m, k, k, c, d), jnp.float32))


def kernel_grad_by_matmul(x: jax.Array, g: jax.Array, kernel_size: int,
                          strides: int, padding: int,
                          chunk_bytes: int = CHUNK_BYTES) -> jax.Array:
  """The kernel gradient of `_conv` over all images [N, H, W, C] of `x`
  (gradient `g` [N, H', W', D]): `kernel_grads_by_matmul` of one member,
  [k, k, C, D] in float32."""
  return kernel_grads_by_matmul(x[None], g[None], kernel_size, strides,
                                padding, chunk_bytes)[0]


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

  if _xla_kernel_grad(x.size * x.dtype.itemsize):
    return dx, native(x, g)
  dw = jax.lax.platform_dependent(x, g, cpu=by_matmul, default=native)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd, symbolic_zeros=True)


def merge_members(x: jax.Array, image_major: bool) -> jax.Array:
  """[..., B, H, W, C] -> [N, H, W, C], one batch for one convolution.

  With `image_major` (two leading axes [M, B]), the members' copies are
  merged as [B * M]: when the image axis B is split over devices only a
  merge that keeps it major keeps each device's images on it (a
  member-major [M * B] merge is not a tiling of the devices' shares, and
  XLA gathers the whole batch onto every device). On one device the
  member-major merge is faster on a CPU (experiments/BENCHMARKS.md), so it
  is the default there.
  """
  if image_major and x.ndim == 5:
    x = jnp.swapaxes(x, 0, 1)
  return x.reshape((-1, *x.shape[-3:]))


def split_members(y: jax.Array, lead: tuple[int, ...],
                  image_major: bool) -> jax.Array:
  """The inverse of `merge_members` for the output [N, H', W', D]."""
  if image_major and len(lead) == 2:
    return jnp.swapaxes(y.reshape((lead[1], lead[0], *y.shape[1:])), 0, 1)
  return y.reshape((*lead, *y.shape[1:]))


def _members_conv(x, kernel, strides, padding, dtype, image_major):
  """`_conv` of [M, B, H, W, C] in `dtype`, the members merged."""
  y = _conv(merge_members(x, image_major).astype(dtype),
            kernel.astype(dtype), strides, padding)
  return split_members(y, x.shape[:2], image_major)


def _per_member(v: jax.Array) -> jax.Array:
  """[M, F] -> [M, 1, 1, 1, F], to scale [M, B, H, W, F]."""
  return v[:, None, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def batch_ensemble_conv2d(x: jax.Array, kernel: jax.Array, r: jax.Array,
                          s: jax.Array, strides: int, padding: int,
                          dtype, image_major: bool = False) -> jax.Array:
  """BatchEnsemble convolution ((x * r_m) conv W) * s_m of every member m.

  Its gradient is written out. Autodiff takes the fast weights' gradients
  from two activation-sized products per convolution, sum(x * dL/d(x r_m))
  for r and sum(g * ((x r_m) conv W)) for s. All three weight gradients
  are linear in the per-member kernel gradient K_m = sum over member m's
  images of the input tap times g (the kernel gradient of the unscaled
  convolution x conv W, member by member):

    dW = sum_m r_m s_m K_m
    dr_m[c] = sum_{i, j, d} W[i, j, c, d] s_m[d] K_m[i, j, c, d]
    ds_m[d] = sum_{i, j, c} W[i, j, c, d] r_m[c] K_m[i, j, c, d]

  On a CPU, where the kernel gradient is ours (`kernel_grads_by_matmul`;
  see `conv2d`), they are computed that way: kernel-sized sums instead of
  activation-sized ones (experiments/BENCHMARKS.md, "CPU step"). On other
  platforms, and on a CPU where XLA's kernel gradient is used, the
  gradient is autodiff's, written out: the same operations.

  Args:
    x: [M, B, H, W, C], any float dtype (cast to `dtype` after x * r).
    kernel: [k, k, C, D] float32.
    r: [M, C] float32.
    s: [M, D] float32.
    strides: s.
    padding: p on each side of H and W.
    dtype: the convolution's dtype.
    image_major: merge the members' copies image-major (`merge_members`).

  Returns:
    [M, B, H', W', D] in `dtype`.
  """
  return _batch_ensemble_forward(x, kernel, r, s, strides, padding, dtype,
                                 image_major)[0]


def _batch_ensemble_forward(x, kernel, r, s, strides, padding, dtype,
                            image_major):
  y0 = _members_conv(x * _per_member(r).astype(x.dtype), kernel, strides,
                     padding, dtype, image_major)
  return y0 * _per_member(s).astype(dtype), y0


def _batch_ensemble_fwd(x, kernel, r, s, strides, padding, dtype,
                        image_major):
  need = tuple(v.perturbed for v in (x, kernel, r, s))
  x, kernel, r, s = x.value, kernel.value, r.value, s.value
  y, y0 = _batch_ensemble_forward(x, kernel, r, s, strides, padding, dtype,
                                  image_major)
  return y, (x, kernel, r, s, y0, need)


def _batch_ensemble_bwd(strides, padding, dtype, image_major, res, g):
  x, kernel, r, s, y0, (need_x, need_w, need_r, need_s) = res
  if type(g) is jax.custom_derivatives.SymbolicZero:  # pylint: disable=unidiomatic-typecheck
    return None, None, None, None
  rx = _per_member(r).astype(x.dtype)
  g_y0 = g * _per_member(s).astype(dtype)

  def input_grad():
    """dL/d(x r_m) in x.dtype."""
    return _transpose(lambda v: _members_conv(v, kernel, strides, padding,
                                              dtype, image_major),
                      x, g_y0)

  def from_member_grads():
    grads = kernel_grads_by_matmul(x.astype(dtype), g, kernel.shape[0],
                                   strides, padding)
    # The values the forward pass multiplied by.
    w32, r32, s32 = (v.astype(t).astype(jnp.float32) for v, t in
                     ((kernel, dtype), (r, x.dtype), (s, dtype)))
    return (input_grad() * rx if need_x else None,
            jnp.einsum("mijcd,mc,md->ijcd", grads, r32, s32) if need_w
            else None,
            jnp.einsum("mijcd,ijcd,md->mc", grads, w32, s32) if need_r
            else None,
            jnp.einsum("mijcd,ijcd,mc->md", grads, w32, r32) if need_s
            else None)

  def autodiff():
    x_scaled = x * rx
    dx_scaled = input_grad() if need_x or need_r else None
    return (
        dx_scaled * rx if need_x else None,
        _transpose(lambda w: _members_conv(x_scaled, w, strides, padding,
                                           dtype, image_major),
                   kernel, g_y0) if need_w else None,
        (dx_scaled * x).sum((1, 2, 3)).astype(jnp.float32) if need_r
        else None,
        (g * y0).sum((1, 2, 3)).astype(jnp.float32) if need_s else None)

  if not (need_w or need_r or need_s):
    return (input_grad() * rx if need_x else None), None, None, None
  if _xla_kernel_grad(x.size * jnp.dtype(dtype).itemsize):
    return autodiff()
  return jax.lax.platform_dependent(cpu=from_member_grads, default=autodiff)


batch_ensemble_conv2d.defvjp(_batch_ensemble_fwd, _batch_ensemble_bwd,
                             symbolic_zeros=True)
