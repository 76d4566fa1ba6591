"""Distillation: errors, fused passes, exact resume, the whole pipeline."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import latest_checkpoint, load_config

from divdistill_jax import configlib, distill, jobs, teachers

SMALL = {"data.train_size": 128, "teacher.batch_size": 32,
         "student.batch_size": 32}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teachers"))
  teachers.train_teachers(load_config("quickstart", "teachers,smoke", **SMALL),
                          workdir)
  return workdir


def _student(method, teacher_dir, **overrides):
  return load_config("quickstart", f"{method},smoke", **SMALL,
                     **{"teacher.workdir": teacher_dir, **overrides})


def test_teacher_errors_are_clear(teacher_dir, tmp_path):
  with pytest.raises(distill.TeacherError, match="No teachers workdir"):
    distill.load_teachers(_student("kd", None), None)
  with pytest.raises(distill.TeacherError, match="No finished teachers run"):
    distill.load_teachers(_student("kd", str(tmp_path)), str(tmp_path))
  with pytest.raises(distill.TeacherError,
                     match="2 teachers .* student.ensemble_size=3"):
    distill.load_teachers(_student("kd", teacher_dir,
                                   **{"student.ensemble_size": 3}),
                          teacher_dir)
  # Mean pairing accepts any student size.
  distill.load_teachers(_student("kd", teacher_dir,
                                 **{"student.ensemble_size": 3,
                                    "student.pairing": "mean"}), teacher_dir)
  config = _student("kd", teacher_dir)
  config.unlock()
  config.data.name = "cifar10"
  with pytest.raises(distill.TeacherError, match="trained on 'fashion_mnist'"):
    distill.load_teachers(config, teacher_dir)
  broken = str(tmp_path / "broken")
  shutil.copytree(teacher_dir, broken)
  for root, _, files in os.walk(os.path.join(broken, "best")):
    for f in files:
      if f != "_CHECKPOINT_METADATA":
        os.remove(os.path.join(root, f))
  with pytest.raises(distill.TeacherError, match="teacher checkpoint"):
    distill.load_teachers(_student("kd", broken), broken)


def test_fused_pass_equals_two_passes_on_forward_statistics():
  config = _student("confods", None)
  batch = 8
  two = distill.Student(config, None)
  fused = distill.Student(config, batch)
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


def test_distill_resume_is_exact(teacher_dir, tmp_path):
  straight, split = str(tmp_path / "a"), str(tmp_path / "b")
  out = distill.distill(_student("confods", teacher_dir), straight)
  assert distill.distill(_student("confods", teacher_dir,
                                  stop_after_step=3), split) == {
                                      "stopped_at_step": 3}
  distill.distill(_student("confods", teacher_dir), split)
  jax.tree.map(np.testing.assert_array_equal, latest_checkpoint(straight)[1],
               latest_checkpoint(split)[1])
  assert out["method"] == "confods"
  with np.load(os.path.join(straight, "predictions.npz")) as f:
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


def test_pipeline_runs_every_method_and_reuses_stages(tmp_path, capsys):
  config = load_config("quickstart", "smoke", **SMALL)
  results = jobs.run_job(config, str(tmp_path))
  labels = [r["label"] for r in results["rows"]]
  assert labels == ["DE-1", "DE-2"] + [
      f"BE-2 {configlib.METHOD_LABELS[m]}" for m in configlib.METHODS]
  for method in configlib.METHODS:
    assert os.path.exists(tmp_path / "students" / method / "predictions.npz")
  assert os.path.getsize(tmp_path / "plots" / "teacher_kl.png") > 1000
  with np.load(tmp_path / "teachers" / "diversity.npz") as f:
    assert {"kl_train", "kl_validation", "kl_train+ods"} <= set(f.files)
  capsys.readouterr()
  jobs.run_job(config, str(tmp_path))
  assert capsys.readouterr().out.count("finished earlier: reused") == 6
