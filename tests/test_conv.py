"""The convolution's CPU kernel gradient against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec

from divdistill_jax import parallel
from divdistill_jax.models import conv


def _xla_conv(x, w, s, p):
  return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO",
                                                         "NHWC"))


def _numpy_kernel_grad(x, g, k, s, p):
  """dW[i, j] = sum over images and output pixels, by its definition."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  _, ho, wo, _ = g.shape
  dw = np.zeros((k, k, x.shape[-1], g.shape[-1]))
  for i in range(k):
    for j in range(k):
      for oh in range(ho):
        for ow in range(wo):
          dw[i, j] += xp[:, s * oh + i, s * ow + j, :].T @ g[:, oh, ow, :]
  return dw


CASES = [  # images, size, C, D, k, stride, padding
    (6, 9, 3, 5, 3, 1, 1),
    (8, 8, 4, 6, 3, 2, 1),
    (4, 8, 4, 6, 1, 2, 0),
    (5, 7, 2, 3, 3, 1, 0),
    (3, 6, 2, 3, 5, 1, 2),
    (4, 5, 3, 2, 1, 1, 0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_images", [1, 2, 100])
def test_kernel_grad_by_matmul_is_the_definition(case, chunk_images):
  b, h, c, d, k, s, p = case
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, h, h, c)).astype(np.float32)
  ho = (h + 2 * p - k) // s + 1
  g = rng.normal(size=(b, ho, ho, d)).astype(np.float32)
  got = conv.kernel_grad_by_matmul(jnp.asarray(x), jnp.asarray(g), k, s, p,
                                   chunk_bytes=chunk_images * h * h * c * 4)
  np.testing.assert_allclose(got, _numpy_kernel_grad(x, g, k, s, p),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 1, 0), (3, 1, 2), (2, 1, 1),
                                   (3, 2, 1), (3, 2, 0), (4, 2, 1), (5, 3, 2),
                                   (2, 3, 1), (1, 2, 0)])
def test_kernel_grads_of_non_square_images_are_the_definition(k, s, p):
  # Rows and columns are shifted differently (the columns on the input, the
  # rows on the gradient, per row phase of the stride): square images
  # would not tell a swapped axis.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 4, 8, 11, 3)).astype(np.float32)
  ho, wo = (8 + 2 * p - k) // s + 1, (11 + 2 * p - k) // s + 1
  g = rng.normal(size=(2, 4, ho, wo, 2)).astype(np.float32)
  got = conv.kernel_grads_by_matmul(jnp.asarray(x), jnp.asarray(g), k, s, p,
                                    chunk_bytes=2 * 8 * 11 * 3 * 4)
  for m in range(2):
    np.testing.assert_allclose(got[m], _numpy_kernel_grad(x[m], g[m], k, s, p),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("images,per_image,budget,want", [
    (8, 10, 80, 1), (8, 10, 40, 2), (8, 10, 30, 4), (6, 10, 25, 3),
    (7, 10, 30, 7), (5, 100, 10, 5)])
def test_num_chunks_divides_and_fits(images, per_image, budget, want):
  n = conv.num_chunks(images, per_image, budget)
  assert n == want and images % n == 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_conv2d_gradients_equal_xlas_on_cpu(case, dtype, tol):
  """bfloat16: both within bfloat16 rounding of a float32 computation on the
  same (rounded) inputs; ours accumulates in float32."""
  b, h, c, d, k, s, p = case
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(b, h, h, c)), dtype)
  w = jnp.asarray(rng.normal(size=(k, k, c, d)) / k, dtype)

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w, s, p).astype(jnp.float32)))

  with conv.cpu_kernel_grad("matmul"):
    ours = jax.jit(jax.value_and_grad(loss(conv.conv2d), (0, 1)))(x, w)
  xla = jax.value_and_grad(loss(_xla_conv), (0, 1))(x, w)
  exact = jax.value_and_grad(loss(_xla_conv), (0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32))
  for a, b, r in zip(*map(jax.tree.leaves, (ours, xla, exact))):
    assert a.dtype == b.dtype
    scale = tol * max(float(jnp.abs(r).max()), 1.0)
    for got in (a, b):
      np.testing.assert_allclose(np.asarray(got, np.float32), r, rtol=tol,
                                 atol=scale)


def _hlo(fn, *args, platform=None):
  if platform is None:
    return jax.jit(fn).lower(*args).as_text()
  return export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def test_the_matmul_gradient_runs_on_cpu_only_and_only_when_asked():
  # 1 MiB of input: 'auto' takes the matrix products.
  x = jnp.ones((32, 32, 32, 8))
  assert x.nbytes == conv.MATMUL_MIN_BYTES
  w = jnp.ones((3, 3, 8, 5))

  def loss(x, w):
    return conv.conv2d(x, w, 1, 1).sum()

  kernel_grad = jax.grad(loss, 1)
  # On CPU the kernel gradient is the chunk loop of matrix products, and a
  # gradient of the images alone builds no loop at all.
  assert "while" in _hlo(kernel_grad, x, w)
  assert "while" not in _hlo(jax.grad(loss, 0), x, w)
  # Smaller inputs keep XLA's.
  assert "while" not in _hlo(kernel_grad, x[:31], w)
  # Elsewhere it is XLA's convolution.
  for platform in ("cuda", "tpu"):
    text = _hlo(kernel_grad, x, w, platform=platform)
    assert "while" not in text and "convolution" in text


def test_conv2d_gradients_on_a_batch_split_over_devices():
  mesh = parallel.make_mesh(2)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(jnp.tanh(f(x, w, 2, 1)))

  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  with conv.cpu_kernel_grad("matmul"):
    ours = jax.jit(jax.grad(loss(conv.conv2d), (0, 1)))(xs, w)
  ref = jax.grad(loss(_xla_conv), (0, 1))(x, w)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_cpu_kernel_grad_xla_is_xlas_convolution():
  x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5))

  def kernel_grad(x, w):
    return jax.grad(lambda x, w: conv.conv2d(x, w, 1, 1).sum(), 1)(x, w)

  with conv.cpu_kernel_grad("xla"):
    text = _hlo(kernel_grad, x, w)
  assert "while" not in text and "convolution" in text
  with conv.cpu_kernel_grad("matmul"):
    assert "while" in _hlo(kernel_grad, x, w)
  with pytest.raises(ValueError, match="Unknown CPU kernel gradient"):
    with conv.cpu_kernel_grad("im2col"):
      pass


def test_one_jitted_function_follows_the_kernel_gradient_setting():
  # The setting is part of jit's cache key: the same jitted function is
  # traced again under another one (the benchmark counts FLOPs under 'xla'
  # and then times the step under the case's setting).
  x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  kernel_grad = jax.jit(jax.grad(lambda x, w: conv.conv2d(x, w, 1, 1).sum(),
                                 1))
  with conv.cpu_kernel_grad("xla"):
    assert "while" not in kernel_grad.lower(x, w).as_text()
  with conv.cpu_kernel_grad("matmul"):
    assert "while" in kernel_grad.lower(x, w).as_text()
    kernel_grad(x, w)
  with conv.cpu_kernel_grad("xla"):
    assert "while" not in kernel_grad.lower(x, w).as_text()


def test_a_batchensemble_network_has_the_same_gradient_either_way():
  """The matrix-product kernel gradient inside a network (member scalings,
  BatchNorm in training mode) equals XLA's; strides are tested above."""
  from divdistill_jax import models  # pylint: disable=g-import-not-at-top
  net = models.get_model("resnet2_w4", num_classes=5, ensemble_size=2)
  x = jax.random.uniform(jax.random.key(0), (2, 4, 16, 16, 3))
  variables = net.init(jax.random.key(1), x)

  def grads():
    def loss(params):
      logits, _ = net.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.grad(loss))(variables["params"])

  with conv.cpu_kernel_grad("matmul"):
    ours = grads()
  with conv.cpu_kernel_grad("xla"):
    ref = grads()
  flat = jax.tree.leaves_with_path(ref)
  assert any("kernel" in jax.tree_util.keystr(p) for p, _ in flat)
  for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    scale = max(float(jnp.abs(r).max()), 1e-6)
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * scale)


def test_cpu_compiler_options_take_convolutions_off_ynnpack_and_keep_numbers():
  options = conv.compiler_options()
  assert options == conv.CPU_COMPILER_OPTIONS  # the pinned jaxlib knows it
  # 32 output channels: the pinned XLA:CPU gives such convolutions to
  # YNNPACK by default.
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 32))

  def f(x, w):  # a forward and an input-gradient convolution
    y, vjp = jax.vjp(lambda v: _xla_conv(v, w, 1, 1), x)
    return y, vjp(jnp.ones_like(y))[0]

  with_options = jax.jit(f, compiler_options=options)
  entry = with_options.lower(x, w).compile().as_text().split("ENTRY")[1]
  assert entry.count(" convolution(") == 2
  assert "ynn" not in entry
  for got, want in zip(with_options(x, w), jax.jit(f)(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_cpu_compiler_options_fall_back_when_xla_lacks_them(monkeypatch):
  monkeypatch.setattr(conv, "CPU_COMPILER_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
  conv.compiler_options.cache_clear()
  try:
    assert conv.compiler_options() is None
  finally:
    conv.compiler_options.cache_clear()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_images", [1, 2, 100])
def test_kernel_grads_by_matmul_sum_each_members_own_images(case,
                                                            chunk_images):
  b, h, c, d, k, s, p = case
  members = 3
  rng = np.random.default_rng(3)
  x = rng.normal(size=(members, b, h, h, c)).astype(np.float32)
  ho = (h + 2 * p - k) // s + 1
  g = rng.normal(size=(members, b, ho, ho, d)).astype(np.float32)
  got = conv.kernel_grads_by_matmul(jnp.asarray(x), jnp.asarray(g), k, s, p,
                                    chunk_bytes=chunk_images * h * h * c * 4)
  assert got.shape == (members, k, k, c, d)
  for m in range(members):
    np.testing.assert_allclose(got[m], _numpy_kernel_grad(x[m], g[m], k, s,
                                                          p),
                               rtol=1e-5, atol=1e-4)


def _member_loop_batch_ensemble(x, w, r, s, stride, padding):
  """((x_m * r_m) conv W) * s_m, one member at a time."""
  return jnp.stack([
      _xla_conv(x[m] * r[m], w, stride, padding) * s[m]
      for m in range(x.shape[0])])


def _batch_ensemble_inputs(rng, members, case, dtype=jnp.float32):
  b, h, c, d, k, _, _ = case
  return (jnp.asarray(rng.normal(size=(members, b, h, h, c)), dtype),
          jnp.asarray(rng.normal(size=(k, k, c, d)) / k, jnp.float32),
          jnp.asarray(1 + 0.5 * rng.normal(size=(members, c)), jnp.float32),
          jnp.asarray(1 + 0.5 * rng.normal(size=(members, d)), jnp.float32))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["matmul", "xla"])
@pytest.mark.parametrize("image_major", [False, True])
def test_batch_ensemble_conv2d_and_its_gradients_are_the_member_loops(
    case, how, image_major):
  """'matmul': the fast weights' gradients from per-member kernel
  gradients; 'xla': autodiff's operations, written out."""
  _, _, _, _, _, s, p = case
  rng = np.random.default_rng(4)
  args = _batch_ensemble_inputs(rng, 3, case)

  def loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)))

  def ours(x, w, r, s_):
    return conv.batch_ensemble_conv2d(x, w, r, s_, s, p, jnp.float32,
                                      image_major)

  def ref(x, w, r, s_):
    return _member_loop_batch_ensemble(x, w, r, s_, s, p)

  np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5, atol=1e-5)
  with conv.cpu_kernel_grad(how):
    got = jax.jit(jax.grad(loss(ours), (0, 1, 2, 3)))(*args)
  want = jax.grad(loss(ref), (0, 1, 2, 3))(*args)
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-4 * max(float(jnp.abs(b).max()), 1))


@pytest.mark.parametrize("how", ["matmul", "xla"])
def test_batch_ensemble_conv2d_in_bfloat16(how):
  """Within bfloat16 rounding of the float32 member loop on the same
  (rounded) images; the gradients come back in their inputs' dtypes."""
  case = CASES[1]
  _, _, _, _, _, s, p = case
  rng = np.random.default_rng(5)
  x, w, r, s_ = _batch_ensemble_inputs(rng, 2, case, jnp.bfloat16)

  def loss(x, w, r, s_):
    y = conv.batch_ensemble_conv2d(x, w, r, s_, s, p, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  with conv.cpu_kernel_grad(how):
    got = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(x, w, r, s_)
  want = jax.grad(
      lambda *a: jnp.sum(jnp.sin(_member_loop_batch_ensemble(*a, s, p))),
      (0, 1, 2, 3))(x.astype(jnp.float32), w, r, s_)
  for a, b in zip(got, want):
    assert a.dtype == (jnp.bfloat16 if a.shape == x.shape else jnp.float32)
    scale = 3e-2 * max(float(jnp.abs(b).max()), 1.0)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=3e-2,
                               atol=scale)


def test_batch_ensemble_gradients_take_member_kernel_grads_on_cpu_only():
  # 1 MiB of input: 'auto' takes the per-member matrix products.
  x = jnp.ones((4, 8, 32, 32, 8))
  assert x.nbytes == conv.MATMUL_MIN_BYTES
  w, r, s = jnp.ones((3, 3, 8, 5)), jnp.ones((4, 8)), jnp.ones((4, 5))

  def loss(x, w, r, s):
    return jnp.sin(conv.batch_ensemble_conv2d(x, w, r, s, 1, 1,
                                              jnp.float32)).sum()

  def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()

  weights = jax.grad(loss, (1, 2, 3))
  # On CPU: the forward convolution and the chunk loop; neither r's
  # activation-sized input gradient nor XLA's kernel gradient.
  text = compiled(weights, x, w, r, s)
  assert text.count(" convolution(") == 1 and text.count(" while(") == 1
  # The images' gradient alone (a perturbation step) builds no loop.
  text = compiled(jax.grad(loss), x, w, r, s)
  assert text.count(" convolution(") == 2 and " while(" not in text
  # Smaller inputs keep autodiff's operations: three convolutions.
  text = compiled(weights, x[:, :7], w, r, s)
  assert text.count(" convolution(") == 3 and " while(" not in text
  for platform in ("cuda", "tpu"):
    text = _hlo(weights, x, w, r, s, platform=platform)
    assert "while" not in text
    assert text.count("stablehlo.convolution") == 3


def test_batch_ensemble_conv2d_on_a_batch_split_over_devices():
  mesh = parallel.make_mesh(2)
  case = (4, 8, 4, 6, 3, 2, 1)
  rng = np.random.default_rng(6)
  x, w, r, s = _batch_ensemble_inputs(rng, 2, case)

  def loss(x, w, r, s):
    y = conv.batch_ensemble_conv2d(x, w, r, s, 2, 1, jnp.float32, True)
    return jnp.sum(jnp.tanh(y))

  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "data")))
  with conv.cpu_kernel_grad("matmul"):
    got = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(xs, w, r, s)
  want = jax.grad(
      lambda *a: jnp.sum(jnp.tanh(_member_loop_batch_ensemble(*a, 2, 1))),
      (0, 1, 2, 3))(x, w, r, s)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
