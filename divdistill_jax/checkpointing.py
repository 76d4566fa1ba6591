"""Checkpoints through orbax; the only module that imports orbax.

Saves are atomic (orbax writes to a temporary folder and renames it when
complete), so a crash mid-save leaves the previous checkpoint as the latest
one and the partial folder is ignored. Checkpoints hold arrays (OCDBT /
tensorstore) and JSON metadata: nothing is pickled, nothing executes on load.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

PyTree = Any


class Checkpointer:
  """Keeps the latest `keep` training states of a run directory.

  Each step holds two items: `state` (a pytree of arrays) and `meta` (JSON:
  step, config, best metrics...).
  """

  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        create=True,
        preservation_policy=checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict) -> None:
    """Saves synchronously; an existing step is left as it is."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, target: PyTree) -> tuple[PyTree, dict]:
    """Restores `step` into the shapes/shardings of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return out["meta"]

  def close(self) -> None:
    self._manager.close()


def save_variables(path: str, variables: PyTree) -> None:
  """Writes one pytree (e.g. the selected teacher set) atomically."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables, force=True)


def load_variables(path: str, target: PyTree | None = None) -> PyTree:
  """Reads a pytree written by `save_variables`.

  Args:
    path: the folder given to `save_variables`.
    target: optional pytree of arrays or ShapeDtypeStructs giving shapes,
      dtypes and shardings; None restores as saved, on the default device.

  Raises:
    FileNotFoundError: if `path` holds no complete checkpoint.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}.")
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(path)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return ckptr.restore(path, abstract)
