"""Test setup: 4 fake CPU devices, absl flags parsed, a shared compile cache."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4").strip()
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
                "tinyimagenet")


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
