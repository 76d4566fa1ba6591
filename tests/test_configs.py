"""Every config and variant loads; bad keys, types and values fail clearly."""

import pytest
from conftest import CONFIG_FILES, load_config

from divdistill_jax import configlib, data, models

VARIANTS = (None, "teachers", "kd", "gaussian", "ods", "confods",
            "disagreement", "tdiv_sdiv", "pipeline", "evaluate", "smoke",
            "confods,smoke", "teachers,smoke")


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_and_variant_loads(name, variant):
  config = load_config(name, variant)
  assert config.job in configlib.JOBS
  assert config.data.name in data.DATASETS
  assert config.model.name in models.MODEL_NAMES
  if variant and variant.split(",")[0] in configlib.METHODS:
    assert config.job == "distill"
    assert config.perturb.method == variant.split(",")[0]
  with pytest.raises(AttributeError):  # Locked: no new keys.
    config.kd.alphaa = 0.5


def test_paper_hyperparameters_cifar100():
  c = load_config("cifar100_wrn28x10", "confods")
  assert (c.model.name, c.data.name) == ("wrn28x10", "cifar100")
  assert (c.teacher.batch_size, c.teacher.epochs) == (256, 300)
  assert c.teacher.optim.learning_rate == 0.2
  assert (c.student.batch_size, c.student.epochs) == (64, 300)
  assert (c.student.optim.learning_rate,
          c.student.optim.fast_learning_rate) == (0.05, 0.025)
  assert tuple(c.student.optim.milestones) == (5, 150, 270)
  assert (c.kd.alpha, c.kd.temperature, c.perturb.step_size) == (0.9, 1.0, 1.0)


def test_cifar100_batchnorm_groups_are_the_official_gpus_by_default():
  """4 GPUs without SyncBN: 64 teacher images and 16 student images (x 4
  members) per BatchNorm group and per ODS draw (docs/SOURCES.md, Per-GPU
  BatchNorm)."""
  c = load_config("cifar100_wrn28x10", "confods")
  assert (c.teacher.bn_group_size, c.student.bn_group_size) == (64, 16)
  assert load_config("cifar100_wrn28x10", "ghostbn").student.bn_group_size \
      == 16
  c = load_config("cifar100_wrn28x10", "confods,syncbn")
  assert (c.teacher.bn_group_size, c.student.bn_group_size) == (None, None)
  # The single-GPU ResNet-32 runs used whole-batch statistics.
  c = load_config("cifar10_resnet32", "confods")
  assert (c.teacher.bn_group_size, c.student.bn_group_size) == (None, None)


def test_followup_recipe_cifar100_wrn28x4():
  """The ICML 2022 recipe and its three students."""
  c = load_config("cifar100_wrn28x4", "tdiv_sdiv")
  assert (c.model.name, c.data.name, c.job) == ("wrn28x4", "cifar100",
                                                "distill")
  for who in (c.teacher, c.student):
    assert (who.batch_size, who.epochs) == (128, 200)
    o = who.optim
    assert (o.learning_rate, o.nesterov, o.schedule, o.warmup_epochs,
            o.warmup_factor, o.granularity, o.weight_decay) == (
                0.1, True, "cosine", 5, 0.0, "step", 5e-4)
  assert (c.kd.alpha, c.kd.temperature, c.kd.clean_pass) == (1.0, 4.0, False)
  assert (c.student.kind, c.student.ensemble_size, c.perturb.method,
          c.perturb.step_size) == ("latentbe", 4, "tdiv_sdiv", 1.0)
  single = load_config("cifar100_wrn28x4", "kd,single")
  assert (single.student.ensemble_size, single.student.pairing) == (1, "mean")
  ods = load_config("cifar100_wrn28x4", "ods,latentbe")
  assert (ods.perturb.method, ods.student.kind) == ("ods", "latentbe")
  pipe = load_config("cifar100_wrn28x4", "pipeline")
  assert pipe.pipeline.methods == "single:kd,kd,tdiv_sdiv"


def test_paper_hyperparameters_cifar10():
  c = load_config("cifar10_resnet32", "ods")
  assert (c.teacher.batch_size, c.teacher.epochs) == (512, 200)
  assert c.teacher.optim.learning_rate == 0.4
  assert c.teacher.optim.weight_decay == 4e-4
  assert tuple(c.teacher.optim.milestones) == (5, 100, 180)
  assert (c.student.batch_size, c.student.epochs) == (128, 250)
  assert tuple(c.student.optim.milestones) == (5, 125, 225)
  assert c.kd.temperature == 4.0


def test_unknown_variant_fails():
  with pytest.raises(ValueError, match="Unknown config variant 'odz'"):
    load_config("quickstart", "odz")


def test_unknown_key_and_wrong_type_fail():
  config = load_config("quickstart")
  with pytest.raises(AttributeError):
    config.student.temprature = 2.0
  with pytest.raises(TypeError):
    config.kd.alpha = "high"


@pytest.mark.parametrize("field,value,message", [
    ("perturb.method", "odss", "perturb.method"),
    ("student.pairing", "random", "student.pairing"),
    ("kd.alpha", 1.5, "kd.alpha"),
    ("kd.alpha", -0.1, "kd.alpha"),
    ("kd.temperature", 0.0, "kd.temperature"),
    ("teacher.batch_size", 0, "teacher.batch_size"),
    ("student.batch_size", -4, "student.batch_size"),
    ("teacher.epochs", 0, "teacher.epochs"),
    ("student.epochs", 0, "student.epochs"),
    ("pipeline.methods", "kd,foo", "pipeline.methods"),
    ("pipeline.methods", "tiny:kd", "pipeline.methods"),
    ("student.kind", "mimo", "student.kind"),
    ("perturb.step_size", -1.0, "perturb.step_size"),
    ("perturb.step_size", "big", "perturb.step_size"),
    ("perturb.auto_target_ratio", 0.0, "perturb.auto_target_ratio"),
    ("perturb.auto_num_examples", 0, "perturb.auto_num_examples"),
    ("kd.temperature", float("nan"), "kd.temperature"),
    ("student.optim.learning_rate", float("inf"), "finite"),
    ("pipeline.recompute", "teacher", "pipeline.recompute"),
    ("perturb.num_steps", 0, "perturb.num_steps"),
    ("kd.clean_pass", False, "kd.clean_pass"),
    ("student.bn_group_size", 7, "student.bn_group_size"),
    ("teacher.bn_group_size", 0, "teacher.bn_group_size"),
    ("student.optim.learning_rate", -0.1, "student.optim.learning_rate"),
    ("teacher.optim.weight_decay", -1e-4, "teacher.optim.weight_decay"),
    ("student.optim.momentum", 1.0, "student.optim.momentum"),
    ("student.optim.warmup_factor", -0.1, "student.optim.warmup_factor"),
    ("teacher.optim.milestones", (5, 3, 10), "teacher.optim.milestones"),
    ("student.fast_init_std", -0.5, "student.fast_init_std"),
    ("data.train_size", 0, "data.train_size"),
    ("data.crop_padding", -1, "data.crop_padding"),
    ("eval.ece_bins", 0, "eval.ece_bins"),
    ("parallel.num_devices", 0, "parallel.num_devices"),
])
def test_validate_names_the_field(field, value, message):
  config = load_config("quickstart")
  config.unlock()
  target = config
  *parents, leaf = field.split(".")
  for p in parents:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    configlib.validate(config)


def test_valid_edge_values_pass():
  config = load_config("quickstart")
  config.unlock()
  config.perturb.step_size = "auto"
  configlib.validate(config)
  config.perturb.step_size = 0  # No perturbation: allowed.
  config.kd.alpha = 1.0
  config.student.bn_group_size = 25
  config.perturb.auto_num_examples = 1  # The smallest calibration set.
  config.pipeline.recompute = "teachers,kd"
  configlib.validate(config)


@pytest.mark.parametrize("override,message", [
    ("--config.student.batch_sz=3",
     "divdistill: error: --config.student.batch_sz: the config has no field "
     "'batch_sz'. Did you mean \"batch_size\" instead of \"batch_sz\"?"),
    ("--config.perturb.step_size=-1",
     "divdistill: error: config.perturb.step_size = -1 must be a number >= 0"),
    ("--config.student.batch_size=abc",
     "divdistill: error: flag --config.student.batch_size=abc"),
])
def test_command_line_bad_values_print_one_line(tmp_path, override, message):
  import os
  import subprocess
  import sys
  from conftest import ROOT
  result = subprocess.run(
      [sys.executable, "-m", "divdistill_jax.main",
       "--config=configs/quickstart.py:evaluate", override,
       f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  assert result.stderr.startswith(message), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
