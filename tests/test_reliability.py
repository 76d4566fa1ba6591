"""Preemption, crashes and bad input, through the real command line.

Each run is a subprocess of `tests/_hooked_main.py` (the CLI plus test
hooks), so signals and SIGKILL are real. Final states are compared bit for
bit against an uninterrupted run of the same command.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, latest_checkpoint, xla_flags

from divdistill_jax import checkpointing

HOOKED_MAIN = os.path.join(ROOT, "tests", "_hooked_main.py")
# 8 steps per epoch x 2 epochs; a checkpoint every 4 steps, metrics every 2.
SMOKE = ["--config.data.train_size=256"]


def _command(variant: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, HOOKED_MAIN,
          f"--config=configs/quickstart.py:{variant},smoke",
          f"--workdir={workdir}", *SMOKE, *extra]


def _run(cmd, *, env=None, signal_after_step=None, sig=signal.SIGTERM):
  """Runs `cmd`; optionally sends `sig` once metrics.jsonl passes a step."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if signal_after_step is not None:
    workdir = next(a.split("=", 1)[1] for a in cmd
                   if a.startswith("--workdir="))
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
      if os.path.exists(metrics):
        with open(metrics) as f:
          steps = [json.loads(line)["step"] for line in f if line.strip()]
        if steps and max(steps) >= signal_after_step:
          proc.send_signal(sig)
          break
      time.sleep(0.05)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _checkpoint_steps(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.all_steps()
  ckpt.close()
  return sorted(steps)


def _assert_same_run(a, b):
  step_a, state_a = latest_checkpoint(a)
  step_b, state_b = latest_checkpoint(b)
  assert step_a == step_b
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  with np.load(os.path.join(a, "predictions.npz")) as fa, np.load(
      os.path.join(b, "predictions.npz")) as fb:
    for key in fa.files:
      np.testing.assert_array_equal(fa[key], fb[key])


@pytest.fixture(scope="module")
def reference_teachers(smoke_pipeline):
  """An uninterrupted teachers run of the same config (the smoke pipeline's
  teachers stage); also the teachers of the distill tests."""
  return smoke_pipeline.teachers


def test_sigterm_saves_and_the_same_command_resumes_exactly(
    reference_teachers, tmp_path):
  workdir = str(tmp_path / "teachers")
  cmd = _command("teachers", workdir)
  rc, _, err = _run(cmd, env={"SLOW_STEP": "0.4"}, signal_after_step=2)
  assert rc == 128 + signal.SIGTERM, err
  assert "SIGTERM at step" in err and "rerun the same command" in err
  assert "Traceback" not in err
  saved = _checkpoint_steps(workdir)
  assert saved and 2 < saved[-1] < 16  # Saved where it stopped.
  assert not os.path.exists(os.path.join(workdir, "done.json"))
  rc, _, err = _run(cmd)
  assert rc == 0, err
  _assert_same_run(reference_teachers, workdir)


def test_sigint_during_distillation_resumes_exactly(smoke_pipeline,
                                                    tmp_path):
  # The uninterrupted run of the same config: the pipeline's student.
  straight = os.path.join(smoke_pipeline.workdir, "students", "confods")
  split = str(tmp_path / "split")
  teachers = f"--config.teacher.workdir={smoke_pipeline.teachers}"
  cmd = _command("confods", split, teachers)
  rc, _, err = _run(cmd, env={"SLOW_STEP": "0.4"}, signal_after_step=2,
                    sig=signal.SIGINT)
  assert rc == 128 + signal.SIGINT, err
  assert "SIGINT at step" in err
  assert _checkpoint_steps(split)[-1] < 16
  rc, _, err = _run(cmd)
  assert rc == 0, err
  _assert_same_run(straight, split)


def test_sigkill_mid_save_resumes_from_last_complete_checkpoint(
    reference_teachers, tmp_path):
  workdir = str(tmp_path / "teachers")
  cmd = _command("teachers", workdir)
  rc, _, _ = _run(cmd, env={"KILL_AT_SAVE": "8"})
  assert rc == -signal.SIGKILL
  # Step 8's files were written but never committed: orbax ignores them.
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("8.") for n in names), names
  assert _checkpoint_steps(workdir) == [4]
  rc, out, err = _run(cmd)
  assert rc == 0, err
  assert "resumed from step 4" in out
  _assert_same_run(reference_teachers, workdir)


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def test_two_processes_with_jax_distributed_match_one(reference_teachers,
                                                      tmp_path):
  """The multi-host path: 2 processes x 2 CPU devices on loopback.

  Each process loads half of every global batch; the result must be the
  4-device single-process run's (the reference fixture).
  """
  workdir = str(tmp_path / "two_processes")
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(2)}
  procs = [subprocess.Popen(
      _command("teachers", workdir, "--config.parallel.distributed=True",
               f"--config.parallel.coordinator_address=127.0.0.1:{port}",
               "--config.parallel.num_processes=2",
               f"--config.parallel.process_id={i}"),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  with open(os.path.join(workdir, "done.json")) as f:
    assert json.load(f)["steps"] == 16
  with np.load(os.path.join(workdir, "predictions.npz")) as f:
    assert f["test_probs"].shape == (2, 64, 10)
  one, two = _metrics(reference_teachers), _metrics(workdir)
  assert sorted(one) == sorted(two)
  # Step 2 agrees to float rounding (the all-reduce order differs); later
  # steps drift as rounding noise grows on this tiny net.
  for key in ("train/loss", "train/param_norm", "train/accuracy"):
    assert two[2][key] == pytest.approx(one[2][key], rel=1e-5), key
  assert two[4]["train/loss"] == pytest.approx(one[4]["train/loss"], rel=0.02)


def test_bad_input_prints_one_clear_line(reference_teachers, tmp_path):
  """Errors of our checks print the message alone, without a traceback."""
  cases = [
      (_command("kd", str(tmp_path / "a")),
       "No teachers workdir: set --config.teacher.workdir"),
      (_command("kd", str(tmp_path / "b"),
                f"--config.teacher.workdir={reference_teachers}",
                "--config.student.ensemble_size=3"),
       "Ensemble size mismatch: 2 teachers"),
      (_command("teachers", str(tmp_path / "c"),
                "--config.teacher.batch_size=30"),
       "teacher.batch_size: global batch 30 is not divisible"),
      (_command("teachers", str(tmp_path / "d"),
                "--config.data.data_dir=" + str(tmp_path / "nowhere")),
       "Fashion-MNIST not found"),
  ]
  for cmd, message in cases:
    rc, _, err = _run(cmd)
    assert rc == 1, (cmd, err)
    assert "divdistill: error:" in err and message in err, err
    assert "Traceback" not in err, err


def test_corrupted_teacher_checkpoint_is_refused_without_running_code(
    reference_teachers, tmp_path):
  """Every file of best/ replaced by a pickle that would create a folder."""
  broken = str(tmp_path / "teachers")
  shutil.copytree(reference_teachers, broken)
  marker = str(tmp_path / "code_ran")

  class Payload:
    def __reduce__(self):
      return (os.mkdir, (marker,))

  for root, _, files in os.walk(os.path.join(broken, "best")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        pickle.dump(Payload(), fh)
  rc, _, err = _run(_command("kd", str(tmp_path / "student"),
                             f"--config.teacher.workdir={broken}"))
  assert rc == 1, err
  assert "Could not read the teacher checkpoint" in err
  assert "Traceback" not in err
  assert not os.path.exists(marker)


def test_only_our_own_checks_lose_their_traceback():
  from divdistill_jax import main, parallel
  ours = main._raised_by_our_checks  # pylint: disable=protected-access
  with pytest.raises(ValueError) as info:
    parallel.check_batch_size(30, parallel.make_mesh(4), "teacher.batch_size")
  assert ours(info.value)
  with pytest.raises((TypeError, ValueError)) as info:
    jax.numpy.zeros(6).reshape(4, 4)  # Raised inside JAX: keep traceback.
  assert not ours(info.value)
  with pytest.raises(KeyError) as info:
    {}["missing"]  # noqa: B018
  assert not ours(info.value)


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
  from divdistill_jax import fileio
  path = str(tmp_path / "done.json")
  fileio.write_json(path, {"steps": 1})
  # json.dump fails half-way (after writing '{"steps": 2, "bad": ').
  with pytest.raises(TypeError):
    fileio.write_json(path, {"steps": 2, "bad": object()})
  with open(path) as f:
    assert json.load(f) == {"steps": 1}
  assert os.listdir(tmp_path) == ["done.json"]  # No temporary file left.
  fileio.write_npz(str(tmp_path / "p.npz"), a=np.arange(3))
  with np.load(tmp_path / "p.npz") as f:  # Exactly this name, no '.npz.npz'.
    np.testing.assert_array_equal(f["a"], np.arange(3))
