"""The `distill` job: DE-M teachers -> BatchEnsemble (or single) student.

One jitted step does the official recipe (PAPER_SPEC 6.2): augment, perturb
(through the frozen eval-mode teachers), teacher targets on the perturbed
images, a student pass on the clean images for CE and one on the perturbed
images for KD with BatchNorm statistics threaded clean -> perturbed (plain
KD uses one pass), the optax update. Teacher variables are an argument of
the step, never closure constants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from divdistill_jax import (augment, calibrate, checkpointing, configlib,
                            data, ensemble, latentbe, logging_utils, losses,
                            models, optim, parallel, perturb, train)


class TeacherError(ValueError):
  """A teachers workdir that is missing or does not fit the student."""


class Student:
  """The student network with an explicit member axis.

  BatchEnsemble for M > 1 (input [M, B, H, W, C]); for M = 1 the plain
  network, applied to x[0] and given back a member axis, so that the single
  network student is a real single network (no fast weights). With
  `student.kind = 'latentbe'` the BatchEnsemble starts from identical
  members (fast weights 1) with a shared classifier bias before s, and
  `plain_model` is the single network it merges into (latentbe.py).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               bn_group_size: int | None):
    info = data.dataset_info(config.data.name)
    self.ensemble_size = config.student.ensemble_size
    self.kind = config.student.kind
    plain = self.ensemble_size == 1
    latent = self.kind == "latentbe"
    self.model = models.get_model(
        config.model.name, num_classes=info.num_classes, mean=info.mean,
        std=info.std, dtype=config.model.dtype, bn_group_size=bn_group_size,
        ensemble_size=None if plain else self.ensemble_size,
        fast_init_std=0.0 if latent else config.student.fast_init_std,
        bias_mode="shared_before_s" if latent else "member")
    self.plain_model = models.get_model(
        config.model.name, num_classes=info.num_classes, mean=info.mean,
        std=info.std, dtype=config.model.dtype)
    self._plain = plain

  def init(self, key, sample: jax.Array):
    x = sample if self._plain else jnp.broadcast_to(
        sample, (self.ensemble_size, *sample.shape))
    return self.model.init(key, x, train=False)

  def apply(self, variables, x: jax.Array, train: bool):
    """x [M, B, H, W, C] -> (logits [M, B, K], new batch_stats or None)."""
    inputs = x[0] if self._plain else x
    if train:
      logits, new = self.model.apply(variables, inputs, train=True,
                                     mutable=["batch_stats"])
      new = new["batch_stats"]
    else:
      logits, new = self.model.apply(variables, inputs, train=False), None
    return (logits[None] if self._plain else logits), new


def load_teachers(config: ml_collections.ConfigDict, teacher_dir: str | None):
  """Loads a finished teachers workdir and checks it fits this config.

  Returns:
    (teacher model, stacked teacher variables, the teachers' config dict).

  Raises:
    TeacherError: missing directory / checkpoint, or a dataset, class-count,
      ensemble-size or architecture mismatch.
  """
  if not teacher_dir:
    raise TeacherError(
        "No teachers workdir: set --config.teacher.workdir=DIR to the "
        "--workdir of a finished `teachers` job.")
  cfg_path = os.path.join(teacher_dir, "config.json")
  best = os.path.join(teacher_dir, "best")
  if not os.path.exists(cfg_path) or not os.path.isdir(best):
    raise TeacherError(
        f"No finished teachers run in {teacher_dir!r} (need config.json and "
        "best/). Run the `teachers` job with that --workdir first.")
  with open(cfg_path) as f:
    tcfg = json.load(f)
  if tcfg["data"]["name"] != config.data.name:
    raise TeacherError(
        f"Teachers in {teacher_dir!r} were trained on "
        f"{tcfg['data']['name']!r}, the student config uses "
        f"{config.data.name!r}.")
  m_t = tcfg["teacher"]["ensemble_size"]
  m_s = config.student.ensemble_size
  if config.student.pairing == "member" and m_t != m_s:
    raise TeacherError(
        f"Ensemble size mismatch: {m_t} teachers in {teacher_dir!r} but "
        f"student.ensemble_size={m_s}. Member pairing needs equal sizes; set "
        f"--config.student.ensemble_size={m_t} or "
        "--config.student.pairing=mean.")
  info = data.dataset_info(config.data.name)
  model = models.get_model(
      tcfg["model"]["name"], num_classes=info.num_classes, mean=info.mean,
      std=info.std, dtype=config.model.dtype)
  sample = jnp.zeros((1, *info.image_shape), jnp.float32)
  target = jax.eval_shape(
      lambda: ensemble.init_members(model, jax.random.key(0), m_t, sample))
  try:
    saved = checkpointing.load_variables(best)
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherError(
        f"Could not read the teacher checkpoint {best!r} ({e}). It may be "
        "corrupted: retrain the teachers.") from e
  expected = jax.tree.map(lambda s: s.shape, target)
  found = jax.tree.map(lambda a: a.shape, saved)
  if expected != found:
    raise TeacherError(
        f"The teacher checkpoint {best!r} does not match "
        f"{tcfg['model']['name']} x{m_t} with {info.num_classes} classes "
        "(different architecture, class count or a corrupted save).")
  return model, saved, tcfg


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static options of one distillation step (hashable).

  Attributes:
    method: registered perturbation name ('none' = plain KD; perturb.py).
    perturb: the perturbation's settings.
    alpha: KD weight; the loss is (1 - alpha) CE + alpha T^2 KL.
    temperature: T of the KD targets and the student's KD logits.
    pairing: 'member' (student m <- teacher m) or 'mean'.
    padding: crop padding of the augmentation (0 = none).
    flip: random horizontal flips.
    strategy: 'vmap' or 'unroll' over teacher members.
    clean_pass: also run the student on the clean images (the CE term, and
      the official BatchNorm threading clean -> perturbed). Only alpha = 1
      may turn it off: the follow-up paper's recipe, one pass on the
      perturbed images.
  """

  method: str
  perturb: perturb.Options
  alpha: float
  temperature: float
  pairing: str = "member"
  padding: int = 0
  flip: bool = False
  strategy: str = "unroll"
  clean_pass: bool = True

  def __post_init__(self):
    if not self.clean_pass and self.alpha != 1.0:
      raise ValueError("Skipping the clean pass drops the CE term: only "
                       f"kd.alpha = 1 allows it (got {self.alpha}).")


def student_train_step(state: train.TrainState, images, labels, base_key,
                       teacher_vars, *, student: Student, fused: Student | None,
                       teacher_model, tx, spec: StepSpec):
  """One distillation step (PAPER_SPEC 6.2).

  Args:
    state: the student's TrainState.
    images: uint8 [B, H, W, C]; labels: int32 [B].
    base_key: run key; the step key is fold_in(base_key, step).
    teacher_vars: stacked teacher variables (leading axis M_t).
    student: the Student; `fused` the same network with one BN group per
      pass (None = two sequential passes).
    teacher_model: the plain teacher network.
    tx: optimiser.
    spec: the step's static options.

  Returns:
    (new state, scalar metrics).
  """
  key = jax.random.fold_in(base_key, state.step)
  aug_key, perturb_key = jax.random.split(key)
  x = augment.augment(aug_key, images, padding=spec.padding, flip=spec.flip)
  m = student.ensemble_size
  tile = lambda a: jnp.broadcast_to(a, (m, *a.shape))  # noqa: E731

  def member_logits(variables, inputs):
    return teacher_model.apply(variables, inputs, train=False)

  def student_logits(variables, inputs):
    return student.apply(variables, tile(inputs), train=False)[0]

  context = perturb.Context(
      member_logits, teacher_vars, student_logits,
      {"params": state.params, "batch_stats": state.batch_stats})
  x_kd = perturb.apply(spec.method, perturb_key, x, context, spec.perturb)
  teacher_logits = ensemble.apply_members(teacher_model, teacher_vars, x_kd,
                                          strategy=spec.strategy)
  temperature = spec.temperature
  targets = losses.distillation_targets(
      jax.lax.stop_gradient(teacher_logits), temperature, spec.pairing, m)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if spec.method == "none":
      clean, batch_stats = student.apply(variables, tile(x), train=True)
      kd_logits = clean
    elif not spec.clean_pass:
      kd_logits, batch_stats = student.apply(variables, tile(x_kd),
                                             train=True)
      clean = kd_logits  # CE has weight 1 - alpha = 0; metrics only.
    elif fused is not None:
      both, batch_stats = fused.apply(
          variables, tile(jnp.concatenate([x, x_kd])), train=True)
      clean, kd_logits = jnp.split(both, 2, axis=1)
    else:
      clean, batch_stats = student.apply(variables, tile(x), train=True)
      kd_logits, batch_stats = student.apply(
          {"params": params, "batch_stats": batch_stats}, tile(x_kd),
          train=True)
    loss, (ce, kd) = losses.distillation_loss(
        clean, labels, kd_logits, targets, alpha=spec.alpha,
        temperature=temperature)
    acc = (clean.argmax(-1) == labels[None]).mean()
    return loss, (batch_stats, ce, kd, acc)

  (loss, (batch_stats, ce, kd, acc)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)
  delta = (x_kd - x).reshape(x.shape[0], -1)
  metrics = {
      "loss": loss,
      "ce": ce, "kd": kd, "accuracy": acc,
      "perturbation_l2": jnp.linalg.norm(delta, axis=1).mean(),
      # Teachers' mutual information on the distillation inputs (T = 1):
      # how much diversity the student is shown.
      "teacher_mi": perturb.mutual_information(teacher_logits).mean(),
      "param_norm": optax.tree.norm(params),
  }
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, metrics


def step_spec(config: ml_collections.ConfigDict,
              step_size: float) -> StepSpec:
  """The StepSpec of a distill config (step_size already resolved)."""
  p = config.perturb
  return StepSpec(
      method=configlib.PERTURBATION_OF_METHOD[p.method],
      perturb=perturb.Options(
          step_size=step_size, temperature=config.kd.temperature,
          num_steps=p.num_steps, norm=p.norm,
          confidence_scaled=p.confidence_scaled,
          strategy=config.model.ensemble_strategy,
          # One draw per BatchNorm group: per official GPU.
          group_size=config.student.bn_group_size, all_pairs=p.all_pairs),
      alpha=config.kd.alpha, temperature=config.kd.temperature,
      pairing=config.student.pairing, padding=config.data.crop_padding,
      flip=config.data.flip, strategy=config.model.ensemble_strategy,
      clean_pass=config.kd.clean_pass)


def student_optim(config: ml_collections.ConfigDict) -> dict:
  """The student's optimiser fields; LatentBE's fast group by definition.

  LatentBE (FOLLOWUP_SPEC 1): one LR for every parameter, fast weights
  decayed toward 1 with wd / M and their gradients scaled by M, so their
  update direction is M g + wd (p - 1).
  """
  fields = dict(config.student.optim)
  if config.student.kind == "latentbe":
    m = config.student.ensemble_size
    fields.update(fast_learning_rate=fields["learning_rate"],
                  fast_weight_decay=fields["weight_decay"] / m,
                  fast_decay_target=1.0, fast_grad_scale=float(m))
  return fields


def merged_predictions(config: ml_collections.ConfigDict, student: Student,
                       variables, mesh, *, splits: dict) -> dict:
  """Predictions of the merged LatentBE network: one plain network.

  Returns arrays `merged_<rule>_{validation,test}_probs` [1, N, K] for the
  bias rules 'sb' and 'b', and `merged_sb_bn_*` when
  `student.merge_bn_reestimate` (statistics re-estimated on the training
  images).
  """
  plain = student.plain_model

  @jax.jit
  def predict(v, images):
    logits = plain.apply(v, augment.to_float(images), train=False)
    return jax.nn.softmax(logits, -1)[None]

  variables = jax.device_get(variables)
  sample = jnp.zeros((1, *splits["train"][0].shape[1:]), jnp.float32)
  merged = {rule: latentbe.merge(variables, rule)
            for rule in latentbe.BIAS_RULES}
  latentbe.check_structure(merged["sb"], plain, sample)
  if config.student.merge_bn_reestimate:
    merged["sb_bn"] = latentbe.reestimate_batch_stats(
        plain, merged["sb"], augment.to_float(splits["train"][0]),
        config.eval.batch_size)
  out = {}
  for name, v in merged.items():
    v = parallel.replicate(v, mesh)
    for split in ("validation", "test"):
      out[f"merged_{name}_{split}_probs"] = train.predict_split(
          predict, v, splits[split][0], mesh, config.eval.batch_size)
  return out


def make_student_task(config: ml_collections.ConfigDict, mesh, splits: dict,
                      teacher_model, teacher_vars,
                      step_size: float | None = None) -> train.Task:
  """Builds the distillation Task.

  `step_size` (1/255 units) replaces `config.perturb.step_size`; it must be
  given when that is 'auto' (`calibrate.resolve_step_size`).
  """
  if step_size is None:
    if config.perturb.step_size == "auto":
      raise ValueError("step_size='auto' must be resolved first "
                       "(calibrate.resolve_step_size).")
    step_size = float(config.perturb.step_size)
  scfg = config.student
  batch = scfg.batch_size
  parallel.check_batch_size(batch, mesh, "student.batch_size")
  parallel.check_bn_group_size(scfg.bn_group_size, batch, mesh,
                               "student.bn_group_size")
  train_images, train_labels = splits["train"]
  n = len(train_images)
  steps_per_epoch = data.steps_per_epoch(n, batch, "student.batch_size")
  student = Student(config, scfg.bn_group_size)
  method = configlib.PERTURBATION_OF_METHOD[config.perturb.method]
  fused = None
  if scfg.fused_passes and method != "none":
    fused = Student(config, scfg.bn_group_size or batch)
  tx = optim.make_optimizer(steps_per_epoch=steps_per_epoch,
                            total_epochs=scfg.epochs,
                            **student_optim(config))
  sample = jnp.zeros((1, *train_images.shape[1:]), jnp.float32)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init(key):
    variables = student.init(key, sample)
    params = variables["params"]
    return train.new_state(params, variables["batch_stats"], tx.init(params),
                           num_selected=1)

  state = init(jax.random.fold_in(jax.random.key(config.seed), 2))
  spec = step_spec(config, step_size)
  step = jax.jit(functools.partial(
      student_train_step, student=student, fused=fused,
      teacher_model=teacher_model, tx=tx, spec=spec), donate_argnums=0)
  teacher_vars = parallel.replicate(teacher_vars, mesh)

  def train_step(state, images, labels, key):
    return step(state, images, labels, key, teacher_vars)

  def batch_fn(step_index: int):
    idx = data.batch_indices(config.seed, step_index, n, batch)
    local = data.process_slice(idx, jax.process_index(), jax.process_count())
    return (parallel.global_batch(train_images[local], mesh),
            parallel.global_batch(train_labels[local], mesh))

  @jax.jit
  def predict(variables, images):
    x = augment.to_float(images)
    logits, _ = student.apply(
        variables, jnp.broadcast_to(x, (student.ensemble_size, *x.shape)),
        train=False)
    return jax.nn.softmax(logits, axis=-1)

  extra = None
  if student.kind == "latentbe":
    extra = functools.partial(merged_predictions, config, student,
                              splits=splits)

  return train.Task(
      name=f"student {config.perturb.method}", state=state,
      train_step=train_step, batch_fn=batch_fn, predict_fn=predict,
      extra_predictions=extra,
      selection="mean", steps_per_epoch=steps_per_epoch, epochs=scfg.epochs,
      images_per_step=batch,
      eval_epochs=train.eval_epochs(scfg.epochs, scfg.eval_every_epochs,
                                    scfg.eval_final_epochs,
                                    config.eval.schedule))


def distill(config: ml_collections.ConfigDict, workdir: str,
            teacher_dir: str | None = None) -> dict:
  """The `distill` job; callable from Python / Colab.

  Args:
    config: a config with job 'distill'.
    workdir: the student's run directory.
    teacher_dir: the teachers' workdir (default `config.teacher.workdir`).

  Returns:
    The loop's summaries; predictions in `workdir/predictions.npz`.
  """
  train.setup_runtime(config)
  teacher_dir = teacher_dir or config.teacher.workdir
  teacher_model, teacher_vars, _ = load_teachers(config, teacher_dir)
  mesh = parallel.make_mesh(config.parallel.num_devices)
  splits = train.load_splits(config)
  step_size = calibrate.resolve_step_size(config, teacher_dir, teacher_model,
                                          teacher_vars, splits)
  method_is_kd = configlib.PERTURBATION_OF_METHOD[
      config.perturb.method] == "none"
  if config.perturb.step_size == "auto" and not method_is_kd:
    logging_utils.log(f"   step size: auto -> {step_size:.3g}/255")
  task = make_student_task(config, mesh, splits, teacher_model, teacher_vars,
                           step_size=step_size)
  return train.run(task, workdir=workdir, config=config, mesh=mesh,
                   splits=splits,
                   predictions_extra={
                       "method": config.perturb.method,
                       "kind": config.student.kind,
                       "step_size": None if method_is_kd else step_size})
