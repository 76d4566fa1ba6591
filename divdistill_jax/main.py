"""Command line entry point.

  python -m divdistill_jax.main --config=FILE[:VARIANTS] --workdir=DIR

Kept short on purpose: every job is a library function taking
`(config, workdir)`, callable from Python or Colab without absl.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from divdistill_jax import jobs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py or "
    "configs/cifar100_wrn28x10.py:confods.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # orbax logs every save/restore at INFO; keep the console for progress.
  logging.set_verbosity(logging.WARNING)
  jobs.run_job(FLAGS.config, FLAGS.workdir)


def run():
  """Console script `divdistill`."""
  app.run(main)


if __name__ == "__main__":
  run()
