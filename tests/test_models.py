"""Models against independent computations (docs/SOURCES.md, Models)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divdistill_jax import ensemble, models
from divdistill_jax.models import layers


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,classes,m,plain,extra", [
    ("wrn28x10", 100, 4, 36_536_884, 78_984),
    ("resnet32", 10, 4, 464_154, 9_170),
])
def test_exact_parameter_counts(name, classes, m, plain, extra):
  """Counts of the official PyTorch networks (eval_shape: nothing is
  materialised)."""
  net = models.get_model(name, num_classes=classes)
  be = models.get_model(name, num_classes=classes, ensemble_size=m)
  p = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  q = jax.eval_shape(be.init, jax.random.key(0),
                     jnp.zeros((m, 1, 32, 32, 3)))
  assert _n_params(p["params"]) == plain
  assert _n_params(q["params"]) - plain == extra


def _effective_plain_params(be_params, member):
  """BE params -> plain params of member m: W * (r_m s_m^T), bias b_m."""
  out = {}
  for key, value in be_params.items():
    plain_key = re.sub(r"^BatchEnsemble(Conv|Dense)_", r"\1_", key)
    if isinstance(value, dict) and "fast_r" in value:
      r, s = value["fast_r"][member], value["fast_s"][member]
      kernel = value["kernel"]
      if kernel.ndim == 4:
        out[plain_key] = {"kernel": kernel * r[None, None, :, None]
                          * s[None, None, None, :]}
      else:
        out[plain_key] = {"kernel": kernel * r[:, None] * s[None, :],
                          "bias": value["member_bias"][member]}
    elif isinstance(value, dict):
      out[plain_key] = _effective_plain_params(value, member)
    else:
      out[plain_key] = value
  return out


def _randomise_stats(stats, key):
  leaves, tree = jax.tree.flatten(stats)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [
      jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
      for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", ["wrn10x1", "resnet8"])
def test_batch_ensemble_member_equals_plain_network(name):
  m, k = 3, 7
  x = jax.random.uniform(jax.random.key(1), (5, 16, 16, 3))
  be = models.get_model(name, num_classes=k, ensemble_size=m)
  plain = models.get_model(name, num_classes=k)
  variables = be.init(jax.random.key(2), jnp.zeros((m, 1, 16, 16, 3)))
  stats = _randomise_stats(variables["batch_stats"], jax.random.key(3))
  logits = be.apply({"params": variables["params"], "batch_stats": stats},
                    jnp.broadcast_to(x, (m, *x.shape)), train=False)
  assert logits.shape == (m, 5, k)
  for member in range(m):
    params = _effective_plain_params(variables["params"], member)
    expected = plain.apply({"params": params, "batch_stats": stats}, x,
                           train=False)
    np.testing.assert_allclose(logits[member], expected, rtol=1e-4, atol=1e-5)
  # Members differ (the fast weights are not all equal).
  assert not np.allclose(logits[0], logits[1])


def test_fast_weight_init_and_names():
  be = models.get_model("resnet8", num_classes=10, ensemble_size=4)
  params = be.init(jax.random.key(0), jnp.zeros((4, 1, 32, 32, 3)))["params"]
  fast = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
          if path[-1].key.startswith("fast_")]
  values = np.concatenate([np.ravel(x) for x in fast])
  assert abs(values.mean() - 1.0) < 0.05 and abs(values.std() - 0.5) < 0.05
  head = params["BatchEnsembleDense_0"]
  assert set(head) == {"kernel", "fast_r", "fast_s", "member_bias"}
  np.testing.assert_array_equal(head["member_bias"], 0.0)
  conv_biases = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)
                 if "Conv" in str(p) and "bias" in str(p[-1])]
  assert not conv_biases


@pytest.mark.parametrize("group_size", [None, 2])
def test_grouped_batch_norm_matches_manual(group_size):
  x = jax.random.normal(jax.random.key(4), (3, 4, 5, 5, 6)) * 2 + 1
  bn = layers.BatchNorm(use_running_average=False, group_size=group_size)
  variables = bn.init(jax.random.key(0), x)
  y, updated = bn.apply(variables, x, mutable=["batch_stats"])
  xs = np.asarray(x, np.float64)
  g = 4 if group_size is None else group_size
  expected = np.empty_like(xs)
  means, vars_ = [], []
  for start in range(0, 4, g):
    block = xs[:, start:start + g]  # All members of these images together.
    mu = block.mean(axis=(0, 1, 2, 3))
    var = block.var(axis=(0, 1, 2, 3))
    expected[:, start:start + g] = (block - mu) / np.sqrt(var + 1e-5)
    means.append(mu)
    n = block.size / block.shape[-1]
    vars_.append(var * n / (n - 1))  # PyTorch keeps the unbiased variance.
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  stats = updated["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(means, 0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.mean(vars_, 0),
                             rtol=1e-4)


def _batch_norm_by_group(x, scale, bias, group_size):
  """An independent BatchNorm: a loop over groups, jnp.var, and autodiff."""
  outs, means, vars_ = [], [], []
  for start in range(0, x.shape[1], group_size):
    block = x[:, start:start + group_size]
    mu, var = block.mean(axis=(0, 1, 2, 3)), block.var(axis=(0, 1, 2, 3))
    outs.append((block - mu) / jnp.sqrt(var + 1e-5) * scale + bias)
    means.append(mu)
    vars_.append(var)
  return jnp.concatenate(outs, 1), jnp.stack(means), jnp.stack(vars_)


@pytest.mark.parametrize("group_size", [None, 2])
def test_batch_norm_gradient_matches_autodiff_of_a_loop(group_size):
  """The written-out BatchNorm gradient (input, scale, bias, and the
  cotangents of the group statistics) against autodiff of a per-group
  loop."""
  keys = jax.random.split(jax.random.key(5), 6)
  x = jax.random.normal(keys[0], (3, 4, 5, 5, 6)) * 2 + 1
  scale = jax.random.uniform(keys[1], (6,), minval=0.5, maxval=1.5)
  bias = jax.random.normal(keys[2], (6,))
  groups = 1 if group_size is None else 4 // group_size
  cotangents = (jax.random.normal(keys[3], x.shape),
                jax.random.normal(keys[4], (groups, 6)),
                jax.random.normal(keys[5], (groups, 6)))
  got_out, got_vjp = jax.vjp(
      lambda *a: layers.batch_norm(*a, group_size, 1e-5), x, scale, bias)
  want_out, want_vjp = jax.vjp(
      lambda *a: _batch_norm_by_group(*a, group_size or 4), x, scale, bias)
  for got, want in zip(got_out, want_out):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for got, want in zip(got_vjp(cotangents), want_vjp(cotangents)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The training step's case: only the output has a cotangent.
  got_x = jax.grad(lambda v: (layers.batch_norm(v, scale, bias, group_size,
                                                1e-5)[0] ** 3).sum())(x)
  want_x = jax.grad(lambda v: (_batch_norm_by_group(
      v, scale, bias, group_size or 4)[0] ** 3).sum())(x)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-4, atol=1e-4)


def test_batch_norm_group_must_divide_batch():
  bn = layers.BatchNorm(use_running_average=False, group_size=3)
  with pytest.raises(ValueError, match="must divide"):
    bn.init(jax.random.key(0), jnp.zeros((4, 2, 2, 1)))


def _numpy_conv(x, w, stride, pad):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_h, w.shape[-1]))
  for i in range(out_h):
    for j in range(out_h):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (3, 1), (1, 2)])
def test_conv_padding_is_symmetric_like_pytorch(kernel_size, stride):
  x = np.asarray(jax.random.normal(jax.random.key(5), (2, 8, 8, 3)))
  conv = layers.Conv(4, kernel_size=kernel_size, strides=stride)
  params = conv.init(jax.random.key(6), x)
  y = conv.apply(params, x)
  expected = _numpy_conv(x, np.asarray(params["params"]["kernel"]), stride,
                         (kernel_size - 1) // 2)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_init_scales_match_kaiming_fan_out():
  net = models.get_model("wrn10x1", num_classes=10)
  params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  kernel = np.asarray(params["Conv_0"]["kernel"])  # 3x3, 3 -> 16
  assert abs(kernel.std() - np.sqrt(2 / (16 * 9))) < 0.03
  head = params["Dense_0"]
  assert np.abs(head["bias"]).max() <= 1 / np.sqrt(16)
  assert abs(np.asarray(head["kernel"]).std() - np.sqrt(2 / 10)) < 0.06


def test_wrong_channel_count_is_a_clear_error():
  net = models.get_model("resnet8", num_classes=10, mean=(0.5,), std=(0.2,))
  with pytest.raises(ValueError, match="3 channels but the model was built"):
    net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))


@pytest.mark.parametrize("strategy", ensemble.STRATEGIES)
def test_apply_members_equals_python_loop(strategy):
  net = models.get_model("resnet8", num_classes=5, mean=(0.5,), std=(0.2,))
  x = jax.random.uniform(jax.random.key(7), (3, 12, 12, 1))
  variables = ensemble.init_members(net, jax.random.key(8), 3, x)
  logits = jax.jit(lambda v, x: ensemble.apply_members(
      net, v, x, strategy=strategy))(variables, x)
  assert logits.shape == (3, 3, 5)
  for m in range(3):
    member = jax.tree.map(lambda a, m=m: a[m], variables)
    np.testing.assert_allclose(logits[m], net.apply(member, x, train=False),
                               rtol=1e-5, atol=1e-5)
  # Independent initialisation per member.
  assert not np.allclose(logits[0], logits[1])
  # A traced member index selects the same member.
  picked = jax.jit(ensemble.select_member)(variables, jnp.asarray(2))
  np.testing.assert_allclose(net.apply(picked, x, train=False), logits[2],
                             rtol=1e-5, atol=1e-5)
  probs = ensemble.mean_probs(logits)
  np.testing.assert_allclose(probs, np.mean(jax.nn.softmax(logits), 0),
                             rtol=1e-6)


def test_unknown_model_name():
  with pytest.raises(ValueError, match="Unknown model 'resnet9'"):
    models.get_model("resnet9", num_classes=10)


@pytest.mark.parametrize("rule", ["unbiased", "biased"])
def test_batchnorm_running_variance_rule(rule):
  """One training step's running statistics, transcribed in numpy:
  PyTorch keeps the unbiased batch variance, giung2-jax (norm.py) the
  biased E[x^2] - E[x]^2; momentum 0.1 in PyTorch's convention."""
  from divdistill_jax.models import layers
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (6, 4, 4, 3)).astype(np.float32)
  bn = layers.BatchNorm(use_running_average=False, running_var=rule)
  variables = bn.init(jax.random.key(0), x)
  _, new = bn.apply(variables, x, mutable=["batch_stats"])
  flat = x.reshape(-1, 3).astype(np.float64)
  n = len(flat)
  mean = flat.mean(0)
  biased = (flat ** 2).mean(0) - mean ** 2
  batch_var = biased if rule == "biased" else biased * n / (n - 1)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean,
                             rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"],
                             0.9 * 1.0 + 0.1 * batch_var, rtol=1e-5)


def test_kernel_initialisers():
  """'fan_out_normal': N(0, 2 / fan_out), untruncated (PyTorch's
  kaiming_normal_(mode='fan_out')); 'fan_in_truncated': JAX's
  kaiming_normal, variance 2 / fan_in from a normal truncated at 2 std
  (so no value beyond 2 / 0.8796 of its std)."""
  from divdistill_jax.models import layers
  shape = (3, 3, 64, 32)
  fan_in, fan_out = 3 * 3 * 64, 3 * 3 * 32
  key = jax.random.key(0)
  w = np.asarray(layers.KERNEL_INITS["fan_out_normal"](key, shape))
  assert w.std() == pytest.approx(np.sqrt(2 / fan_out), rel=0.03)
  assert np.abs(w).max() > 2.5 * np.sqrt(2 / fan_out)  # Not truncated.
  w = np.asarray(layers.KERNEL_INITS["fan_in_truncated"](key, shape))
  std = np.sqrt(2 / fan_in)
  assert w.std() == pytest.approx(std, rel=0.03)
  assert np.abs(w).max() <= 2 * std / 0.87962566 * (1 + 1e-5)
  # The model option reaches every kernel and the classifier bias.
  for init, bias_init in (("fan_in_truncated", "zeros"),
                          ("fan_out_normal", "uniform")):
    net = models.get_model("resnet8", num_classes=10, mean=(0.5,),
                           std=(0.25,), kernel_init=init, bias_init=bias_init)
    params = net.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
    # The stem (3, 3, 1, 16): std sqrt(2 / 9) = 0.47 from fan_in, sqrt(2 /
    # 144) = 0.12 from fan_out.
    stem = np.asarray(params["Conv_0"]["kernel"])
    assert (stem.std() > 0.3) == (init == "fan_in_truncated")
    assert np.all(np.asarray(params["Dense_0"]["bias"]) == 0) == (
        bias_init == "zeros")
