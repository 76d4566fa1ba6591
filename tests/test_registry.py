"""The perturbation registry is the one extension point.

A method registered here, in the test alone, must be a valid config method,
run inside the real student step and give a pipeline table row, with no
edit to configlib.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_config, notebook_config

from divdistill_jax import (configlib, distill, parallel, perturb, pipeline,
                            runtime, teachers)

NAME = "invert_test"


def _invert(key, x, context, options):
  del key, context, options
  return 1.0 - x


if NAME not in perturb.methods():
  perturb.register(NAME, label="KD+Invert")(_invert)


def test_configlib_is_free_of_jax_and_lists_the_built_in_methods():
  code = ("import sys; from divdistill_jax import configlib; "
          "assert 'jax' not in sys.modules, 'configlib imported jax'; "
          "from divdistill_jax import perturb; "
          "print(perturb.methods() == configlib.METHODS "
          "== configlib.known_methods())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "True"


def test_registering_makes_a_config_method():
  assert set(configlib.known_methods()) == set(perturb.methods())
  assert perturb.label(NAME) == "KD+Invert"
  assert not perturb.is_identity(NAME) and not perturb.uses_student(NAME)
  assert perturb.is_identity("kd") and perturb.is_identity("none")
  config = load_config("quickstart", f"{NAME},smoke")
  assert (config.job, config.perturb.method) == ("distill", NAME)
  with pytest.raises(ValueError, match="already registered"):
    perturb.register(NAME)(_invert)
  config.unlock()
  config.perturb.method = "nope"
  with pytest.raises(ValueError, match="config.perturb.method"):
    configlib.validate(config)


def test_a_registered_method_runs_in_the_student_step(smoke_pipeline):
  """The step applies the registered function: the logged step size is
  mean_b |(1 - x_b) - x_b|_2, computed here from the batch."""
  config = load_config("quickstart", f"{NAME},smoke",
                       **{"teacher.workdir": smoke_pipeline.teachers})
  assert config.data.crop_padding == 0 and not config.data.flip
  model, variables, _ = teachers.load_teachers(config,
                                               smoke_pipeline.teachers)
  mesh = parallel.make_mesh(1)
  task = distill.make_student_task(config, mesh, runtime.load_splits(config),
                                   model, variables)
  images, labels = task.batch_fn(0)
  _, metrics = task.train_step(task.state, images, labels,
                               jax.random.key(0))
  x = np.asarray(images, np.float64).reshape(len(images), -1) / 255
  want = np.linalg.norm(1 - 2 * x, axis=1).mean()
  assert float(metrics["perturbation_l2"]) == pytest.approx(want, rel=1e-5)


def test_a_registered_method_gets_a_pipeline_row(smoke_pipeline, tmp_path):
  workdir = str(tmp_path / "run")
  with smoke_pipeline.locked():
    shutil.copytree(smoke_pipeline.teachers, os.path.join(workdir,
                                                          "teachers"))
  config = notebook_config()
  config.unlock()
  config.pipeline.methods = NAME
  config.lock()
  results = pipeline.run_pipeline(config, workdir)
  rows = {r["label"]: r for r in results["rows"]}
  assert set(rows) == {"DE-1", "DE-2", "BE-2 KD+Invert"}
  assert np.isfinite(rows["BE-2 KD+Invert"]["nll"])
  assert rows["BE-2 KD+Invert"]["step_size"] == 1.0
  with open(os.path.join(workdir, "students", NAME, "done.json")) as f:
    assert json.load(f)["method"] == NAME


def test_option_defaults_are_the_config_defaults():
  """One set of defaults: perturb.Options() is what the base config gives."""
  from divdistill_jax import step
  assert perturb.Options() == step.perturb_options(configlib.base_config())
