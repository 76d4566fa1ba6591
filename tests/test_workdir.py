"""A workdir never reports numbers its config did not produce.

Each test runs the real command (`python -m divdistill_jax.main`) on a copy
of the session's smoke pipeline or on a fresh tiny workdir.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

SMOKE = ["--config=configs/quickstart.py:smoke",
         "--config.logging.progress_bar=False"]


def _cli(workdir, *args, config=SMOKE, cwd=ROOT, timeout=300):
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "divdistill_jax.main", *config,
       f"--workdir={workdir}", *args], cwd=cwd, capture_output=True,
      text=True, timeout=timeout)
  proc.seconds = time.time() - start
  return proc


def _one_error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("divdistill: error: ")
  return lines[0]


@pytest.fixture
def copy(smoke_pipeline, tmp_path):
  """A private copy of the finished smoke pipeline workdir."""
  dst = tmp_path / "copy"
  with smoke_pipeline.locked() as workdir:
    shutil.copytree(workdir, dst)
  return dst


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _predictions(run_dir):
  with np.load(os.path.join(run_dir, "predictions.npz")) as f:
    return {k: f[k] for k in f.files}


REFUSALS = [
    (["--config.kd.alpha=0.5"], "kd.alpha 0.9 -> 0.5"),
    (["--config.teacher.ensemble_size=3", "--config.student.ensemble_size=3"],
     "teacher.ensemble_size 2 -> 3"),
    (["--config.kd.temperature=2.0"], "kd.temperature 1.0 -> 2.0"),
]


def test_a_finished_stage_of_other_settings_is_refused(copy):
  before = {name: _read(copy / name) for name in (
      "results.json", "teachers/step_size.json", "teachers/diversity.npz",
      "students/kd/predictions.npz")}
  # The three commands at once, each on its own copy (one run per workdir);
  # each stops before any work.
  dirs = [copy] + [shutil.copytree(copy, f"{copy}_{i}") for i in (1, 2)]
  start = time.time()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "divdistill_jax.main", *SMOKE,
       f"--workdir={d}", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
           for d, (overrides, _) in zip(dirs, REFUSALS)]
  for proc, (_, named) in zip(procs, REFUSALS):
    _, proc.stderr = proc.communicate(timeout=120)
    line = _one_error_line(proc)
    assert named in line and "recompute" in line and "new --workdir" in line
  assert time.time() - start < 90
  for d in dirs:
    for name, data in before.items():  # Nothing was rewritten.
      assert _read(os.path.join(d, name)) == data, (d, name)


def test_recompute_moves_the_old_stage_aside(copy):
  old = _predictions(copy / "students" / "kd")
  proc = _cli(copy, "--config.kd.alpha=0.5", "--config.pipeline.methods=kd",
              "--config.pipeline.recompute=kd")
  assert proc.returncode == 0, proc.stderr[-3000:]
  replaced = [os.path.join(r, d) for r, ds, _ in os.walk(copy / "replaced")
              for d in ds if d == "kd"]
  assert len(replaced) == 1
  # The old result is kept whole, with the settings it was computed with.
  with open(os.path.join(replaced[0], "done.json")) as f:
    assert json.load(f)["stage_fields"]["kd.alpha"] == 0.9
  np.testing.assert_array_equal(_predictions(replaced[0])["test_probs"],
                                old["test_probs"])
  with open(copy / "students" / "kd" / "done.json") as f:
    done = json.load(f)
  assert done["stage_fields"]["kd.alpha"] == 0.5
  with open(copy / "results.json") as f:
    rows = {r["label"]: r for r in json.load(f)["rows"]}
  assert set(rows) == {"DE-1", "DE-2", "BE-2 KD"}
  assert rows["BE-2 KD"]["fingerprint"] == done["fingerprint"]
  assert not np.array_equal(_predictions(copy / "students" / "kd")
                            ["test_probs"], old["test_probs"])


def test_a_copied_workdir_resumes_under_another_spelling(copy, tmp_path):
  # An unfinished student in the copy: it must resume from its checkpoint,
  # not be refused for the workdir's new location or spelling.
  original = _predictions(copy / "students" / "kd")
  os.remove(copy / "students" / "kd" / "done.json")
  os.remove(copy / "students" / "kd" / "predictions.npz")
  config = [f"--config={ROOT}/configs/quickstart.py:smoke", *SMOKE[1:]]
  proc = _cli("./copy", config=config, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished earlier: reused") == 5
  assert "[student batchensemble kd] resumed from step" in proc.stdout
  got = _predictions(copy / "students" / "kd")
  np.testing.assert_array_equal(got["test_probs"], original["test_probs"])


def test_a_second_run_on_the_same_workdir_is_refused(smoke_pipeline,
                                                     tmp_path):
  workdir = tmp_path / "w"
  args = ["--config.pipeline.methods=kd"]
  first = subprocess.Popen(
      [sys.executable, "-m", "divdistill_jax.main", *SMOKE,
       f"--workdir={workdir}", *args], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  lock = workdir / ".divdistill.lock"
  deadline = time.time() + 120
  while not (lock.exists() and lock.read_text().startswith("pid")):
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.2)
  second = _cli(workdir, *args)
  line = _one_error_line(second)
  assert f"in use by another run (pid {first.pid}" in line
  assert second.seconds < 30
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  # The first run's student is the session pipeline's (same settings).
  with smoke_pipeline.locked() as reference:
    want = _predictions(os.path.join(reference, "students", "kd"))
  got = _predictions(workdir / "students" / "kd")
  np.testing.assert_allclose(got["test_probs"], want["test_probs"],
                             rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def stopped_student(smoke_pipeline, tmp_path_factory):
  """A KD student stopped at step 12 (checkpoints 8 and 12 kept), its
  teachers, its command line and the uninterrupted run's predictions."""
  root = tmp_path_factory.mktemp("stopped")
  with smoke_pipeline.locked() as reference:
    teachers = root / "teachers"
    shutil.copytree(os.path.join(reference, "teachers"), teachers)
    want = _predictions(os.path.join(reference, "students", "kd"))
  config = ["--config=configs/quickstart.py:kd,smoke",
            "--config.logging.progress_bar=False",
            f"--config.teacher.workdir={teachers}"]
  proc = _cli(root / "student", "--config.stop_after_step=12",
              config=config)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "student", config, want


@pytest.mark.parametrize("damage", ["state", "metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
    stopped_student, tmp_path, damage):
  student = tmp_path / "student"
  shutil.copytree(stopped_student[0], student)
  config, want = stopped_student[1:]
  latest = student / "checkpoints" / "12"
  if damage == "state":
    for root, _, files in os.walk(latest / "state"):
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          size = os.path.getsize(os.path.join(root, name))
          f.write(b"\x13" * max(size, 1))
  else:
    for root, _, files in os.walk(latest):
      for name in files:
        if "METADATA" in name or name.endswith(".json"):
          with open(os.path.join(root, name), "w") as f:
            f.write('{"truncated')
  proc = _cli(student, config=config)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint of step 12 is damaged" in proc.stdout
  assert "resumed from step 8" in proc.stdout
  assert (student / "checkpoints.damaged" / "12").is_dir()
  got = _predictions(student)
  np.testing.assert_allclose(got["test_probs"], want["test_probs"],
                             rtol=1e-5, atol=1e-7)
  # Replayed steps are logged once.
  with open(student / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  keys = [(r["step"], tuple(sorted(r))) for r in lines]
  assert len(keys) == len(set(keys))
  assert [r["step"] for r in lines] == sorted(r["step"] for r in lines)


def test_damaged_derived_files_are_computed_again(copy):
  calibration = json.loads(_read(copy / "teachers" / "step_size.json"))
  original = _predictions(copy / "students" / "kd")
  for name in ("teachers/step_size.json", "students/kd/predictions.npz"):
    data = _read(copy / name)
    with open(copy / name, "wb") as f:
      f.write(data[:len(data) // 3])
  proc = _cli(copy)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step_size.json is damaged" in proc.stdout
  assert "kd: predictions.npz is missing or damaged" in proc.stdout
  again = json.loads(_read(copy / "teachers" / "step_size.json"))
  for method, record in calibration["methods"].items():
    assert again["methods"][method]["step_size"] == pytest.approx(
        record["step_size"], rel=1e-6)
  np.testing.assert_array_equal(
      _predictions(copy / "students" / "kd")["test_probs"],
      original["test_probs"])


def _unwritable(tmp_path) -> str:
  if os.geteuid() == 0:  # Root writes through permissions: a kernel fs.
    return "/sys/divdistill-test-workdir"
  path = tmp_path / "readonly"
  path.mkdir()
  path.chmod(0o555)
  return str(path)


@pytest.mark.parametrize("case", [
    "nan", "inf", "file_workdir", "readonly_workdir", "missing_config",
    "unknown_variant"])
def test_bad_input_is_one_line_within_seconds(tmp_path, case):
  workdir, config, args = str(tmp_path / "w"), SMOKE, []
  if case == "nan":
    args, expect = ["--config.kd.temperature=nan"], "config.kd.temperature"
  elif case == "inf":
    args, expect = ["--config.student.optim.learning_rate=inf"], "finite"
  elif case == "file_workdir":
    workdir = str(tmp_path / "a_file")
    open(workdir, "w").close()
    expect = "is a file"
  elif case == "readonly_workdir":
    workdir, expect = _unwritable(tmp_path), "cannot be written"
  elif case == "missing_config":
    config, expect = ["--config=configs/no_such_file.py"], "no_such_file.py"
  else:
    config = ["--config=configs/quickstart.py:smoke,bogus"]
    expect = "Unknown config variant 'bogus'"
  proc = _cli(workdir, *args, config=config, timeout=60)
  assert expect in _one_error_line(proc)
  assert proc.seconds < 30
