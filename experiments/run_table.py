"""Reproduce a paper table: pipelines over seeds, mean +- std, checks.

  python experiments/run_table.py --family=cifar100_wrn28x10 \
      --data_dir=DATA --workdir=W --seeds=0,1,2

runs `configs/<family>.py:pipeline` once per seed (W/seed<k>, skipping what
is finished), or only collects with --collect_only. It prints one Markdown
table with mean +- std over seeds beside the expected numbers of
`experiments/expected.json` (source and tolerance there), marks each cell
within tolerance, and evaluates the relational checks (docs/SOURCES.md,
Reference numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("family", "cifar100_wrn28x10", "Config file in configs/.")
flags.DEFINE_string("workdir", None, "Root directory (one folder per seed).")
flags.DEFINE_string("data_dir", None, "Dataset folder.")
flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
flags.DEFINE_string("variant", "pipeline", "Variants, e.g. pipeline,smoke.")
flags.DEFINE_bool("collect_only", False, "Only collect finished results.")
flags.DEFINE_multi_string("override", [], "Extra --config.x=y overrides.")

COLUMNS = ("acc", "nll", "bs", "ece", "cnll", "cbs", "cece", "dee", "kl")


def run_seed(seed: int, workdir: str) -> None:
  cmd = [sys.executable, "-m", "divdistill_jax.main",
         f"--config={ROOT}/configs/{FLAGS.family}.py:{FLAGS.variant}",
         f"--workdir={workdir}", f"--config.seed={seed}"]
  if FLAGS.data_dir:
    cmd.append(f"--config.data.data_dir={FLAGS.data_dir}")
  cmd += [f"--config.{o}" for o in FLAGS.override]
  print(" ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def collect(workdirs: list[str]) -> dict[str, dict[str, list[float]]]:
  """label -> column -> values over seeds."""
  out: dict[str, dict[str, list[float]]] = {}
  for workdir in workdirs:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      for row in json.load(f)["rows"]:
        cols = out.setdefault(row["label"], {})
        for c in COLUMNS:
          cols.setdefault(c, []).append(row[c])
  return out


def table(results: dict, expected: dict) -> str:
  lines = ["| Model | " + " | ".join(c.upper() for c in COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
  for label, cols in results.items():
    cells = []
    for c in COLUMNS:
      v = np.asarray(cols[c])
      cell = f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1
                                  else "")
      ref = expected.get(label, {}).get(c)
      if ref is not None:
        ok = abs(v.mean() - ref[0]) <= ref[1]
        cell += f" (paper {ref[0]} ± {ref[1]}: {'pass' if ok else 'FAIL'})"
      cells.append(cell)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def relational(results: dict, checks: list, prefix: str) -> list[str]:
  lines = []
  for check in checks:
    a, b = f"{prefix} {check['a']}", f"{prefix} {check['b']}"
    if a not in results or b not in results:
      continue
    d = (np.mean(results[a][check["metric"]])
         - np.mean(results[b][check["metric"]]))
    ok = True
    if "min_delta" in check:
      ok &= d >= check["min_delta"]
    if "max_delta" in check:
      ok &= d <= check["max_delta"]
    if "abs_max" in check:
      ok &= abs(d) <= check["abs_max"]
    lines.append(f"- [{'pass' if ok else 'FAIL'}] {check['name']}: "
                 f"delta = {d:+.3f}")
  return lines


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds.split(",")]
  workdirs = [os.path.join(FLAGS.workdir, f"seed{s}") for s in seeds]
  if not FLAGS.collect_only:
    for seed, workdir in zip(seeds, workdirs):
      run_seed(seed, workdir)
  with open(os.path.join(ROOT, "experiments", "expected.json")) as f:
    expected = json.load(f)
  results = collect(workdirs)
  family = expected.get(FLAGS.family, {"rows": {}})
  prefix = next((label.split(" ")[0] for label in results
                 if label.startswith(("BE-", "Single"))), "BE-4")
  source = family.get("_source", expected["_source"] if family["rows"]
                     else None)
  print(f"{FLAGS.family}: {len(workdirs)} seed(s). "
        + (f"Expected: {source}\n" if source
           else "No expected numbers for this family.\n"))
  print(table(results, family["rows"]))
  print("\nRelational checks (the paper's claims):")
  print("\n".join(relational(results, expected["relational_checks"], prefix))
        or "(no student rows)")
  print(f"\nCompute estimate: {family.get('gpu_hours_estimate', '?')}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
