"""Diversity-matched step size on a model whose KL-vs-eta is analytic.

Two linear-softmax "teachers" over K = 2 classes with logits
z_m = (s_m b t, 0), s = (+1, -1), t = (x - c) . u and u = 1 / sqrt(D) on
every pixel. Their pairwise KL at t is y tanh(y / 2) with y = b t. Training
images sit at x = c (t = 0, the teachers agree); validation images at
x = c + v / 255 on every pixel (t = v sqrt(D) / 255). Any ODS step points
along +-u (the only direction the logits depend on), moving t by
eta sqrt(D) / 255, so the teachers' KL on perturbed training images equals
their validation KL exactly at eta = v; ConfODS scales the step by the
clean confidence 1/2, so it needs eta = 2 v.
"""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from divdistill_jax import calibrate

H = W = 4
D = H * W
B_SCALE = 20.0
CENTER = 128


class LinearTeacher:
  """Applied like a Flax module; variables {'w': [D, 2]}."""

  def apply(self, variables, x, train=False):
    del train
    flat = x.reshape(x.shape[0], -1) - CENTER / 255.0
    return flat @ variables["w"]


def _teachers():
  u = np.ones(D) / np.sqrt(D)
  w = np.zeros((2, D, 2), np.float32)
  w[0, :, 0] = B_SCALE * u
  w[1, :, 0] = -B_SCALE * u
  return {"w": jnp.asarray(w)}


def _splits(v):
  train = np.full((64, H, W, 1), CENTER, np.uint8)
  val = np.full((64, H, W, 1), CENTER + v, np.uint8)
  labels = np.zeros(64, np.int32)
  return {"train": (train, labels), "validation": (val, labels)}


def _config(**overrides):
  return load_config("quickstart", "ods", **overrides)


def _analytic_kl(t):
  y = B_SCALE * t
  return y * np.tanh(y / 2)


def test_find_step_size_on_an_analytic_curve():
  c = 0.3

  def kl(eta):
    return _analytic_kl(c * eta)

  for want in (0.6, 3.0, 50.0):
    record = calibrate.find_step_size(kl, kl(want))
    assert record["status"] == "found"
    assert record["step_size"] == pytest.approx(want, rel=2e-3)
    assert record["curve"]["eta"] == sorted(record["curve"]["eta"])
  low = calibrate.find_step_size(kl, kl(0.1))
  assert (low["status"], low["step_size"]) == ("clipped_low", 0.25)
  high = calibrate.find_step_size(kl, kl(500.0))
  assert (high["status"], high["step_size"]) == ("clipped_high", 128.0)


@pytest.mark.parametrize("method,factor", [("ods", 1), ("confods", 2)])
def test_calibration_finds_the_known_eta(method, factor, capsys):
  v = 6
  record = calibrate.calibrate(
      _config(**{"kd.temperature": 2.0}), LinearTeacher(), _teachers(),
      _splits(v), [method], num_examples=64, batch_size=32)
  t_val = v * np.sqrt(D) / 255
  assert record["validation_kl"] == pytest.approx(_analytic_kl(t_val),
                                                  rel=1e-3)
  assert record["train_kl"] == pytest.approx(0.0, abs=1e-9)
  found = record["methods"][method]
  assert found["status"] == "found"
  assert found["step_size"] == pytest.approx(factor * v, rel=1e-2)
  assert found["kl"] == pytest.approx(record["validation_kl"], rel=1e-2)
  # The curve is the analytic one at every evaluated eta that clipping
  # to [0, 1] leaves alone.
  etas = np.asarray(found["curve"]["eta"])
  inside = etas / factor <= 255 - CENTER
  want = _analytic_kl(etas / factor * np.sqrt(D) / 255)
  np.testing.assert_allclose(np.asarray(found["curve"]["kl"])[inside],
                             want[inside], rtol=1e-3)
  assert inside.sum() >= 15
  assert f"step size for {method}: eta = " in capsys.readouterr().out


def test_unreachable_targets_are_clipped_and_said(capsys):
  teachers, splits = _teachers(), _splits(6)
  high = calibrate.calibrate(
      _config(**{"perturb.auto_target_ratio": 1e4}), LinearTeacher(),
      teachers, splits, ["ods"], num_examples=64, batch_size=32)
  assert high["methods"]["ods"]["status"] == "clipped_high"
  assert high["methods"]["ods"]["step_size"] == calibrate.GRID[-1]
  assert "clipped_high" in capsys.readouterr().out
  low = calibrate.calibrate(_config(), LinearTeacher(), teachers, _splits(0),
                            ["ods"], num_examples=64, batch_size=32)
  assert low["methods"]["ods"]["status"] == "clipped_low"
  assert low["methods"]["ods"]["step_size"] == calibrate.GRID[0]


def test_saved_calibration_is_reused_and_redone_when_settings_change(
    tmp_path):
  teachers, splits = _teachers(), _splits(6)
  config = _config(**{"perturb.step_size": "auto"})
  resolved = calibrate.resolve(config, str(tmp_path), LinearTeacher(),
                               teachers, splits)
  eta = resolved.perturb.step_size
  assert isinstance(eta, float) and config.perturb.step_size == "auto"
  saved = calibrate.load(str(tmp_path))
  assert saved["methods"]["ods"]["step_size"] == eta
  # A different target ratio is another calibration: doubling the KL target
  # needs a larger step.
  doubled = _config(**{"perturb.step_size": "auto",
                       "perturb.auto_target_ratio": 2.0})
  eta2 = calibrate.resolve(doubled, str(tmp_path), LinearTeacher(),
                           teachers, splits).perturb.step_size
  assert eta2 > eta * 1.2
  assert calibrate.load(str(tmp_path))["settings"]["target_ratio"] == 2.0
  # A fixed step size is used as it is.
  fixed = _config(**{"perturb.step_size": 3.5})
  assert calibrate.resolve(fixed, str(tmp_path), None, None,
                           None).perturb.step_size == 3.5


def test_calibration_draws_ods_per_batchnorm_group_like_training():
  """With student BatchNorm groups the calibration perturbs in batches of
  whole groups and draws one ODS member per group: its KL-vs-eta curve is
  the teachers' KL on images perturbed exactly as the training step's
  options do (batches of 8 = two groups of 4, keys as the calibration
  folds them)."""
  from divdistill_jax import ensemble, perturb, teachers as teachers_lib
  from divdistill_jax.step import StepSpec
  config = load_config("quickstart", "ods,smoke",
                       **{"student.bn_group_size": 4})
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (16, 28, 28, 1), np.uint8)
  splits = {"train": (images, np.zeros(16, np.int32)),
            "validation": (images[::-1], np.zeros(16, np.int32))}
  model = teachers_lib.build_teacher_model(config)
  variables = ensemble.init_members(model, jax.random.key(0), 2,
                                    jnp.zeros((1, 28, 28, 1)))
  out = calibrate.calibrate(config, model, variables, splits, ["ods"],
                            num_examples=16, batch_size=10)
  curve = out["methods"]["ods"]["curve"]
  eta = 8.0
  options = dataclasses.replace(StepSpec.from_config(config).perturb,
                                step_size=eta)
  assert options.group_size == 4
  context = perturb.Context(ensemble.member_fn(model), variables)
  key = jax.random.fold_in(jax.random.key(config.seed), 17)
  x = jnp.asarray(images, jnp.float32) / 255
  x_pert = jnp.concatenate([perturb.apply(
      "ods", jax.random.fold_in(key, i), x[i:i + 8], context, options)
      for i in (0, 8)])
  probs = np.stack([np.asarray(jax.nn.softmax(model.apply(
      jax.tree.map(lambda a, m=m: a[m], variables), x_pert, train=False)))
                    for m in range(2)]).astype(np.float64)
  kl = ((probs[0] * np.log(probs[0] / probs[1])).sum(-1)
        + (probs[1] * np.log(probs[1] / probs[0])).sum(-1)).mean() / 2
  got = curve["kl"][curve["eta"].index(eta)]
  assert got == pytest.approx(kl, rel=1e-3)
