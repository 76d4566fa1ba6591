"""Smoke test of experiments/benchmark.py (no timing assertions)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
from conftest import ROOT

from divdistill_jax import data, flops, teachers

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
