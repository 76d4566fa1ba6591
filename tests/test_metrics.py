"""Metrics against straightforward numpy references (docs/SOURCES.md,
Metrics)."""

import json
import os

import numpy as np
import pytest

from divdistill_jax import evaluate, metrics


def _random_probs(rng, n=200, k=6, sharp=3.0):
  z = rng.normal(size=(n, k)) * sharp
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ref_ece(p, y, bins=15):
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    idx = [i for i in range(len(p)) if lo < p[i].max() <= hi]
    if idx:
      acc = np.mean([p[i].argmax() == y[i] for i in idx])
      conf = np.mean([p[i].max() for i in idx])
      total += len(idx) / len(p) * abs(acc - conf)
  return total


def test_basic_metrics_against_loops():
  rng = np.random.default_rng(0)
  p, y = _random_probs(rng), rng.integers(0, 6, 200)
  n = len(p)
  acc = sum(p[i].argmax() == y[i] for i in range(n)) / n
  nll = -sum(np.log(p[i, y[i]] + 1e-12) for i in range(n)) / n
  bs = sum(sum((p[i, k] - (k == y[i])) ** 2 for k in range(6))
           for i in range(n)) / n
  assert metrics.accuracy(p, y) == pytest.approx(acc)
  assert metrics.negative_log_likelihood(p, y) == pytest.approx(nll)
  assert metrics.brier_score(p, y) == pytest.approx(bs)
  assert metrics.expected_calibration_error(p, y) == pytest.approx(
      _ref_ece(p, y))


def test_ece_hand_computed_where_binning_matters():
  """Confidences on bin edges, bins of both signs of (accuracy - confidence).

  With 4 bins (edges 0, .25, .5, .75, 1, exact in binary):
    2 x conf 0.5,  both wrong     sum(acc - conf) = -1.0  -> (.25, .5]
    4 x conf 0.6,  1 correct      sum = -1.4               -> (.5, .75]
    4 x conf 0.75, all correct    sum = +1.0               -> (.5, .75]
    4 x conf 0.9,  all correct    sum = +0.4               -> (.75, 1]
    4 x conf 1.0,  all correct    sum =  0.0               -> (.75, 1]
  ECE = (|-1.0| + |-1.4 + 1.0| + |0.4 + 0|) / 18 = 1.8 / 18 = 0.1.
  Half-open [lo, hi) bins would give (2.4 + 1.4) / 18 and equal-mass bins
  yet another value.
  """
  rows = [(0.5, 0, 2), (0.6, 1, 3), (0.75, 4, 0), (0.9, 4, 0), (1.0, 4, 0)]
  probs, labels = [], []
  for conf, right, wrong in rows:
    p = [conf, (1 - conf) / 2, (1 - conf) / 2]
    probs += [p] * (right + wrong)
    labels += [0] * right + [1] * wrong
  probs, labels = np.array(probs), np.array(labels)
  assert metrics.expected_calibration_error(probs, labels, num_bins=4) == (
      pytest.approx(0.1, abs=1e-12))
  # Calibrated bins alone give zero.
  calibrated = np.array([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
  assert metrics.expected_calibration_error(
      calibrated, np.array([0, 0, 0, 1, 0, 0]), num_bins=4) == pytest.approx(
          0.0, abs=1e-12)


def test_perfect_uniform_and_boundary_cases():
  y = np.array([0, 1, 2, 1])
  perfect = np.eye(3)[y]
  assert metrics.accuracy(perfect, y) == 1.0
  assert metrics.negative_log_likelihood(perfect, y) == pytest.approx(
      0, abs=1e-9)
  assert metrics.brier_score(perfect, y) == 0.0
  assert metrics.expected_calibration_error(perfect, y) == 0.0
  uniform = np.full((4, 3), 1 / 3)
  assert metrics.negative_log_likelihood(uniform, y) == pytest.approx(
      np.log(3))
  assert metrics.brier_score(uniform, y) == pytest.approx(2 / 3)
  # Ties: argmax takes the first class; confidence 1/3 is in (4/15, 5/15].
  assert metrics.accuracy(uniform, y) == 0.25
  assert metrics.expected_calibration_error(uniform, y) == pytest.approx(
      abs(0.25 - 1 / 3))
  # A confidence of exactly 0.4 belongs to the bin (1/3, 0.4], upper edge
  # inclusive; only two bins are non-empty, the others are skipped.
  p = np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05]])
  assert metrics.expected_calibration_error(p, np.array([1, 0])) == (
      pytest.approx(0.5 * 0.4 + 0.5 * 0.1))


def test_temperature_fit_recovers_a_known_temperature():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(20000, 10)) * 3
  true_p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = np.array([rng.choice(10, p=q) for q in true_p])
  # The model is overconfident by a factor 2.5 in logit space.
  over = np.exp(2.5 * logits)
  over /= over.sum(-1, keepdims=True)
  t = metrics.fit_temperature(over, labels)
  assert t == pytest.approx(2.5, rel=0.05)
  # Agrees with a fine grid to 3 decimals.
  grid = np.exp(np.linspace(np.log(1.5), np.log(4.0), 4001))
  nlls = [metrics.negative_log_likelihood(metrics.apply_temperature(over, g),
                                          labels) for g in grid[::20]]
  best = grid[::20][int(np.argmin(nlls))]
  assert abs(t - best) < 0.02
  calibrated = metrics.apply_temperature(over, t)
  np.testing.assert_allclose(calibrated.sum(-1), 1.0, rtol=1e-9)
  assert (metrics.negative_log_likelihood(calibrated, labels)
          < metrics.negative_log_likelihood(over, labels))


def test_deep_ensemble_equivalent():
  curve = [0.789, 0.708, 0.673, 0.655]  # Official README's DE-1..4 cNLL.
  assert metrics.deep_ensemble_equivalent(0.750, curve) == pytest.approx(
      1 + (0.789 - 0.750) / (0.789 - 0.708))
  assert metrics.deep_ensemble_equivalent(0.665, curve) == pytest.approx(
      3 + (0.673 - 0.665) / (0.673 - 0.655))
  assert metrics.deep_ensemble_equivalent(0.80, curve) == 1.0
  assert metrics.deep_ensemble_equivalent(0.60, curve) == float("inf")
  assert metrics.deep_ensemble_equivalent(0.708, curve) == pytest.approx(2.0)


def test_diversity_metrics():
  rng = np.random.default_rng(2)
  members = np.stack([_random_probs(rng, 50, 4) for _ in range(3)])
  m = 3
  kl = np.zeros(50)
  for a in range(m):
    for b in range(m):
      if a != b:
        kl += (members[a] * np.log(members[a] / members[b])).sum(-1)
  assert metrics.pairwise_kl(members) == pytest.approx((kl / 6).mean(),
                                                       rel=1e-6)
  top = members.argmax(-1)
  pairs = [(0, 1), (0, 2), (1, 2)]
  dis = np.mean([(top[a] != top[b]).astype(float) for a, b in pairs], 0)
  assert metrics.disagreement(members) == pytest.approx(dis.mean())
  mean = members.mean(0)
  entropy = lambda p: -(p * np.log(p)).sum(-1)  # noqa: E731
  mi = entropy(mean) - np.mean([entropy(p) for p in members], 0)
  assert metrics.mutual_information(members) == pytest.approx(mi.mean(),
                                                              rel=1e-5)
  same = np.stack([members[0]] * 3)
  assert metrics.pairwise_kl(same) == pytest.approx(0, abs=1e-9)
  assert metrics.disagreement(same) == 0.0


def _fake_predictions(rng, m, n=300, k=5, noise=1.0):
  labels = rng.integers(0, k, n)
  base = np.eye(k)[labels] * 3
  z = base[None] + rng.normal(size=(m, n, k)) * noise
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  return p, labels


def test_table_rows_from_synthetic_prediction_files(tmp_path):
  rng = np.random.default_rng(3)
  tv, lv = _fake_predictions(rng, 4)
  tt, lt = _fake_predictions(rng, 4)
  teachers = tmp_path / "teachers"
  teachers.mkdir()
  np.savez(teachers / "predictions.npz", validation_probs=tv,
           validation_labels=lv, test_probs=tt, test_labels=lt)
  (teachers / "done.json").write_text('{"seconds": 40.0}')
  student = tmp_path / "students" / "ods"
  student.mkdir(parents=True)
  np.savez(student / "predictions.npz", validation_probs=tv[:, :, ::-1],
           validation_labels=lv, test_probs=tt[:2], test_labels=lt)
  (student / "done.json").write_text("{}")
  from conftest import load_config

  from divdistill_jax import stages
  config = load_config("quickstart", "evaluate",
                       **{"pipeline.methods": "ods"})
  # The runs' own records of the settings they were computed with.
  (teachers / "config.json").write_text(json.dumps(stages.as_json(
      stages.stage_config(config, "teachers"))))
  (student / "config.json").write_text(json.dumps(stages.as_json(
      stages.stage_config(config, "distill", "ods", str(teachers)))))
  results = evaluate.evaluate_workdir(config, str(tmp_path))
  rows = {r["label"]: r for r in results["rows"]}
  assert list(rows) == ["DE-1", "DE-2", "DE-3", "DE-4", "BE-2 KD+ODS"]
  # Independent numpy: DE-k is the mean of the first k members' probs.
  de2 = tt[:2].mean(0)
  n = len(lt)
  assert rows["DE-2"]["acc"] == pytest.approx(
      100 * np.mean(de2.argmax(-1) == lt))
  assert rows["DE-2"]["nll"] == pytest.approx(
      -np.mean(np.log(de2[np.arange(n), lt] + 1e-12)))
  assert rows["DE-2"]["ece"] == pytest.approx(_ref_ece(de2, lt))
  assert rows["DE-2"]["seconds"] == pytest.approx(20.0)
  # cNLL: the NLL at the temperature that is best on VALIDATION, found by a
  # plain grid here (the code uses a golden-section search).
  grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))

  def nll_at(probs, labels, t):
    z = np.log(probs + 1e-12) / t
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.mean(logp[np.arange(len(labels)), labels])

  val2 = tv[:2].mean(0)
  t = grid[np.argmin([nll_at(val2, lv, g) for g in grid])]
  assert rows["DE-2"]["temperature"] == pytest.approx(t, rel=5e-3)
  assert rows["DE-2"]["cnll"] == pytest.approx(nll_at(de2, lt, t), rel=1e-3)
  assert rows["DE-1"]["dee"] == 1.0
  assert rows["DE-2"]["dee"] == pytest.approx(2.0)
  # The student row: its own two members, the validation set reversed.
  student_test = tt[:2]
  mean = student_test.mean(0)
  assert rows["BE-2 KD+ODS"]["acc"] == pytest.approx(
      100 * np.mean(mean.argmax(-1) == lt))
  assert rows["BE-2 KD+ODS"]["bs"] == pytest.approx(
      np.mean(np.sum((mean - np.eye(mean.shape[1])[lt]) ** 2, -1)))
  kl_01 = np.sum(student_test[0] * np.log((student_test[0] + 1e-12)
                                          / (student_test[1] + 1e-12)), -1)
  kl_10 = np.sum(student_test[1] * np.log((student_test[1] + 1e-12)
                                          / (student_test[0] + 1e-12)), -1)
  assert rows["BE-2 KD+ODS"]["kl"] == pytest.approx(
      np.mean((kl_01 + kl_10) / 2), rel=1e-6)
  assert rows["BE-2 KD+ODS"]["disagreement"] == pytest.approx(
      np.mean(student_test[0].argmax(-1) != student_test[1].argmax(-1)))
  assert rows["BE-2 KD+ODS"]["temperature"] == pytest.approx(
      grid[np.argmin([nll_at(tv[:, :, ::-1].mean(0), lv, g)
                      for g in grid])], rel=5e-3)
  md = (tmp_path / "results.md").read_text()
  assert "| BE-2 KD+ODS |" in md and "cNLL" in md
  for name in os.listdir(tmp_path / "plots"):
    assert os.path.getsize(tmp_path / "plots" / name) > 1000
  assert "reliability_de_4.png" in os.listdir(tmp_path / "plots")
