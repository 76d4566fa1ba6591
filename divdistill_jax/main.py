"""Command line entry point.

  python -m divdistill_jax.main --config=FILE[:VARIANTS] --workdir=DIR

Kept short on purpose: every job is a library function taking
`(config, workdir)`, callable from Python or Colab without absl.
"""

import os
import pickle
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from divdistill_jax import jobs, train

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
  try:
    jobs.run_job(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    # 128 + signal number, as a shell reports a process the signal killed,
    # so schedulers see a terminated (resumable) job.
    print(f"divdistill: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except Exception as e:  # pylint: disable=broad-except
    if not _raised_by_our_checks(e):
      raise
    print(f"divdistill: error: {e}", file=sys.stderr)
    sys.exit(1)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _raised_by_our_checks(e: BaseException) -> bool:
  """True when one of this package's input checks raised `e`.

  Those messages name the problem and the fix, so they are printed alone;
  anything raised elsewhere (a bug, JAX) keeps its full traceback.
  """
  if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError,
                        pickle.UnpicklingError)):
    return False
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.abspath(
      tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _unknown_field_message(e: BaseException, argv: list[str]) -> str | None:
  """One line for a --config.* override that names no field, else None.

  ml_collections raises a KeyError (with a "Did you mean" hint) wrapped in
  an AttributeError; the hint is kept, the traceback dropped.
  """
  hint, key = None, None
  while e is not None:
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
      if "Did you mean" in e.args[0]:
        hint = e.args[0].split("\n", 1)[1].strip()
      else:
        key = e.args[0]
    e = e.__context__
  if key is None:
    return None
  flag = next((a for a in argv if a.startswith("--config.")
               and key in a.split("=", 1)[0].split(".")), None)
  where = f"{flag.split('=', 1)[0]}: " if flag else ""
  return (f"{where}the config has no field {key!r}."
          + (f" {hint}" if hint else ""))


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for the config flag.

  Covers an override naming no field, a malformed value, a config file that
  does not exist and an unknown variant (raised inside the config file).
  """
  try:
    rest = FLAGS(argv)
    FLAGS.config.to_dict()  # Loads the file now: its errors are flag errors.
    return rest
  except (AttributeError, KeyError) as e:
    message = _unknown_field_message(e, argv)
    if message is None:
      raise
  except flags.Error as e:
    first = str(e).strip().splitlines()[0]
    if "Error whilst parsing config file" in first:
      # The config file raised: keep its message, drop the traceback.
      reason = _last_line(str(e)).split(": ", 1)[-1]
      message = f"{first.split(': Error whilst')[0]}: {reason}"
    else:
      message = first if len(str(e)) > 300 else str(e)
  except OSError as e:
    message = f"--config: cannot load the config file ({_last_line(str(e))})"
  print(f"divdistill: error: {message}", file=sys.stderr)
  sys.exit(1)


def run():
  """Console script `divdistill`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
