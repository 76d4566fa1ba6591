"""experiments/plan.py: its cases and its arithmetic (nothing compiled)."""

import os
import sys

import pytest
from conftest import ROOT

from divdistill_jax import configlib

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import plan  # noqa: E402


def test_cases_cover_every_step_of_every_config_and_validate():
  cases = plan.cases(plan.CONFIGS, ["float32", "bfloat16"])
  for name in plan.CONFIGS:
    config = configlib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
    for dtype in ("float32", "bfloat16"):
      kinds = {(c.kind, c.entry) for c in cases
               if c.config_file == name and c.dtype == dtype and c.groups
               and c.devices == 1 and c.microbatches == 1
               and c.remat == "none"}
      want = {("teacher", "")} | {("student", e) for e in
                                  configlib.pipeline_entries(config)}
      assert want <= kinds, (name, dtype)
      assert any(k == "eval" for k, _ in kinds)
  # The headline grid: k in {1, 4} x three remat settings x two dtypes.
  grid = [c for c in cases if c.config_file == "cifar100_wrn28x10"
          and c.entry == "confods" and c.devices == 1 and c.groups]
  assert {(c.dtype, c.microbatches, c.remat) for c in grid} == {
      (d, k, r) for d in ("float32", "bfloat16") for k in (1, 4)
      for r in ("none", "full", "convs")}
  assert len({c.name for c in cases}) == len(cases)
  for case in cases:  # Every case is a valid config (the plan's errors).
    config = plan.load_config(case)
    assert config.model.remat == case.remat
    if case.kind != "teacher":
      assert config.student.microbatches == case.microbatches


def _row(need_gib, gflop_per_step, bytes_accessed, dtype="float32",
         tpu_need=None, devices=1):
  compilers = {"cpu": {"need_gib": need_gib,
                       "bytes_accessed": bytes_accessed}}
  if tpu_need is not None:
    compilers["tpu:v5e:2x2"] = {"need_gib": tpu_need,
                                "bytes_accessed": bytes_accessed / 2}
  return {"gflop_per_step": gflop_per_step, "devices": devices,
          "dtype": dtype, "compilers": compilers}


def test_estimates_fit_with_headroom_and_take_the_slower_bound():
  # 20 GiB = 21.47e9 bytes: within 90% of 24 GB (21.6e9), not of 16 GB
  # or of a 16 GiB v5e.
  row = _row(20.0, 5000.0, 1e11)
  est = plan.estimates(row)
  assert not est["T4 16GB"]["fits"] and est["L4 24GB"]["fits"]
  assert est["A100 40GB"]["fits"] and not est["TPU v5e 16GiB"]["fits"]
  # H200: 5e12 FLOP / 494.7e12 = 10.1 ms, 1e11 B / 4.8e12 = 20.8 ms.
  assert est["H200 141GB"]["ms"] == pytest.approx(1e11 / 4.8e12 * 1e3)
  # T4: compute-bound, 5e12 / 8.1e12 = 617 ms.
  assert est["T4 16GB"]["ms"] == pytest.approx(5e12 / 8.1e12 * 1e3)
  # Data parallel: each of 4 devices does a quarter of the FLOPs.
  four = plan.estimates(_row(20.0, 5000.0, 1e9, devices=4))
  assert four["T4 16GB"]["ms"] == pytest.approx(5e12 / 4 / 8.1e12 * 1e3)


def test_tpu_rows_use_the_tpu_compilers_figures():
  est = plan.estimates(_row(20.0, 1.0, 1e11, tpu_need=10.0))
  assert est["TPU v5e 16GiB"]["from"] == "tpu"
  assert est["TPU v5e 16GiB"]["fits"]  # 10 GiB of XLA:TPU's, not 20.
  assert est["TPU v5e 16GiB"]["ms"] == pytest.approx(0.5e11 / 819e9 * 1e3)
  assert est["TPU v4 32GiB"]["from"] == "cpu"  # Not compiled for v4.


def test_the_plan_compiles_what_an_accelerator_runs(monkeypatch):
  """XLA:CPU figures stand in for a GPU's: the step is traced with XLA's
  convolution kernel gradient, not the CPU-only matrix products."""
  from divdistill_jax.models import conv  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(plan, "_compile_case",
                      lambda *a: seen.append(conv._CPU_KERNEL_GRAD.value))  # pylint: disable=protected-access
  plan.compile_case(None, None, ["cpu"])
  assert seen == ["xla"] and conv._CPU_KERNEL_GRAD.value == "auto"  # pylint: disable=protected-access
