"""The training loop shared by the teacher and distillation jobs.

A job builds a `Task` (initial state, jitted step, batch and predict
functions) and calls `run(task, ...)`, which owns everything else: resume
from the latest checkpoint, the step loop, logging, validation and
best-checkpoint selection, preemption, NaN guard, final export.

The step's key is `fold_in(base_key, step)` and the batch of step s is a pure
function of (seed, s), so a resumed run replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from divdistill_jax import (checkpointing, configlib, fileio, logging_utils,
                            runtime)

PyTree = Any
# Config fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = ("logging", "checkpoint", "compile_cache_dir",
                     "cpu_keep_freed_memory", "stop_after_step", "job",
                     "pipeline", "parallel")
# Where the inputs live is not what the run computes: a moved or copied
# workdir, or another spelling of a path, resumes.
_PATH_FIELDS = ("data.data_dir", "teacher.workdir")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue; saved whole in each checkpoint.

  `best_*` hold the best-by-validation variables. With per-member selection
  (teachers) `best_accuracy` is [M] and member m's slice of `best_params`
  is its own best; with joint selection (students) it is [1].
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  best_params: PyTree
  best_batch_stats: PyTree
  best_accuracy: jax.Array
  best_epoch: jax.Array


def new_state(params, batch_stats, opt_state, num_selected: int) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=opt_state, best_params=params, best_batch_stats=batch_stats,
      best_accuracy=jnp.full((num_selected,), -1.0, jnp.float32),
      best_epoch=jnp.zeros((num_selected,), jnp.int32))


@dataclasses.dataclass
class Task:
  """What the loop needs from a job.

  Attributes:
    name: 'teachers' or 'student' (used in messages and the progress bar).
    state: initial TrainState, already placed on the mesh.
    train_step: jitted `(state, images, labels, key) -> (state, metrics)`;
      metrics are scalars and include 'loss'.
    batch_fn: `step -> (images, labels)` global device arrays.
    predict_fn: jitted `(variables, uint8 images [B, H, W, C]) -> probs
      [M, B, K]` in eval mode.
    selection: 'member' (each member keeps its own best, teachers) or
      'mean' (the mean member accuracy selects the whole model, as the
      official student script does; docs/SOURCES.md, "Validation").
    steps_per_epoch: full batches per epoch.
    epochs: number of epochs.
    images_per_step: for the throughput display.
    eval_epochs: 1-indexed epochs after which to validate.
  """

  name: str
  state: TrainState
  train_step: Callable[..., Any]
  batch_fn: Callable[[int], tuple[jax.Array, jax.Array]]
  predict_fn: Callable[..., jax.Array]
  selection: str
  steps_per_epoch: int
  epochs: int
  images_per_step: int
  eval_epochs: frozenset[int]
  # (selected variables, mesh) -> extra arrays for predictions.npz, written
  # before done.json (e.g. the merged LatentBE network's predictions).
  extra_predictions: Callable[[Any, Any], dict] | None = None
  # Jitted `(variables, uint8 images) -> probs [1, B, K]` whose validation
  # accuracy selects the checkpoint instead of the members' (e.g. a LatentBE
  # student's merged network); None = `selection` as above.
  selection_fn: Callable[..., jax.Array] | None = None
  # The jitted steps behind `train_step`, by images per step (per member
  # for teachers), and the arguments they take after (state, images,
  # labels, key): for ahead-of-time compilation and export
  # (experiments/plan.py, tests/test_export.py).
  step_fns: dict[int, Any] = dataclasses.field(default_factory=dict)
  step_args: tuple = ()


class TrainingDiverged(RuntimeError):
  """Raised when the loss or parameters stop being finite."""


class Preempted(RuntimeError):
  """Raised after a clean save when SIGTERM/SIGINT stopped the run."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def eval_epochs(epochs: int, every: int, final: int = 0,
                schedule: str = "every") -> frozenset[int]:
  """Validation epochs (1-indexed); 'official' adds the official scripts'
  epoch 1 and last `final` epochs (docs/SOURCES.md, "Validation")."""
  out = {e for e in range(1, epochs + 1) if e % every == 0} | {epochs}
  if schedule == "official":
    out |= {1} | set(range(max(epochs - final + 1, 1), epochs + 1))
  return frozenset(out)


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def config_differences(saved: dict, current: dict,
                       defaults: dict | None = None,
                       prefix: str = "") -> list[str]:
  """Dotted fields in which two config dicts differ (resumable ones aside).

  A field missing from `saved` (added to the code after that run started)
  counts as equal when `current` holds its default value: a newer version
  may resume an older run whose behaviour it keeps.
  """
  if defaults is None:
    defaults = config_json(configlib.base_config())
  out = []
  for key in sorted(set(saved) | set(current)):
    if not prefix and key in _RESUMABLE_FIELDS:
      continue
    path = prefix + key
    if path in _PATH_FIELDS or path in configlib.MEMORY_FIELDS:
      continue
    default = defaults.get(key) if isinstance(defaults, dict) else None
    if key not in current:
      out.append(path)
    elif key not in saved:
      if current[key] != default:
        out.append(path)
    elif isinstance(saved[key], dict) and isinstance(current[key], dict):
      out += config_differences(saved[key], current[key], default or {},
                                path + ".")
    elif saved[key] != current[key]:
      out.append(path)
  return out


@jax.jit
def _update_best(state: TrainState, accuracy: jax.Array, epoch: jax.Array):
  """Keeps the variables of every selection unit whose accuracy improved."""
  improved = accuracy > state.best_accuracy

  def pick(new, old):
    if improved.shape[0] == 1:
      return jnp.where(improved[0], new, old)
    mask = improved.reshape((-1,) + (1,) * (new.ndim - 1))
    return jnp.where(mask, new, old)

  return state.replace(
      best_params=jax.tree.map(pick, state.params, state.best_params),
      best_batch_stats=jax.tree.map(pick, state.batch_stats,
                                    state.best_batch_stats),
      best_accuracy=jnp.where(improved, accuracy, state.best_accuracy),
      best_epoch=jnp.where(improved, epoch, state.best_epoch))


def member_accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Top-1 accuracy of each member, [M, N, K] -> [M]."""
  return (probs.argmax(-1) == labels[None]).mean(-1)


def _check_finite(step: int, metrics: dict) -> None:
  for name, value in metrics.items():
    if not np.all(np.isfinite(value)):
      raise TrainingDiverged(
          f"Training diverged at step {step}: {name} = {value}. The last "
          "good checkpoint is kept as the latest; lower the learning rate or "
          "check the data."
      )


class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag checked once per step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: no handlers, no flag.
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run(task: Task, *, workdir: str, config: ml_collections.ConfigDict,
        mesh, splits: dict, summary_extra: dict | None = None) -> dict:
  """Trains `task` to the end (resuming if possible) and exports results.

  Writes into `workdir`: `checkpoints/` (latest K states), `best/` (the
  selected variables), `predictions.npz` (member probabilities on the
  validation and test splits), `metrics.jsonl`, TensorBoard events,
  `config.json` and, when finished, `done.json` with the summaries and
  `summary_extra` (e.g. the method and its step size). Arrays from
  `task.extra_predictions` go into `predictions.npz`.

  Returns:
    Summaries: final/best validation accuracies, steps, wall time.

  Raises:
    TrainingDiverged: on a non-finite loss or parameters.
    Preempted: after saving, when SIGTERM / SIGINT arrived.
    ValueError: if `workdir` holds a run of a different config.
  """
  os.makedirs(workdir, exist_ok=True)
  cfg_json = config_json(config)
  ckpt, state, start, meta = _restore_latest(task, workdir, config, cfg_json)
  # Training time of the processes before a resume.
  earlier_seconds = meta.get("seconds", 0.0)
  if start is not None:
    logging_utils.log(f"[{task.name}] resumed from step {start} in {workdir}")
  start = start or 0
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(workdir, "config.json"), cfg_json,
                             indent=2, sort_keys=True)

  total = task.steps_per_epoch * task.epochs
  stop_at = total if config.stop_after_step is None else min(
      total, config.stop_after_step)
  writer = logging_utils.MetricWriter(workdir, drop_after=start)
  progress = logging_utils.Progress(
      total, start, task.name, task.images_per_step,
      enabled=config.logging.progress_bar)
  val_images, val_labels = splits["validation"]
  base_key = jax.random.key(config.seed)
  t0 = time.time()
  try:
    with _StopSignal() as stop:
      for step in range(start, stop_at):
        images, labels = task.batch_fn(step)
        state, metrics = task.train_step(state, images, labels, base_key)
        done_steps = step + 1
        epoch, within = divmod(done_steps, task.steps_per_epoch)
        host_metrics = None
        if done_steps % config.logging.every_steps == 0:
          host_metrics = jax.device_get(metrics)
          _check_finite(done_steps, host_metrics)
          writer.write(done_steps, {f"train/{k}": v
                                    for k, v in host_metrics.items()})
        if within == 0 and epoch in task.eval_epochs:
          state = _validate(task, state, epoch, mesh, config, writer,
                            val_images, val_labels, done_steps)
        progress.update(1, **({"loss": float(host_metrics["loss"])}
                              if host_metrics else {}))
        # The loop always saves its last step, so nothing is saved after it.
        if (done_steps % config.checkpoint.every_steps == 0
            or stop.received or done_steps == stop_at):
          if host_metrics is None:
            _check_finite(done_steps, jax.device_get(metrics))
          ckpt.save(done_steps, state, {
              "step": done_steps, "config": cfg_json,
              "seconds": earlier_seconds + time.time() - t0})
        if stop.received:
          raise Preempted(
              f"[{task.name}] {stop.received.name} at step {done_steps}: "
              f"saved a checkpoint in {workdir}; rerun the same command to "
              "resume.", stop.received)
  finally:
    progress.close()
    writer.close()
  ckpt.close()
  if stop_at < total:
    return {"stopped_at_step": stop_at}
  return _finish(task, state, workdir, mesh, config, splits,
                 earlier_seconds + time.time() - t0, summary_extra or {})


def _restore_latest(task, workdir, config, cfg_json):
  """The newest readable checkpoint: (checkpointer, state, step, meta).

  A checkpoint that cannot be read is moved to `checkpoints.damaged/` with
  one line and the previous one is tried; none at all is a fresh start.

  Raises:
    ValueError: the workdir holds a run of a different config, or every
      checkpoint it had is damaged.
  """
  directory = os.path.join(workdir, "checkpoints")
  damaged = os.path.join(workdir, "checkpoints.damaged")
  moved = []
  while True:
    ckpt = checkpointing.Checkpointer(directory, keep=config.checkpoint.keep)
    step = ckpt.latest_step()
    if step is None:
      if moved:
        raise ValueError(
            f"No readable checkpoint is left in {directory!r} (damaged: "
            f"steps {moved}, moved to {damaged!r}). Delete {workdir!r} (or "
            "use another --workdir) to train this stage from scratch.")
      return ckpt, task.state, None, {}
    try:
      meta = ckpt.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      problem = e
    else:
      differences = config_differences(meta.get("config", {}), cfg_json)
      if differences and not config.checkpoint.allow_config_change:
        raise ValueError(
            f"{workdir!r} holds a run of a different config (fields "
            f"{', '.join(differences[:6])}; see its config.json). Use a new "
            "--workdir, or set --config.checkpoint.allow_config_change=True "
            "to continue anyway.")
      try:
        state, _ = ckpt.restore(step, task.state)
        return ckpt, state, step, meta
      except Exception as e:  # pylint: disable=broad-except
        problem = e
    ckpt.close()
    reason = (str(problem).strip().splitlines()
              or [type(problem).__name__])[0][:160]
    os.makedirs(damaged, exist_ok=True)
    target = os.path.join(damaged, str(step))
    if os.path.exists(target):
      target += f".{int(time.time())}"
    shutil.move(os.path.join(directory, str(step)), target)
    moved.append(step)
    logging_utils.log(f"[{task.name}] checkpoint of step {step} is damaged "
                      f"({type(problem).__name__}: {reason}); moved to "
                      f"{target}, trying the previous one")


def _validate(task, state, epoch, mesh, config, writer, val_images,
              val_labels, step):
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  probs = runtime.predict_split(task.predict_fn, variables, val_images, mesh,
                        config.eval.batch_size)
  accs = member_accuracy(probs, val_labels)
  ens_acc = float((probs.mean(0).argmax(-1) == val_labels).mean())
  selected = accs if task.selection == "member" else accs.mean(keepdims=True)
  scalars = {"val/mean_member_accuracy": accs.mean(),
             "val/ensemble_accuracy": ens_acc}
  if task.selection_fn is not None:
    chosen = runtime.predict_split(task.selection_fn, variables, val_images,
                                   mesh, config.eval.batch_size)
    selected = member_accuracy(chosen, val_labels)
    scalars["val/selection_accuracy"] = selected[0]
  state = _update_best(state, jnp.asarray(selected, jnp.float32),
                       jnp.asarray(epoch, jnp.int32))
  scalars.update({f"val/member_{m}_accuracy": a for m, a in enumerate(accs)})
  writer.write(step, scalars)
  logging_utils.log(
      f"[{task.name}] epoch {epoch}: val member acc "
      f"{np.round(accs * 100, 2).tolist()} ensemble {ens_acc * 100:.2f}"
      + (f" selection {float(selected[0]) * 100:.2f}"
         if task.selection_fn is not None else ""))
  return state


def _finish(task, state, workdir, mesh, config, splits, seconds, extra):
  """Exports the selected variables and their predictions."""
  best = {"params": state.best_params, "batch_stats": state.best_batch_stats}
  checkpointing.save_variables(os.path.join(workdir, "best"), best)
  arrays = {}
  for split in ("validation", "test"):
    images, labels = splits[split]
    arrays[f"{split}_probs"] = runtime.predict_split(
        task.predict_fn, best, images, mesh, config.eval.batch_size)
    arrays[f"{split}_labels"] = labels
  if task.extra_predictions is not None:
    arrays.update(task.extra_predictions(best, mesh))
  summaries = {
      "steps": int(state.step),
      "seconds": seconds,
      "best_val_accuracy": np.asarray(state.best_accuracy).tolist(),
      "best_epoch": np.asarray(state.best_epoch).tolist(),
      "test_member_accuracy": member_accuracy(
          arrays["test_probs"], arrays["test_labels"]).tolist(),
      **extra,
  }
  if jax.process_index() == 0:
    # done.json last: its presence means every output above is complete.
    fileio.write_npz(os.path.join(workdir, "predictions.npz"),
                            **arrays)
    fileio.write_json(os.path.join(workdir, "done.json"), summaries,
                             indent=2)
  return summaries
