"""Test setup: 4 fake CPU devices, absl flags parsed, a shared compile cache."""

import contextlib
import fcntl
import os

# Must happen before JAX initialises its backends. The tests' tiny models
# spend their time compiling, not running: -O0 code and XLA:CPU's older
# (non-MLIR) fusion emitters compile a student step 3x faster (the same
# HLO; fast-math off either way).
# The user's own flags, kept once: xdist workers inherit the controller's
# environment, flags included, and must not add theirs a second time.
_USER_XLA_FLAGS = os.environ.setdefault("DIVDISTILL_USER_XLA_FLAGS",
                                        os.environ.get("XLA_FLAGS", ""))


def xla_flags(devices: int) -> str:
  """The tests' XLA flags with `devices` host devices (for subprocesses)."""
  return (f"{_USER_XLA_FLAGS} --xla_force_host_platform_device_count="
          f"{devices} --xla_backend_optimization_level=0"
          " --xla_cpu_use_fusion_emitters=false").strip()


os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ.setdefault(
    "DIVDISTILL_COMPILE_CACHE",
    os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "xla"))

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from orbax.checkpoint import StandardCheckpointer  # noqa: E402

from divdistill_jax import checkpointing, configlib  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = ("quickstart", "cifar10_resnet32", "cifar100_wrn28x10",
                "tinyimagenet", "cifar100_wrn28x4")


def load_config(name: str, arg: str | None = None, **overrides):
  """`configs/<name>.py:get_config(arg)`, with dotted-key overrides."""
  config = configlib.from_file(os.path.join(ROOT, "configs", f"{name}.py"),
                               arg)
  if overrides:
    config.unlock()
    for key, value in overrides.items():
      target = config
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
    config.lock()
  return config


def latest_checkpoint(workdir: str):
  """(step, raw state pytree) of the newest complete checkpoint of a run."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  ckpt.close()
  with StandardCheckpointer() as c:
    return step, c.restore(os.path.join(workdir, "checkpoints", str(step),
                                        "state"))


@pytest.fixture(autouse=True, scope="session")
def _parse_flags():
  flags.FLAGS.mark_as_parsed()


def notebook_config():
  """The config the Colab notebook builds for its 'smoke' test run."""
  config = configlib.from_file(os.path.join(ROOT, "configs", "quickstart.py"),
                               "smoke")
  config.unlock()
  config.logging.progress_bar = False
  config.lock()
  return config


def grouped_config(arg: str = "pipeline,smoke", devices: int | None = None,
                   **overrides):
  """The smoke config with the CIFAR-100 recipe's per-GPU structure:
  BatchNorm groups of 16 teacher images and 8 student images (x members)
  and one ODS draw per student group; `devices` a mesh size."""
  return load_config("quickstart", arg, **{
      "teacher.bn_group_size": 16, "student.bn_group_size": 8,
      "parallel.num_devices": devices, "logging.progress_bar": False,
      **overrides})


class SharedRun:
  """A workdir built once per test session, shared by the xdist workers.

  The first worker to ask builds it under an exclusive file lock; the
  others wait on the lock and reuse it. Tests that run jobs on it again
  (which rewrite its result files) hold the lock while they do.
  """

  def __init__(self, root: str):
    self.workdir = os.path.join(root, "smoke_pipeline")
    self._lock_path = os.path.join(root, "smoke_pipeline.lock")

  @contextlib.contextmanager
  def locked(self):
    with open(self._lock_path, "w") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield self.workdir
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  @property
  def teachers(self) -> str:
    return os.path.join(self.workdir, "teachers")


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> SharedRun:
  """The whole smoke pipeline (teachers, every method, the table), run once.

  Used by the pipeline, notebook, resume and reliability tests: its
  teachers and students are their references.
  """
  from divdistill_jax import jobs  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp below a shared parent.
  root = str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
  run = SharedRun(root)
  with run.locked() as workdir:
    if not os.path.exists(os.path.join(workdir, "results.json")):
      jobs.run_job(notebook_config(), workdir)
  return run


def pytest_collection_modifyitems(items):
  """Runs one test that needs the shared smoke pipeline first and the rest
  of those last: under xdist the first worker builds the pipeline while the
  others run tests that do not need it, instead of waiting on its lock."""
  needs = [i for i in items
           if "smoke_pipeline" in getattr(i, "fixturenames", ())]
  if not needs:
    return
  rest = [i for i in items if i not in needs]
  items[:] = [needs[0], *rest, *needs[1:]]
