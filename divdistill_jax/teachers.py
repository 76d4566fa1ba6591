"""The `teachers` job: M deep-ensemble members trained in one jitted step.

Every member has its own initialisation key and its own data order (stream
m of the batch sampler), and the loss is the SUM of the members' mean CE
losses, so each member's gradient is exactly that of an independent run
(docs/SOURCES.md, "Teachers"). Parameters, BN statistics and optimiser
state are stacked on a leading member axis. `load_teachers` reads a
finished teachers workdir for the students.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from divdistill_jax import (accumulate, augment, checkpointing, configlib,
                            data, ensemble, losses, models, optim, parallel,
                            runtime, train)
from divdistill_jax import workdir as workdir_lib
from divdistill_jax.models import conv


class TeacherError(ValueError):
  """A teachers workdir that is missing or does not fit the student."""


def build_teacher_model(config: ml_collections.ConfigDict,
                        bn_group_size: int | None | str = "config"):
  """The plain teacher network of a config (BatchNorm groups of
  `teacher.bn_group_size` images unless `bn_group_size` is given)."""
  info = data.dataset_info(config.data.name)
  if bn_group_size == "config":
    bn_group_size = config.teacher.bn_group_size
  return models.get_model(
      config.model.name, num_classes=info.num_classes, mean=info.mean,
      std=info.std, dtype=config.model.dtype, bn_group_size=bn_group_size,
      **configlib.model_options(config))


def teacher_train_step(state: train.TrainState, images, labels, base_key, *,
                       model, tx, strategy: str, padding: int, flip: bool,
                       microbatches: int = 1, shards: int = 1):
  """One SGD step of all M members.

  Args:
    state: stacked TrainState.
    images: uint8 [M, B, H, W, C], member m's own batch.
    labels: int32 [M, B].
    base_key: the run's key; the step key is fold_in(base_key, step).
    model: the plain network.
    tx: the optax optimiser.
    strategy: 'vmap' or 'unroll' over members.
    padding: crop padding.
    flip: random horizontal flips.
    microbatches: k; the gradient is accumulated over k microbatches of
      whole BatchNorm groups (accumulate.py).
    shards: devices the batch axis is split over.

  Returns:
    (new state, metrics: mean member CE 'loss', 'accuracy', 'param_norm').
  """
  key = jax.random.fold_in(base_key, state.step)
  x = augment.augment(key, images, padding=padding, flip=flip)

  def member_loss(params, batch_stats, xm, ym):
    logits, new = model.apply({"params": params, "batch_stats": batch_stats},
                              xm, train=True, mutable=["batch_stats"])
    acc = (logits.argmax(-1) == ym).mean()
    return losses.cross_entropy(logits, ym), (new["batch_stats"], acc)

  def loss_fn(params, batch):
    loss, (batch_stats, acc) = ensemble.map_members(
        member_loss, params, state.batch_stats, *batch, strategy=strategy)
    return loss.sum(), (loss, batch_stats, acc)

  batch = (x, labels)
  if microbatches > 1:  # The image axis is axis 1, after the members.
    batch = tuple(accumulate.split(a, microbatches, shards, axis=1)
                  for a in batch)
  (_, (member_loss_values, batch_stats, acc)), grads = (
      accumulate.mean_value_and_grad(loss_fn, state.params, batch,
                                     microbatches))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(jnp.add, state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"loss": member_loss_values.mean(),
                     "accuracy": acc.mean(),
                     # Non-finite parameters make this non-finite (NaN guard).
                     "param_norm": optax.tree.norm(params)}


def make_teacher_task(config: ml_collections.ConfigDict, mesh,
                      splits: dict, *, abstract: bool = False) -> train.Task:
  """Builds the teacher Task (state on the mesh, jitted step, batches);
  with `abstract` the state is jax.ShapeDtypeStructs and nothing is
  computed (ahead-of-time compilation and export of `Task.step_fns`)."""
  tcfg = config.teacher
  m, batch = tcfg.ensemble_size, tcfg.batch_size
  parallel.check_batch_size(batch, mesh, "teacher.batch_size")
  parallel.check_bn_group_size(tcfg.bn_group_size, batch, mesh,
                               "teacher.bn_group_size")
  shards = mesh.devices.size
  accumulate.check(batch, tcfg.microbatches, tcfg.bn_group_size, shards,
                   "teacher.microbatches")
  train_images, train_labels = splits["train"]
  n = len(train_images)
  sampler = dict(replicas=config.data.sampler_replicas,
                 drop_remainder=config.data.drop_remainder)
  steps_per_epoch = data.steps_per_epoch(n, batch, "teacher.batch_size",
                                         **sampler)
  model = build_teacher_model(config)
  tx = optim.make_optimizer(steps_per_epoch=steps_per_epoch,
                            total_epochs=tcfg.epochs, **tcfg.optim)
  sample = jnp.zeros((1, *train_images.shape[1:]), jnp.float32)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init(key):
    variables = ensemble.init_members(model, key, m, sample)
    params = variables["params"]
    return train.new_state(params, variables["batch_stats"], tx.init(params),
                           num_selected=m)

  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  state = jax.eval_shape(init, key) if abstract else init(key)
  strategy = config.model.ensemble_strategy

  def compiled_step(step_model, microbatches):
    return jax.jit(
        functools.partial(teacher_train_step, model=step_model, tx=tx,
                          strategy=strategy, padding=config.data.crop_padding,
                          flip=config.data.flip, microbatches=microbatches,
                          shards=shards),
        donate_argnums=0, compiler_options=conv.compiler_options())

  steps = {batch: compiled_step(model, tcfg.microbatches)}
  partial = runtime.partial_last_batch(n, batch, tcfg.bn_group_size, config,
                                       mesh)
  if partial is not None:
    last, last_group = partial
    steps[last] = compiled_step(
        build_teacher_model(config, last_group),
        accumulate.for_partial_batch(last, last_group, tcfg.microbatches,
                                     shards))

  def step(state, images, labels, key):  # images [M, B, ...].
    return steps[images.shape[1]](state, images, labels, key)

  gather = parallel.BatchGatherer(train_images, train_labels, mesh,
                                  on_device=config.data.on_device
                                  and not abstract, axis=1)

  def batch_fn(step_index: int):  # Member m's own order: stream m.
    return gather(np.stack([
        data.batch_indices(config.seed, step_index, n, batch, stream=member,
                           **sampler) for member in range(m)]))

  probs = ensemble.probs_fn(model, strategy)

  # Scaling inside the jit, as the students' predictions do.
  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def predict(variables, images):
    return probs(variables, augment.to_float(images))

  return train.Task(
      name="teachers", state=state, train_step=step, batch_fn=batch_fn,
      predict_fn=predict, selection="member", step_fns=steps,
      steps_per_epoch=steps_per_epoch, epochs=tcfg.epochs,
      images_per_step=m * batch,
      eval_epochs=train.eval_epochs(tcfg.epochs, tcfg.eval_every_epochs,
                                    tcfg.eval_final_epochs,
                                    config.eval.schedule))


def train_teachers(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `teachers` job; callable from Python / Colab.

  Returns:
    The loop's summaries; the selected teacher set is in `workdir/best`,
    member probabilities in `workdir/predictions.npz`.
  """
  runtime.setup_runtime(config)
  mesh = parallel.make_mesh(config.parallel.num_devices)
  splits = runtime.load_splits(config)
  task = make_teacher_task(config, mesh, splits)
  fields = workdir_lib.stage_fields(
      json.loads(config.to_json_best_effort()), "teachers")
  return train.run(task, workdir=workdir, config=config, mesh=mesh,
                   splits=splits,
                   summary_extra={"stage_fields": fields,
                                  "fingerprint": workdir_lib.fingerprint(
                                      fields)})


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
    run_config = json.load(f)
  if run_config["data"]["name"] != config.data.name:
    raise TeacherError(
        f"Teachers in {teacher_dir!r} were trained on "
        f"{run_config['data']['name']!r}, the student config uses "
        f"{config.data.name!r}.")
  m_t = run_config["teacher"]["ensemble_size"]
  m_s = config.student.ensemble_size
  if config.student.pairing == "member" and m_t != m_s:
    raise TeacherError(
        f"Ensemble size mismatch: {m_t} teachers in {teacher_dir!r} but "
        f"student.ensemble_size={m_s}. Member pairing needs equal sizes; set "
        f"--config.student.ensemble_size={m_t} or "
        "--config.student.pairing=mean.")
  info = data.dataset_info(config.data.name)
  model = models.get_model(
      run_config["model"]["name"], num_classes=info.num_classes,
      mean=info.mean, std=info.std, dtype=config.model.dtype)
  sample = jnp.zeros((1, *info.image_shape), jnp.float32)
  target = jax.eval_shape(
      lambda: ensemble.init_members(model, jax.random.key(0), m_t, sample))
  try:
    variables = checkpointing.load_variables(best)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise TeacherError(
        f"Could not read the teacher checkpoint {best!r} ({reason}). It may "
        "be damaged: retrain the teachers (or recompute them with "
        "--config.pipeline.recompute=teachers).") from None
  expected = jax.tree.map(lambda s: s.shape, target)
  found = jax.tree.map(lambda a: a.shape, variables)
  if expected != found:
    raise TeacherError(
        f"The teacher checkpoint {best!r} does not match "
        f"{run_config['model']['name']} x{m_t} with {info.num_classes} "
        "classes (different architecture, class count or a corrupted save).")
  return model, variables, run_config
