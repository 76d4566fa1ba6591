"""The clipping diagnostic against hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np

from divdistill_jax import analysis, perturb


def test_step_kept_counts_only_the_part_inside_the_range():
  # 4 pixels per image at 0 (black background), 4 at 0.5; the step is
  # +-eta on every pixel (RMS eta), pointing down on two of the black ones.
  eta = 3.0
  x = np.array([[0, 0, 0, 0, .5, .5, .5, .5]], np.float32).reshape(1, 2, 4, 1)
  sign = np.array([[1, 1, -1, -1, 1, -1, 1, -1]], np.float32).reshape(x.shape)
  x_pert = np.clip(x + eta / 255 * sign, 0, 1)
  # 6 of 8 pixels move by eta, 2 do not: RMS = eta * sqrt(6 / 8).
  np.testing.assert_allclose(analysis.step_kept(x, x_pert, eta),
                             [np.sqrt(0.75)], rtol=1e-5)
  # Nothing clipped: all of it survives.
  np.testing.assert_allclose(
      analysis.step_kept(x[..., :], np.clip(x + eta / 255 * np.abs(sign), 0,
                                            1), eta), [1.0], rtol=1e-5)


def test_ods_on_black_images_keeps_the_upward_components():
  # On an all-zero image ODS keeps exactly the gradient's positive
  # components: kept = |g+| / |g| (sqrt(D) normalisation cancels).
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(2, 12, 3)), jnp.float32)
  x = jnp.zeros((5, 2, 3, 2), jnp.float32)

  def logits(params, inputs):
    return inputs.reshape(inputs.shape[0], -1) @ params

  key = jax.random.key(1)
  out = perturb.perturb("ods", key, x, logits, weights, step_size=2.0,
                        temperature=1.0)
  kept = analysis.step_kept(np.asarray(x), np.asarray(out), 2.0)
  # Recompute the direction: member and w from the same key, analytic grad.
  member_key, w_key = jax.random.split(key)
  m = int(jax.random.randint(member_key, (), 0, 2))
  w = np.asarray(jax.random.uniform(w_key, (5, 3), jnp.float32, -1.0, 1.0))
  p = np.full((5, 3), 1 / 3)  # Zero image, linear model: uniform softmax.
  grad = (p * (w - (w * p).sum(-1, keepdims=True))) @ np.asarray(
      weights[m], np.float64).T
  expected = (np.linalg.norm(np.maximum(grad, 0), axis=1)
              / np.linalg.norm(grad, axis=1))
  np.testing.assert_allclose(kept, expected, rtol=1e-4)
  assert (kept < 1).all() and (kept > 0).all()
