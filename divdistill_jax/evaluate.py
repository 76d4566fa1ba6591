"""The paper's table from saved predictions (the `evaluate` job).

A pipeline workdir holds `teachers/predictions.npz` and
`students/<method>/predictions.npz` (member probabilities on validation and
test). Rows DE-1..DE-M use the first k teachers; every student is one row.
Nothing is re-run: every column is a function of those arrays.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np

from divdistill_jax import (configlib, fileio, logging_utils, metrics, perturb,
                            stages)

COLUMNS = (("acc", "ACC", 2), ("nll", "NLL", 3), ("bs", "BS", 3),
           ("ece", "ECE", 3), ("cnll", "cNLL", 3), ("cbs", "cBS", 3),
           ("cece", "cECE", 3), ("dee", "DEE", 2), ("kl", "KL", 3),
           ("disagreement", "Dis.", 3), ("temperature", "T", 2),
           ("step_size", "eta", 2), ("seconds", "time (s)", 0))


def load_predictions(run_dir: str) -> dict:
  path = os.path.join(run_dir, "predictions.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No predictions in {run_dir!r}: the run has not finished.")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _done_info(run_dir: str) -> dict:
  """A finished run's done.json (seconds, step size, ...); {} if absent."""
  path = os.path.join(run_dir, "done.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


# Rows of the merged LatentBE network (one plain network at test time), by
# predictions.npz key infix; the headline rule's row is "(merged)".
_MERGED_SUFFIX = {"sb": "bias s*b", "b": "bias b"}


def merged_row_name(rule: str, headline: str = "sb") -> str:
  """'(merged)' for the headline bias rule, else named for its rule; 'sb_bn'
  is rule 'sb' with BatchNorm statistics re-estimated."""
  base, bn = (rule[:-3], True) if rule.endswith("_bn") else (rule, False)
  parts = [] if base == headline else [_MERGED_SUFFIX[base]]
  parts += ["BN re-estimated"] if bn else []
  return "(merged" + "".join(", " + p for p in parts) + ")"


def student_label(method: str, ensemble_size: int,
                  kind: str = "batchensemble") -> str:
  if ensemble_size == 1:
    prefix = "Single"
  elif kind == "latentbe":
    prefix = f"LatentBE-{ensemble_size}"
  else:
    prefix = f"BE-{ensemble_size}"
  # A method registered in another process (a user's module) gets the
  # registry's default label.
  name = (perturb.label(method) if method in perturb.methods()
          else f"KD+{method}")
  return f"{prefix} {name}"


def merged_label(label: str, rule: str, headline: str = "sb") -> str:
  """'LatentBE-4 KD' -> 'LatentBE-4 (merged)'; other methods keep theirs."""
  base = label[:-len(" KD")] if label.endswith(" KD") else label
  return f"{base} {merged_row_name(rule, headline)}"


def merged_students(label: str, preds: dict,
                    headline: str = "sb") -> list[tuple[str, dict]]:
  """(label, predictions) of each merged network saved with a student,
  the headline rule's first."""
  out = []
  rules = [headline] + [r for r in ("sb", "b", "sb_bn") if r != headline]
  for rule in rules:
    key = f"merged_{rule}_test_probs"
    if key in preds:
      out.append((merged_label(label, rule, headline), {
          "validation_probs": preds[f"merged_{rule}_validation_probs"],
          "validation_labels": preds["validation_labels"],
          "test_probs": preds[key], "test_labels": preds["test_labels"]}))
  return out


def build_rows(teacher_preds: dict, students: list[tuple[str, dict]], *,
               num_bins: int = 15, teacher_seconds: float | None = None,
               student_seconds: dict | None = None,
               student_step_sizes: dict | None = None) -> list[dict]:
  """Table rows: DE-1..DE-M, then each student, with DEE against DE-k.

  Args:
    teacher_preds: arrays `validation_probs` [M, Nv, K], `validation_labels`,
      `test_probs` [M, Nt, K], `test_labels`.
    students: (label, predictions) pairs in display order.
    num_bins: ECE bins.
    teacher_seconds: wall time of the teachers job (DE-k shows k/M of it).
    student_seconds: label -> wall time.
    student_step_sizes: label -> the eta the student was distilled with
      (1/255 units; None for plain KD).

  Returns:
    Rows (dicts with 'label' and the keys of `metrics.table_row`, 'dee',
    'dee_lower_bound', 'seconds').
  """
  num_teachers = teacher_preds["test_probs"].shape[0]
  rows = []
  for k in range(1, num_teachers + 1):
    row = metrics.table_row(
        teacher_preds["validation_probs"][:k],
        teacher_preds["validation_labels"], teacher_preds["test_probs"][:k],
        teacher_preds["test_labels"], num_bins)
    row["label"] = f"DE-{k}"
    row["seconds"] = (None if teacher_seconds is None
                      else teacher_seconds * k / num_teachers)
    rows.append(row)
  for label, preds in students:
    row = metrics.table_row(preds["validation_probs"],
                            preds["validation_labels"], preds["test_probs"],
                            preds["test_labels"], num_bins)
    row["label"] = label
    row["seconds"] = (student_seconds or {}).get(label)
    row["step_size"] = (student_step_sizes or {}).get(label)
    rows.append(row)
  curve = [r["cnll"] for r in rows[:num_teachers]]
  for row in rows:
    dee = metrics.deep_ensemble_equivalent(row["cnll"], curve)
    row["dee_lower_bound"] = math.isinf(dee)
    row["dee"] = float(num_teachers) if math.isinf(dee) else dee
  return rows


def format_table(rows: list[dict]) -> str:
  """Markdown table; DEE beyond the largest DE reads '> M'."""
  head = "| Model | " + " | ".join(c[1] for c in COLUMNS) + " |"
  sep = "|---|" + "---:|" * len(COLUMNS)
  lines = [head, sep]
  for row in rows:
    cells = []
    for key, _, digits in COLUMNS:
      value = row.get(key)
      if value is None:
        cells.append("-")
      elif key == "dee" and row.get("dee_lower_bound"):
        cells.append(f"> {value:.0f}")
      else:
        cells.append(f"{value:.{digits}f}")
    lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _log_left_out(config: ml_collections.ConfigDict, workdir: str,
                  rows: list[str]) -> None:
  """Says which student folders give no row, and why."""
  for entry in configlib.pipeline_entries(config):
    if stages.student_dir(workdir, entry) not in rows:
      logging_utils.log(f"   {entry}: not finished, no row")
  root = os.path.join(workdir, "students")
  known = {os.path.basename(stages.student_dir(workdir, e))
           for e in configlib.pipeline_entries(config)}
  others = sorted(set(os.listdir(root)) - known) if os.path.isdir(root) else []
  if others:
    logging_utils.log(f"   not in pipeline.methods, no row: {others}")


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Builds, prints and writes the table of a pipeline workdir.

  Only stages computed with this config's settings give rows (a finished
  stage of other settings stops it with one line naming the fields); each
  row records its stage's fingerprint. Writes `results.json` (rows as in
  the README's "Workdir layout"), `results.md` and `plots/*.png`.

  Returns:
    The results dict.
  """
  workdir = os.path.realpath(os.path.abspath(workdir))
  teacher_dir = stages.teacher_dir(workdir)
  if not stages.finished(teacher_dir, stages.TEACHERS):
    raise FileNotFoundError(
        f"No finished teachers in {teacher_dir!r}: run the pipeline (or the "
        "teachers job) with this --workdir first.")
  finished = stages.check_finished(config, workdir)
  _log_left_out(config, workdir, [d for _, d in finished])
  teacher_fp = stages.recorded_fingerprint(teacher_dir, "teachers")
  teacher_preds = load_predictions(teacher_dir)
  students, seconds, etas, prints = [], {}, {}, {}
  for method, run_dir in finished:
    preds = load_predictions(run_dir)
    info = _done_info(run_dir)
    label = student_label(method, preds["test_probs"].shape[0],
                          info.get("kind", "batchensemble"))
    merged = merged_students(label, preds,
                             info.get("merged_headline", "sb"))
    for row_label, row_preds in [(label, preds)] + merged:
      students.append((row_label, row_preds))
      seconds[row_label] = info.get("seconds")
      etas[row_label] = info.get("step_size")
      prints[row_label] = info.get("fingerprint")
  rows = build_rows(teacher_preds, students, num_bins=config.eval.ece_bins,
                    teacher_seconds=_done_info(teacher_dir).get("seconds"),
                    student_seconds=seconds, student_step_sizes=etas)
  for row in rows:
    row["fingerprint"] = prints.get(row["label"], teacher_fp)
  results = {"rows": rows, "config": json.loads(config.to_json_best_effort())}
  table = format_table(rows)
  fileio.write_json(os.path.join(workdir, "results.json"), results,
                    indent=2)
  fileio.write_text(os.path.join(workdir, "results.md"), table + "\n")
  try:
    from divdistill_jax import plots  # pylint: disable=g-import-not-at-top
    plots.write_all(workdir, teacher_preds, students, rows)
  except ImportError:
    pass  # matplotlib missing: the table is still complete.
  print(table, flush=True)
  return results
