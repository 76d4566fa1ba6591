"""Dispatch of `config.job` to the library functions."""

from __future__ import annotations

import ml_collections

from divdistill_jax import configlib


def run_job(config: ml_collections.ConfigDict, workdir: str):
  """Runs `config.job` ('teachers', 'distill', 'evaluate' or 'pipeline')."""
  configlib.validate(config)
  if config.job == "teachers":
    from divdistill_jax import teachers  # pylint: disable=g-import-not-at-top
    return teachers.train_teachers(config, workdir)
  if config.job == "distill":
    from divdistill_jax import distill  # pylint: disable=g-import-not-at-top
    return distill.distill(config, workdir)
  if config.job == "evaluate":
    from divdistill_jax import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.evaluate_workdir(config, workdir)
  if config.job == "pipeline":
    from divdistill_jax import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.run_pipeline(config, workdir)
  raise ValueError(f"Unknown config.job {config.job!r}; use {configlib.JOBS}.")
