"""The study's summary: mean +- standard error and paired differences."""

import os
import sys

import numpy as np
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import study  # noqa: E402


def _row(seed, method, nll, kl, eta="-", ece=0.05):
  # A BatchEnsemble row: no merged-network columns.
  row = {k: 0.5 for k, _, _ in study.SUMMARY_COLUMNS
         if not k.startswith("merged_")}
  row.update(seed=seed, method=method, eta=eta, nll=nll, kl=kl, ece=ece,
             model="resnet8_w8", train_size=500, epochs=45, tag="",
             steps=450, de1_acc=76.0, de4_nll=0.57, de4_kl=0.35)
  return row


def _columns(text, method):
  lines = text.splitlines()
  header = next(s for s in lines if s.startswith("| method"))
  line = next(s for s in lines if s.startswith(f"| {method} |"))
  # " | " and not "|": the header has "KL(T||S)".
  names = header.strip("| ").split(" | ")
  return dict(zip(names, line.strip("| ").split(" | ")))


def test_summary_pairs_each_method_with_kd_of_the_same_seed():
  rng = np.random.default_rng(0)
  kd_nll, kd_kl = rng.uniform(0.6, 0.7, 3), rng.uniform(0.2, 0.3, 3)
  m_nll, m_kl = rng.uniform(0.6, 0.7, 3), rng.uniform(0.2, 0.3, 3)
  kd_ece, m_ece = rng.uniform(0, 0.1, 3), rng.uniform(0, 0.1, 3)
  rows = [_row(s, "kd", kd_nll[s], kd_kl[s], ece=kd_ece[s]) for s in range(3)]
  rows += [_row(s, "confods", m_nll[s], m_kl[s], "1.0", m_ece[s])
           for s in range(3)]
  # A seed without its KD row has no pair: it counts in the means only.
  rows.append(_row(7, "confods", 0.9, 0.9, "1.0"))
  cols = _columns(study.summarise(rows), "confods")

  def fmt(values, digits=3):
    v = np.asarray(values)
    se = v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.{digits}f} ± {se:.{digits}f}"

  assert cols["n"] == "4"
  assert cols["NLL"] == fmt(list(m_nll) + [0.9])
  assert cols["member KL"] == fmt(list(m_kl) + [0.9])
  assert cols["dNLL vs KD"] == fmt(m_nll - kd_nll)
  assert cols["dKL vs KD"] == fmt(m_kl - kd_kl)
  assert cols["dECE vs KD"] == fmt(m_ece - kd_ece)
  kd = _columns(study.summarise(rows), "kd")
  assert kd["NLL"] == fmt(kd_nll) and kd["dNLL vs KD"] == "-"
  # BE rows have no merged network, so the paired merged NLL column
  # pairs only seeds where both rows have one.
  assert cols["dmerged NLL vs KD"] == "-"
  for r, v in zip(rows[:6], [0.7, 0.6, 0.8, 0.65, 0.62, 0.9]):
    r["merged_sb_nll"] = v
  del rows[2]["merged_sb_nll"]  # KD of seed 2: its ConfODS row is unpaired.
  cols = _columns(study.summarise(rows), "confods")
  assert cols["dmerged NLL vs KD"] == fmt([0.65 - 0.7, 0.62 - 0.6])


def test_one_seed_has_no_standard_error():
  rows = [_row(0, "kd", 0.6, 0.2), _row(0, "ods", 0.65, 0.25, "1.0")]
  cols = _columns(study.summarise(rows), "ods")
  assert cols["NLL"] == "0.650" and cols["dNLL vs KD"] == "0.050"


def test_collect_only_on_an_empty_workdir_says_so(tmp_path):
  import subprocess
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "study.py"),
       f"--workdir={tmp_path}", "--collect_only", f"--out={tmp_path / 'o'}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "no finished rows" in proc.stderr
  assert not (tmp_path / "o" / "summary.md").exists()
