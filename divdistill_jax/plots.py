"""PNG plots: reliability diagrams and diversity (the paper's Fig. 1)."""

from __future__ import annotations

import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from divdistill_jax import metrics  # noqa: E402


def _slug(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


def reliability_diagram(probs, labels, title: str, path: str,
                        num_bins: int = 15) -> None:
  """Accuracy vs confidence per bin, with the gap to the diagonal."""
  p = np.asarray(probs)
  conf, correct = p.max(-1), p.argmax(-1) == np.asarray(labels)
  edges = np.linspace(0, 1, num_bins + 1)
  accs, confs, counts = [], [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (conf > lo) & (conf <= hi)
    counts.append(sel.sum())
    accs.append(correct[sel].mean() if sel.any() else 0.0)
    confs.append(conf[sel].mean() if sel.any() else 0.0)
  fig, ax = plt.subplots(figsize=(4, 4))
  centers = (edges[:-1] + edges[1:]) / 2
  ax.bar(centers, accs, width=1 / num_bins, edgecolor="k", label="accuracy")
  ax.bar(centers, np.array(confs) - np.array(accs), bottom=accs,
         width=1 / num_bins, color="tab:red", alpha=0.3, label="gap")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ece = metrics.expected_calibration_error(p, labels, num_bins)
  ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
         title=f"{title}\nECE {ece:.3f}")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def diversity_histograms(values: dict[str, np.ndarray], title: str,
                         xlabel: str, path: str) -> None:
  """Overlaid per-example histograms, one per input set (Figure 1 style)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  top = max(float(np.quantile(v, 0.99)) for v in values.values()) or 1.0
  bins = np.linspace(0, top, 40)
  for name, v in values.items():
    ax.hist(np.clip(v, 0, top), bins=bins, alpha=0.45,
            label=f"{name} (mean {np.mean(v):.3f})", density=True)
  ax.set(xlabel=xlabel, ylabel="density", title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def diversity_bars(rows: list[dict], path: str) -> None:
  """Member diversity (pairwise KL on test) of the teachers and students."""
  rows = [r for r in rows if r["label"].startswith(("DE-", "BE-"))
          and r["label"] != "DE-1"]
  fig, ax = plt.subplots(figsize=(max(5, len(rows) * 0.9), 3.5))
  ax.bar(range(len(rows)), [r["kl"] for r in rows],
         color=["tab:gray" if r["label"].startswith("DE") else "tab:blue"
                for r in rows])
  ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30,
                ha="right", fontsize=8)
  ax.set(ylabel="pairwise KL (test)", title="Member diversity")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def step_size_curves(calibration: dict, path: str) -> None:
  """Teacher KL on perturbed training images vs eta, one line per method,
  with the validation level and the target drawn (calibrate.py)."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method, record in calibration["methods"].items():
    line, = ax.plot(record["curve"]["eta"], record["curve"]["kl"], "o-",
                    ms=3, label=method)
    ax.plot([record["step_size"]], [record["kl"]], "*", ms=12,
            color=line.get_color())
  ax.axhline(calibration["validation_kl"], color="k", ls="--", lw=1,
             label="validation (clean)")
  ax.axhline(calibration["train_kl"], color="gray", ls=":", lw=1,
             label="train (clean)")
  if abs(calibration["target"] - calibration["validation_kl"]) > 1e-12:
    ax.axhline(calibration["target"], color="tab:red", ls="-.", lw=1,
               label="target")
  ax.set_xscale("log")
  ax.set(xlabel="step size eta (1/255 units)",
         ylabel="teacher pairwise KL",
         title="Diversity-matched step size (star: chosen)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_all(workdir: str, teacher_preds: dict, students, rows) -> list[str]:
  """Writes every plot under workdir/plots; returns the paths."""
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  series = [(f"DE-{teacher_preds['test_probs'].shape[0]}", teacher_preds)]
  series += list(students)
  for label, preds in series:
    path = os.path.join(out_dir, f"reliability_{_slug(label)}.png")
    reliability_diagram(preds["test_probs"].mean(0), preds["test_labels"],
                        label, path)
    paths.append(path)
  path = os.path.join(out_dir, "member_diversity.png")
  diversity_bars(rows, path)
  paths.append(path)
  analysis = os.path.join(workdir, "teachers", "diversity.npz")
  if os.path.exists(analysis):
    with np.load(analysis) as f:
      sets = {k[len("kl_"):]: f[k] for k in f.files if k.startswith("kl_")}
      dis = {k[len("dis_"):]: f[k] for k in f.files if k.startswith("dis_")}
    for name, values, xlabel in (("teacher_kl", sets, "pairwise KL"),
                                 ("teacher_disagreement", dis,
                                  "pairwise disagreement")):
      path = os.path.join(out_dir, f"{name}.png")
      diversity_histograms(values, "Teacher diversity per input set", xlabel,
                           path)
      paths.append(path)
  calibration = os.path.join(workdir, "teachers", "step_size.json")
  if os.path.exists(calibration):
    with open(calibration) as f:
      record = json.load(f)
    if record["methods"]:
      path = os.path.join(out_dir, "step_size_calibration.png")
      step_size_curves(record, path)
      paths.append(path)
  return paths
