"""Memory and cost plan of every jitted step at the paper's shapes.

Nothing runs on an accelerator: each step the jobs run (the teacher step,
the student step of every pipeline entry, the evaluation forward) is built
from the config as the job builds it, lowered and compiled ahead of time,
and the compiler's own analyses are reported:

- memory per device (`compiled.memory_analysis()`): arguments, outputs,
  temporaries, and what donation aliases; the need is arguments + outputs
  - aliased + temporaries;
- bytes accessed (`compiled.cost_analysis()`) and the analytic FLOPs of the
  convolutions and matmuls (`divdistill_jax.flops`);
- the accelerators whose memory holds it with 10% headroom, and a lower
  bound of the step time on each: max(FLOPs / peak, bytes / bandwidth);
- what that makes the whole table of the config (teachers + every student,
  steps x epochs; evaluation passes not counted).

Compilers. `cpu`: XLA:CPU on this machine; for the GPU columns its figures
are estimates (XLA:GPU fuses differently and cuDNN adds workspaces); the
first GPU run checks them (experiments/BENCHMARKS.md). `tpu:<topology>`:
XLA:TPU itself, deviceless (`jax.experimental.topologies`), with the `tpu`
extra installed (pip install -e ".[tpu]"); run it as

  JAX_PLATFORMS=cpu TPU_ACCELERATOR_TYPE=v5litepod-4 \\
    TPU_WORKER_HOSTNAMES=localhost python experiments/plan.py \\
    --compilers=cpu,tpu:v5e:2x2,tpu:v5p:2x2x1 --out=experiments/results/plan

Single-card question ("will it fit on my card, how long will the table
take?"): `--only=wrn28x10` etc. keep some configs; `--headline` only the
WRN-28-10 BE-4 ConfODS 64 x 4 step with and without microbatches / remat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB, GIB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Datasheet figures of one device (dense, no sparsity).

  `flops` by dtype: XLA runs float32 convolutions as TF32 on Ampere and
  later NVIDIA cards and as bf16 passes on TPUs by default, so those peaks
  are used for float32; a T4 has neither TF32 nor bf16 tensor cores.
  """
  name: str
  compiler: str  # Whose memory figures apply: 'cpu' (estimate) or 'tpu'.
  memory: float  # Bytes.
  flops: dict
  bandwidth: float  # Bytes/s.
  source: str


ACCELERATORS = (
    Accelerator("T4 16GB", "cpu", 16 * GB,
                {"float32": 8.1e12, "bfloat16": 8.1e12}, 320 * GB,
                "NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, FP32 8.1 TFLOPS"),
    Accelerator("L4 24GB", "cpu", 24 * GB,
                {"float32": 60e12, "bfloat16": 121e12}, 300 * GB,
                "NVIDIA L4 datasheet: 24 GB, 300 GB/s, TF32 120 / BF16 242 "
                "TFLOPS with sparsity (half dense)"),
    Accelerator("A100 40GB", "cpu", 40 * GB,
                {"float32": 156e12, "bfloat16": 312e12}, 1555 * GB,
                "NVIDIA A100 datasheet (SXM): TF32 156, BF16 312 TFLOPS, "
                "1,555 GB/s"),
    Accelerator("A100 80GB", "cpu", 80 * GB,
                {"float32": 156e12, "bfloat16": 312e12}, 2039 * GB,
                "NVIDIA A100 datasheet (SXM): 2,039 GB/s"),
    Accelerator("H100 80GB", "cpu", 80 * GB,
                {"float32": 494.7e12, "bfloat16": 989.4e12}, 3350 * GB,
                "NVIDIA H100 datasheet (SXM): TF32 989, BF16 1,979 TFLOPS "
                "with sparsity (half dense), 3.35 TB/s"),
    Accelerator("H200 141GB", "cpu", 141 * GB,
                {"float32": 494.7e12, "bfloat16": 989.4e12}, 4800 * GB,
                "NVIDIA H200 datasheet (SXM): as H100, 141 GB, 4.8 TB/s"),
    Accelerator("TPU v4 32GiB", "cpu", 32 * GIB,
                {"float32": 275e12, "bfloat16": 275e12}, 1200 * GB,
                "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16, 32 GiB HBM, "
                "1,200 GB/s"),
    Accelerator("TPU v5e 16GiB", "tpu:v5e", 16 * GIB,
                {"float32": 197e12, "bfloat16": 197e12}, 819 * GB,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16, 16 GiB HBM, "
                "819 GB/s"),
    Accelerator("TPU v5p 95GiB", "tpu:v5p", 95 * GIB,
                {"float32": 459e12, "bfloat16": 459e12}, 2765 * GB,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16, 95 GiB HBM, "
                "2,765 GB/s"),
)
HEADROOM = 0.9  # A step fits when it needs at most 90% of the memory.
CONFIGS = ("cifar100_wrn28x10", "cifar100_wrn28x4", "cifar10_resnet32",
           "tinyimagenet")


@dataclasses.dataclass(frozen=True)
class Case:
  """One planned step: a config's step with the plan's overrides."""
  config_file: str
  kind: str  # 'teacher' | 'student' | 'eval'.
  entry: str = ""  # The pipeline entry of a student ('latentbe:kd').
  dtype: str = "float32"
  groups: bool = True  # The config's BatchNorm groups; False = none.
  microbatches: int = 1
  remat: str = "none"
  devices: int = 1

  @property
  def name(self) -> str:
    parts = [self.config_file, self.kind + (f" {self.entry}" if self.entry
                                            else ""), self.dtype]
    if not self.groups:
      parts.append("no groups")
    if self.microbatches > 1:
      parts.append(f"k={self.microbatches}")
    if self.remat != "none":
      parts.append(f"remat={self.remat}")
    if self.devices > 1:
      parts.append(f"{self.devices} devices")
    return ", ".join(parts)


def load_config(case: Case):
  """The case's config: the file's defaults and the case's fields."""
  # pylint: disable=g-import-not-at-top
  from divdistill_jax import configlib
  config = configlib.from_file(
      os.path.join(ROOT, "configs", f"{case.config_file}.py"))
  config.unlock()
  config.model.dtype = case.dtype
  config.model.remat = case.remat
  config.parallel.num_devices = case.devices
  if not case.groups:
    config.teacher.bn_group_size = None
    config.student.bn_group_size = None
  config.teacher.microbatches = config.student.microbatches = (
      case.microbatches)
  if case.kind != "teacher":
    kind, method = configlib.parse_student_entry(
        case.entry or configlib.pipeline_entries(config)[-1])
    config.perturb.method = method
    configlib.apply_student_kind(config, kind)
    if config.perturb.step_size == "auto":
      config.perturb.step_size = 1.0  # The step's shape does not depend on it.
  config.lock()
  configlib.validate(config)
  return config


def cases(configs, dtypes) -> list[Case]:
  """Every step of each config at its defaults, the CIFAR-100 recipe's
  steps without groups and on its 4 devices, and the headline grid."""
  # pylint: disable=g-import-not-at-top
  from divdistill_jax import configlib
  out = []
  for dtype in dtypes:
    for name in configs:
      config = configlib.from_file(os.path.join(ROOT, "configs",
                                                f"{name}.py"))
      entries = configlib.pipeline_entries(config)
      out.append(Case(name, "teacher", dtype=dtype))
      out += [Case(name, "student", e, dtype=dtype) for e in entries]
      out.append(Case(name, "eval", entries[-1], dtype=dtype))
      if config.student.bn_group_size is not None:
        out += [Case(name, "teacher", dtype=dtype, groups=False),
                Case(name, "student", "confods", dtype=dtype, groups=False),
                Case(name, "teacher", dtype=dtype, devices=4),
                Case(name, "student", "confods", dtype=dtype, devices=4)]
    out += headline([dtype])
  return list(dict.fromkeys(out))


def headline(dtypes) -> list[Case]:
  """WRN-28-10 BE-4 ConfODS, the whole 4-GPU batch (64 x 4) on one card."""
  return [Case("cifar100_wrn28x10", "student", "confods", dtype=d,
               microbatches=k, remat=r)
          for d in dtypes for k in (1, 4) for r in ("none", "full", "convs")]


class Builder:
  """Builds the case's task as the job does, abstractly (shapes only: no
  initialisation runs), with a synthetic split for the batches."""

  def task(self, case: Case, config, mesh):
    # pylint: disable=g-import-not-at-top
    import jax
    import jax.numpy as jnp
    import numpy as np

    from divdistill_jax import data, distill, ensemble, parallel, teachers
    info = data.dataset_info(config.data.name)
    batch = max(config.teacher.batch_size, config.student.batch_size)
    rng = np.random.default_rng(0)
    splits = {"train": (
        rng.integers(0, 256, (batch, *info.image_shape), dtype=np.uint8),
        rng.integers(0, info.num_classes, batch, dtype=np.int32))}
    if case.kind == "teacher":
      return teachers.make_teacher_task(config, mesh, splits, abstract=True)
    model = teachers.build_teacher_model(config)
    sample = jnp.zeros((1, *info.image_shape), jnp.float32)
    tvars = _abstract(jax.eval_shape(lambda: ensemble.init_members(
        model, jax.random.key(1), config.teacher.ensemble_size, sample)),
                      parallel.replicated(mesh))
    return distill.make_student_task(config, mesh, splits, model, tvars,
                                     abstract=True)


def _abstract(tree, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      tree)


def _tpu_mesh(topology: str, devices: int):
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import Mesh
  desc = topologies.get_topology_desc(topology, "tpu")
  if devices > len(desc.devices):
    raise ValueError(f"{topology} has {len(desc.devices)} devices, not "
                     f"{devices}.")
  return Mesh(np.asarray(desc.devices[:devices]), ("data",))


def compile_case(case: Case, builder: Builder, compilers) -> dict:
  """Compiles the case's step for each compiler; one row.

  The step is traced with XLA's convolution kernel gradient, the program
  an accelerator runs (models/conv.py computes it otherwise on a CPU), so
  that the XLA:CPU figures estimate a GPU's.
  """
  from divdistill_jax.models import conv  # pylint: disable=g-import-not-at-top
  with conv.cpu_kernel_grad("xla"):
    return _compile_case(case, builder, compilers)


def _compile_case(case: Case, builder: Builder, compilers) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np

  from divdistill_jax import data, flops, parallel
  config = load_config(case)
  mesh = parallel.make_mesh(case.devices)
  task = builder.task(case, config, mesh)
  key = jax.random.key(0)
  info = data.dataset_info(config.data.name)
  if case.kind == "eval":
    images = np.zeros((config.eval.batch_size, *info.image_shape), np.uint8)
    variables = {"params": task.state.params,
                 "batch_stats": task.state.batch_stats}
    fn, args, axes = task.predict_fn, (variables, images), (None, 0)
    images_per_step = config.eval.batch_size
  else:
    images, labels = task.batch_fn(0)
    axis = 1 if case.kind == "teacher" else 0
    fn = task.step_fns[images.shape[axis]]
    args = (task.state, images, labels, key, *task.step_args)
    axes = (None, axis, axis, None) + (None,) * len(task.step_args)
    images_per_step = task.images_per_step
  step_flops = flops.count(fn, *args)
  row = {**dataclasses.asdict(case), "name": case.name,
         "images_per_step": images_per_step,
         "gflop_per_image": step_flops / 1e9 / images_per_step,
         "gflop_per_step": step_flops / 1e9, "compilers": {}}
  for compiler in compilers:
    t0 = time.perf_counter()
    call_args = args
    if compiler != "cpu":
      tpu_mesh = _tpu_mesh(compiler.split(":", 1)[1], case.devices)
      call_args = tuple(
          _abstract(a, parallel.replicated(tpu_mesh) if axis is None
                    else parallel.batch_sharding(tpu_mesh, a.ndim, axis))
          for a, axis in zip(args, axes))
    lowered = fn.lower(*call_args)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    row["compilers"][compiler] = {
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "need_gib": need / GIB,
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "compile_s": time.perf_counter() - t0}
  return row


def estimates(row: dict) -> dict:
  """Per accelerator: fits (with headroom) and the step-time lower bound
  (ms), from the compiler that applies to it (its TPU generation's own
  when compiled, otherwise XLA:CPU's)."""
  out = {}
  per_device_flops = row["gflop_per_step"] * 1e9 / row["devices"]
  for acc in ACCELERATORS:
    figures = next((v for k, v in row["compilers"].items()
                    if acc.compiler.startswith("tpu")
                    and k.startswith(acc.compiler)), None)
    source = "tpu" if figures else "cpu"
    figures = figures or row["compilers"].get("cpu")
    if figures is None:
      continue
    need = figures["need_gib"] * GIB
    seconds = max(per_device_flops / acc.flops[row["dtype"]],
                  figures["bytes_accessed"] / acc.bandwidth)
    out[acc.name] = {"fits": need <= HEADROOM * acc.memory,
                     "use": need / acc.memory, "ms": seconds * 1e3,
                     "from": source}
  return out


def is_default(row: dict) -> bool:
  """A training step of the config's defaults on one device."""
  return (row["kind"] != "eval" and row["devices"] == 1 and row["groups"]
          and row["microbatches"] == 1 and row["remat"] == "none")


def table_hours(rows: list[dict]) -> dict:
  """{config: {dtype: {accelerator: hours}}}: teachers + every student of
  the config's pipeline on one card (default settings, one device), as
  lower bounds; None where a step does not fit."""
  from divdistill_jax import data  # pylint: disable=g-import-not-at-top
  out = {}
  for r in rows:
    if not is_default(r):
      continue
    config = load_config(Case(**{f.name: r[f.name]
                                 for f in dataclasses.fields(Case)}))
    info = data.dataset_info(config.data.name)
    n = train_size(config.data.name) - info.num_validation
    role = config.teacher if r["kind"] == "teacher" else config.student
    steps = role.epochs * data.steps_per_epoch(
        n, role.batch_size, replicas=config.data.sampler_replicas,
        drop_remainder=config.data.drop_remainder)
    cell = out.setdefault(r["config_file"], {}).setdefault(r["dtype"], {})
    for acc, e in r["estimates"].items():
      if acc in cell and cell[acc] is None:
        continue
      cell[acc] = (None if not e["fits"]
                   else cell.get(acc, 0.0) + steps * e["ms"] / 3.6e6)
  return out


def train_size(name: str) -> int:
  """Training images of the full split (before the validation hold-out)."""
  return {"cifar10": 50000, "cifar100": 50000, "tinyimagenet": 100000,
          "fashion_mnist": 60000}[name]


def _short(name: str) -> str:
  """'A100 40GB' -> 'A100-40GB', 'TPU v5e 16GiB' -> 'v5e', 'T4 16GB' ->
  'T4'."""
  parts = name.split()
  if parts[0] == "TPU":
    return parts[1]
  return "-".join(parts) if parts[0] == "A100" else parts[0]


def markdown(rows: list[dict], header: dict) -> str:
  accs = [a.name for a in ACCELERATORS]
  out = [f"Compiled {header['date']}, jax {header['jax']}; compilers: "
         f"{', '.join(header['compilers'])}. `{header['command']}`", "",
         "Memory per device (GiB): need = arguments + outputs - aliased + "
         "temporaries. `cpu` = XLA:CPU (an estimate for GPUs), `tpu:*` = "
         "XLA:TPU. Fits: need <= 90% of the device's memory; lower bound: "
         "max(FLOPs / peak, bytes / bandwidth) per step (ms).", ""]
  comp = header["compilers"]
  out.append("| step | img/step | GFLOP/img | "
             + " | ".join(f"{c} need | {c} temp" for c in comp)
             + " | FLOP/byte (cpu) | fits on | " + " | ".join(
                 f"{a} ms" for a in accs) + " |")
  out.append("|---|---:|---:|" + "---:|---:|" * len(comp) + "---:|---|"
             + "---:|" * len(accs))
  for r in rows:
    cells = []
    for c in comp:
      f = r["compilers"].get(c)
      cells += ([f"{f['need_gib']:.2f}", f"{f['temp_gib']:.2f}"] if f
                else ["–", "–"])
    cpu = r["compilers"].get("cpu")
    ratio = (r["gflop_per_step"] * 1e9 / r["devices"] / cpu["bytes_accessed"]
             if cpu and cpu["bytes_accessed"] else None)
    fits = [_short(a) for a in accs
            if r["estimates"].get(a, {}).get("fits")]
    times = [f"{r['estimates'][a]['ms']:.1f}" if a in r["estimates"]
             else "–" for a in accs]
    out.append(f"| {r['name']} | {r['images_per_step']} | "
               f"{r['gflop_per_image']:.3g} | " + " | ".join(cells)
               + f" | {'–' if ratio is None else f'{ratio:.0f}'} | "
               f"{', '.join(fits) or 'none'} | " + " | ".join(times) + " |")
  hours = table_hours(rows)
  if hours:
    out += ["", "Whole table on one card (teachers + every student of the "
            "config's pipeline, default settings), hours, lower bound "
            "('–': a step does not fit):", "",
            "| config | dtype | " + " | ".join(accs) + " |",
            "|---|---|" + "---:|" * len(accs)]
    for name, by_dtype in hours.items():
      for dtype, cell in by_dtype.items():
        out.append(f"| {name} | {dtype} | " + " | ".join(
            "–" if cell.get(a) is None else f"{cell[a]:.1f}" for a in accs)
            + " |")
  out += ["", "Sources of the accelerator figures:", ""]
  out += [f"- {a.name}: {a.source}." for a in ACCELERATORS]
  return "\n".join(out) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--compilers", default="cpu",
                      help="Comma-separated: cpu, tpu:<topology>.")
  parser.add_argument("--headline", action="store_true",
                      help="Only the WRN-28-10 ConfODS 64 x 4 grid.")
  parser.add_argument("--only", default="",
                      help="Keep cases whose name contains this text.")
  args = parser.parse_args(argv)
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4")
  # pylint: disable=g-import-not-at-top
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  dtypes = args.dtypes.split(",")
  compilers = args.compilers.split(",")
  todo = (headline(dtypes) if args.headline
          else cases(args.configs.split(","), dtypes))
  todo = [c for c in todo if args.only in c.name]
  header = {"jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "compilers": compilers,
            "command": " ".join(["python experiments/plan.py",
                                 *(argv if argv is not None
                                   else sys.argv[1:])])}
  os.makedirs(args.out, exist_ok=True)
  builder, rows = Builder(), []
  path = os.path.join(args.out, "plan.json")
  if os.path.exists(path):  # Resume: keep the rows of an earlier run.
    with open(path) as f:
      earlier = json.load(f)
    if earlier["header"]["compilers"] == compilers:
      rows = earlier["rows"]
      done = {r["name"] for r in rows}
      todo = [c for c in todo if c.name not in done]
  for case in todo:
    row = compile_case(case, builder, compilers)
    row["estimates"] = estimates(row)
    rows.append(row)
    print(json.dumps({"name": row["name"], **{
        c: round(v["need_gib"], 2) for c, v in row["compilers"].items()}}),
        flush=True)
    text = _write(args.out, header, rows)  # After every case.
  text = _write(args.out, header, rows)
  print(text)
  return {"header": header, "rows": rows}


def _write(out: str, header: dict, rows: list[dict]) -> str:
  from divdistill_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_json(os.path.join(out, "plan.json"),
                    {"header": header, "rows": rows}, indent=2)
  text = markdown(rows, header)
  fileio.write_text(os.path.join(out, "plan.md"), text)
  return text


if __name__ == "__main__":
  main()
