"""Scalars to TensorBoard (tensorboardX) and `metrics.jsonl`; a progress bar.

Only process 0 writes. The JSONL file is appended to, so a resumed run keeps
its history; each line is `{"step": int, "time": float, name: value...}`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes scalar dicts to TensorBoard event files and metrics.jsonl."""

  def __init__(self, workdir: str, *, enabled: bool | None = None,
               drop_after: int | None = None):
    """`drop_after`: a resumed run's step; lines of later steps (written
    before the interruption, to be replayed now) are dropped first."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path):
        _drop_lines_after(path, drop_after or 0)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
      self._jsonl = open(path, "a")  # noqa: SIM115

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(),
                                  **clean}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _drop_lines_after(path: str, step: int) -> None:
  """Keeps the JSONL lines of steps <= `step` (and drops unreadable ones)."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        pass
  with open(path, "w") as f:
    f.writelines(kept)


class Progress:
  """A tqdm bar over steps with throughput (img/s); silent when disabled."""

  def __init__(self, total: int, initial: int, desc: str, images_per_step: int,
               enabled: bool = True):
    self.images_per_step = images_per_step
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, smoothing=0.1)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is None:
      return
    self._bar.update(n)
    rate = self._bar.format_dict.get("rate")
    if rate:
      postfix["img/s"] = f"{rate * self.images_per_step:.0f}"
    if postfix:
      self._bar.set_postfix(
          {k: (f"{v:.4g}" if isinstance(v, float) else v)
           for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def log(message: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)
