"""Dispatch of `config.job` to the library functions."""

from __future__ import annotations

import ml_collections

from divdistill_jax import configlib


def run_job(config: ml_collections.ConfigDict, workdir: str):
  """Runs `config.job` ('teachers', 'distill', 'evaluate' or 'pipeline').

  The config and the workdir are checked before anything is loaded, and the
  run holds the workdir's lock (one writer at a time) until it returns.

  Raises:
    ValueError: a bad config field; workdir.WorkdirError: a workdir that is
      a file, cannot be written or is in use by another run.
  """
  configlib.validate(config)
  # pylint: disable=g-import-not-at-top
  import jax

  from divdistill_jax import runtime, workdir as workdir_lib
  runtime.setup_runtime(config)
  path = workdir_lib.prepare(workdir)
  if jax.process_index() == 0:  # Processes of one run share the workdir.
    with workdir_lib.lock(path):
      return _dispatch(config, path)
  return _dispatch(config, path)


def _dispatch(config: ml_collections.ConfigDict, workdir: str):
  # pylint: disable=g-import-not-at-top
  if config.job == "teachers":
    from divdistill_jax import teachers
    return teachers.train_teachers(config, workdir)
  if config.job == "distill":
    from divdistill_jax import distill
    return distill.distill(config, workdir)
  if config.job == "evaluate":
    from divdistill_jax import evaluate
    return evaluate.evaluate_workdir(config, workdir)
  if config.job == "pipeline":
    from divdistill_jax import pipeline
    return pipeline.run_pipeline(config, workdir)
  raise ValueError(f"Unknown config.job {config.job!r}; use {configlib.JOBS}.")
