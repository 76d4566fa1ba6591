"""LatentBE: merging, identical members, BN re-estimation, optimiser, job."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from divdistill_jax import distill, evaluate, latentbe, models, optim
from divdistill_jax.student import Student

M, K = 3, 7


def _latent_be(name="resnet8", fast_std=0.5):
  be = models.get_model(name, num_classes=K, ensemble_size=M,
                        fast_init_std=fast_std, bias_mode="shared_before_s")
  plain = models.get_model(name, num_classes=K)
  return be, plain


def _random_variables(be, shape, seed=0):
  """Random fast weights around 1, a random classifier bias and random BN
  statistics, so that every term of the merge matters."""
  variables = be.init(jax.random.key(seed), jnp.zeros((M, 1, *shape)),
                      train=False)
  flat = flax.traverse_util.flatten_dict(variables)
  rng = np.random.default_rng(seed)
  for path, value in flat.items():
    if path[-1] in ("bias", "mean"):
      flat[path] = jnp.asarray(rng.normal(size=value.shape), jnp.float32)
    elif path[-1] == "var":
      flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape),
                               jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _independent_merge(variables, bias_rule):
  """W_avg = W * outer(mean r, mean s) layer by layer, in float64 numpy."""
  flat = flax.traverse_util.flatten_dict(variables["params"])
  layers = {path[:-1] for path in flat if path[-1] == "fast_r"}
  out = {}
  for path, value in flat.items():
    layer, leaf = path[:-1], path[-1]
    if layer not in layers:
      out[path] = np.asarray(value, np.float64)
      continue
    if leaf in ("fast_r", "fast_s"):
      continue
    r = np.asarray(flat[layer + ("fast_r",)], np.float64).mean(0)
    s = np.asarray(flat[layer + ("fast_s",)], np.float64).mean(0)
    plain_layer = tuple(
        n.replace("BatchEnsembleConv", "Conv").replace(
            "BatchEnsembleDense", "Dense") for n in layer)
    if leaf == "kernel":
      w = np.asarray(value, np.float64)
      w = w * r.reshape((1,) * (w.ndim - 2) + (-1, 1)) * s
      out[plain_layer + ("kernel",)] = w
    elif leaf == "bias":
      out[plain_layer + ("bias",)] = (s if bias_rule == "sb" else 1.0) * \
          np.asarray(value, np.float64)
  params = flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in out.items()})
  return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("name,bias_rule", [("resnet8", "sb"),
                                             ("wrn10x1", "b")])
def test_merged_network_is_the_plain_network_with_w_avg(name, bias_rule):
  be, plain = _latent_be(name)
  shape = (12, 12, 3)
  variables = _random_variables(be, shape)
  x = jax.random.uniform(jax.random.key(1), (4, *shape))
  merged = latentbe.merge(variables, bias_rule)
  latentbe.check_structure(merged, plain, x[:1])
  got = plain.apply(merged, x, train=False)
  want = plain.apply(_independent_merge(variables, bias_rule), x,
                     train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The merged network is not any single member nor their mean logits.
  members = be.apply(variables, jnp.broadcast_to(x, (M, *x.shape)),
                     train=False)
  assert not np.allclose(got, members.mean(0), atol=1e-3)


def test_identical_members_merge_exactly_into_that_member():
  be, plain = _latent_be("resnet8")
  shape = (12, 12, 3)
  variables = _random_variables(be, shape, seed=3)
  # Every member gets member 0's (random, not unit) fast weights.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.broadcast_to(a[:1], a.shape)
      if p[-1].key.startswith("fast_") else a, variables)
  x = jax.random.uniform(jax.random.key(2), (4, *shape))
  members = be.apply(variables, jnp.broadcast_to(x, (M, *x.shape)),
                     train=False)
  merged = plain.apply(latentbe.merge(variables, "sb"), x, train=False)
  for m in range(M):
    np.testing.assert_allclose(members[m], merged, rtol=1e-5, atol=1e-5)
  # Keeping b unscaled does not give the member back when s != 1.
  b_rule = plain.apply(latentbe.merge(variables, "b"), x, train=False)
  assert not np.allclose(b_rule, members[0], atol=1e-3)


def test_latentbe_starts_from_identical_members():
  be, _ = _latent_be("resnet8", fast_std=0.0)
  variables = be.init(jax.random.key(0), jnp.zeros((M, 1, 8, 8, 3)),
                      train=False)
  fast = [a for p, a in jax.tree_util.tree_leaves_with_path(variables)
          if p[-1].key.startswith("fast_")]
  assert fast and all(np.array_equal(a, np.ones_like(a)) for a in fast)
  head = variables["params"]["BatchEnsembleDense_0"]
  assert set(head) == {"kernel", "fast_r", "fast_s", "bias"}


def test_batchnorm_reestimation_matches_the_layer_input_statistics():
  """resnet2_w4: the only BatchNorm sees the stem conv's output."""
  plain = models.get_model("resnet2_w4", num_classes=K, mean=(0.5,),
                           std=(0.25,))
  images = np.asarray(jax.random.uniform(jax.random.key(0), (10, 8, 8, 1)))
  variables = plain.init(jax.random.key(1), images[:1], train=False)
  out = latentbe.reestimate_batch_stats(plain, variables, images,
                                        batch_size=6)
  kernel = np.asarray(variables["params"]["Conv_0"]["kernel"], np.float64)
  x = (images.astype(np.float64) - 0.5) / 0.25
  y = np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")),
                 np.float64)
  # Batches of 6 and 4 images, weighted by their sizes.
  parts = [y[:6], y[6:]]
  mean = sum(len(p) * p.mean((0, 1, 2)) for p in parts) / 10
  var = sum(len(p) * p.var((0, 1, 2), ddof=1) for p in parts) / 10
  stats = out["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-5)


def test_latentbe_optimiser_decays_fast_weights_toward_one():
  config = load_config("quickstart", "kd", **{"student.kind": "latentbe"})
  fields = distill.student_optim(config)
  m = config.student.ensemble_size
  tx = optim.make_optimizer(steps_per_epoch=10, total_epochs=12, **fields)
  params = {"Conv_0": {"kernel": jnp.full((2,), 0.5),
                       "fast_r": jnp.full((2,), 1.5)}}
  grads = {"Conv_0": {"kernel": jnp.full((2,), 0.2),
                      "fast_r": jnp.full((2,), 0.2)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(optim.epoch_schedule(
      fields["learning_rate"], steps_per_epoch=10, total_epochs=12,
      milestones=fields["milestones"], granularity=fields["granularity"])(0))
  wd = fields["weight_decay"]
  # First SGD step: the update is -lr * direction (momentum buffer = it).
  np.testing.assert_allclose(updates["Conv_0"]["kernel"],
                             -lr * (0.2 + wd * 0.5), rtol=1e-6)
  np.testing.assert_allclose(updates["Conv_0"]["fast_r"],
                             -lr * (m * 0.2 + wd * (1.5 - 1.0)), rtol=1e-6)


def test_latentbe_student_job_writes_merged_rows(smoke_pipeline, tmp_path):
  config = load_config("quickstart", "kd,smoke",
                       **{"teacher.workdir": smoke_pipeline.teachers,
                          "student.kind": "latentbe",
                          "student.merge_bn_reestimate": True})
  workdir = str(tmp_path / "latentbe")
  distill.distill(config, workdir)
  preds = evaluate.load_predictions(workdir)
  for rule in ("sb", "b", "sb_bn"):
    assert preds[f"merged_{rule}_test_probs"].shape == (1, 64, 10)
  # The saved merged predictions are the independently merged network's.
  from divdistill_jax import checkpointing, runtime
  best = checkpointing.load_variables(os.path.join(workdir, "best"))
  plain = Student(config).plain_model
  images = runtime.load_splits(config)["test"][0].astype(np.float32) / 255
  probs = jax.nn.softmax(plain.apply(_independent_merge(best, "sb"),
                                     images, train=False), -1)
  np.testing.assert_allclose(preds["merged_sb_test_probs"][0], probs,
                             rtol=1e-4, atol=1e-6)
  labels = [label for label, _ in evaluate.merged_students(
      "LatentBE-2 KD", preds)]
  assert labels == ["LatentBE-2 (merged)", "LatentBE-2 (merged, bias b)",
                    "LatentBE-2 (merged, BN re-estimated)"]


def test_followup_pipeline_rows(tmp_path):
  """The follow-up config's pipeline (smoke, on Fashion-MNIST): a single
  KD student, LatentBE with KD and with TDiv-SDiv, merged rows."""
  from divdistill_jax import jobs
  workdir = tmp_path / "followup"
  # Its own teachers: a finished stage of another config is not reused.
  config = load_config("cifar100_wrn28x4", "smoke",
                       **{"data.name": "fashion_mnist",
                          "logging.progress_bar": False})
  results = jobs.run_job(config, str(workdir))
  labels = [r["label"] for r in results["rows"]]
  assert labels == [
      "DE-1", "DE-2", "Single KD", "LatentBE-2 KD", "LatentBE-2 (merged)",
      "LatentBE-2 (merged, bias s*b)", "LatentBE-2 KD+TDiv-SDiv",
      "LatentBE-2 KD+TDiv-SDiv (merged)",
      "LatentBE-2 KD+TDiv-SDiv (merged, bias s*b)"]
  rows = {r["label"]: r for r in results["rows"]}
  # The headline merged row is the authors' evaluation.ipynb merge (the
  # shared bias unchanged, rule 'b'), the other the rule 's*b'.
  from divdistill_jax import metrics
  with np.load(workdir / "students" / "kd" / "predictions.npz") as f:
    for label, rule in (("LatentBE-2 (merged)", "b"),
                        ("LatentBE-2 (merged, bias s*b)", "sb")):
      want = 100 * metrics.accuracy(f[f"merged_{rule}_test_probs"][0],
                                    f["test_labels"])
      assert rows[label]["acc"] == pytest.approx(want)
  # One network: no member diversity; the un-merged ensemble has some.
  assert rows["LatentBE-2 (merged)"]["kl"] == 0.0
  assert rows["LatentBE-2 KD+TDiv-SDiv"]["step_size"] == 1.0
  assert sorted(os.listdir(workdir / "students")) == [
      "kd", "single_kd", "tdiv_sdiv"]


def test_latentbe_fast_weights_start_at_one_whatever_the_init_std():
  """student.kind = latentbe overrides fast_init_std: identical members."""
  sample = jnp.zeros((1, 28, 28, 1))

  def fast_leaves(kind):
    config = load_config("quickstart", "kd,smoke",
                         **{"student.kind": kind,
                            "student.fast_init_std": 0.5})
    params = Student(config).init(jax.random.key(0), sample)["params"]
    return [np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(params)
            if "fast_" in jax.tree_util.keystr(path)]

  latent = fast_leaves("latentbe")
  assert latent and all(np.all(leaf == 1.0) for leaf in latent)
  # The same std draws them for a BatchEnsemble student.
  assert any(np.std(leaf) > 0.1 for leaf in fast_leaves("batchensemble"))


def test_merged_selection_keeps_the_epoch_of_the_best_merged_network(
    tmp_path):
  """With a selection network (the merged LatentBE), the checkpoint kept is
  the one whose selection accuracy is best, not the members'."""
  from divdistill_jax import logging_utils, parallel, train
  labels = np.arange(4, dtype=np.int32) % 2
  images = np.zeros((4, 2, 2, 1), np.uint8)
  right = np.eye(2, dtype=np.float32)[labels]

  def probs(correct):  # [1, B, K]: all right or all wrong.
    return jnp.asarray(right if correct else right[:, ::-1])[None]

  def predict(variables, batch):  # Members: right at epoch 1 only.
    del batch
    return jnp.where(variables["params"]["epoch"] == 1, probs(True),
                     probs(False))

  def merged(variables, batch):  # Merged network: right at epoch 2 only.
    del batch
    return jnp.where(variables["params"]["epoch"] == 2, probs(True),
                     probs(False))

  config = load_config("quickstart", "kd,smoke", **{"eval.batch_size": 4})
  mesh = parallel.make_mesh(1)
  writer = logging_utils.MetricWriter(str(tmp_path), enabled=False)
  out = {}
  for name, select in (("members", None), ("merged", merged)):
    task = train.Task(
        name="t", state=None, train_step=None, batch_fn=None,
        predict_fn=predict, selection="mean", steps_per_epoch=1, epochs=2,
        images_per_step=1, eval_epochs=frozenset({1, 2}),
        selection_fn=select)
    state = train.new_state({"epoch": jnp.asarray(0)}, {}, (),
                            num_selected=1)
    for epoch in (1, 2):
      state = state.replace(params={"epoch": jnp.asarray(epoch)})
      state = train._validate(task, state, epoch, mesh, config, writer,  # pylint: disable=protected-access
                              images, labels, epoch)
    out[name] = (int(state.best_epoch[0]),
                 int(state.best_params["epoch"]))
  assert out == {"members": (1, 1), "merged": (2, 2)}


def test_followup_model_options_are_the_authors(tmp_path):
  """configs/cifar100_wrn28x4.py builds giung2-jax's initialisation and
  BatchNorm; the NeurIPS configs keep PyTorch's."""
  from divdistill_jax import teachers
  # The recipes' options on the stem-only network (quick to initialise).
  small = {"data.name": "fashion_mnist", "model.name": "resnet2_w4"}
  follow = load_config("cifar100_wrn28x4", "kd,single", **small)
  neurips = load_config("cifar100_wrn28x10", "kd", **small)
  for config, bias_zero in ((follow, True), (neurips, False)):
    model = teachers.build_teacher_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))[
        "params"]
    bias = [np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path).endswith("['bias']")
            and "Dense" in jax.tree_util.keystr(path)]
    assert len(bias) == 1 and np.all(bias[0] == 0) == bias_zero
  assert (follow.model.kernel_init, follow.model.bn_running_var,
          follow.student.selection, follow.student.merged_headline) == (
              "fan_in_truncated", "biased", "merged", "b")
  assert (neurips.model.kernel_init, neurips.model.bn_running_var,
          neurips.student.selection, neurips.student.merged_headline) == (
              "fan_out_normal", "unbiased", "members", "sb")
