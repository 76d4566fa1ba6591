"""Atomic writes of result files (JSON, text, .npz).

Each file is written under a temporary sibling name and renamed over the
target once complete, so a crash mid-write leaves the old file (or none),
never a truncated one. Checkpoints themselves go through `checkpointing`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np


@contextlib.contextmanager
def _atomic(path: str, mode: str):
  """Opens a temporary sibling of `path`, renamed over it once complete.

  A crash mid-write leaves the old file (or none), never a truncated one.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any, **kwargs) -> None:
  """Writes `obj` as JSON atomically (kwargs go to `json.dump`)."""
  with _atomic(path, "w") as f:
    json.dump(obj, f, **kwargs)


def write_text(path: str, text: str) -> None:
  with _atomic(path, "w") as f:
    f.write(text)


def write_npz(path: str, **arrays) -> None:
  """`np.savez` to exactly `path`, atomically."""
  with _atomic(path, "wb") as f:
    np.savez(f, **arrays)
