"""Teacher training: equivalences, devices, resume, outputs, guards."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import latest_checkpoint, load_config

from divdistill_jax import (checkpointing, optim, parallel, runtime, teachers,
                            train)


def _smoke(**overrides):
  base = {"data.train_size": 128, "teacher.batch_size": 32,
          "student.batch_size": 32}
  base.update(overrides)
  return load_config("quickstart", "teachers,smoke", **base)


@pytest.mark.parametrize("strategy", ["vmap", "unroll"])
def test_member_step_equals_single_member_steps(strategy):
  config = _smoke()
  model = teachers.build_teacher_model(config)
  tx = optim.make_optimizer(steps_per_epoch=4, total_epochs=2,
                            **config.teacher.optim)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (3, 2, 8, 28, 28, 1), np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (3, 2, 8)))
  sample = jnp.zeros((1, 28, 28, 1))
  from divdistill_jax import ensemble
  variables = ensemble.init_members(model, jax.random.key(0), 2, sample)

  def state_of(v):
    return train.new_state(v["params"], v["batch_stats"],
                           tx.init(v["params"]), num_selected=1)

  step = jax.jit(functools.partial(
      teachers.teacher_train_step, model=model, tx=tx, strategy=strategy,
      padding=0, flip=False))
  key = jax.random.key(5)
  joint = state_of(variables)
  singles = [state_of(jax.tree.map(lambda a, m=m: a[m:m + 1], variables))
             for m in range(2)]
  for s in range(3):
    joint, _ = step(joint, images[s], labels[s], key)
    singles = [step(st, images[s][m:m + 1], labels[s][m:m + 1], key)[0]
               for m, st in enumerate(singles)]
  for m in range(2):
    jax.tree.map(lambda a, b, m=m: np.testing.assert_allclose(
        a[m], b[0], rtol=2e-5, atol=2e-6), joint.params, singles[m].params)
    jax.tree.map(lambda a, b, m=m: np.testing.assert_allclose(
        a[m], b[0], rtol=2e-5, atol=2e-6), joint.batch_stats,
        singles[m].batch_stats)


def test_one_device_equals_four_devices():
  """Same losses and parameters on 1 and 4 devices.

  Parameters are compared after the first step: reduction order differs
  between meshes and the tiny smoke network amplifies float noise ~100x per
  step, while a semantic difference (e.g. per-device BatchNorm statistics or
  sharding-dependent random numbers) would show at step 1 already.
  """
  assert jax.device_count() >= 4
  config = _smoke(**{"teacher.optim.learning_rate": 0.02})
  splits = runtime.load_splits(config)
  results = []
  for devices in (1, 4):
    mesh = parallel.make_mesh(devices)
    task = teachers.make_teacher_task(config, mesh, splits)
    state, losses, first = task.state, [], None
    for s in range(3):
      images, labels = task.batch_fn(s)
      state, metrics = task.train_step(state, images, labels,
                                       jax.random.key(0))
      losses.append(float(metrics["loss"]))
      first = jax.device_get(state.params) if s == 0 else first
    results.append((losses, first))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
      results[0][1], results[1][1])


def test_batch_not_divisible_by_devices():
  config = _smoke(**{"teacher.batch_size": 30})
  mesh = parallel.make_mesh(4)
  with pytest.raises(ValueError, match="per device 7.5"):
    teachers.make_teacher_task(config, mesh, runtime.load_splits(config))


class _FakeClock:
  """time.time() for train.py: +1 s per call, so elapsed times are exact."""

  def __init__(self, now):
    self.now = now

  def time(self):
    self.now += 1.0
    return self.now - 1.0


def test_resume_is_exact_and_run_writes_outputs(tmp_path, monkeypatch):
  straight = str(tmp_path / "straight")
  split = str(tmp_path / "split")
  summary = teachers.train_teachers(_smoke(), straight)
  clock = _FakeClock(0.0)
  monkeypatch.setattr(train, "time", clock)
  stopped = teachers.train_teachers(_smoke(stop_after_step=3), split)
  assert stopped == {"stopped_at_step": 3}
  ckpt = checkpointing.Checkpointer(os.path.join(split, "checkpoints"))
  first_seconds = ckpt.restore_meta(3)["seconds"]
  ckpt.close()
  clock.now = 1000.0
  resumed = teachers.train_teachers(_smoke(), split)
  monkeypatch.undo()
  # Wall time adds up over the interrupted and the resumed process: the
  # resumed run started its clock at 1000 and its last call was clock.now-1.
  assert first_seconds > 0
  assert resumed["seconds"] == first_seconds + (clock.now - 1.0 - 1000.0)
  step_a, a = latest_checkpoint(straight)
  step_b, b = latest_checkpoint(split)
  assert step_a == step_b == 8
  # Bit-exact: parameters, BN statistics, optimiser state, best variables.
  jax.tree.map(np.testing.assert_array_equal, a, b)

  files = set(os.listdir(straight))
  assert {"checkpoints", "best", "predictions.npz", "metrics.jsonl",
          "config.json", "done.json"} <= files
  assert any(f.startswith("events.out.tfevents") for f in files)
  with np.load(os.path.join(straight, "predictions.npz")) as f:
    assert f["test_probs"].shape == (2, 64, 10)
    assert f["validation_probs"].shape == (2, 64, 10)
    np.testing.assert_allclose(f["test_probs"].sum(-1), 1.0, rtol=1e-5)
  # Per-member best selection: each member's best epoch is the argmax of
  # its own validation accuracy history.
  history = [json.loads(line) for line in
             open(os.path.join(straight, "metrics.jsonl"))]
  val = [h for h in history if "val/member_0_accuracy" in h]
  assert len(val) == 2
  for m in range(2):
    accs = [h[f"val/member_{m}_accuracy"] for h in val]
    assert summary["best_epoch"][m] == int(np.argmax(accs)) + 1
    assert summary["best_val_accuracy"][m] == pytest.approx(max(accs))
  # The exported `best` teachers reproduce the saved validation predictions.
  best = checkpointing.load_variables(os.path.join(straight, "best"))
  config = _smoke()
  mesh = parallel.make_mesh(1)
  splits = runtime.load_splits(config)
  task = teachers.make_teacher_task(config, mesh, splits)
  probs = runtime.predict_split(task.predict_fn,
                                parallel.replicate(best, mesh),
                                splits["validation"][0], mesh, 64)
  with np.load(os.path.join(straight, "predictions.npz")) as f:
    np.testing.assert_allclose(probs, f["validation_probs"], rtol=1e-4,
                               atol=1e-6)

  # A workdir of another config is refused, naming the field.
  with pytest.raises(ValueError,
                     match="different config.*teacher.optim.learning_rate"):
    teachers.train_teachers(_smoke(**{"teacher.optim.learning_rate": 0.3},
                                   stop_after_step=2), split)


def test_config_differences_accept_fields_added_at_their_default():
  current = train.config_json(_smoke())
  older = json.loads(json.dumps(current))
  del older["kd"]["clean_pass"]  # A run saved before the field existed.
  del older["student"]["optim"]["fast_grad_scale"]
  assert train.config_differences(older, current) == []
  changed = json.loads(json.dumps(current))
  changed["kd"]["clean_pass"] = False
  # Missing AND not at the default (the quick start's T = 1 vs 4): differs.
  del older["kd"]["temperature"]
  assert train.config_differences(older, changed) == [
      "kd.clean_pass", "kd.temperature"]
  # Resumable fields never count.
  changed = json.loads(json.dumps(current))
  changed["logging"]["every_steps"] = 7
  assert train.config_differences(current, changed) == []


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  teachers.train_teachers(_smoke(stop_after_step=2), workdir)
  # Resume with a learning rate that overflows the parameters at step 3.
  config = _smoke(**{"teacher.optim.learning_rate": 1e30,
                     "checkpoint.allow_config_change": True,
                     "logging.every_steps": 1, "checkpoint.every_steps": 1})
  with pytest.raises(train.TrainingDiverged,
                     match="at step 3: train/param_norm|at step 3: param_norm"):
    teachers.train_teachers(config, workdir)
  step, state = latest_checkpoint(workdir)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_eval_schedule_official():
  assert train.eval_epochs(300, 30, 30, "official") == frozenset(
      [1, *range(30, 271, 30), *range(271, 301)])
  assert train.eval_epochs(10, 4) == frozenset([4, 8, 10])


def _index_coded_splits(n):
  """Images whose first two pixels spell their index; labels = index % 10."""
  images = np.zeros((n, 28, 28, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) // 256
  images[:, 0, 1, 0] = np.arange(n) % 256
  labels = (np.arange(n) % 10).astype(np.int32)
  return {"train": (images, labels), "validation": (images[:8], labels[:8]),
          "test": (images[:8], labels[:8])}


def test_each_teacher_member_has_its_own_data_order():
  """Member m sees its own permutation of the training set every epoch."""
  n, batch = 70, 16
  config = _smoke(**{"data.train_size": n, "teacher.batch_size": batch})
  splits = _index_coded_splits(n)
  task = teachers.make_teacher_task(config, parallel.make_mesh(1), splits)
  steps = task.steps_per_epoch
  assert steps == n // batch
  orders = []
  for epoch in range(2):
    seen = [[], []]
    for s in range(epoch * steps, (epoch + 1) * steps):
      images, labels = task.batch_fn(s)
      images, labels = np.asarray(images), np.asarray(labels)
      assert images.shape == (2, batch, 28, 28, 1)
      for m in range(2):
        idx = images[m, :, 0, 0, 0].astype(int) * 256 + images[m, :, 0, 1, 0]
        np.testing.assert_array_equal(labels[m], idx % 10)
        seen[m].extend(idx.tolist())
    for m in range(2):
      # Distinct examples of the training set (the last partial batch of
      # each epoch's permutation is dropped).
      assert len(set(seen[m])) == steps * batch
      assert set(seen[m]) <= set(range(n))
    assert seen[0] != seen[1]
    orders.append(seen)
  assert orders[0][0] != orders[1][0]  # A new permutation every epoch.


def test_figure1_sets_come_from_their_splits():
  """kl_validation is the teachers' KL on validation images, kl_train on
  training images, and the perturbed sets perturb training images."""
  from divdistill_jax import analysis, ensemble
  config = load_config("quickstart", "pipeline,smoke",
                       **{"perturb.step_size": 0.0})
  rng = np.random.default_rng(0)
  splits = {"train": (rng.integers(0, 256, (12, 28, 28, 1), np.uint8),
                      np.zeros(12, np.int32)),
            "validation": (rng.integers(0, 80, (10, 28, 28, 1), np.uint8),
                           np.zeros(10, np.int32))}
  model = teachers.build_teacher_model(config)
  variables = ensemble.init_members(model, jax.random.key(0), 2,
                                    jnp.zeros((1, 28, 28, 1)))
  out = analysis.teacher_diversity(config, model, variables, splits,
                                   ["kd", "ods", "disagreement"],
                                   num_examples=12, batch_size=4)

  def member_probs(images):
    x = jnp.asarray(images, jnp.float32) / 255
    return np.stack([np.asarray(jax.nn.softmax(model.apply(
        jax.tree.map(lambda a, m=m: a[m], variables), x, train=False)))
                     for m in range(2)])

  for name in ("train", "validation"):
    probs = member_probs(splits[name][0])
    kl = (probs[0] * np.log(probs[0] / probs[1])).sum(-1)
    kl = (kl + (probs[1] * np.log(probs[1] / probs[0])).sum(-1)) / 2
    np.testing.assert_allclose(out[f"kl_{name}"], kl, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(
        out[f"dis_{name}"], probs[0].argmax(-1) != probs[1].argmax(-1))
  assert not np.allclose(out["kl_train"][:10], out["kl_validation"])
  # A zero step leaves the training images as they are.
  for method in ("ods", "disagreement"):
    np.testing.assert_allclose(out[f"kl_train+{method}"], out["kl_train"],
                               rtol=1e-5, atol=1e-7)
  assert "kl_train+kd" not in out


def test_figure1_sets_draw_per_batchnorm_group_like_training():
  """With student BatchNorm groups, the perturbed Figure-1 set draws one
  ODS member and w per group, exactly as the training step's options do."""
  from divdistill_jax import analysis, ensemble, perturb
  from divdistill_jax.step import StepSpec
  config = load_config("quickstart", "ods,smoke",
                       **{"perturb.step_size": 8.0,
                          "student.bn_group_size": 4})
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (12, 28, 28, 1), np.uint8)
  splits = {"train": (images, np.zeros(12, np.int32)),
            "validation": (images[:4], np.zeros(4, np.int32))}
  model = teachers.build_teacher_model(config)
  variables = ensemble.init_members(model, jax.random.key(0), 2,
                                    jnp.zeros((1, 28, 28, 1)))
  options = StepSpec.from_config(config).perturb
  assert options.group_size == 4
  context = perturb.Context(ensemble.member_fn(model), variables)
  x = jnp.asarray(images, jnp.float32) / 255
  key = jax.random.key(config.seed)
  # Batches of 8 images (two groups) and 4 (one group), as the analysis
  # batches them; each batch's key is fold_in(key, its first index).
  want = np.concatenate([np.asarray(perturb.apply(
      "ods", jax.random.fold_in(key, i), x[i:i + 8], context, options))
      for i in (0, 8)])
  single = np.asarray(perturb.apply(
      "ods", jax.random.fold_in(key, 0), x[:8], context,
      perturb.Options(step_size=8.0, temperature=options.temperature)))
  assert not np.allclose(want[:8], single, atol=1e-6)  # Groups matter here.
  out = analysis.teacher_diversity(config, model, variables, splits, ["ods"],
                                   num_examples=12, batch_size=8)
  probs = np.stack([np.asarray(jax.nn.softmax(model.apply(
      jax.tree.map(lambda a, m=m: a[m], variables), jnp.asarray(want),
      train=False))) for m in range(2)]).astype(np.float64)
  kl = (probs[0] * np.log(probs[0] / probs[1])).sum(-1)
  kl = (kl + (probs[1] * np.log(probs[1] / probs[0])).sum(-1)) / 2
  np.testing.assert_allclose(out["kl_train+ods"], kl, rtol=1e-3, atol=1e-6)
