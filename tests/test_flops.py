"""The analytic FLOP counter against hand-written formulas."""

import jax
import jax.numpy as jnp
import pytest

from divdistill_jax import flops


def _conv(x, k, stride):
  return jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


X = jax.ShapeDtypeStruct((8, 16, 16, 4), jnp.float32)
K = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_and_backward(stride):
  fwd = flops.count(lambda x, k: _conv(x, k, stride), X, K)
  out = 16 // stride
  assert fwd == 2 * 8 * out * out * 6 * (3 * 3 * 4)
  # Input and kernel gradients each cost one forward, strided or not.
  loss = lambda x, k: (_conv(x, k, stride) ** 2).sum()  # noqa: E731
  assert flops.count(jax.grad(loss, argnums=(0, 1)), X, K) == 3 * fwd
  # Three members with their own kernels (vmap -> grouped convolutions).
  xs = jax.ShapeDtypeStruct((3, *X.shape), jnp.float32)
  ks = jax.ShapeDtypeStruct((3, *K.shape), jnp.float32)
  assert flops.count(jax.vmap(jax.grad(loss, argnums=(0, 1))), xs,
                     ks) == 9 * fwd


def test_batch_grouped_conv():
  """batch_group_count (vmapped kernel gradients): G convs of B/G images."""
  groups, per_group = 4, 2
  lhs = jax.ShapeDtypeStruct((groups * per_group, 5, 5, 4), jnp.float32)
  rhs = jax.ShapeDtypeStruct((3, 3, 4, groups * 6), jnp.float32)
  got = flops.count(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      batch_group_count=groups), lhs, rhs)
  one_group = 2 * per_group * 5 * 5 * 6 * (3 * 3 * 4)
  assert got == groups * one_group


def test_matmul_scan_and_jit():
  a = jax.ShapeDtypeStruct((4, 5, 7), jnp.float32)
  b = jax.ShapeDtypeStruct((7, 3), jnp.float32)
  one = 2 * 4 * 5 * 7 * 3
  einsum = lambda a, b: jnp.einsum("mbf,fk->mbk", a, b)  # noqa: E731
  assert flops.count(einsum, a, b) == one
  assert flops.count(jax.jit(einsum), a, b) == one

  def looped(a, b):
    return jax.lax.fori_loop(0, 6, lambda i, acc: acc + einsum(a, b),
                             jnp.zeros((4, 5, 3)))

  assert flops.count(looped, a, b) == 6 * one
  # Elementwise work is not counted.
  assert flops.count(lambda a: jnp.tanh(a) * 2, a) == 0
