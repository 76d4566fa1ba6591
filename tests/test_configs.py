"""Every config and variant loads; bad keys, types and values fail clearly."""

import pytest
from conftest import CONFIG_FILES, load_config

from divdistill_jax import configlib, data, models

VARIANTS = (None, "teachers", "kd", "gaussian", "ods", "confods",
            "disagreement", "pipeline", "evaluate", "smoke", "confods,smoke",
            "teachers,smoke")


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
    ("teacher.batch_size", 0, "teacher.batch_size"),
    ("pipeline.methods", "kd,foo", "pipeline.methods"),
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


def test_command_line_rejects_unknown_override(tmp_path):
  import os
  import subprocess
  import sys
  from conftest import ROOT
  result = subprocess.run(
      [sys.executable, "-m", "divdistill_jax.main",
       "--config=configs/quickstart.py:evaluate",
       "--config.kd.nosuchkey=1", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert "nosuchkey" in result.stderr
