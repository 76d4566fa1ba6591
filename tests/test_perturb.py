"""Perturbations against analytic gradients and their defining properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divdistill_jax import perturb

B, H, W, C, K, M = 6, 4, 4, 2, 5, 3
D = H * W * C
ETA = 1.0 / 255


def linear_logits(params, x):
  return x.reshape(x.shape[0], -1) @ params


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  weights = jnp.asarray(rng.normal(size=(M, D, K)) * 2, jnp.float32)
  # Interior pixels so that one step is never clipped.
  x = jnp.asarray(rng.uniform(0.3, 0.7, (B, H, W, C)), jnp.float32)
  return weights, x


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ods_direction_is_the_analytic_gradient(temperature):
  weights, x = _setup()
  key = jax.random.key(3)
  out = perturb.perturb("ods", key, x, linear_logits, weights, step_size=1.0,
                        temperature=temperature)
  # Recompute the member and w the method draws from this key.
  member_key, w_key = jax.random.split(key)
  m = int(jax.random.randint(member_key, (), 0, M))
  w = np.asarray(jax.random.uniform(w_key, (B, K), jnp.float32, -1.0, 1.0))
  wm = np.asarray(weights[m], np.float64)
  xf = np.asarray(x, np.float64).reshape(B, -1)
  p = _softmax(xf @ wm / temperature)
  # d/dz <w, softmax(z/T)> = p * (w - <w, p>) / T, then through z = x W.
  grad = (p * (w - (w * p).sum(-1, keepdims=True)) / temperature) @ wm.T
  expected = grad / np.linalg.norm(grad, axis=1, keepdims=True) * np.sqrt(D)
  delta = (np.asarray(out, np.float64) - xf.reshape(x.shape)).reshape(B, -1)
  np.testing.assert_allclose(delta / ETA, expected, rtol=2e-3, atol=2e-3)
  # The step lies in the span of the chosen member's weight columns.
  q, _ = np.linalg.qr(wm)
  residual = delta - delta @ q @ q.T
  assert np.abs(residual).max() < 1e-5
  # ||x~ - x||_2 = eta * sqrt(D) for every example.
  np.testing.assert_allclose(np.linalg.norm(delta, axis=1), ETA * np.sqrt(D),
                             rtol=1e-3)


@pytest.mark.parametrize("method", ["ods", "confods"])
def test_ods_draws_a_member_and_weights_per_group(method):
  """With groups, each group of images gets its own teacher member and w
  (one official GPU each), and equals ODS run on that group alone."""
  weights, x = _setup(7)
  group = 2
  keys, members = None, None
  for seed in range(20):  # The first key whose groups draw different members.
    key = jax.random.key(seed)
    keys = jax.random.split(key, B // group)
    members = [int(jax.random.randint(jax.random.split(k)[0], (), 0, M))
               for k in keys]
    if len(set(members)) > 1:
      break
  assert len(set(members)) > 1
  out = perturb.perturb(method, key, x, linear_logits, weights, step_size=1.0,
                        temperature=1.0, group_size=group)
  for i, (k, m) in enumerate(zip(keys, members)):
    rows = slice(i * group, (i + 1) * group)
    alone = perturb.ods(k, x[rows], linear_logits, weights, step_size=1.0,
                        temperature=1.0,
                        confidence_scaled=method == "confods")
    np.testing.assert_allclose(out[rows], alone, rtol=1e-6, atol=1e-7)
    # The group's step lies in the span of ITS member's weight columns.
    delta = np.asarray(out[rows] - x[rows], np.float64).reshape(group, -1)
    q, _ = np.linalg.qr(np.asarray(weights[m], np.float64))
    assert np.abs(delta - delta @ q @ q.T).max() < 1e-5
    other = next(j for j in range(M) if j != m)
    q, _ = np.linalg.qr(np.asarray(weights[other], np.float64))
    assert np.abs(delta - delta @ q @ q.T).max() > 1e-4
  # No groups (or one group the size of the batch): the official one draw.
  whole = perturb.perturb(method, key, x, linear_logits, weights,
                          step_size=1.0, temperature=1.0)
  np.testing.assert_array_equal(
      perturb.perturb(method, key, x, linear_logits, weights, step_size=1.0,
                      temperature=1.0, group_size=B), whole)
  with pytest.raises(ValueError, match="group_size=4 must divide"):
    perturb.perturb(method, key, x, linear_logits, weights, step_size=1.0,
                    temperature=1.0, group_size=4)


def test_confods_norm_is_scaled_by_the_max_probability():
  weights, x = _setup(1)
  key = jax.random.key(4)
  out = perturb.perturb("confods", key, x, linear_logits, weights,
                        step_size=1.0, temperature=1.0)
  m = int(jax.random.randint(jax.random.split(key)[0], (), 0, M))
  p = _softmax(np.asarray(x).reshape(B, -1) @ np.asarray(weights[m]))
  norms = np.linalg.norm(np.asarray(out - x).reshape(B, -1), axis=1)
  np.testing.assert_allclose(norms, ETA * np.sqrt(D) * p.max(-1), rtol=1e-3)
  # Same direction as ODS.
  ods = perturb.perturb("ods", key, x, linear_logits, weights, step_size=1.0,
                        temperature=1.0)
  cos = np.sum(np.asarray(out - x).reshape(B, -1)
               * np.asarray(ods - x).reshape(B, -1), 1)
  assert (cos > 0).all()


def test_gaussian_std_and_clipping():
  x = jnp.full((64, 8, 8, 3), 0.5)
  out = perturb.perturb("gaussian", jax.random.key(0), x, None, None,
                        step_size=2.0, temperature=1.0)
  assert float(jnp.std(out - x)) == pytest.approx(2 * ETA, rel=0.03)
  edge = jnp.ones((4, 8, 8, 3))
  clipped = perturb.perturb("gaussian", jax.random.key(1), edge, None, None,
                            step_size=50.0, temperature=1.0)
  assert float(clipped.max()) <= 1.0 and float(clipped.min()) >= 0.0


@pytest.mark.parametrize("method", ["ods", "confods", "disagreement"])
def test_gradient_methods_clip_and_are_deterministic(method):
  weights, _ = _setup(2)
  x = jnp.asarray(np.random.default_rng(5).choice([0.0, 1.0],
                                                  (B, H, W, C)), jnp.float32)
  kw = dict(step_size=20.0, temperature=1.0)
  a = perturb.perturb(method, jax.random.key(7), x, linear_logits, weights,
                      **kw)
  b = perturb.perturb(method, jax.random.key(7), x, linear_logits, weights,
                      **kw)
  np.testing.assert_array_equal(a, b)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  assert not np.array_equal(a, x)


def test_linf_norm_moves_every_pixel_by_eta():
  weights, x = _setup(3)
  out = perturb.perturb("ods", jax.random.key(1), x, linear_logits, weights,
                        step_size=1.0, temperature=1.0, norm="linf")
  np.testing.assert_allclose(np.abs(np.asarray(out - x)), ETA, rtol=1e-3)


def test_one_trace_over_many_steps():
  weights, x = _setup(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(key, x, weights):
    return perturb.perturb("confods", key, x, linear_logits, weights,
                           step_size=1.0, temperature=1.0)

  for i in range(4):  # New keys (so new members) and new data: no retrace.
    step(jax.random.key(i), x + 0.01 * i, weights)


def _train_linear_ensemble(seed=0, steps=300):
  """M linear-softmax members trained on different halves of 4 clusters."""
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0.2, 0.8, (K, D))
  labels = rng.integers(0, K, 400)
  images = np.clip(centers[labels] + rng.normal(0, 0.15, (400, D)), 0, 1)
  members = []
  for m in range(M):
    idx = rng.choice(400, 200, replace=False)
    xs, ys = jnp.asarray(images[idx]), jnp.asarray(labels[idx])
    w = jnp.asarray(rng.normal(0, 0.1, (D, K)))

    def loss(w, xs=xs, ys=ys):
      logp = jax.nn.log_softmax(xs @ w)
      return -jnp.take_along_axis(logp, ys[:, None], 1).mean()

    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
      w = w - 0.5 * grad(w)
    members.append(w)
  x = jnp.asarray(images[:128].reshape(128, H, W, C), jnp.float32)
  return jnp.stack(members).astype(jnp.float32), x


def test_disagreement_raises_mutual_information_most():
  weights, x = _train_linear_ensemble()

  def mi(inputs):
    logits = jax.vmap(lambda w: linear_logits(w, inputs))(weights)
    return float(perturb.mutual_information(logits).mean())

  kw = dict(step_size=4.0, temperature=1.0)
  base = mi(x)
  dis = mi(perturb.perturb("disagreement", jax.random.key(0), x,
                           linear_logits, weights, **kw))
  ods = np.mean([mi(perturb.perturb("ods", jax.random.key(s), x,
                                    linear_logits, weights, **kw))
                 for s in range(5)])
  noise = jax.random.normal(jax.random.key(9), x.shape)
  rand = mi(jnp.clip(x + 4 * ETA * perturb.normalised_direction(noise), 0, 1))
  assert dis > base
  assert dis - base > ods - base
  assert dis - base > rand - base
  multi = mi(perturb.perturb("disagreement", jax.random.key(0), x,
                             linear_logits, weights, num_steps=3, **kw))
  assert multi > base


@pytest.mark.parametrize("num_steps,confidence_scaled",
                         [(1, False), (3, False), (1, True), (3, True)])
def test_disagreement_follows_its_formula(num_steps, confidence_scaled):
  """num_steps steps of eta / num_steps along the normalised gradient of
  mean_m KL(p_m || p_bar), each scaled by max_k p_bar(x) on the clean input
  when confidence_scaled; gradients analytic, in float64."""
  weights, x = _setup(6)
  temperature = 2.0
  eta = 2.0
  out = perturb.perturb("disagreement", jax.random.key(0), x, linear_logits,
                        weights, step_size=eta, temperature=temperature,
                        num_steps=num_steps,
                        confidence_scaled=confidence_scaled)
  ws = np.asarray(weights, np.float64)

  def probs(xf):
    return np.stack([_softmax(xf @ w / temperature) for w in ws])

  def mi_grad(xf):
    # d/dz_m of sum_m' KL(p_m' || p_bar) / M is p_m * (l_m - <p_m, l_m>) / M
    # with l_m = log p_m - log p_bar (the p_bar terms cancel); z = x W / T.
    p = probs(xf)
    ell = np.log(p) - np.log(p.mean(0))
    dz = p * (ell - (p * ell).sum(-1, keepdims=True)) / len(ws)
    return sum(dz[m] @ ws[m].T for m in range(len(ws))) / temperature

  xf = np.asarray(x, np.float64).reshape(B, -1)
  scale = np.full((B, 1), eta / 255 / num_steps)
  if confidence_scaled:
    scale = scale * probs(xf).mean(0).max(-1, keepdims=True)
  want = xf
  for _ in range(num_steps):
    g = mi_grad(want)
    d = g / np.linalg.norm(g, axis=1, keepdims=True) * np.sqrt(D)
    want = np.clip(want + scale * d, 0, 1)
  got = np.asarray(out, np.float64).reshape(B, -1)
  np.testing.assert_allclose(got - xf, want - xf, rtol=2e-3, atol=2e-6)
  # The total RMS move is at most eta (exactly eta for aligned steps).
  rms = np.linalg.norm(got - xf, axis=1) / np.sqrt(D)
  assert (rms <= eta / 255 * (1 + 1e-4)).all()


def _tdiv_setup(seed=8):
  """Linear teachers on the first half of the pixels, a linear 'student'
  with member weights on the second half: the two divergences move
  different pixels, so one ascent step must raise one and lower the other."""
  rng = np.random.default_rng(seed)
  half = D // 2
  teachers = np.zeros((M, D, K), np.float32)
  teachers[:, :half] = rng.normal(size=(M, half, K)) * 3
  student = np.zeros((M, D, K), np.float32)
  student[:, half:] = rng.normal(size=(M, D - half, K)) * 3
  x = jnp.asarray(rng.uniform(0.3, 0.7, (B, H, W, C)), jnp.float32)
  return jnp.asarray(teachers), jnp.asarray(student), x


def _student_fn(w, x):
  return jnp.einsum("bd,mdk->mbk", x.reshape(x.shape[0], -1), w)


def _pair_divergences(teachers, student, xf, x_target, i, j):
  """Per-example CE(p_j(x_target), p_i(xf)) of the teachers and of the
  student members (numpy): the objective's two terms, its stop-gradient
  targets p_j held at `x_target`."""
  def ce(w):
    log_p_i = np.log(_softmax(xf @ np.asarray(w[i], np.float64)))
    p_j = _softmax(x_target @ np.asarray(w[j], np.float64))
    return -(p_j * log_p_i).sum(-1)
  return ce(teachers), ce(student)


def test_tdiv_sdiv_step_follows_the_finite_difference_gradient():
  teachers, student, x = _tdiv_setup()
  key = jax.random.key(11)
  i, j = (int(v) for v in jax.random.choice(key, M, (2,), replace=False))
  eta = 2.0
  out = perturb.perturb("tdiv_sdiv", key, x, linear_logits, teachers,
                        step_size=eta, temperature=4.0, student_fn=_student_fn,
                        student_variables=student)
  xf = np.asarray(x, np.float64).reshape(B, -1)

  def objective(xs, b):
    # sg(p_j) is a constant: take it at the unperturbed point.
    t_j = _softmax(xf[b] @ np.asarray(teachers[j], np.float64))
    s_j = _softmax(xf[b] @ np.asarray(student[j], np.float64))
    t_i = _softmax(xs @ np.asarray(teachers[i], np.float64))
    s_i = _softmax(xs @ np.asarray(student[i], np.float64))
    return -(t_j * np.log(t_i)).sum() + (s_j * np.log(s_i)).sum()

  delta = np.asarray(out, np.float64).reshape(B, -1) - xf
  h = 1e-5
  for b in range(B):
    fd = np.array([(objective(xf[b] + h * e, b) - objective(xf[b] - h * e, b))
                   / (2 * h) for e in np.eye(D)])
    want = eta / 255 * np.sqrt(D) * fd / np.linalg.norm(fd)
    np.testing.assert_allclose(delta[b], want, rtol=1e-3, atol=1e-6)
  # One step raises the teachers' divergence for the pair and lowers the
  # student's (each member i against its partner's prediction at x).
  t0, s0 = _pair_divergences(teachers, student, xf, xf, i, j)
  t1, s1 = _pair_divergences(teachers, student, xf + delta, xf, i, j)
  assert (t1 > t0).all() and (s1 < s0).all()
  # The temperature of the KD targets plays no role (T = 1 here).
  same = perturb.perturb("tdiv_sdiv", key, x, linear_logits, teachers,
                         step_size=eta, temperature=1.0,
                         student_fn=_student_fn, student_variables=student)
  np.testing.assert_array_equal(out, same)


def test_tdiv_sdiv_all_pairs_and_several_steps():
  teachers, student, x = _tdiv_setup(9)
  xf = np.asarray(x, np.float64).reshape(B, -1)
  tw = np.asarray(teachers, np.float64)
  sw = np.asarray(student, np.float64)

  def grad_all_pairs(xs):
    # d/dx of mean_{a != b} [CE(sg p_b, p_a)] for teachers minus students:
    # d CE(q, softmax(z_a)) / dz_a = p_a - q, through z_a = x W_a.
    g = np.zeros_like(xs)
    for sign, w in ((1.0, tw), (-1.0, sw)):
      probs = [_softmax(xs @ w[m]) for m in range(M)]
      for a in range(M):
        for b in range(M):
          if a != b:
            g += sign * (probs[a] - probs[b]) @ w[a].T
    return g / (M * (M - 1))

  eta, steps = 3.0, 2
  want = xf
  for _ in range(steps):
    g = grad_all_pairs(want)
    want = np.clip(want + eta / 255 / steps * np.sqrt(D) * g
                   / np.linalg.norm(g, axis=1, keepdims=True), 0, 1)
  out = perturb.perturb("tdiv_sdiv", jax.random.key(0), x, linear_logits,
                        teachers, step_size=eta, temperature=1.0,
                        num_steps=steps, all_pairs=True,
                        student_fn=_student_fn, student_variables=student)
  np.testing.assert_allclose(np.asarray(out, np.float64).reshape(B, -1) - xf,
                             want - xf, rtol=2e-3, atol=1e-6)


def test_tdiv_sdiv_needs_the_student_and_matching_sizes():
  teachers, student, x = _tdiv_setup()
  with pytest.raises(ValueError, match="needs the student"):
    perturb.perturb("tdiv_sdiv", jax.random.key(0), x, linear_logits,
                    teachers, step_size=1.0, temperature=1.0)
  with pytest.raises(ValueError, match="3 teachers but 2 student members"):
    perturb.perturb("tdiv_sdiv", jax.random.key(0), x, linear_logits,
                    teachers, step_size=1.0, temperature=1.0,
                    student_fn=_student_fn, student_variables=student[:2])
  assert perturb.uses_student("tdiv_sdiv")
  assert not perturb.uses_student("confods")


def test_registry_runs_a_new_method_through_apply():
  name = "test_shift"
  if name not in perturb.methods():
    @perturb.register(name)
    def _shift(key, x, ctx, options):  # pylint: disable=unused-variable
      del key, ctx
      return jnp.clip(x + options.step_size / 255, 0, 1)
  x = jnp.full((2, 2, 2, 1), 0.5)
  out = perturb.apply(name, jax.random.key(0), x,
                      perturb.Context(None, None),
                      perturb.Options(step_size=3.0))
  np.testing.assert_allclose(out, 0.5 + 3 / 255)
  with pytest.raises(ValueError, match="already registered"):
    perturb.register(name)(lambda *a: a[1])


def test_unknown_method():
  with pytest.raises(ValueError, match="Unknown perturbation"):
    perturb.perturb("fgsm", jax.random.key(0), jnp.zeros((1, 2, 2, 1)), None,
                    None, step_size=1.0, temperature=1.0)
