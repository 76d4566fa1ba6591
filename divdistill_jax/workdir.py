"""What keeps a workdir honest: stage fingerprints, one writer, checks.

Every stage (the teachers, each student) records in its `done.json` a
fingerprint of the config fields that determine its result, and a student
also the fingerprint of the teachers it learnt from. A finished stage is
reused only when the fields match the config being run; paths, logging,
checkpointing and parallelism settings are not part of a result, so a
moved or copied workdir, or `./w` for `w`, is the same workdir.

A run holds an advisory lock on its workdir for its whole life; the kernel
drops it when the process ends, however it ends, so a dead run never blocks
the next one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator

import numpy as np

from divdistill_jax import configlib

LOCK_FILE = ".divdistill.lock"
REPLACED = "replaced"  # Stages set aside by a recompute, under the workdir.


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked; the message says why and how."""


class StageMismatch(WorkdirError):
  """A finished stage computed under other settings than the config's."""


# Config sections that never change a stage's result.
_NOT_RESULTS = ("job", "logging", "checkpoint", "compile_cache_dir",
                "cpu_keep_freed_memory", "stop_after_step", "pipeline",
                "parallel")
# Fields that do not change a result either: paths, how members are
# batched (equal results by construction), evaluation batching.
_NOT_RESULT_FIELDS = ("data.data_dir", "teacher.workdir", "eval.batch_size",
                      *configlib.MEMORY_FIELDS)
_TEACHER_SECTIONS = ("seed", "data", "model", "teacher", "eval.schedule")
# The student's result also depends on its teachers, through their own
# fingerprint (recorded separately), not through the student's copy of the
# teacher section. The auto_* fields matter only with step_size 'auto'
# (then they and the teachers determine the calibrated eta).
_STUDENT_SECTIONS = ("seed", "data", "model", "student", "kd", "perturb",
                     "eval.schedule")
_AUTO_ONLY = ("perturb.auto_target_ratio", "perturb.auto_num_examples")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _defaults() -> dict:
  return flatten(json.loads(configlib.base_config().to_json_best_effort()))


def stage_fields(config: dict, stage: str) -> dict:
  """The dotted config fields that determine a stage's result.

  Args:
    config: a config as JSON (`config.to_json_best_effort()` parsed, or a
      run's `config.json`); fields it lacks (added to the code after that
      run) count at their default.
    stage: 'teachers' or 'student'. A student's fields are those it was
      asked for: with step_size 'auto' the request, not the calibrated
      value (the request, the teachers and these fields determine it).

  Returns:
    {dotted field: value}.
  """
  sections = {"teachers": _TEACHER_SECTIONS,
              "student": _STUDENT_SECTIONS}[stage]
  flat = {**_defaults(), **flatten(config)}
  skip = set(_NOT_RESULT_FIELDS)
  if stage == "student" and flat.get("perturb.step_size") != "auto":
    skip |= set(_AUTO_ONLY)
  return {k: v for k, v in sorted(flat.items())
          if any(k == s or k.startswith(s + ".") for s in sections)
          and k not in skip}


def fingerprint(fields: dict) -> str:
  """A short hash of stage fields (and of the stages they consumed)."""
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(saved: dict, current: dict) -> list[str]:
  """Fields whose values differ, with both values: 'kd.alpha 0.9 -> 0.5'."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if a != b:
      out.append(f"{key} {a!r} -> {b!r}")
  return out


def load_json(path: str) -> dict | None:
  """A JSON file, or None when it is missing or damaged."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def readable_predictions(path: str) -> bool:
  """True when a predictions .npz opens and every array in it reads."""
  try:
    with np.load(path) as f:
      for name in f.files:
        f[name]  # noqa: B018  (reads and checks the array)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and checks it can be written.

  Returns:
    Its absolute, resolved path.

  Raises:
    WorkdirError: it is a file, or it cannot be created or written.
  """
  path = os.path.realpath(os.path.abspath(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir!r} is a file, not a directory.")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir!r} cannot be written "
                       f"({e.strerror or e}).") from None
  return path


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's advisory lock for the life of a run.

  Raises:
    WorkdirError: another process holds it (its pid and start time named).
  """
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+")  # noqa: SIM115  (held open while the run lives)
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown process"
      raise WorkdirError(
          f"{workdir!r} is in use by another run ({holder}); wait for it to "
          "finish or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()}, started {started}")
    f.flush()
    yield
  finally:
    f.close()  # Closing releases the lock.


def move_aside(workdir: str, path: str) -> str:
  """Moves a stage's folder to `workdir/replaced/<time>/<its relative path>`.

  Nothing is deleted; returns the new location.
  """
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  rel = os.path.relpath(path, workdir)
  target = os.path.join(workdir, REPLACED, stamp, rel)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(path, target)
  return target
