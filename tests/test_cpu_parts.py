"""experiments/cpu_parts.py: the KD step's parts, timed alone."""

import collections
import os
import sys

import jax
import jax.numpy as jnp
from conftest import ROOT

from divdistill_jax.models import get_model

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import cpu_parts  # noqa: E402


def test_the_convolution_shapes_are_resnet32s():
  """CONVS against the model's own 3 x 3 kernels, counted by channels."""
  model = get_model("resnet32", num_classes=10)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
  kernels = collections.Counter(
      (leaf.shape[2], leaf.shape[3])
      for leaf in jax.tree.leaves(params) if leaf.ndim == 4)
  assert kernels == collections.Counter(
      {(c, d): n for (_, c, d, _), n in cpu_parts.CONVS})
  assert sum(n for _, n in cpu_parts.CONVS) == 31
  # The stride-2 convolutions halve the size the next shape starts from.
  for ((size, _, _, s), _), ((nxt, _, _, _), _) in zip(cpu_parts.CONVS,
                                                       cpu_parts.CONVS[1:]):
    assert nxt == size // s


def test_totals_weigh_each_shape_by_its_count():
  times = {f"{size}x{size}x{c}->{d}/{s} {kind}": 1.0
           for (size, c, d, s), _ in cpu_parts.CONVS
           for kind in ("forward", "input gradient", "kernel gradient")}
  times["8x8x64->64/1 kernel gradient"] = 3.0  # nine of these
  out = cpu_parts._with_totals(times)  # pylint: disable=protected-access
  assert out["all 31 convolutions, forward"] == 31
  assert out["all 31 convolutions, kernel gradient"] == 31 + 9 * 2


def test_our_side_runs_and_prints_every_part(capsys):
  cpu_parts.main(["--images=1", "--repeats=1"])  # ours only: no giung2
  rows = {}
  for line in capsys.readouterr().out.splitlines():
    if line.startswith("| ") and not line.startswith("| part"):
      name, ms = (cell.strip() for cell in line.strip("|").split("|"))
      rows[name] = float(ms.replace(",", ""))
  assert set(cpu_parts.PARTS) <= set(rows)
  assert len(rows) == 3 + 3 * len(cpu_parts.CONVS) + 3
  assert all(v > 0 for v in rows.values())
