"""Shared configuration: the base ConfigDict every config file starts from.

Config files in `configs/` call `base_config()`, fill in their paper setting
and then `apply_variants(config, arg)` for `--config=file.py:VARIANTS`, e.g.
`configs/cifar100_wrn28x10.py:confods,smoke`.

Variants:
  teachers                 job = teachers (train the DE-M teachers).
  kd, gaussian, ods,
  confods, disagreement,
  tdiv_sdiv                job = distill with that perturbation ("kd" = none).
  pipeline                 teachers, every method of pipeline.methods, table.
  evaluate                 the table from an existing pipeline workdir.
  smoke                    tiny model, tiny data, a few steps (tests, CI).
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections
from ml_collections import config_dict

JOBS = ("teachers", "distill", "evaluate", "pipeline")
# The built-in perturbation methods, as `perturb.py` registers them ("kd" =
# plain KD, the identity). A method registered later (`perturb.register`)
# joins through `add_method`; this module stays free of jax.
METHODS = ("kd", "gaussian", "ods", "confods", "disagreement", "tdiv_sdiv")
# What `pipeline` runs by default: the NeurIPS 2021 paper's methods and ours.
PIPELINE_METHODS = ("kd", "gaussian", "ods", "confods", "disagreement")
_ADDED_METHODS: list[str] = []


def add_method(name: str) -> None:
  """Makes a newly registered perturbation a valid method name."""
  if name not in METHODS and name not in _ADDED_METHODS:
    _ADDED_METHODS.append(name)


def known_methods() -> tuple[str, ...]:
  """Valid `perturb.method` names: the built-in ones, then added ones."""
  return METHODS + tuple(_ADDED_METHODS)


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """Optimiser and schedule fields (docs/SOURCES.md, Optimiser, Schedule)."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 0.1  # Base LR of the default group (slow weights).
  c.fast_learning_rate = 0.05  # LR of BatchEnsemble fast weights r, s.
  c.weight_decay = 5e-4  # Coupled L2 on every non-fast parameter.
  c.fast_weight_decay = 0.0
  c.momentum = 0.9
  c.nesterov = False
  c.schedule = "warmup_linear"  # 'warmup_linear' | 'cosine' | 'constant'.
  # WarmupLinearDecay milestones in epochs (m0, m1, m2), 1-indexed epochs.
  c.milestones = (5, 150, 270)
  c.warmup_factor = 0.01
  c.final_factor = 0.01
  c.warmup_epochs = 5  # Cosine schedule only.
  # 'epoch' (official: LR constant within an epoch) or 'step' (the same
  # curve at the fractional epoch; smooths a short warm-up).
  c.granularity = "epoch"
  # Fast group: fast_grad_scale * (g + fast_weight_decay * (p - target)).
  # Set by student.kind = 'latentbe' (optim.make_optimizer).
  c.fast_decay_target = 0.0
  c.fast_grad_scale = 1.0
  c.update(overrides)
  return c


# How a step is computed, not what it computes: memory and speed settings
# that give the same update to float rounding. They are left out of stage
# fingerprints, and a run may resume with other values (a run that ran out
# of memory resumes with microbatches or remat).
MEMORY_FIELDS = ("model.ensemble_strategy", "model.remat",
                 "teacher.microbatches", "student.microbatches",
                 "data.on_device")


def model_options(config: ml_collections.ConfigDict) -> dict:
  """The config's initialisation, BatchNorm and rematerialisation options
  for `models.get_model`."""
  return {"kernel_init": config.model.kernel_init,
          "bias_init": config.model.classifier_bias_init,
          "bn_running_var": config.model.bn_running_var,
          "remat": config.model.remat}


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=path:arg` would give.

  For Python and notebooks, where the absl flag is not used.
  """
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"divdistill_config_{name}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  """The full set of fields, with CPU-friendly defaults."""
  c = ml_collections.ConfigDict()
  c.job = "pipeline"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.data_dir = config_dict.placeholder(str)
  # Use only the first N images of the train / validation / test split
  # (-1 = all). The quick start trains on a subset so teachers overfit.
  c.data.train_size = -1
  c.data.validation_size = -1
  c.data.test_size = -1
  c.data.crop_padding = 4
  c.data.flip = True
  # True: every epoch is floor(N / B) full batches (one compiled shape).
  # False: ceil steps with a partial last batch, as the official PyTorch
  # runs' DistributedSampler over `sampler_replicas` GPUs with drop_last =
  # False (each GPU's last batch partial; its BatchNorm group and ODS draw
  # follow it).
  c.data.drop_remainder = True
  c.data.sampler_replicas = 1
  # Keep the training split on every device and gather batches there (only
  # indices travel); False: gather in host memory and transfer the images
  # (splits too large for device memory). The same batches either way.
  c.data.on_device = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"
  c.model.dtype = "float32"  # 'bfloat16': bf16 compute, fp32 params/stats.
  # How M teacher members run: 'unroll' (loop inside jit) or 'vmap'.
  c.model.ensemble_strategy = "unroll"
  # Initialisation and BatchNorm of the recipe's code: the NeurIPS 2021
  # PyTorch code ('fan_out_normal', 'uniform', 'unbiased') or the ICML 2022
  # follow-up's giung2-jax ('fan_in_truncated', 'zeros', 'biased').
  c.model.kernel_init = "fan_out_normal"
  c.model.classifier_bias_init = "uniform"
  c.model.bn_running_var = "unbiased"
  # Rematerialisation of every residual block in the backward pass:
  # 'none', 'full' (keep only the block's input, recompute the block) or
  # 'convs' (keep the convolutions' outputs, recompute the norms and
  # activations). Same gradients, less activation memory (experiments/plan.py).
  c.model.remat = "none"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.ensemble_size = 4
  c.teacher.batch_size = 128  # Global, per member.
  c.teacher.epochs = 200
  c.teacher.optim = optim_config(learning_rate=0.1)
  # Ghost BatchNorm: images per statistics group (None = whole batch).
  c.teacher.bn_group_size = config_dict.placeholder(int)
  # Gradient accumulation over k microbatches of whole BatchNorm groups:
  # the same step with 1/k of the activation memory (accumulate.py).
  c.teacher.microbatches = 1
  c.teacher.eval_every_epochs = 1
  c.teacher.eval_final_epochs = 0
  # Teachers workdir used by the distill job (pipeline sets it itself).
  c.teacher.workdir = config_dict.placeholder(str)

  c.student = ml_collections.ConfigDict()
  c.student.ensemble_size = 4  # BE-M; 1 = single network (use pairing=mean).
  # 'batchensemble' (NeurIPS 2021) or 'latentbe' (ICML 2022: fast weights
  # start at 1, shared classifier bias before s, fast weights decayed toward
  # 1 with wd / M and their gradients x M, one LR; evaluated also as ONE
  # merged network). 'latentbe' overrides fast_init_std and the fast group.
  c.student.kind = "batchensemble"
  # LatentBE: also re-estimate the merged network's BatchNorm statistics on
  # the training images (an extra table row; the follow-up does not).
  c.student.merge_bn_reestimate = False
  c.student.pairing = "member"  # 'member' (official) | 'mean'.
  # Which validation accuracy keeps the best checkpoint: the members' mean
  # (NeurIPS 2021) or, for LatentBE students, the merged network's (rule
  # 'sb', as the follow-up's training script validates).
  c.student.selection = "members"
  # LatentBE: the merged network of the table's headline "(merged)" row;
  # the other bias rule gets a row named for it.
  c.student.merged_headline = "sb"
  c.student.batch_size = 128  # Global images; each is tiled M times.
  c.student.epochs = 250
  c.student.fast_init_std = 0.5
  c.student.fused_passes = False  # Clean + perturbed pass as one pass.
  c.student.optim = optim_config(learning_rate=0.1, fast_learning_rate=0.05)
  # Images per BN group; all M member copies of those images share it.
  c.student.bn_group_size = config_dict.placeholder(int)
  c.student.microbatches = 1  # As teacher.microbatches.
  c.student.eval_every_epochs = 1
  c.student.eval_final_epochs = 0

  c.kd = ml_collections.ConfigDict()
  c.kd.alpha = 0.9
  c.kd.temperature = 4.0
  # Also run the student on clean images (CE, and the official BN threading
  # clean -> perturbed). False needs alpha = 1: the ICML 2022 recipe.
  c.kd.clean_pass = True

  c.perturb = ml_collections.ConfigDict()
  c.perturb.method = "kd"  # A registered method (known_methods()).
  # In 1/255 units (1.0 = the paper's eta), or 'auto': calibrated after the
  # teachers so that their diversity on perturbed training images matches
  # `auto_target_ratio` x their diversity on validation images
  # (calibrate.py).
  c.perturb.step_size = config_dict.FieldReference(1.0, field_type=object)
  c.perturb.auto_target_ratio = 1.0
  c.perturb.auto_num_examples = 500  # Train / validation images searched.
  c.perturb.num_steps = 1
  c.perturb.norm = "l2"  # 'l2' | 'linf'.
  c.perturb.confidence_scaled = False  # Disagreement method only.
  c.perturb.all_pairs = False  # tdiv_sdiv: every member pair, not one.

  c.eval = ml_collections.ConfigDict()
  # Validation epochs: every `eval_every_epochs` and the last one; with
  # 'official' also epoch 1 and each of the last `eval_final_epochs`
  # (docs/SOURCES.md, Validation).
  c.eval.schedule = "every"
  c.eval.batch_size = 500
  c.eval.ece_bins = 15

  c.parallel = ml_collections.ConfigDict()
  c.parallel.num_devices = config_dict.placeholder(int)  # None = all.
  c.parallel.distributed = False  # Call jax.distributed.initialize().
  # Passed to jax.distributed.initialize; None = detect (TPU pods, SLURM,
  # Open MPI, Kubernetes). Set all three elsewhere (e.g. GPU hosts, or two
  # local CPU processes on loopback).
  c.parallel.coordinator_address = config_dict.placeholder(str)
  c.parallel.num_processes = config_dict.placeholder(int)
  c.parallel.process_id = config_dict.placeholder(int)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 2
  # Allow a workdir that holds a run of a different config.
  c.checkpoint.allow_config_change = False

  c.logging = ml_collections.ConfigDict()
  c.logging.every_steps = 50
  c.logging.progress_bar = True
  c.compile_cache_dir = config_dict.placeholder(str)
  # On a CPU, each step reuses the memory the last one freed
  # (`runtime.keep_freed_cpu_memory`; the process keeps its peak memory).
  c.cpu_keep_freed_memory = True

  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.methods = ",".join(PIPELINE_METHODS)
  # Finished stages to compute again, the old ones moved under replaced/:
  # comma-separated 'teachers' (and so every student), 'students', 'all'
  # or pipeline entries. Empty: a finished stage of other settings stops
  # the run with one line naming the fields.
  c.pipeline.recompute = ""
  c.stop_after_step = config_dict.placeholder(int)  # Testing only.
  return c


def split_list(text: str | None) -> list[str]:
  """'confods, smoke' -> ['confods', 'smoke'] (empty items dropped)."""
  return [v.strip() for v in (text or "").split(",") if v.strip()]


def pipeline_entries(config: ml_collections.ConfigDict) -> list[str]:
  """The `pipeline.methods` entries, METHOD or KIND:METHOD, in order."""
  return split_list(config.pipeline.methods)


def apply_variants(
    config: ml_collections.ConfigDict,
    arg: str | None,
    extra: dict | None = None,
) -> ml_collections.ConfigDict:
  """Applies `file.py:VARIANTS` to a config.

  Args:
    config: a config from `base_config()` with the file's setting filled in.
    arg: the text after ':' in `--config=file.py:arg`, e.g. 'ods,smoke'.
    extra: file-specific variants, name -> callable(config); a callable
      named 'smoke' runs after the shared smoke setting.

  Returns:
    The same config, modified and locked.

  Raises:
    ValueError: for an unknown variant.
  """
  extra = extra or {}
  for variant in split_list(arg):
    if variant == "teachers":
      config.job = "teachers"
    elif variant in known_methods():
      config.job = "distill"
      config.perturb.method = variant
    elif variant in ("pipeline", "evaluate"):
      config.job = variant
    elif variant == "smoke":
      apply_smoke(config)
      if "smoke" in extra:
        extra["smoke"](config)
    elif variant in extra:
      extra[variant](config)
    else:
      known = ("teachers", *known_methods(), "pipeline", "evaluate", "smoke",
               *extra)
      raise ValueError(
          f"Unknown config variant {variant!r}; expected any of "
          f"{sorted(set(known))}."
      )
  validate(config)
  config.lock()
  return config


_CHOICES = {
    "job": JOBS,
    "perturb.norm": ("l2", "linf"),
    "student.pairing": ("member", "mean"),
    "student.kind": ("batchensemble", "latentbe"),
    "student.selection": ("members", "merged"),
    "student.merged_headline": ("sb", "b"),
    "model.kernel_init": ("fan_out_normal", "fan_in_truncated"),
    "model.classifier_bias_init": ("uniform", "zeros"),
    "model.bn_running_var": ("unbiased", "biased"),
    "model.remat": ("none", "full", "convs"),
    "model.dtype": ("float32", "bfloat16"),
    "model.ensemble_strategy": ("unroll", "vmap"),
    "eval.schedule": ("every", "official"),
    "teacher.optim.schedule": ("warmup_linear", "cosine", "constant"),
    "student.optim.schedule": ("warmup_linear", "cosine", "constant"),
    "teacher.optim.granularity": ("epoch", "step"),
    "student.optim.granularity": ("epoch", "step"),
}


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks choices and ranges that ConfigDict types cannot express.

  Raises:
    ValueError: naming the field, the bad value and what is allowed.
  """
  for field, value in _numbers(config.to_dict()):
    if not math.isfinite(value):
      raise ValueError(f"config.{field} = {value} must be a finite number.")
  all_choices = {**_CHOICES, "perturb.method": known_methods()}
  for field, choices in all_choices.items():
    value = _get(config, field)
    if value not in choices:
      raise ValueError(
          f"config.{field} = {value!r} is not one of {list(choices)}."
      )
  positive = (
      "teacher.ensemble_size", "student.ensemble_size", "teacher.batch_size",
      "student.batch_size", "teacher.epochs", "student.epochs",
      "perturb.num_steps", "eval.batch_size", "checkpoint.every_steps",
      "checkpoint.keep", "logging.every_steps", "teacher.eval_every_epochs",
      "student.eval_every_epochs", "data.sampler_replicas",
      "teacher.microbatches", "student.microbatches",
  )
  for field in positive:
    value = _get(config, field)
    if value < 1:
      raise ValueError(f"config.{field} must be >= 1, got {value}.")
  for field in ("teacher.eval_final_epochs", "student.eval_final_epochs",
                "data.crop_padding"):
    if _get(config, field) < 0:
      raise ValueError(
          f"config.{field} must be >= 0, got {_get(config, field)}.")
  for field in ("data.train_size", "data.validation_size", "data.test_size"):
    value = _get(config, field)
    if value != -1 and value < 1:
      raise ValueError(
          f"config.{field} must be -1 (all) or >= 1, got {value}.")
  replicas = config.data.sampler_replicas
  for who in ("teacher", "student"):
    _validate_optim(config[who].optim, f"{who}.optim")
    group, batch = config[who].bn_group_size, config[who].batch_size
    if group is not None and (group < 1 or batch % group):
      raise ValueError(
          f"config.{who}.bn_group_size = {group} must be >= 1 and divide "
          f"config.{who}.batch_size = {batch}.")
    k = config[who].microbatches
    if k > 1 and (group is None or batch % (k * group)):
      raise ValueError(
          f"config.{who}.microbatches = {k} must split the batch into whole "
          f"BatchNorm groups: config.{who}.bn_group_size = {group} must be "
          f"set and {k} x {group} must divide config.{who}.batch_size = "
          f"{batch} (a microbatch normalised by its own statistics would "
          "change the step).")
    if not config.data.drop_remainder:
      if batch % replicas:
        raise ValueError(
            f"config.{who}.batch_size = {batch} must be a multiple of "
            f"config.data.sampler_replicas = {replicas}.")
      if group is not None and group != batch // replicas:
        raise ValueError(
            f"config.{who}.bn_group_size = {group}: with a partial last "
            "batch (config.data.drop_remainder = False) a BatchNorm group "
            f"is one replica's batch, {batch // replicas}, or None.")
  if config.student.kind == "latentbe" and config.student.ensemble_size < 2:
    raise ValueError("config.student.kind = 'latentbe' needs "
                     "config.student.ensemble_size >= 2.")
  if config.student.fast_init_std < 0:
    raise ValueError("config.student.fast_init_std must be >= 0, got "
                     f"{config.student.fast_init_std}.")
  step = config.perturb.step_size
  if step != "auto" and (isinstance(step, bool)
                         or not isinstance(step, (int, float)) or step < 0):
    raise ValueError(
        f"config.perturb.step_size = {step!r} must be a number >= 0 (in "
        "1/255 units) or 'auto'.")
  if config.perturb.auto_num_examples < 1:
    raise ValueError("config.perturb.auto_num_examples must be >= 1, got "
                     f"{config.perturb.auto_num_examples}.")
  if config.perturb.auto_target_ratio <= 0:
    raise ValueError("config.perturb.auto_target_ratio must be > 0, got "
                     f"{config.perturb.auto_target_ratio}.")
  if config.eval.ece_bins < 1:
    raise ValueError(
        f"config.eval.ece_bins must be >= 1, got {config.eval.ece_bins}.")
  devices = config.parallel.num_devices
  if devices is not None and devices < 1:
    raise ValueError(
        f"config.parallel.num_devices must be >= 1 or None, got {devices}.")
  if not 0.0 <= config.kd.alpha <= 1.0:
    raise ValueError(
        f"config.kd.alpha must be in [0, 1], got {config.kd.alpha}.")
  if not config.kd.clean_pass and config.kd.alpha != 1.0:
    raise ValueError(
        "config.kd.clean_pass = False drops the CE term: it needs "
        f"config.kd.alpha = 1, got {config.kd.alpha}.")
  if config.kd.temperature <= 0:
    raise ValueError(
        f"config.kd.temperature must be > 0, got {config.kd.temperature}."
    )
  for entry in pipeline_entries(config):
    kind, method = parse_student_entry(entry)
    if method not in known_methods() or kind not in STUDENT_KINDS:
      raise ValueError(
          f"config.pipeline.methods has unknown entry {entry!r}; expected "
          f"comma-separated METHOD or KIND:METHOD with METHOD in "
          f"{list(known_methods())} and KIND in {list(STUDENT_KINDS)}.")
  stages = {"teachers", "students", "all", *pipeline_entries(config)}
  unknown = set(split_list(config.pipeline.recompute)) - stages
  if unknown:
    raise ValueError(
        f"config.pipeline.recompute names no stage: {sorted(unknown)}; "
        f"use any of {sorted(stages)}.")


def _numbers(tree: dict, prefix: str = ""):
  """(dotted field, float value) of every float leaf of a config dict."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(value, float):
      yield f"{prefix}{key}", value
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        if isinstance(item, float):
          yield f"{prefix}{key}[{i}]", item


# Student kinds a pipeline entry may name: 'be' (BatchEnsemble), 'latentbe',
# 'single' (one network, mean pairing); None = the config's student.
STUDENT_KINDS = (None, "be", "latentbe", "single")


def parse_student_entry(entry: str) -> tuple[str | None, str]:
  """'latentbe:tdiv_sdiv' -> ('latentbe', 'tdiv_sdiv'); 'ods' -> (None,
  'ods')."""
  if ":" in entry:
    kind, method = entry.split(":", 1)
    return kind, method
  return None, entry


def apply_student_kind(config: ml_collections.ConfigDict,
                       kind: str | None) -> None:
  """Sets an unlocked config's student to a pipeline entry's kind."""
  if kind == "be":
    config.student.kind = "batchensemble"
  elif kind == "latentbe":
    config.student.kind = "latentbe"
  elif kind == "single":
    config.student.kind = "batchensemble"
    config.student.ensemble_size = 1
    config.student.pairing = "mean"


def _validate_optim(optim: ml_collections.ConfigDict, name: str) -> None:
  for field in ("learning_rate", "fast_learning_rate", "weight_decay",
                "fast_weight_decay", "final_factor", "warmup_epochs"):
    if optim[field] < 0:
      raise ValueError(
          f"config.{name}.{field} must be >= 0, got {optim[field]}.")
  if not 0.0 <= optim.momentum < 1.0:
    raise ValueError(
        f"config.{name}.momentum must be in [0, 1), got {optim.momentum}.")
  if not 0.0 <= optim.warmup_factor <= 1.0:
    raise ValueError(f"config.{name}.warmup_factor must be in [0, 1], got "
                     f"{optim.warmup_factor}.")
  m = tuple(optim.milestones)
  if len(m) != 3 or not 1 <= m[0] <= m[1] <= m[2]:
    raise ValueError(
        f"config.{name}.milestones = {m} must be three epochs "
        "1 <= warm-up end <= decay start <= decay end.")


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Tiny, fast setting shared by every file's `:smoke` variant."""
  config.data.train_size = 256
  config.data.validation_size = 64
  config.data.test_size = 64
  # Stem conv + BatchNorm + classifier: every code path of the real
  # networks (BatchEnsemble layers, shared BN, member axis) at the lowest
  # compile time, which dominates runs this short.
  config.model.name = "resnet2_w4"
  config.perturb.auto_num_examples = 64
  config.teacher.bn_group_size = None
  config.student.bn_group_size = None
  config.teacher.ensemble_size = 2
  config.student.ensemble_size = 2
  config.teacher.batch_size = 32
  config.student.batch_size = 32
  config.teacher.epochs = 2
  config.student.epochs = 2
  for optim in (config.teacher.optim, config.student.optim):
    optim.milestones = (1, 2, 2)
    optim.warmup_epochs = 1
  config.teacher.eval_every_epochs = 1
  config.student.eval_every_epochs = 1
  config.eval.schedule = "every"
  config.eval.batch_size = 64
  config.checkpoint.every_steps = 4
  config.logging.every_steps = 2
  config.logging.progress_bar = False
