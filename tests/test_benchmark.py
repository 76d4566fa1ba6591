"""Smoke test of experiments/benchmark.py (no timing assertions)."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT

from divdistill_jax import data, flops, teachers
from divdistill_jax.models import conv

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import benchmark  # noqa: E402


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
  out = str(tmp_path)
  result = benchmark.main(["--quick", "--repeats=2", "--only=M=1",
                           f"--out={out}"])
  (row,) = result["rows"]
  assert row["name"] == "teacher M=1 b32"
  assert row["ms_per_step"] > 0 and row["images_per_s"] > 0
  with open(os.path.join(out, "benchmark.json")) as f:
    assert json.load(f)["rows"][0]["name"] == row["name"]
  with open(os.path.join(out, "benchmark.md")) as f:
    assert "| teacher M=1 b32 | float32 |" in f.read()
  # The step's FLOPs: forward + backward of the plain network, i.e. just
  # under 3 forwards (the stem needs no input gradient).
  config = benchmark.load_config(benchmark.quick_cases(["float32"])[0])
  model = teachers.build_teacher_model(config)
  shape = data.dataset_info(config.data.name).image_shape
  x = jnp.zeros((32, *shape))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1],
                                                train=False))
  forward = flops.count(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]),
      variables)
  ratio = row["gflop_per_step"] * 1e9 / forward
  assert 2.5 < ratio < 3.0, ratio


def test_summary_pairs_rows_that_differ_in_one_field():
  def row(ms, gflop, **fields):
    case = benchmark.Case(**{"name": "", "kind": "student",
                             "config_file": "quick", "batch": 32,
                             "devices": 1, **fields})
    name = case.name or f"{case.kind} {case.method}"
    return {**vars(case), "name": name, "ms_per_step": ms,
            "gflop_per_step": gflop}

  rows = [row(100.0, 1.0), row(190.0, 1.88, method="confods"),
          row(250.0, 1.88, method="confods", fused=True, name="fused"),
          row(300.0, 1.88, method="confods", devices=2, name="two"),
          row(30.0, 1.0, kind="teacher", members=1, name="t1"),
          row(90.0, 4.0, kind="teacher", name="t4")]
  lines = benchmark.summary(rows)
  assert lines == [
      "- student confods (float32) / KD: FLOP ratio 1.88, time ratio 1.90",
      "- student confods (float32): fused passes 250.0 ms vs two passes "
      "190.0 ms",
      "- student confods (float32): 2 devices 300.0 ms vs 1 device 190.0 ms",
      "- t4 (float32): 90.0 ms vs 4 separate one-member steps 120.0 ms",
  ]


def _step_and_args(case):
  task, images, labels = benchmark.build(case)  # a teacher case: images [M, B]
  return (task.step_fns[images.shape[1]], task.state, images, labels,
          jax.random.key(0), *task.step_args)


def test_the_rate_counts_model_flops_and_times_the_cases_gradient(
    monkeypatch):
  # FLOPs come from XLA's convolutions (what our CPU kernel gradient adds,
  # products over padding rows, is not counted), but the timed step must
  # still be the case's, traced again after the count.
  calls = []
  ours = conv.kernel_grads_by_matmul
  monkeypatch.setattr(conv, "kernel_grads_by_matmul",
                      lambda *a, **k: calls.append(1) or ours(*a, **k))
  case = dataclasses.replace(benchmark.quick_cases(["float32"])[0],
                             kernel_grad="matmul")
  row = benchmark.measure(case, repeats=1, flops_only=False)
  assert calls, "the timed step did not run the case's kernel gradient"
  xla = benchmark.measure(dataclasses.replace(case, kernel_grad="xla"),
                          repeats=1, flops_only=True)
  assert row["gflop_per_step"] == xla["gflop_per_step"]
  with conv.cpu_kernel_grad("matmul"):
    ours_flops = flops.count(*_step_and_args(case))
  assert ours_flops > row["gflop_per_step"] * 1e9  # the padding rows


@pytest.mark.parametrize("compare,names,more,case", [
    ("compiler_options", ("XLA defaults", "conv.compiler_options()"), [],
     "student quickstart kd 50x4"),
    ("fast_weight_grads", ("autodiff of x r, conv, y s",
                           "conv.batch_ensemble_conv2d"), [],
     "student quickstart kd 50x4"),
    ("kernel_grad_products",
     ("shifted copies, one product per row phase", "k * k tap products"),
     ["--reverse", "--teacher"], "teacher quickstart M=4 b50 unroll")])
def test_ab_cpu_options_alternates_both_variants(compare, names, more, case):
  import ab_cpu_options  # pylint: disable=g-import-not-at-top
  out = ab_cpu_options.main(["--net=quickstart", "--method=kd",
                             "--rounds=2", f"--compare={compare}", *more])
  assert out["case"] == case
  assert out["compare"] == compare
  ran = [name for name in out if isinstance(out[name], dict)]
  assert ran == list(names)  # in the order run
  for name in names:
    assert len(out[name]["steps_ms"]) == 2 and out[name]["median_ms"] > 0


def test_ab_cpu_memory_runs_one_process_per_variant_in_order():
  import ab_cpu_memory  # pylint: disable=g-import-not-at-top
  out = ab_cpu_memory.main(["--net=quickstart", "--method=kd", "--rounds=1",
                            "--steps=2", "--reverse"])
  assert out["order"] == ["keep", "glibc"]
  for variant in ("keep", "glibc"):
    (run,) = out["runs"][variant]
    assert run["case"] == "student quickstart kd 50x4"
    assert len(run["steps_ms"]) == 2 and run["ms"] > 0
    assert run["faults"] >= 0 and run["peak_gib"] > 0
    # Resident memory after each step, never above the process's peak.
    assert len(run["rss_gib_steps"]) == 2
    assert 0 < max(run["rss_gib_steps"]) <= run["peak_gib"] + 1e-3
