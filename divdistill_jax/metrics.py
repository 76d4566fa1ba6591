"""Table metrics as pure functions of predicted probabilities (docs/SOURCES.md,
Metrics).

`probs` are predictive probabilities [N, K], `member_probs` are [M, N, K],
`labels` are ints [N]. Inputs may be numpy or jax arrays; outputs are Python
floats (or numpy arrays for per-example values).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def accuracy(probs, labels) -> float:
  """Fraction of argmax predictions equal to the label (not percent)."""
  return float((_np(probs).argmax(-1) == np.asarray(labels)).mean())


def negative_log_likelihood(probs, labels) -> float:
  """-mean log(p_y + 1e-12)."""
  p = _np(probs)
  return float(-np.log(p[np.arange(len(p)), np.asarray(labels)] + EPS).mean())


def brier_score(probs, labels) -> float:
  """mean_i sum_k (p_ik - 1[k = y_i])^2 (summed over classes, not / K)."""
  p = _np(probs)
  onehot = np.eye(p.shape[1])[np.asarray(labels)]
  return float(np.square(p - onehot).sum(-1).mean())


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """ECE with equal-width confidence bins (lower, upper]; empty bins skipped."""
  p = _np(probs)
  confidence = p.max(-1)
  correct = p.argmax(-1) == np.asarray(labels)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  ece = 0.0
  for lower, upper in zip(edges[:-1], edges[1:]):
    in_bin = (confidence > lower) & (confidence <= upper)
    if in_bin.any():
      gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
      ece += in_bin.mean() * gap
  return float(ece)


def apply_temperature(probs, temperature: float) -> np.ndarray:
  """softmax(log(p + 1e-12) / T): temperature on the ensemble's log-probs."""
  logits = np.log(_np(probs) + EPS) / temperature
  logits -= logits.max(-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(-1, keepdims=True)


def fit_temperature(probs, labels, *, low: float = 0.05,
                    high: float = 20.0) -> float:
  """T minimising the NLL of `apply_temperature(probs, T)` (validation set).

  A golden-section search on log T after a coarse grid (the NLL is smooth
  and unimodal in log T in practice); agrees with a fine grid to < 1e-3.
  """
  log_p = np.log(_np(probs) + EPS)
  labels = np.asarray(labels)

  def nll(log_t):
    z = log_p / np.exp(log_t)
    z = z - z.max(-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(-1))
    return float((log_norm - z[np.arange(len(z)), labels]).mean())

  grid = np.linspace(np.log(low), np.log(high), 61)
  i = int(np.argmin([nll(t) for t in grid]))
  a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  ratio = (np.sqrt(5) - 1) / 2
  c, d = b - ratio * (b - a), a + ratio * (b - a)
  fc, fd = nll(c), nll(d)
  for _ in range(60):
    if fc < fd:
      b, d, fd = d, c, fc
      c = b - ratio * (b - a)
      fc = nll(c)
    else:
      a, c, fc = c, d, fd
      d = a + ratio * (b - a)
      fd = nll(d)
  return float(np.exp((a + b) / 2))


def deep_ensemble_equivalent(cnll: float, de_cnll_curve) -> float:
  """DEE (Ashukha et al. 2020) by linear interpolation on DE-1..M cNLL.

  Args:
    cnll: the method's calibrated NLL.
    de_cnll_curve: cNLL of DE-1, DE-2, ..., DE-M (index k-1 = size k).

  Returns:
    1.0 if the method is no better than DE-1; the interpolated size inside
    the curve; `inf` marks "better than DE-M" (only a lower bound M is
    known), which tables print as "> M".
  """
  curve = [float(c) for c in de_cnll_curve]
  if cnll >= curve[0]:
    return 1.0
  for j in range(len(curve) - 1):
    hi, lo = curve[j], curve[j + 1]
    if hi >= cnll >= lo and hi > lo:
      return j + 1 + (hi - cnll) / (hi - lo)
  # Flat or non-monotone stretches: the first size reaching the cNLL.
  for j, value in enumerate(curve):
    if value <= cnll:
      return float(j + 1)
  return float("inf")


def _member_np(member_probs) -> np.ndarray:
  p = _np(member_probs)
  if p.ndim != 3:
    raise ValueError(f"member_probs must be [M, N, K], got shape {p.shape}.")
  return p


def pairwise_kl_per_example(member_probs) -> np.ndarray:
  """mean over ordered pairs a != b of KL(p_a || p_b), per example -> [N]."""
  p = _member_np(member_probs)
  m = p.shape[0]
  if m < 2:
    return np.zeros(p.shape[1])
  logp = np.log(p + EPS)
  total = np.zeros(p.shape[1])
  for a in range(m):
    for b in range(m):
      if a != b:
        total += (p[a] * (logp[a] - logp[b])).sum(-1)
  return total / (m * (m - 1))


def pairwise_kl(member_probs) -> float:
  """Official KLD diversity: mean ordered-pair KL (giung2 diversity.py)."""
  return float(pairwise_kl_per_example(member_probs).mean())


def disagreement_per_example(member_probs) -> np.ndarray:
  """Fraction of member pairs whose argmax differ, per example -> [N]."""
  p = _member_np(member_probs)
  m = p.shape[0]
  if m < 2:
    return np.zeros(p.shape[1])
  top = p.argmax(-1)
  pairs = [(top[a] != top[b]) for a in range(m) for b in range(a + 1, m)]
  return np.mean(pairs, axis=0)


def disagreement(member_probs) -> float:
  return float(disagreement_per_example(member_probs).mean())


def mutual_information_per_example(member_probs) -> np.ndarray:
  """mean_m KL(p_m || p_bar) = H(p_bar) - mean_m H(p_m), per example."""
  p = _member_np(member_probs)
  mean = p.mean(0)
  return (p * (np.log(p + EPS) - np.log(mean + EPS)[None])).sum(-1).mean(0)


def mutual_information(member_probs) -> float:
  return float(mutual_information_per_example(member_probs).mean())


def entropy(probs) -> float:
  """Mean predictive entropy -sum_k p log(p + 1e-12)."""
  p = _np(probs)
  return float(-(p * np.log(p + EPS)).sum(-1).mean())


def table_row(val_member_probs, val_labels, test_member_probs, test_labels,
              num_bins: int = 15) -> dict:
  """Every column of the paper's table for one predictor.

  The predictor is the mean of its members' probabilities; the temperature
  is fitted on validation and applied to test (giung2
  `scripts/evaluation.ipynb`).
  """
  val = _member_np(val_member_probs).mean(0)
  test = _member_np(test_member_probs).mean(0)
  t = fit_temperature(val, val_labels)
  cal = apply_temperature(test, t)
  return {
      "acc": 100.0 * accuracy(test, test_labels),
      "nll": negative_log_likelihood(test, test_labels),
      "bs": brier_score(test, test_labels),
      "ece": expected_calibration_error(test, test_labels, num_bins),
      "cnll": negative_log_likelihood(cal, test_labels),
      "cbs": brier_score(cal, test_labels),
      "cece": expected_calibration_error(cal, test_labels, num_bins),
      "kl": pairwise_kl(test_member_probs),
      "disagreement": disagreement(test_member_probs),
      "mi": mutual_information(test_member_probs),
      "entropy": entropy(test),
      "temperature": t,
  }
