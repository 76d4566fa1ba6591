"""Schedules and PyTorch-style SGD groups (docs/SOURCES.md, Optimiser,
Schedule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divdistill_jax import optim


@pytest.mark.parametrize("epoch,factor", [
    (1, 0.01), (2, 0.2575), (3, 0.505), (4, 0.7525), (5, 1.0), (150, 1.0),
    (151, 0.99175), (201, 0.57925), (269, 0.01825), (270, 0.01), (300, 0.01),
])
def test_warmup_linear_values(epoch, factor):
  value = optim.warmup_linear_factor(epoch, (5, 150, 270), 0.01, 0.01)
  assert float(value) == pytest.approx(factor, abs=1e-6)


def test_schedule_is_constant_within_an_epoch():
  lr = optim.epoch_schedule(0.05, steps_per_epoch=10, total_epochs=300)
  assert float(lr(0)) == pytest.approx(0.0005)
  assert float(lr(9)) == pytest.approx(0.0005)
  assert float(lr(10)) == pytest.approx(0.05 * 0.2575)
  assert float(lr(40)) == pytest.approx(0.05)


def test_step_granularity_is_the_piecewise_linear_curve():
  """'step' follows np.interp through the milestones at fractional epochs."""
  steps = 7
  lr = optim.epoch_schedule(0.1, steps_per_epoch=steps, total_epochs=12,
                            milestones=(2, 5, 10), granularity="step")
  counts = np.arange(12 * steps)
  epochs = 1 + counts / steps
  want = 0.1 * np.interp(epochs, [1, 2, 5, 10], [0.01, 1, 1, 0.01])
  got = np.array([float(lr(c)) for c in counts])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # At epoch boundaries both granularities agree.
  per_epoch = optim.epoch_schedule(0.1, steps_per_epoch=steps, total_epochs=12,
                                   milestones=(2, 5, 10))
  for c in range(0, 12 * steps, steps):
    assert float(per_epoch(c)) == pytest.approx(float(lr(c)), rel=1e-5)
  with pytest.raises(ValueError, match="granularity"):
    optim.epoch_schedule(0.1, steps_per_epoch=1, total_epochs=1,
                         granularity="batch")


def test_cosine_schedule_ends_at_zero():
  assert float(optim.cosine_factor(1, 100, 0)) == pytest.approx(1.0)
  assert float(optim.cosine_factor(101, 100, 0)) == pytest.approx(0.0, abs=1e-6)
  assert float(optim.cosine_factor(1, 100, 5, 0.01)) == pytest.approx(0.01)


def test_sgd_groups_match_pytorch_reference():
  """A numpy re-implementation of torch.optim.SGD with two groups."""
  params = {"Conv_0": {"kernel": jnp.ones((2, 2)), "fast_r": jnp.ones(3)},
            "Dense_0": {"member_bias": jnp.full(2, 0.5)}}
  tx = optim.make_optimizer(steps_per_epoch=2, total_epochs=10,
                            learning_rate=0.1, fast_learning_rate=0.05,
                            weight_decay=0.01, momentum=0.9,
                            schedule="constant")
  state = tx.init(params)
  rng = np.random.default_rng(0)
  ref = jax.tree.map(np.asarray, params)
  buf = jax.tree.map(lambda _: None, params, is_leaf=lambda x: False)
  buf = {k: {n: None for n in v} for k, v in ref.items()}
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape), ref)
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
    params = jax.tree.map(jnp.add, params, updates)
    for mod in ref:
      for name in ref[mod]:
        fast = name.startswith("fast_")
        lr, wd = (0.05, 0.0) if fast else (0.1, 0.01)
        g = grads[mod][name] + wd * ref[mod][name]
        b = buf[mod][name]
        b = g if b is None else 0.9 * b + g
        buf[mod][name] = b
        ref[mod][name] = ref[mod][name] - lr * b
  for mod in ref:
    for name in ref[mod]:
      np.testing.assert_allclose(params[mod][name], ref[mod][name], rtol=1e-5)


def test_weight_decay_only_on_default_group():
  """Every non-fast parameter decays, BatchNorm scale and bias included
  (the official coupled L2 over all slow parameters)."""
  params = {"a": {"kernel": jnp.ones(2), "fast_s": jnp.ones(2)},
            "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
            "Dense_0": {"member_bias": jnp.ones(2), "fast_r": jnp.ones(2)}}
  tx = optim.make_optimizer(steps_per_epoch=1, total_epochs=1,
                            learning_rate=1.0, fast_learning_rate=1.0,
                            weight_decay=0.1, schedule="constant")
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["a"]["kernel"], -0.1)
  np.testing.assert_allclose(updates["a"]["fast_s"], 0.0)
  np.testing.assert_allclose(updates["BatchNorm_0"]["scale"], -0.1)
  np.testing.assert_allclose(updates["BatchNorm_0"]["bias"], -0.1)
  np.testing.assert_allclose(updates["Dense_0"]["member_bias"], -0.1)
  np.testing.assert_allclose(updates["Dense_0"]["fast_r"], 0.0)
  labels = optim.param_labels(params)
  assert labels["a"] == {"kernel": "default", "fast_s": "fast"}
