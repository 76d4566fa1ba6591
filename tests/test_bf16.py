"""bf16 compute: float32 parameters, statistics, losses and perturbations."""

import jax
import jax.numpy as jnp
import numpy as np

from divdistill_jax import ensemble, perturb
from divdistill_jax.models import get_model


def _models(name="resnet8", **kwargs):
  return (get_model(name, num_classes=10, **kwargs),
          get_model(name, num_classes=10, dtype="bfloat16", **kwargs))


def test_bf16_model_matches_fp32_with_fp32_state():
  fp32, bf16 = _models()
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3))
  variables = jax.jit(lambda k, x: fp32.init(k, x, train=False))(
      jax.random.key(1), x)

  def train_apply(model):  # Jitted: eager bf16 convs are slow on CPU.
    return jax.jit(lambda v, x: model.apply(v, x, train=True,
                                            mutable=["batch_stats"]))

  ref, ref_stats = train_apply(fp32)(variables, x)
  out, stats = train_apply(bf16)(variables, x)
  assert out.dtype == jnp.float32  # Logits are returned in float32.
  # bf16 rounds to 8 significant bits (eps = 2^-8 = 0.0039): through 7
  # layers the logits stay within a few eps, relative to their scale; and
  # they must differ from float32 by more than float32 rounding (2^-24),
  # or the compute did not happen in bf16 at all.
  rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
  assert 2.0**-12 < rel < 4 * 2.0**-8, rel
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)

  def loss(params, model):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return jax.nn.log_softmax(logits.astype(jnp.float32)).mean()

  grads = jax.jit(jax.grad(lambda p: loss(p, bf16)))(variables["params"])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bf16_batchensemble_and_ods_norm():
  # The stem-only network: dtypes and the ODS norm do not need depth.
  _, be = _models("resnet2_w4", ensemble_size=2)
  x = jax.random.uniform(jax.random.key(0), (2, 4, 16, 16, 3))
  # Jitted: eager bf16 convs are slow on CPU.
  variables = jax.jit(lambda k, x: be.init(k, x, train=False))(
      jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert jax.jit(lambda v, x: be.apply(v, x, train=False))(
      variables, x).shape == (2, 4, 10)

  _, teacher = _models("resnet2_w4")
  tvars = jax.jit(lambda k: ensemble.init_members(teacher, k, 2, x[0, :1]))(
      jax.random.key(2))
  # Interior pixels, so that clipping leaves the step alone.
  images = jax.random.uniform(jax.random.key(4), (4, 16, 16, 3),
                              minval=0.2, maxval=0.8)
  out = jax.jit(lambda tv, x: perturb.perturb(
      "ods", jax.random.key(3), x,
      lambda v, z: teacher.apply(v, z, train=False), tv, step_size=1.0,
      temperature=1.0))(tvars, images)
  assert out.dtype == jnp.float32
  # The step is eta * sqrt(D) per example, computed in float32.
  norms = np.linalg.norm(np.asarray(out - images).reshape(4, -1), axis=1)
  np.testing.assert_allclose(norms, np.sqrt(16 * 16 * 3) / 255, rtol=1e-4)
