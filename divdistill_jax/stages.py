"""The stages of a pipeline workdir and whether a finished one may be reused.

Layout: `W/teachers/`, `W/students/<entry>/` (an entry is METHOD or
KIND:METHOD, ':' written '_'). A stage is finished when its `done.json`
reads and its `predictions.npz` reads. A finished stage is reused only when
the fields that determine its result equal the config's (workdir.py), and
a student's teachers are the ones it learnt from.
"""

from __future__ import annotations

import json
import os

import ml_collections

from divdistill_jax import configlib, logging_utils
from divdistill_jax import workdir as workdir_lib

TEACHERS = "teachers"


def teacher_dir(workdir: str) -> str:
  return os.path.join(workdir, TEACHERS)


def student_dir(workdir: str, entry: str) -> str:
  return os.path.join(workdir, "students", entry.replace(":", "_"))


def stage_config(config: ml_collections.ConfigDict, job: str,
                 entry: str | None = None,
                 teachers: str | None = None) -> ml_collections.ConfigDict:
  """A locked copy of `config` for one stage (`entry`: METHOD or
  KIND:METHOD)."""
  stage = config.copy_and_resolve_references()
  stage.unlock()
  stage.job = job
  if entry is not None:
    kind, stage.perturb.method = configlib.parse_student_entry(entry)
    configlib.apply_student_kind(stage, kind)
  if teachers is not None:
    stage.teacher.workdir = teachers
  stage.lock()
  return stage


def as_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def teacher_fields(config: ml_collections.ConfigDict) -> dict:
  return workdir_lib.stage_fields(as_json(config), "teachers")


def student_fields(config: ml_collections.ConfigDict) -> dict:
  """The student stage's fields as requested (step size 'auto' or a
  number)."""
  return workdir_lib.stage_fields(as_json(config), "student")


def saved_fields(run_dir: str, kind: str) -> dict:
  """The stage fields a finished run recorded (done.json), else those of
  its config.json (runs written before done.json held them)."""
  done = workdir_lib.load_json(os.path.join(run_dir, "done.json")) or {}
  if "stage_fields" in done:
    return done["stage_fields"]
  saved = workdir_lib.load_json(os.path.join(run_dir, "config.json")) or {}
  return workdir_lib.stage_fields(saved, kind)


def recorded_fingerprint(run_dir: str, stage: str) -> str | None:
  """The fingerprint of a finished run's stage fields (None: not
  finished)."""
  if workdir_lib.load_json(os.path.join(run_dir, "done.json")) is None:
    return None
  return workdir_lib.fingerprint(saved_fields(run_dir, stage))


def finished(run_dir: str, name: str) -> bool:
  """True when the stage's done.json and predictions read.

  A damaged done.json or predictions.npz is moved aside (to
  `done.json.damaged`) with one line: the stage then reruns, which resumes
  from its last checkpoint and exports its results again.
  """
  done = os.path.join(run_dir, "done.json")
  if not os.path.exists(done):
    return False
  preds = os.path.join(run_dir, "predictions.npz")
  problem = None
  if workdir_lib.load_json(done) is None:
    problem = "done.json is damaged"
  elif not workdir_lib.readable_predictions(preds):
    problem = "predictions.npz is missing or damaged"
  if problem is None:
    return True
  os.replace(done, done + ".damaged")
  logging_utils.log(f"   {name}: {problem}; exporting it again from the "
                    "last checkpoint")
  return False


def check_reusable(run_dir: str, name: str, kind: str, expected: dict,
                   teacher_fingerprint: str | None = None) -> None:
  """Raises StageMismatch unless a finished stage fits the config.

  Args:
    run_dir: the finished stage's folder.
    name: its name in messages and in `pipeline.recompute`.
    kind: 'teachers' or 'student'.
    expected: the config's stage fields.
    teacher_fingerprint: for a student, its teachers' current fingerprint.
  """
  diffs = workdir_lib.differences(saved_fields(run_dir, kind), expected)
  done = workdir_lib.load_json(os.path.join(run_dir, "done.json")) or {}
  used = done.get("teacher_fingerprint")
  if teacher_fingerprint is not None and used not in (None,
                                                      teacher_fingerprint):
    diffs.append("its teachers (they were retrained since)")
  if diffs:
    shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
    raise workdir_lib.StageMismatch(
        f"The finished stage {name!r} ({run_dir}) was computed with other "
        f"settings: {shown}. Use a new --workdir, or add "
        f"--config.pipeline.recompute={name} to recompute it (the old "
        "result is moved under replaced/ in the workdir, not deleted).")


def check_finished(config: ml_collections.ConfigDict,
                   workdir: str) -> list[tuple[str, str]]:
  """Checks every finished stage of a pipeline workdir against `config`.

  Returns:
    (method, run dir) of the pipeline entries' finished students, in order.

  Raises:
    workdir.StageMismatch: a finished stage of other settings (the
      teachers, or a student, whose teachers must also be the current ones).
  """
  t_dir = teacher_dir(workdir)
  if finished(t_dir, TEACHERS):
    check_reusable(t_dir, TEACHERS, "teachers",
                   teacher_fields(stage_config(config, "teachers")))
  teacher_fp = recorded_fingerprint(t_dir, "teachers")
  out = []
  for entry in configlib.pipeline_entries(config):
    run_dir = student_dir(workdir, entry)
    if finished(run_dir, entry):
      s_config = stage_config(config, "distill", entry, t_dir)
      check_reusable(run_dir, entry, "student", student_fields(s_config),
                     teacher_fp)
      out.append((s_config.perturb.method, run_dir))
  return out
