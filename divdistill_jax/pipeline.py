"""The `pipeline` job: teachers, every student method, then the table.

Layout under the workdir: `teachers/`, `students/<entry>/`, `results.json`,
`results.md`, `plots/`. A finished stage is reused only when it was
computed with the config's settings (stages.py); otherwise the job stops
with one line naming the differing fields, unless
`pipeline.recompute` names the stage, which moves the old one aside
(`replaced/`) and computes it again. An interrupted stage resumes from its
checkpoint.
"""

from __future__ import annotations

import os
import time

import ml_collections

from divdistill_jax import (analysis, calibrate, configlib, distill, evaluate,
                            logging_utils, runtime, stages, teachers,
                            workdir as workdir_lib)

def _recompute(config: ml_collections.ConfigDict) -> set[str]:
  names = set(configlib.split_list(config.pipeline.recompute))
  if "all" in names:
    names |= {stages.TEACHERS, "students"}
  return names


def _set_aside(workdir: str, run_dir: str, name: str) -> None:
  if os.path.exists(run_dir):
    target = workdir_lib.move_aside(workdir, run_dir)
    logging_utils.log(f"   {name}: the earlier result moved to {target}")


def _check_finished_stages(config, workdir: str, entries: list[str],
                           recompute: set[str]) -> None:
  """Before any work: sets aside what `recompute` names, then refuses (one
  line naming the fields) a finished stage of other settings, so nothing
  is written under a config that did not produce it."""
  t_dir = stages.teacher_dir(workdir)
  if stages.TEACHERS in recompute:
    _set_aside(workdir, t_dir, stages.TEACHERS)
    # Every student learnt from the old teachers.
    students = os.path.join(workdir, "students")
    if os.path.isdir(students):
      _set_aside(workdir, students, "students")
  for entry in entries:
    if entry in recompute or "students" in recompute:
      _set_aside(workdir, stages.student_dir(workdir, entry), entry)
  stages.check_finished(config, workdir)


def _calibration_and_diversity(config, t_dir: str, entries: list[str]):
  """Always calibrated: with a fixed eta (the paper configs) the
  diversity-matched value is logged as a diagnostic."""
  stage = stages.stage_config(config, "distill", teachers=t_dir)
  methods = [configlib.parse_student_entry(e)[1] for e in entries]
  diversity_path = os.path.join(t_dir, "diversity.npz")
  saved = calibrate.load(t_dir)
  if (workdir_lib.readable_predictions(diversity_path) and saved is not None
      and saved["settings"] == calibrate.settings(stage)
      and all(m in saved["methods"] for m in methods
              if calibrate.calibratable(m))):
    return
  model, variables, _ = teachers.load_teachers(stage, t_dir)
  splits = runtime.load_splits(stage)
  record = calibrate.ensure(stage, t_dir, model, variables, splits, methods)
  if config.perturb.step_size == "auto":
    etas = {m: r["step_size"] for m, r in record["methods"].items()}
  else:
    etas = {}
    logging_utils.log(f"   students use the configured step size "
                      f"{config.perturb.step_size}/255")
  values = analysis.teacher_diversity(stage, model, variables, splits,
                                      sorted(set(methods)), step_sizes=etas)
  analysis.write_teacher_diversity(diversity_path, values)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or finishes) the whole pipeline and returns the results dict."""
  workdir = os.path.realpath(os.path.abspath(workdir))
  entries = configlib.pipeline_entries(config)
  _check_finished_stages(config, workdir, entries, _recompute(config))
  t_dir = stages.teacher_dir(workdir)
  num = len(entries) + 2
  t0 = time.time()
  logging_utils.log(f"== [1/{num}] DE-{config.teacher.ensemble_size} "
                    f"teachers -> {t_dir}")
  if stages.finished(t_dir, stages.TEACHERS):
    logging_utils.log("   finished earlier: reused")
  else:
    teachers.train_teachers(stages.stage_config(config, "teachers"), t_dir)
  _calibration_and_diversity(config, t_dir, entries)
  for i, entry in enumerate(entries, start=2):
    run_dir = stages.student_dir(workdir, entry)
    s_config = stages.stage_config(config, "distill", entry, t_dir)
    label = evaluate.student_label(s_config.perturb.method,
                                   s_config.student.ensemble_size,
                                   s_config.student.kind)
    logging_utils.log(f"== [{i}/{num}] {label} -> {run_dir}")
    if stages.finished(run_dir, entry):
      logging_utils.log("   finished earlier: reused")
      continue
    distill.distill(s_config, run_dir)
  logging_utils.log(f"== [{num}/{num}] table -> "
                    f"{os.path.join(workdir, 'results.md')}")
  results = evaluate.evaluate_workdir(
      stages.stage_config(config, "evaluate"), workdir)
  logging_utils.log(f"pipeline finished in {time.time() - t0:.0f} s")
  return results
