"""The per-GPU recipe end to end: BatchNorm groups and per-group ODS draws.

The CIFAR-100 configs default to them; these tests run the same structure
at smoke size (`conftest.grouped_config`), on one and two devices. The
step itself is checked against a reference that forms the groups by hand in
tests/test_distill_step.py.
"""

import json
import os

import jax
import numpy as np
from conftest import grouped_config

from divdistill_jax import distill, jobs, parallel, runtime, teachers


def test_grouped_student_step_is_the_same_on_one_and_two_devices(
    smoke_pipeline):
  """Groups are slices of the global batch, not of a device's share: the
  first step's parameters and BatchNorm statistics agree on 1 and 2
  devices (per-group ODS draws included)."""
  config = grouped_config("confods,smoke",
                          **{"teacher.workdir": smoke_pipeline.teachers})
  model, variables, _ = teachers.load_teachers(config,
                                               smoke_pipeline.teachers)
  splits = runtime.load_splits(config)
  out = []
  for devices in (1, 2):
    task = distill.make_student_task(config, parallel.make_mesh(devices),
                                     splits, model, variables)
    images, labels = task.batch_fn(0)
    state, metrics = task.train_step(task.state, images, labels,
                                     jax.random.key(0))
    out.append(jax.device_get((state.params, state.batch_stats,
                               metrics["perturbation_l2"])))
  (p1, s1, l1), (p2, s2, l2) = out
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()), p1, p2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6), s1, s2)


def test_grouped_pipeline_on_two_devices(tmp_path):
  """Teachers, a student and the table, with groups on a 2-device mesh:
  every stage records the groups it ran with. (The per-group ODS draws of
  a ConfODS step and of the calibration have their own tests.)"""
  workdir = str(tmp_path / "w")
  config = grouped_config(devices=2, **{"pipeline.methods": "kd"})
  results = jobs.run_job(config, workdir)
  rows = {r["label"]: r for r in results["rows"]}
  assert set(rows) == {"DE-1", "DE-2", "BE-2 KD"}
  assert all(np.isfinite(r["nll"]) for r in rows.values())
  with open(os.path.join(workdir, "teachers", "done.json")) as f:
    assert json.load(f)["stage_fields"]["teacher.bn_group_size"] == 16
  with open(os.path.join(workdir, "students", "kd", "done.json")) as f:
    assert json.load(f)["stage_fields"]["student.bn_group_size"] == 8


def test_teacher_partial_last_batch_normalises_per_replica():
  """data.drop_remainder = False: the teachers' last step of an epoch has
  each replica's remainder (here 1 image of 2 replicas per member) and its
  BatchNorm statistics are the mean of those per-replica groups' updates,
  computed here with an ungrouped network, member by member."""
  from divdistill_jax import data
  config = grouped_config("teachers,smoke", **{
      "teacher.batch_size": 8, "teacher.bn_group_size": 4,
      "data.drop_remainder": False, "data.sampler_replicas": 2})
  rng = np.random.default_rng(0)
  splits = {"train": (rng.integers(0, 256, (18, 28, 28, 1), np.uint8),
                      rng.integers(0, 10, 18).astype(np.int32))}
  task = teachers.make_teacher_task(config, parallel.make_mesh(1), splits)
  assert task.steps_per_epoch == data.steps_per_epoch(
      18, 8, replicas=2, drop_remainder=False) == 3
  state = task.state
  for step in range(2):
    images, labels = task.batch_fn(step)
    state, _ = task.train_step(state, images, labels, jax.random.key(0))
  images, labels = task.batch_fn(2)
  assert images.shape[:2] == (2, 2)  # [members, 2 replicas x 1 image].
  before = jax.device_get((state.params, state.batch_stats))
  state, _ = task.train_step(state, images, labels, jax.random.key(0))
  plain = teachers.build_teacher_model(config, bn_group_size=None)
  x = np.asarray(images, np.float32) / 255
  for m in range(2):
    member = jax.tree.map(lambda a, m=m: a[m], before)
    groups = [plain.apply({"params": member[0], "batch_stats": member[1]},
                          x[m, i:i + 1], train=True,
                          mutable=["batch_stats"])[1]["batch_stats"]
              for i in range(2)]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *groups)
    got = jax.tree.map(lambda a, m=m: np.asarray(a[m]), state.batch_stats)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(
        g, w, rtol=1e-5, atol=1e-6), got, want)
