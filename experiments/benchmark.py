"""Step-time benchmark of the teacher and student steps.

Times, after compilation, the real jitted steps of `teachers.py` and
`distill.py` (synthetic uint8 data, random teachers) and reports the median
ms/step, images/s, compile time, peak device memory, the analytic FLOPs of
the convolutions and matmuls (`divdistill_jax.flops`), the achieved TFLOP/s
and, on known GPUs, the fraction of the card's peak.

  # CPU: tiny shapes, both host cores as a 2-device mesh where asked.
  python experiments/benchmark.py --quick --out=/tmp/bench_cpu
  # GPU: the paper's shapes (WRN-28-10 / CIFAR-100, ResNet-32 / CIFAR-10).
  python experiments/benchmark.py --out=/tmp/bench_gpu
  # FLOP counts of the paper's shapes only (no device time; works on CPU).
  python experiments/benchmark.py --flops_only --out=/tmp/bench_flops
  # The input path (index, gather, transfer) of every paper config, beside
  # the rate the plan's H200 lower bound would consume.
  python experiments/benchmark.py --input_path \
    --plan=experiments/results/plan/plan.json --out=/tmp/bench_input

Writes `benchmark.json` and `benchmark.md` into --out. Ratios are only
meaningful between rows of the same run (same machine, same moment).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("kd", "gaussian", "ods", "confods", "disagreement")

# Dense peak FLOP/s by device kind (NVIDIA datasheets, SXM parts). XLA runs
# float32 convolutions and matmuls as TF32 on these cards by default.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}

# The reference: official PyTorch code on an H200 (TF32), median
# ms/step, synthetic data on the GPU.
REFERENCE_MS = {
    "student wrn28x10 confods 16x4": 75.0,  # 70-80 ms.
    "student wrn28x10 confods 64x4": 203.0,
    "teacher wrn28x10 M=1 b64": 22.5,
    "teacher wrn28x10 M=1 b256": 72.0,
    "student resnet32 confods 128x4": 97.0,
    "teacher resnet32 M=1 b512": 33.0,
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked step."""
  name: str
  kind: str  # 'teacher' | 'student'.
  config_file: str
  batch: int  # Teacher: images per member; student: images.
  members: int = 4
  method: str = "kd"
  strategy: str = "unroll"
  fused: bool = False
  devices: int | None = None  # None = all.
  dtype: str = "float32"
  # BatchNorm groups (and per-group ODS draws) of this many images; the
  # CIFAR-100 configs' default is the 4-GPU recipe's 64 / 16.
  bn_group: int | None = None
  microbatches: int = 1
  # The conv kernel gradient on CPU: 'auto' (the default, models/conv.py)
  # or 'xla' (XLA's convolution, as before).
  kernel_grad: str = "auto"


def paper_cases(dtypes) -> list[Case]:
  cases = []
  for dtype in dtypes:
    c100, c10 = "cifar100_wrn28x10", "cifar10_resnet32"
    for b in (64, 256):
      cases.append(Case(f"teacher wrn28x10 M=1 b{b}", "teacher", c100, b, 1,
                        dtype=dtype))
    for strategy in ("unroll", "vmap"):
      cases.append(Case(f"teacher wrn28x10 M=4 b64 {strategy}", "teacher",
                        c100, 64, 4, strategy=strategy, dtype=dtype))
    for method in METHODS:
      cases.append(Case(f"student wrn28x10 {method} 16x4", "student", c100,
                        16, method=method, dtype=dtype))
    cases.append(Case("student wrn28x10 confods 16x4 fused", "student", c100,
                      16, method="confods", fused=True, dtype=dtype))
    cases.append(Case("student wrn28x10 kd 64x4", "student", c100, 64,
                      dtype=dtype))
    cases.append(Case("student wrn28x10 confods 64x4", "student", c100, 64,
                      method="confods", dtype=dtype))
    # The CIFAR-100 config's default: the 4-GPU recipe on one card, with
    # its per-GPU BatchNorm groups and ODS draws, whole and accumulated.
    cases.append(Case("teacher wrn28x10 M=4 b256 groups64", "teacher", c100,
                      256, 4, dtype=dtype, bn_group=64))
    for k in (1, 4):
      cases.append(Case(f"student wrn28x10 confods 64x4 groups16 k={k}",
                        "student", c100, 64, method="confods", dtype=dtype,
                        bn_group=16, microbatches=k))
    cases.append(Case("teacher resnet32 M=1 b512", "teacher", c10, 512, 1,
                      dtype=dtype))
    for strategy in ("unroll", "vmap"):
      cases.append(Case(f"teacher resnet32 M=4 b128 {strategy}", "teacher",
                        c10, 128, 4, strategy=strategy, dtype=dtype))
    for method in ("kd", "confods"):
      cases.append(Case(f"student resnet32 {method} 128x4", "student", c10,
                        128, method=method, dtype=dtype))
  return cases


def quick_cases(dtypes) -> list[Case]:
  """Tiny shapes for a CPU: ResNet-8 on 32x32x3, one and two devices."""
  cases = []
  q = "quick"
  for dtype in dtypes:
    cases.append(Case("teacher M=1 b32", "teacher", q, 32, 1, dtype=dtype,
                      devices=1))
    for strategy in ("unroll", "vmap"):
      cases.append(Case(f"teacher M=4 b32 {strategy}", "teacher", q, 32, 4,
                        strategy=strategy, dtype=dtype, devices=1))
    for method in METHODS:
      cases.append(Case(f"student {method} 32x4", "student", q, 32,
                        method=method, dtype=dtype, devices=1))
    cases.append(Case("student confods 32x4 fused", "student", q, 32,
                      method="confods", fused=True, dtype=dtype, devices=1))
    cases.append(Case("teacher M=4 b32 unroll, 2 devices", "teacher", q, 32,
                      4, dtype=dtype, devices=2))
    cases.append(Case("student confods 32x4, 2 devices", "student", q, 32,
                      method="confods", dtype=dtype, devices=2))
  return cases


# The official PyTorch step on this project's 2-core CPU machine class (2
# threads, synthetic data, median of 3 steps; issue 25's measurement).
# `experiments/torch_reference.py` measures it on the machine at hand.
CPU_REFERENCE_MS = {
    "student resnet32 kd 128x4": 2738.0,
    "student resnet32 confods 128x4": 8364.0,
}


def cpu_cases(dtypes) -> list[Case]:
  """One CPU device: ResNet-32 / CIFAR-10 at the paper's batch and the quick
  start's shapes, with XLA's conv kernel gradient and with ours."""
  cases = []
  for dtype in dtypes:
    for grad in ("xla", "auto"):
      for net, config, b in (("resnet32 ", "cifar10_resnet32", 128),
                             ("quickstart ", "quickstart", 50)):
        cases.append(Case(f"teacher {net}M=4 b{b} unroll", "teacher",
                          config, b, 4, dtype=dtype, devices=1,
                          kernel_grad=grad))
        for method in ("kd", "confods"):
          cases.append(Case(f"student {net}{method} {b}x4", "student",
                            config, b, method=method, dtype=dtype,
                            devices=1, kernel_grad=grad))
  return cases


def load_config(case: Case):
  """The case's config file with the benchmark's overrides."""
  from divdistill_jax import configlib  # pylint: disable=g-import-not-at-top
  if case.config_file == "quick":
    config = configlib.base_config()
    config.data.name = "cifar10"
    config.model.name = "resnet8"
    config.kd.temperature = 4.0
    configlib.apply_variants(config, None)
  else:
    config = configlib.from_file(
        os.path.join(ROOT, "configs", f"{case.config_file}.py"))
  config.unlock()
  config.model.dtype = case.dtype
  config.model.ensemble_strategy = case.strategy
  config.perturb.method = case.method
  config.parallel.num_devices = case.devices
  config.teacher.ensemble_size = case.members
  config.student.ensemble_size = case.members
  config.teacher.batch_size = case.batch
  config.student.batch_size = case.batch
  config.student.fused_passes = case.fused
  # Whole-batch BatchNorm and one ODS draw per batch unless the case sets
  # groups, so that rows differ only in the case's fields (the CIFAR-100
  # config's per-GPU groups run the ODS vjp once per 16-image group).
  config.teacher.bn_group_size = case.bn_group
  config.student.bn_group_size = case.bn_group
  config.teacher.microbatches = case.microbatches
  config.student.microbatches = case.microbatches
  config.lock()
  return config


def build(case: Case):
  """(task, images, labels, images per step) with synthetic data."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  from divdistill_jax import data, distill, ensemble, parallel, teachers
  config = load_config(case)
  info = data.dataset_info(config.data.name)
  mesh = parallel.make_mesh(config.parallel.num_devices)
  rng = np.random.default_rng(0)
  n = 2 * case.batch
  splits = {"train": (
      rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8),
      rng.integers(0, info.num_classes, n, dtype=np.int32))}
  if case.kind == "teacher":
    task = teachers.make_teacher_task(config, mesh, splits)
  else:
    model = teachers.build_teacher_model(config)
    sample = jnp.zeros((1, *info.image_shape), jnp.float32)
    tvars = jax.jit(lambda k: ensemble.init_members(
        model, k, case.members, sample))(jax.random.key(1))
    task = distill.make_student_task(config, mesh, splits, model, tvars)
  images, labels = task.batch_fn(0)
  return task, images, labels


def measure(case: Case, repeats: int, flops_only: bool) -> dict:
  from divdistill_jax.models import conv  # pylint: disable=g-import-not-at-top
  with conv.cpu_kernel_grad(case.kernel_grad):
    return _measure(case, repeats, flops_only)


def _measure(case: Case, repeats: int, flops_only: bool) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax

  from divdistill_jax import flops
  from divdistill_jax.models import conv
  task, images, labels = build(case)
  key = jax.random.key(0)
  axis = 1 if case.kind == "teacher" else 0
  # The step's arithmetic as XLA's convolutions define it, the FLOPs the
  # official count has: what a CPU kernel gradient computes beyond that
  # (its products over padding rows, kernel-sized sums) is its cost, not
  # work done, and would inflate its rate. The timed step, outside this
  # block, is traced again with the case's gradient (`cpu_kernel_grad`).
  with conv.cpu_kernel_grad("xla"):
    step_flops = flops.count(task.step_fns[images.shape[axis]], task.state,
                             images, labels, key, *task.step_args)
  row = {**dataclasses.asdict(case), "images_per_step": task.images_per_step,
         "gflop_per_step": step_flops / 1e9,
         "gflop_per_image": step_flops / 1e9 / task.images_per_step}
  if flops_only:
    return row
  t0 = time.perf_counter()
  state, _ = task.train_step(task.state, images, labels, key)
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, _ = task.train_step(state, images, labels, key)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = PEAK_FLOPS.get(next((k for k in PEAK_FLOPS
                              if k in device.device_kind), ""), {})
  achieved = step_flops / median
  row.update(
      ms_per_step=median * 1e3, min_ms=min(times) * 1e3,
      images_per_s=task.images_per_step / median,
      compile_s=first - median,
      peak_memory_gib=(stats["peak_bytes_in_use"] / 2**30
                       if "peak_bytes_in_use" in stats else None),
      tflops=achieved / 1e12,
      fraction_of_peak=(achieved / peak[case.dtype]
                        if case.dtype in peak else None))
  return row


def _fmt(value, digits=1):
  if value is None:
    return "–"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _sig(value):
  """Three significant digits (FLOP counts span 0.07 to 8000 GFLOP)."""
  return f"{value:#.3g}".rstrip(".")


_CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case)
                     if f.name != "name")


def _partner(rows: list[dict], row: dict, **changes) -> dict | None:
  """The row whose case equals `row`'s except for `changes`, if measured."""
  want = {**{k: row[k] for k in _CASE_FIELDS}, **changes}
  return next((r for r in rows if all(r[k] == v for k, v in want.items())),
              None)


def summary(rows: list[dict]) -> list[str]:
  """Ratios measured within this run."""
  timed = "ms_per_step" in rows[0]
  ms = lambda r: f"{r['ms_per_step']:.1f} ms"  # noqa: E731
  lines = []
  for r in rows:
    label = f"- {r['name']} ({r['dtype']})"
    kd = r["method"] == "confods" and _partner(rows, r, method="kd")
    if r["kind"] == "student" and kd:
      text = (f"{label} / KD: FLOP ratio "
              f"{r['gflop_per_step'] / kd['gflop_per_step']:.2f}")
      if timed:
        text += f", time ratio {r['ms_per_step'] / kd['ms_per_step']:.2f}"
      lines.append(text)
    if not timed:
      continue
    two_passes = r["fused"] and _partner(rows, r, fused=False)
    if two_passes:
      lines.append(f"- {two_passes['name']} ({r['dtype']}): fused passes "
                   f"{ms(r)} vs two passes {ms(two_passes)}")
    one_device = r["devices"] == 2 and _partner(rows, r, devices=1)
    if one_device:
      lines.append(f"- {one_device['name']} ({r['dtype']}): 2 devices "
                   f"{ms(r)} vs 1 device {ms(one_device)}")
    xla = r.get("kernel_grad", "auto") != "xla" and _partner(
        rows, r, kernel_grad="xla")
    if xla:
      gflops = lambda q: q["tflops"] * 1e3  # noqa: E731
      lines.append(
          f"{label}: conv kernel gradient by matmul {ms(r)} "
          f"({gflops(r):.1f} GFLOP/s) vs XLA's convolution {ms(xla)} "
          f"({gflops(xla):.1f} GFLOP/s): "
          f"{xla['ms_per_step'] / r['ms_per_step']:.2f}x faster")
    single = (r["kind"] == "teacher" and r["members"] > 1
              and _partner(rows, r, members=1, strategy="unroll"))
    if single:
      lines.append(
          f"{label}: {ms(r)} vs {r['members']} separate one-member steps "
          f"{r['members'] * single['ms_per_step']:.1f} ms")
  return lines


def markdown(rows: list[dict], header: dict) -> str:
  timed = "ms_per_step" in rows[0]
  out = [f"Device: {header['device']} ({header['device_count']} devices), "
         f"jax {header['jax']}, {header['date']}.", ""]
  if timed:
    out += ["| step | dtype | ms/step | img/s | compile s | GFLOP/img | "
            "TFLOP/s | % peak | peak GiB | reference ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
      pct = (None if r["fraction_of_peak"] is None
             else 100 * r["fraction_of_peak"])
      reference = (CPU_REFERENCE_MS if header["device"] == "cpu"
                   else REFERENCE_MS).get(r["name"])
      name = r["name"] + (" (XLA kernel grad)"
                          if r.get("kernel_grad") == "xla" else "")
      out.append(
          f"| {name} | {r['dtype']} | {_fmt(r['ms_per_step'])} | "
          f"{_fmt(r['images_per_s'], 0)} | {_fmt(r['compile_s'])} | "
          f"{_sig(r['gflop_per_image'])} | {_sig(r['tflops'])} | "
          f"{_fmt(pct)} | {_fmt(r['peak_memory_gib'], 2)} | "
          f"{_fmt(reference)} |")
  else:
    out += ["| step | dtype | GFLOP/step | GFLOP/img |", "|---|---|---:|---:|"]
    for r in rows:
      out.append(f"| {r['name']} | {r['dtype']} | "
                 f"{_sig(r['gflop_per_step'])} | "
                 f"{_sig(r['gflop_per_image'])} |")
  lines = summary(rows)
  if lines:
    out += ["", "Within this run:", *lines]
  return "\n".join(out) + "\n"


INPUT_CONFIGS = ("cifar100_wrn28x10", "cifar100_wrn28x4", "cifar10_resnet32",
                 "tinyimagenet")
# How batches were made before (a fresh epoch permutation per call and a
# host gather), the host gather with the cached permutation, and the
# default: the split on the devices.
INPUT_PATHS = ("host, uncached", "host", "device")


def input_path(repeats: int, plan: str | None) -> list[dict]:
  """Times `Task.batch_fn` of every paper config's teachers and students on
  a synthetic split of the real size, through each input path, and the
  images/s an H200 would consume at the plan's lower-bound step time."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np

  import plan as plan_lib  # experiments/plan.py

  from divdistill_jax import configlib, data, distill, parallel, teachers
  bounds = {}
  if plan:
    with open(plan) as f:
      for r in json.load(f)["rows"]:
        if plan_lib.is_default(r):
          h200 = r["estimates"].get("H200 141GB")
          key = (r["config_file"], r["kind"], r["dtype"])
          if h200 and (key not in bounds or h200["ms"] < bounds[key]):
            bounds[key] = h200["ms"]  # The fastest step of the role.
  rows = []
  mesh = parallel.make_mesh(1)
  for name in INPUT_CONFIGS:
    config = configlib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
    info = data.dataset_info(config.data.name)
    n = plan_lib.train_size(config.data.name) - info.num_validation
    rng = np.random.default_rng(0)
    splits = {"train": (
        rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8),
        rng.integers(0, info.num_classes, n, dtype=np.int32))}
    for kind in ("teacher", "student"):
      images_per_step = (config.teacher.batch_size
                         * config.teacher.ensemble_size if kind == "teacher"
                         else config.student.batch_size)
      row = {"config": name, "kind": kind, "images_per_step": images_per_step,
             "image_shape": list(info.image_shape)}
      for path in INPUT_PATHS:
        c = config.copy_and_resolve_references()
        c.unlock()
        c.data.on_device = path == "device"
        c.perturb.step_size = 1.0
        c.lock()
        if kind == "teacher":
          task = teachers.make_teacher_task(c, mesh, splits, abstract=True)
        else:
          # Only batch_fn runs: the step's teachers are not needed.
          task = distill.make_student_task(
              c, mesh, splits, teachers.build_teacher_model(c), None,
              abstract=True)
        jax.block_until_ready(task.batch_fn(0))
        times = []
        for step in range(1, repeats + 1):
          if path == "host, uncached":
            data.epoch_permutation.cache_clear()
          t0 = time.perf_counter()
          jax.block_until_ready(task.batch_fn(step))
          times.append(time.perf_counter() - t0)
        row[path] = images_per_step / statistics.median(times)
      for dtype in ("float32", "bfloat16"):
        ms = bounds.get((name, kind, dtype))
        row[f"h200_{dtype}"] = None if ms is None else images_per_step / (
            ms / 1e3)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def input_markdown(rows: list[dict], header: dict) -> str:
  out = [f"Host: {header['device']}, jax {header['jax']}, {header['date']}. "
         f"`{header['command']}`", "",
         "Images/s of `Task.batch_fn` (indices, gather, transfer; the "
         "augmentation runs in the step), median of the calls; the last "
         "columns: what an H200 consumes at the plan's lower-bound step "
         "time of the role's fastest step.", "",
         "| config | role | images/step | " + " | ".join(INPUT_PATHS)
         + " | H200 fp32 bound | H200 bf16 bound |",
         "|---|---|---:|" + "---:|" * (len(INPUT_PATHS) + 2)]
  for r in rows:
    out.append(f"| {r['config']} | {r['kind']} | {r['images_per_step']} | "
               + " | ".join(f"{r[p]:,.0f}" for p in INPUT_PATHS) + " | "
               + " | ".join("–" if r[f"h200_{d}"] is None
                            else f"{r[f'h200_{d}']:,.0f}"
                            for d in ("float32", "bfloat16")) + " |")
  return "\n".join(out) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny CPU shapes instead of the paper's.")
  parser.add_argument("--cpu", action="store_true",
                      help="One CPU device: ResNet-32 at the paper's batch "
                      "and the quick start, XLA's conv kernel gradient "
                      "and ours.")
  parser.add_argument("--flops_only", action="store_true",
                      help="Count FLOPs, time nothing.")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--dtypes", default=None,
                      help="Comma-separated; default float32,bfloat16 on "
                      "the paper shapes and float32 with --quick.")
  parser.add_argument("--only", default="",
                      help="Keep cases whose name contains this text.")
  parser.add_argument("--host_devices", type=int, default=2,
                      help="CPU devices to expose (set before JAX starts).")
  parser.add_argument("--input_path", action="store_true",
                      help="Time the input path of the paper configs.")
  parser.add_argument("--plan", default=None,
                      help="plan.json of experiments/plan.py, for the rate "
                      "the input path must reach.")
  parser.add_argument("--cpu_memory", default="keep",
                      choices=("keep", "glibc"),
                      help="keep: reuse freed memory between CPU steps, as "
                      "a job does (runtime.keep_freed_cpu_memory); glibc: "
                      "the C library's defaults.")
  args = parser.parse_args(argv)
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.host_devices}")
  # pylint: disable=g-import-not-at-top
  import jax
  from divdistill_jax import runtime
  jax.config.update("jax_threefry_partitionable", True)
  if args.cpu_memory == "keep":
    runtime.keep_freed_cpu_memory()  # Before the backend starts.
  dtypes = (args.dtypes or ("float32" if args.quick or args.cpu
                            else "float32,bfloat16")).split(",")
  cases = (quick_cases(dtypes) if args.quick else
           cpu_cases(dtypes) if args.cpu else paper_cases(dtypes))
  cases = [c for c in cases if args.only in c.name]
  header = {"device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_memory": args.cpu_memory,
            "command": " ".join(["python experiments/benchmark.py",
                                 *(argv if argv is not None
                                   else sys.argv[1:])])}
  os.makedirs(args.out, exist_ok=True)
  if args.input_path:
    rows = input_path(args.repeats, args.plan)
    print(_write(args.out, header, rows, "input_path", input_markdown))
    return {"header": header, "rows": rows}
  rows = []
  for case in cases:
    if case.devices and case.devices > jax.device_count():
      continue
    row = measure(case, args.repeats, args.flops_only)
    rows.append(row)
    print(json.dumps({k: row[k] for k in row if k in (
        "name", "dtype", "ms_per_step", "gflop_per_image", "tflops")}),
        flush=True)
    # After every case: an interrupted or partly failed run keeps what it
    # measured.
    text = _write(args.out, header, rows)
  text = _write(args.out, header, rows)
  print(text)
  return {"header": header, "rows": rows}


def _write(out: str, header: dict, rows: list[dict], name: str = "benchmark",
           render=None) -> str:
  """<name>.json and <name>.md of the rows so far (atomic writes)."""
  from divdistill_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json(os.path.join(out, f"{name}.json"),
                    {"header": header, "rows": rows}, indent=2)
  text = (render or markdown)(rows, header)
  fileio.write_text(os.path.join(out, f"{name}.md"), text)
  return text


if __name__ == "__main__":
  main()
