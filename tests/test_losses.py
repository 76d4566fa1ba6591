"""Distillation objective against a direct numpy computation (11.1 item 6)."""

import jax
import numpy as np
import pytest

from divdistill_jax import losses


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_kd_is_zero_when_student_equals_teacher():
  logits = np.random.default_rng(0).normal(size=(4, 8, 10))
  targets = losses.distillation_targets(logits, 1.0, "member", 4)
  assert float(losses.kl_to_target(targets, logits, 1.0)) == pytest.approx(
      0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_matches_numpy_reference(temperature):
  rng = np.random.default_rng(1)
  m, b, k, alpha = 3, 5, 7, 0.9
  clean, kd_logits = rng.normal(size=(2, m, b, k)) * 2
  teacher = rng.normal(size=(m, b, k)) * 2
  labels = rng.integers(0, k, b)
  targets = losses.distillation_targets(teacher, temperature, "member", m)
  loss, (ce, kd) = losses.distillation_loss(
      clean, labels, kd_logits, targets, alpha=alpha, temperature=temperature)
  # Reference: member-major rows, mean over all M*B rows.
  p_clean = _softmax(clean).reshape(m * b, k)
  y = np.tile(labels, m)
  ref_ce = -np.log(p_clean[np.arange(m * b), y]).mean()
  pt = _softmax(teacher / temperature).reshape(m * b, k)
  ps = _softmax(kd_logits / temperature).reshape(m * b, k)
  ref_kd = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
  ref = (1 - alpha) * ref_ce + alpha * temperature**2 * ref_kd
  assert float(ce) == pytest.approx(ref_ce, rel=1e-5)
  assert float(kd) == pytest.approx(ref_kd, rel=1e-5)
  assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_member_pairing_sends_teacher_m_to_member_m():
  teacher = np.zeros((3, 2, 4))
  for m in range(3):
    teacher[m, :, m] = 10.0  # Teacher m predicts class m.
  targets = np.asarray(losses.distillation_targets(teacher, 1.0, "member", 3))
  assert (targets.argmax(-1) == np.arange(3)[:, None]).all()
  # Gradient of member m's KD term only moves student member m towards m.
  student = np.zeros((3, 2, 4))
  grad = jax.grad(lambda s: losses.kl_to_target(targets, s, 1.0))(student)
  assert (np.asarray(grad).argmin(-1) == np.arange(3)[:, None]).all()


def test_mean_pairing_equals_kd_against_the_mean():
  rng = np.random.default_rng(2)
  teacher = rng.normal(size=(4, 6, 5))
  student = rng.normal(size=(2, 6, 5))
  targets = losses.distillation_targets(teacher, 2.0, "mean", 2)
  mean = _softmax(teacher / 2.0).mean(0)
  np.testing.assert_allclose(targets[0], mean, rtol=1e-5)
  np.testing.assert_allclose(targets[1], mean, rtol=1e-5)
  ps = _softmax(student / 2.0)
  ref = (mean * (np.log(mean) - np.log(ps))).sum(-1).mean()
  assert float(losses.kl_to_target(targets, student, 2.0)) == pytest.approx(
      ref, rel=1e-5)


def test_member_pairing_size_mismatch():
  with pytest.raises(ValueError, match="4 vs 3"):
    losses.distillation_targets(np.zeros((3, 2, 5)), 1.0, "member", 4)
