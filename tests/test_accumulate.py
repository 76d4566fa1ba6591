"""Gradient accumulation over BatchNorm groups, and rematerialisation.

k microbatches of whole groups must give the step of the whole batch: the
same parameters, BatchNorm statistics and optimiser state to float
rounding, with the perturbation (per-group ODS draws included) unchanged.
The whole-batch step itself is checked against an independent reference in
tests/test_distill_step.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import grouped_config

from divdistill_jax import (accumulate, configlib, distill, models, parallel,
                            runtime, teachers, train, workdir)


def test_split_keeps_each_shards_images_and_whole_groups():
  x = jnp.arange(16)
  # 2 devices of 8 images; microbatch j = the j-th half of each share.
  got = np.asarray(accumulate.split(x, 2, shards=2))
  np.testing.assert_array_equal(got, [[0, 1, 2, 3, 8, 9, 10, 11],
                                      [4, 5, 6, 7, 12, 13, 14, 15]])
  # Batch on axis 1 (the teachers' [M, B] layout).
  y = jnp.arange(12).reshape(2, 6)
  got = np.asarray(accumulate.split(y, 3, axis=1))
  assert got.shape == (3, 2, 2)
  np.testing.assert_array_equal(got[1], [[2, 3], [8, 9]])


def test_mean_value_and_grad_is_the_whole_batch_gradient():
  """A loss that is a mean over examples: the mean of the microbatches'
  values and gradients is the whole batch's (analytic gradient)."""
  x = jax.random.normal(jax.random.key(0), (12, 3))
  w = jnp.array([0.5, -1.0, 2.0])

  def loss_fn(w, x):
    pred = x @ w
    return jnp.mean(pred**2), pred.mean()

  (value, aux), grad = accumulate.mean_value_and_grad(
      loss_fn, w, accumulate.split(x, 3), 3)
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  np.testing.assert_allclose(value, np.mean((xn @ wn) ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux, (xn @ wn).mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, 2 * xn.T @ (xn @ wn) / 12, rtol=1e-5)


def _first_step(task):
  images, labels = task.batch_fn(0)
  state, metrics = task.train_step(task.state, images, labels,
                                   jax.random.key(0))
  return jax.device_get((state, metrics))


def _assert_same_step(a, b, rtol=2e-5):
  (sa, ma), (sb, mb) = a, b
  for name in ("params", "batch_stats", "opt_state"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=rtol, atol=rtol * max(np.abs(x).max(), 1e-3)),
                 getattr(sa, name), getattr(sb, name))
  for name in ("loss", "accuracy"):
    np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5)


@pytest.mark.parametrize("method,k,devices,fused", [
    ("confods", 4, 1, False),  # One group per microbatch, per-group draws.
    ("confods", 2, 2, False),  # Two devices: each keeps its own groups.
    ("gaussian", 2, 1, True),  # The fused clean + perturbed pass.
])
def test_student_microbatches_give_the_whole_batch_step(
    smoke_pipeline, method, k, devices, fused):
  teacher_dir = smoke_pipeline.teachers
  configs = [grouped_config(f"{method},smoke", **{
      "teacher.workdir": teacher_dir, "student.microbatches": micro,
      "student.fused_passes": fused}) for micro in (1, k)]
  model, variables, _ = teachers.load_teachers(configs[0], teacher_dir)
  splits = runtime.load_splits(configs[0])
  mesh = parallel.make_mesh(devices)
  whole, accumulated = (_first_step(distill.make_student_task(
      c, mesh, splits, model, variables)) for c in configs)
  # The perturbation saw the whole batch as before (same draws). Two
  # programs compiled apart may sum the pixel norms in another order:
  # float32 rounding (a relative 3e-6 seen), far below what other draws
  # or other clipping would change.
  np.testing.assert_allclose(whole[1]["perturbation_l2"],
                             accumulated[1]["perturbation_l2"], rtol=1e-5)
  _assert_same_step(whole, accumulated)
  # Not vacuous: the step moved the parameters and statistics.
  assert not np.allclose(whole[0].batch_stats["BatchNorm_0"]["mean"], 0)


def test_teacher_microbatches_give_the_whole_batch_step():
  configs = [grouped_config(**{"teacher.microbatches": micro})
             for micro in (1, 2)]
  splits = runtime.load_splits(configs[0])
  mesh = parallel.make_mesh(1)
  steps = [_first_step(teachers.make_teacher_task(c, mesh, splits))
           for c in configs]
  _assert_same_step(*steps)


def test_microbatches_that_split_a_group_are_refused():
  with pytest.raises(ValueError, match="bn_group_size = None must be set"):
    configlib.validate(grouped_config(**{"student.bn_group_size": None,
                                         "student.microbatches": 2}))
  with pytest.raises(ValueError, match="3 x 8 must divide"):
    configlib.validate(grouped_config(**{"student.microbatches": 3}))
  with pytest.raises(ValueError, match="teacher.microbatches must be >= 1"):
    configlib.validate(grouped_config(**{"teacher.microbatches": 0}))
  # Per device: 32 images on 4 devices are 8 each, one group of 8.
  with pytest.raises(ValueError, match="per-device batch of 8 images"):
    accumulate.check(32, 2, 8, 4, "student.microbatches")
  accumulate.check(32, 2, 8, 2, "student.microbatches")
  # The partial last batch splits into the groups it has.
  assert accumulate.for_partial_batch(24, 6, 4, 1) == 4
  assert accumulate.for_partial_batch(24, 6, 4, 2) == 2
  assert accumulate.for_partial_batch(24, None, 4, 1) == 1


def test_memory_settings_are_not_part_of_a_stage_or_a_resume_check():
  base = train.config_json(grouped_config())
  other = train.config_json(grouped_config(**{
      "student.microbatches": 2, "teacher.microbatches": 2,
      "model.remat": "full"}))
  for stage in ("teachers", "student"):
    assert (workdir.stage_fields(base, stage)
            == workdir.stage_fields(other, stage))
  assert train.config_differences(base, other) == []


def test_remat_gives_the_same_gradients_and_recomputes():
  name = "resnet8"  # Its blocks name their convolutions as WRN's do.
  x = jax.random.uniform(jax.random.key(1), (2, 4, 8, 8, 3))
  out = {}
  for remat in ("none", "full", "convs"):
    net = models.get_model(name, num_classes=5, ensemble_size=2,
                           bn_group_size=2, remat=remat)
    variables = jax.jit(net.init)(jax.random.key(0), x)

    def loss(params, net=net, variables=variables):
      y, new = net.apply({"params": params,
                          "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
      return jnp.mean(jax.nn.log_softmax(y)[..., 0]), new

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    # The rematerialised blocks are in the program (not a no-op option).
    jaxpr = str(jax.make_jaxpr(grad_fn)(variables["params"]))
    assert (("remat" in jaxpr or "checkpoint" in jaxpr)
            == (remat != "none")), remat
    out[remat] = jax.jit(grad_fn)(variables["params"])
  # Recomputation may round differently: float32 rounding of the largest
  # gradient entry (a wrong remat changes gradients at O(1)).
  for remat in ("full", "convs"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max()),
                 out["none"], out[remat])


def test_unknown_remat_is_a_clear_error():
  with pytest.raises(ValueError, match="model.remat"):
    configlib.validate(grouped_config(**{"model.remat": "blocks"}))
