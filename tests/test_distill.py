"""Distillation: errors, fused passes, exact resume, the whole pipeline."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import latest_checkpoint, load_config, notebook_config

from divdistill_jax import calibrate, configlib, distill, jobs, step, teachers
from divdistill_jax.student import Student

SMALL = {"data.train_size": 128, "teacher.batch_size": 32,
         "student.batch_size": 32}


@pytest.fixture(scope="module")
def teacher_dir(smoke_pipeline):
  return smoke_pipeline.teachers


def _student(method, teacher_dir, **overrides):
  return load_config("quickstart", f"{method},smoke", **SMALL,
                     **{"teacher.workdir": teacher_dir, **overrides})


def test_teacher_errors_are_clear(teacher_dir, tmp_path):
  with pytest.raises(teachers.TeacherError, match="No teachers workdir"):
    teachers.load_teachers(_student("kd", None), None)
  with pytest.raises(teachers.TeacherError, match="No finished teachers run"):
    teachers.load_teachers(_student("kd", str(tmp_path)), str(tmp_path))
  with pytest.raises(teachers.TeacherError,
                     match="2 teachers .* student.ensemble_size=3"):
    teachers.load_teachers(_student("kd", teacher_dir,
                                   **{"student.ensemble_size": 3}),
                          teacher_dir)
  # Mean pairing accepts any student size.
  teachers.load_teachers(_student("kd", teacher_dir,
                                 **{"student.ensemble_size": 3,
                                    "student.pairing": "mean"}), teacher_dir)
  config = _student("kd", teacher_dir)
  config.unlock()
  config.data.name = "cifar10"
  with pytest.raises(teachers.TeacherError, match="trained on 'fashion_mnist'"):
    teachers.load_teachers(config, teacher_dir)
  broken = str(tmp_path / "broken")
  shutil.copytree(teacher_dir, broken)
  for root, _, files in os.walk(os.path.join(broken, "best")):
    for f in files:
      if f != "_CHECKPOINT_METADATA":
        os.remove(os.path.join(root, f))
  with pytest.raises(teachers.TeacherError, match="teacher checkpoint"):
    teachers.load_teachers(_student("kd", broken), broken)


def test_step_spec_carries_the_config():
  """Every static option of the step comes from its config field."""
  config = load_config("cifar100_wrn28x10", "confods",
                       **{"perturb.step_size": 2.5})
  spec = step.StepSpec.from_config(config)
  assert (spec.method, spec.alpha, spec.temperature, spec.pairing) == (
      "confods", 0.9, 1.0, "member")
  assert (spec.padding, spec.flip, spec.clean_pass) == (4, True, True)
  options = spec.perturb
  assert (options.step_size, options.temperature, options.num_steps) == (
      2.5, 1.0, 1)
  # One ODS draw per official GPU: the student's BatchNorm group.
  assert options.group_size == config.student.bn_group_size == 16
  syncbn = step.StepSpec.from_config(load_config("cifar100_wrn28x10",
                                                 "confods,syncbn"))
  assert syncbn.perturb.group_size is None
  with pytest.raises(ValueError, match="only kd.alpha = 1"):
    step.StepSpec(method="ods", perturb=options, alpha=0.9,
                     temperature=1.0, clean_pass=False)


def test_fused_pass_equals_two_passes_on_forward_statistics():
  config = _student("confods", None)
  batch = 8
  two = Student(config, None)
  fused = Student(config, batch)
  x = jax.random.uniform(jax.random.key(0), (2, batch, 28, 28, 1))
  x_kd = jnp.clip(x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                  0, 1)
  variables = two.init(jax.random.key(2), x[0, :1])
  clean, stats1 = two.apply(variables, x, train=True)
  kd, _ = two.apply({"params": variables["params"], "batch_stats": stats1},
                    x_kd, train=True)
  both, _ = fused.apply(variables, jnp.concatenate([x, x_kd], axis=1),
                        train=True)
  np.testing.assert_allclose(both[:, :batch], clean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(both[:, batch:], kd, rtol=1e-4, atol=1e-4)


def test_distill_resume_is_exact(smoke_pipeline, tmp_path):
  """Stopped at step 3 and resumed = the pipeline's uninterrupted run."""
  straight = os.path.join(smoke_pipeline.workdir, "students", "confods")
  split = str(tmp_path / "split")

  def config(**overrides):
    return load_config("quickstart", "confods,smoke",
                       **{"teacher.workdir": smoke_pipeline.teachers,
                          "logging.progress_bar": False, **overrides})

  assert distill.distill(config(stop_after_step=3), split) == {
      "stopped_at_step": 3}
  out = distill.distill(config(), split)
  jax.tree.map(np.testing.assert_array_equal, latest_checkpoint(straight)[1],
               latest_checkpoint(split)[1])
  assert out["method"] == "confods"
  with np.load(os.path.join(split, "predictions.npz")) as f:
    assert f["test_probs"].shape == (2, 64, 10)


def test_single_network_student(teacher_dir, tmp_path):
  config = _student("ods", teacher_dir, **{"student.ensemble_size": 1,
                                           "student.pairing": "mean"})
  distill.distill(config, str(tmp_path))
  with np.load(tmp_path / "predictions.npz") as f:
    assert f["validation_probs"].shape == (1, 64, 10)
  state = latest_checkpoint(str(tmp_path))[1]
  names = [str(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(state["params"])]
  assert not any("fast_" in n for n in names)  # A real single network.


def test_pipeline_runs_every_method_and_reuses_stages(smoke_pipeline,
                                                      capsys):
  with smoke_pipeline.locked() as workdir:
    capsys.readouterr()
    results = jobs.run_job(notebook_config(), workdir)
    # Every stage finished when the fixture ran: all are reused.
    out = capsys.readouterr().out
  assert out.count("finished earlier: reused") == 6
  assert "diversity-matched" not in out  # The calibration is reused too.
  labels = [r["label"] for r in results["rows"]]
  assert labels == ["DE-1", "DE-2", "BE-2 KD", "BE-2 KD+Gaussian",
                    "BE-2 KD+ODS", "BE-2 KD+ConfODS", "BE-2 KD+Disagreement"]
  root = Path(workdir)
  for method in configlib.PIPELINE_METHODS:
    assert os.path.exists(root / "students" / method / "predictions.npz")
  for plot in ("teacher_kl.png", "step_size_calibration.png"):
    assert os.path.getsize(root / "plots" / plot) > 1000
  with np.load(root / "teachers" / "diversity.npz") as f:
    assert {"kl_train", "kl_validation", "kl_train+ods"} <= set(f.files)
  # Fixed eta: students use it; the calibration is a logged diagnostic.
  with open(root / "teachers" / "step_size.json") as f:
    calibration = json.load(f)
  assert set(calibration["methods"]) == set(configlib.PIPELINE_METHODS) - {
      "kd"}
  rows = {r["label"]: r for r in results["rows"]}
  assert rows["BE-2 KD+ODS"]["step_size"] == 1.0
  assert rows["BE-2 KD"]["step_size"] is None


def test_auto_step_size_is_what_the_student_uses(smoke_pipeline, tmp_path):
  """A student with step_size=auto ends exactly where one given the
  recorded value explicitly does."""
  calibration = calibrate.load(smoke_pipeline.teachers)
  eta = calibration["methods"]["ods"]["step_size"]
  assert eta != 1.0
  runs = {}
  for name, value in (("auto", "auto"), ("explicit", eta)):
    config = load_config("quickstart", "ods,smoke",
                         **{"teacher.workdir": smoke_pipeline.teachers,
                            "perturb.step_size": value, "stop_after_step": 2})
    distill.distill(config, str(tmp_path / name))
    runs[name] = latest_checkpoint(str(tmp_path / name))[1]
  jax.tree.map(np.testing.assert_array_equal, runs["auto"], runs["explicit"])
  # And differs from the paper's eta = 1.
  config = load_config("quickstart", "ods,smoke",
                       **{"teacher.workdir": smoke_pipeline.teachers,
                          "stop_after_step": 2})
  distill.distill(config, str(tmp_path / "fixed"))
  fixed = latest_checkpoint(str(tmp_path / "fixed"))[1]
  pairs = zip(jax.tree.leaves(fixed["params"]),
              jax.tree.leaves(runs["auto"]["params"]))
  assert not all(np.array_equal(a, b) for a, b in pairs)
