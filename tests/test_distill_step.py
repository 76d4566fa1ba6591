"""One whole distillation step against an independent recomputation.

The reference below shares only the network definitions (tested against
per-member references in test_models) and the perturbation functions
(tested against analytic gradients in test_perturb) with the code under
test. It rebuilds everything the step itself decides: which key draws what,
which images the teachers see, the clean -> perturbed BatchNorm threading,
the per-GPU BatchNorm groups and ODS draws (formed here, group by group,
with an ungrouped network), which pass gets CE and which KD, the loss
weights, the member pairing, and PyTorch-style SGD with coupled L2 and a
fast-weight group, by hand. The step under test is built from a config by
`distill.make_student_task`, so every config field it reads is covered.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from divdistill_jax import distill, ensemble, models, parallel, perturb
from divdistill_jax.student import Student

M, B, HW, K = 2, 8, 8, 10
ALPHA, TEMP, ETA = 0.7, 2.0, 8.0
LR, FAST_LR, WD, MOMENTUM = 0.1, 0.05, 0.05, 0.9
NUM_STEPS = 2


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _setup(pairing):
  # The stem-only ResNet: a conv, a BatchNorm (so the statistics threading
  # is visible) and a classifier, quick to compile.
  config = load_config("quickstart", "kd,smoke",
                       **{"student.pairing": pairing,
                          "model.name": "resnet2_w4"})
  info_mean, info_std = (0.2860,), (0.3530,)
  teacher_model = models.get_model("resnet2_w4", num_classes=K,
                                   mean=info_mean, std=info_std)
  sample = jnp.zeros((1, HW, HW, 1))
  teacher_vars = ensemble.init_members(teacher_model, jax.random.key(1), M,
                                       sample)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_STEPS, B, HW, HW, 1), dtype=np.uint8)
  labels = rng.integers(0, K, (NUM_STEPS, B)).astype(np.int32)
  return config, teacher_model, teacher_vars, images, labels


def _reference_run(student_model, variables, teacher_model, teacher_vars,
                   images, labels, base_key, *, method, pairing, fused,
                   num_ascent, confidence_scaled, group, alpha, clean_pass):
  """len(images) steps recomputed by hand; returns (params, stats,
  metrics). Each step's batch size is its images'."""
  params = jax.tree.map(np.asarray, variables["params"])
  stats = variables["batch_stats"]
  buf = jax.tree.map(np.zeros_like, params)
  fast = jax.tree_util.tree_map_with_path(
      lambda p, _: "fast_" in jax.tree_util.keystr(p), params)
  all_metrics = []

  def teacher_fn(v, inputs):
    return teacher_model.apply(v, inputs, train=False)

  def student_fn(v, inputs):  # Eval mode, for tdiv_sdiv.
    return student_model.apply(v, jnp.broadcast_to(inputs, (M, *inputs.shape)),
                                train=False)

  def perturbed(key, x):
    return perturb.perturb(method, key, x, teacher_fn, teacher_vars,
                           step_size=ETA, temperature=TEMP,
                           num_steps=num_ascent,
                           confidence_scaled=confidence_scaled,
                           student_fn=student_fn,
                           student_variables={"params": params,
                                              "batch_stats": stats})

  def apply_one(p, s, inputs):
    logits, new = student_model.apply(
        {"params": p, "batch_stats": s},
        jnp.broadcast_to(inputs, (M, *inputs.shape)), train=True,
        mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def apply(p, s, inputs):
    """Train mode; with groups, each group of images (all M copies) is
    normalised alone and the running statistics move by the mean of the
    groups' updates."""
    if group is None:
      return apply_one(p, s, inputs)
    outs = [apply_one(p, s, inputs[i:i + group])
            for i in range(0, len(inputs), group)]
    logits = jnp.concatenate([o[0] for o in outs], axis=1)
    new = jax.tree.map(lambda *a: sum(a) / len(a), *[o[1] for o in outs])
    return logits, new

  @jax.jit
  @functools.partial(jax.grad, has_aux=True)
  def loss_grad(p, s, x, x_kd, targets, y):
    if not clean_pass:  # One pass, on the perturbed images only.
      kd_logits, s2 = apply(p, s, x_kd)
      logq = jax.nn.log_softmax(kd_logits / TEMP)
      kd = jnp.mean(jnp.sum(targets * (jnp.log(targets) - logq), -1))
      return TEMP**2 * kd, (kd_logits, kd_logits, s2)
    clean, s1 = apply(p, s, x)
    if method == "kd":
      kd_logits, s2 = clean, s1
    else:
      # The perturbed pass starts from the clean pass's statistics.
      kd_logits, s2 = apply(p, s1, x_kd)
      if fused:  # One update with the mean of both passes' statistics.
        _, s_kd_alone = apply(p, s, x_kd)
        s2 = jax.tree.map(lambda a, b: (a + b) / 2, s1, s_kd_alone)
    logp = jax.nn.log_softmax(clean)
    ce = -jnp.mean(jnp.take_along_axis(
        logp, jnp.broadcast_to(y, (M, len(y)))[..., None], -1))
    logq = jax.nn.log_softmax(kd_logits / TEMP)
    kd = jnp.mean(jnp.sum(targets * (jnp.log(targets) - logq), -1))
    return (1 - alpha) * ce + alpha * TEMP**2 * kd, (clean, kd_logits, s2)

  for step in range(len(images)):
    B = len(images[step])  # noqa: N806  (the batch size, as elsewhere)
    key = jax.random.fold_in(base_key, step)
    _, perturb_key = jax.random.split(key)
    x = jnp.asarray(images[step], jnp.float32) / 255.0  # No augmentation.
    # The student as it is before this step's update. ODS draws once per
    # group (official GPU): group i with split(key, B / group)[i].
    if group is not None and method in ("ods", "confods"):
      keys = jax.random.split(perturb_key, B // group)
      x_kd = jnp.concatenate([perturbed(keys[i], x[i * group:(i + 1) * group])
                              for i in range(B // group)])
    else:
      x_kd = perturbed(perturb_key, x)
    if method == "kd":
      np.testing.assert_array_equal(x_kd, x)
    # Teachers on the perturbed images, one member at a time.
    t_logits = np.stack([np.asarray(teacher_fn(
        jax.tree.map(lambda a, m=m: a[m], teacher_vars), x_kd))
                         for m in range(M)])
    t_probs = np.exp(_np_log_softmax(t_logits / TEMP))
    targets = t_probs if pairing == "member" else np.broadcast_to(
        t_probs.mean(0), t_probs.shape)

    grads, (clean, kd_logits, stats) = loss_grad(params, stats, x, x_kd,
                                                 targets, labels[step])
    # Metrics in float64 numpy from the reference logits.
    y = labels[step]
    ce = -_np_log_softmax(clean)[:, np.arange(B), y].mean()
    kd = (targets * (np.log(targets) - _np_log_softmax(
        np.asarray(kd_logits) / TEMP))).sum(-1).mean()
    logp_t = _np_log_softmax(t_logits)
    log_mean = np.log(np.exp(logp_t).mean(0))
    mi = (np.exp(logp_t) * (logp_t - log_mean)).sum(-1).mean(0).mean()
    delta = np.asarray(x_kd, np.float64) - np.asarray(x, np.float64)
    all_metrics.append({
        "loss": (1 - alpha) * ce + alpha * TEMP**2 * kd, "ce": ce, "kd": kd,
        "accuracy": (np.asarray(clean).argmax(-1) == y).mean(),
        "perturbation_l2": np.linalg.norm(delta.reshape(B, -1), axis=1).mean(),
        "teacher_mi": mi})
    # torch.optim.SGD with coupled L2: buf = mu buf + (g + wd p); p -= lr buf.
    def sgd(p, g, b, is_fast):
      g = np.asarray(g, np.float64) + (0.0 if is_fast else WD) * p
      b = MOMENTUM * b + g
      return p - (FAST_LR if is_fast else LR) * b, b

    out = jax.tree.map(sgd, params, grads, buf, fast)
    params = jax.tree.map(lambda o: o[0], out,
                          is_leaf=lambda o: isinstance(o, tuple))
    buf = jax.tree.map(lambda o: o[1], out,
                       is_leaf=lambda o: isinstance(o, tuple))
  return params, stats, all_metrics


CASES = [
    # (method, pairing, fused, ascent steps, confidence_scaled, BN/ODS group,
    #  clean pass)
    ("kd", "member", False, 1, False, None, True),
    ("gaussian", "member", False, 1, False, None, True),
    ("ods", "member", False, 1, False, None, True),
    ("confods", "member", False, 1, False, None, True),
    ("disagreement", "member", False, 2, True, None, True),
    ("confods", "member", True, 1, False, None, True),
    ("ods", "mean", False, 1, False, None, True),
    # Per-GPU groups: ghost BatchNorm and one ODS draw per 4 images, with
    # two passes and fused (one pass, the same groups).
    ("confods", "member", False, 1, False, 4, True),
    ("ods", "member", True, 1, False, 4, True),
    # The ICML 2022 recipe: TDiv-SDiv through the current student, alpha = 1
    # and only the perturbed pass.
    ("tdiv_sdiv", "member", False, 1, False, None, False),
]


# (..., devices): the grouped ConfODS case again on a 2-device mesh (one
# BatchNorm group and one ODS draw per device, as on the official GPUs).
DEVICE_CASES = [(*c, 1) for c in CASES] + [
    ("confods", "member", False, 1, False, 4, True, 2)]


@pytest.mark.parametrize(
    "method,pairing,fused,num_ascent,conf,group,clean,devices", DEVICE_CASES)
def test_student_step_matches_reference(method, pairing, fused, num_ascent,
                                        conf, group, clean, devices):
  alpha = ALPHA if clean else 1.0
  _, teacher_model, teacher_vars, images, labels = _setup(pairing)
  # Every option through the config, as a user sets it. A large weight
  # decay so that its groups are visible at float32.
  config = load_config("quickstart", f"{method},smoke", **{
      "student.pairing": pairing, "model.name": "resnet2_w4",
      "student.batch_size": B, "student.bn_group_size": group,
      "student.fused_passes": fused, "kd.alpha": alpha, "kd.clean_pass": clean,
      "kd.temperature": TEMP, "perturb.step_size": ETA,
      "perturb.num_steps": num_ascent, "perturb.confidence_scaled": conf,
      "data.crop_padding": 0, "data.flip": False,
      "student.optim.learning_rate": LR,
      "student.optim.fast_learning_rate": FAST_LR,
      "student.optim.weight_decay": WD, "student.optim.momentum": MOMENTUM,
      "student.optim.schedule": "constant"})
  splits = {"train": (images.reshape(-1, HW, HW, 1), labels.reshape(-1))}
  task = distill.make_student_task(config, parallel.make_mesh(devices),
                                   splits, teacher_model, teacher_vars)
  state = task.state
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  variables = jax.tree.map(np.asarray, variables)
  base_key = jax.random.key(7)
  got_metrics = []
  for i in range(NUM_STEPS):
    state, metrics = task.train_step(state, images[i], labels[i], base_key)
    got_metrics.append(jax.tree.map(float, metrics))

  # The reference's network has no groups: it forms them itself.
  ungrouped = Student(config, None).model
  want_params, want_stats, want_metrics = _reference_run(
      ungrouped, variables, teacher_model, teacher_vars, images, labels,
      base_key, method=method, pairing=pairing, fused=fused,
      num_ascent=num_ascent, confidence_scaled=conf, group=group,
      alpha=alpha, clean_pass=clean)

  for got, want in zip(got_metrics, want_metrics):
    for name, value in want.items():
      assert got[name] == pytest.approx(value, rel=2e-4, abs=2e-5), name
  if method != "kd":
    assert want_metrics[0]["perturbation_l2"] > 0.02  # A visible step.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=2e-5), state.params, want_params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=2e-6), state.batch_stats, want_stats)
  assert int(state.step) == NUM_STEPS


def test_partial_last_batch_step_matches_reference():
  """The official sampler's partial last batch (data.drop_remainder =
  False): 18 images over 2 replicas of 4-image batches leave each replica 1
  image in the epoch's third step, so that step has 2 images, BatchNorm
  groups of 1 image and one ODS draw per image, checked against the
  reference forming those groups itself."""
  from divdistill_jax import data
  _, teacher_model, teacher_vars, _, _ = _setup("member")
  config = load_config("quickstart", "confods,smoke", **{
      "model.name": "resnet2_w4", "student.batch_size": B,
      "student.bn_group_size": B // 2, "data.drop_remainder": False,
      "data.sampler_replicas": 2, "kd.alpha": ALPHA, "kd.temperature": TEMP,
      "perturb.step_size": ETA, "data.crop_padding": 0, "data.flip": False,
      "student.optim.learning_rate": LR,
      "student.optim.fast_learning_rate": FAST_LR,
      "student.optim.weight_decay": WD, "student.optim.momentum": MOMENTUM,
      "student.optim.schedule": "constant"})
  n = 18
  rng = np.random.default_rng(5)
  splits = {"train": (rng.integers(0, 256, (n, HW, HW, 1), dtype=np.uint8),
                      rng.integers(0, K, n).astype(np.int32))}
  task = distill.make_student_task(config, parallel.make_mesh(1), splits,
                                   teacher_model, teacher_vars)
  assert task.steps_per_epoch == 3
  # The task's own last batch: one image of each replica's share.
  last_images, last_labels = (np.asarray(a) for a in task.batch_fn(2))
  assert last_images.shape[0] == 2
  variables = jax.tree.map(np.asarray, {
      "params": task.state.params, "batch_stats": task.state.batch_stats})
  base_key = jax.random.key(7)
  state, metrics = task.train_step(task.state, last_images, last_labels,
                                   base_key)
  want_params, want_stats, want_metrics = _reference_run(
      Student(config, None).model, variables, teacher_model, teacher_vars,
      last_images[None], last_labels[None], base_key, method="confods",
      pairing="member", fused=False, num_ascent=1, confidence_scaled=False,
      group=1, alpha=ALPHA, clean_pass=True)
  for name, value in want_metrics[0].items():
    assert float(metrics[name]) == pytest.approx(value, rel=2e-4,
                                                 abs=2e-5), name
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=2e-5), state.params, want_params)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      g, w, rtol=2e-4, atol=2e-6), state.batch_stats, want_stats)
  assert data.last_batch_size(n, B, replicas=2, drop_remainder=False) == 2
