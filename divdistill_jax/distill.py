"""The `distill` job: DE-M teachers -> BatchEnsemble (or single) student.

`distill(config, workdir)` loads the teachers (teachers.load_teachers),
resolves the step size once (calibrate.resolve: 'auto' becomes the
calibrated number), builds the Task around the jitted step (step.py) and
runs the shared loop (train.run).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from divdistill_jax import (accumulate, calibrate, data, latentbe,
                            logging_utils, optim, parallel, perturb, runtime,
                            stages, step, teachers, train)
from divdistill_jax import workdir as workdir_lib
from divdistill_jax.models import conv
from divdistill_jax.student import Student, predict_fn


def student_optim(config: ml_collections.ConfigDict) -> dict:
  """The student's optimiser fields (LatentBE's fast group by definition)."""
  fields = dict(config.student.optim)
  if config.student.kind == "latentbe":
    return latentbe.optimizer_fields(fields, config.student.ensemble_size)
  return fields


def make_student_task(config: ml_collections.ConfigDict, mesh, splits: dict,
                      teacher_model, teacher_vars, *,
                      abstract: bool = False) -> train.Task:
  """Builds the distillation Task.

  Args:
    config: a distill config whose `perturb.step_size` is a number
      (`calibrate.resolve` replaces 'auto').
    mesh: the device mesh.
    splits: the data splits (uint8 images).
    teacher_model: the plain teacher network.
    teacher_vars: stacked teacher variables.
    abstract: the state (and `teacher_vars` as given) are
      jax.ShapeDtypeStructs and nothing is computed: for ahead-of-time
      compilation and export of `Task.step_fns`.
  """
  spec = step.StepSpec.from_config(config)
  scfg = config.student
  batch = scfg.batch_size
  parallel.check_batch_size(batch, mesh, "student.batch_size")
  parallel.check_bn_group_size(scfg.bn_group_size, batch, mesh,
                               "student.bn_group_size")
  shards = mesh.devices.size
  accumulate.check(batch, scfg.microbatches, scfg.bn_group_size, shards,
                   "student.microbatches")
  train_images, train_labels = splits["train"]
  n = len(train_images)
  sampler = dict(replicas=config.data.sampler_replicas,
                 drop_remainder=config.data.drop_remainder)
  steps_per_epoch = data.steps_per_epoch(n, batch, "student.batch_size",
                                         **sampler)
  # Image-major member merges only when the batch is split over devices.
  merge = dict(image_major=shards > 1)
  student = Student(config, scfg.bn_group_size, **merge)
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

  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  state = jax.eval_shape(init, key) if abstract else init(key)

  def compiled_step(group: int | None, images: int, microbatches: int):
    """The jitted step for batches of `images` with BatchNorm groups (and
    one ODS draw per group) of `group` images."""
    fused = None
    if scfg.fused_passes and not perturb.is_identity(spec.method):
      fused = Student(config, group or images // microbatches, **merge)
    return jax.jit(functools.partial(
        step.student_train_step, student=Student(config, group, **merge),
        fused=fused,
        teacher_model=teacher_model, tx=tx,
        spec=dataclasses.replace(
            spec, microbatches=microbatches, shards=shards,
            perturb=dataclasses.replace(spec.perturb, group_size=group))),
        donate_argnums=0, compiler_options=conv.compiler_options())

  steps = {batch: compiled_step(scfg.bn_group_size, batch,
                                scfg.microbatches)}
  partial = runtime.partial_last_batch(n, batch, scfg.bn_group_size, config,
                                       mesh)
  if partial is not None:
    last, last_group = partial
    steps[last] = compiled_step(
        last_group, last, accumulate.for_partial_batch(
            last, last_group, scfg.microbatches, shards))
  if not abstract:
    teacher_vars = parallel.replicate(teacher_vars, mesh)

  def train_step(state, images, labels, key):
    return steps[images.shape[0]](state, images, labels, key, teacher_vars)

  gather = parallel.BatchGatherer(train_images, train_labels, mesh,
                                  on_device=config.data.on_device
                                  and not abstract)

  def batch_fn(step_index: int):
    return gather(data.batch_indices(config.seed, step_index, n, batch,
                                     **sampler))

  extra, select = None, None
  if student.kind == "latentbe":
    extra = functools.partial(latentbe.merged_predictions, config,
                              student.plain_model, splits=splits)
    if scfg.selection == "merged":
      select = latentbe.merged_predict_fn(student.plain_model, "sb")

  return train.Task(
      name=f"student {config.student.kind} {config.perturb.method}",
      state=state, train_step=train_step, batch_fn=batch_fn,
      predict_fn=predict_fn(student), extra_predictions=extra,
      selection_fn=select,
      step_fns=steps, step_args=(teacher_vars,),
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
  runtime.setup_runtime(config)
  teacher_dir = teacher_dir or config.teacher.workdir
  teacher_model, teacher_vars, _ = teachers.load_teachers(config, teacher_dir)
  mesh = parallel.make_mesh(config.parallel.num_devices)
  splits = runtime.load_splits(config)
  requested = config.perturb.step_size
  fields = stages.student_fields(config)  # As asked: 'auto', not its value.
  config = calibrate.resolve(config, teacher_dir, teacher_model,
                             teacher_vars, splits)
  method = config.perturb.method
  if requested == "auto" and not perturb.is_identity(method):
    logging_utils.log(
        f"   step size: auto -> {config.perturb.step_size:.3g}/255")
  teacher_fp = stages.recorded_fingerprint(teacher_dir, "teachers")
  done = workdir_lib.load_json(os.path.join(workdir, "done.json")) or {}
  if done.get("teacher_fingerprint") not in (None, teacher_fp):
    raise workdir_lib.StageMismatch(
        f"The finished student in {workdir!r} learnt from other teachers "
        f"than those in {teacher_dir!r}. Use a new --workdir.")
  task = make_student_task(config, mesh, splits, teacher_model, teacher_vars)
  return train.run(
      task, workdir=workdir, config=config, mesh=mesh, splits=splits,
      summary_extra={
          "method": method, "kind": config.student.kind,
          "merged_headline": config.student.merged_headline,
          "step_size": None if perturb.is_identity(method)
          else config.perturb.step_size,
          "stage_fields": fields,
          "fingerprint": workdir_lib.fingerprint(
              {**fields, "teachers": teacher_fp}),
          "teacher_fingerprint": teacher_fp})
