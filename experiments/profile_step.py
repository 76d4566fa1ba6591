"""Where a student step's time goes on XLA:CPU, by phase and kind of work.

Builds a `benchmark.py` CPU case (ResNet-32 / CIFAR-10 BE-4 student, 128 x 4
images, float32, one device), runs warm-up steps, traces one step with
`jax.profiler` and sums the executed thunks' times by

- phase, from the HLO op name XLA keeps for each instruction: the
  perturbation (the step's `perturbation` scope: for ODS / ConfODS a
  teacher's forward and input-gradient passes), the student's forward pass
  (`jvp(...)`), its backward pass (`transpose(...)`), and the rest (the
  teachers' forward pass on the distillation inputs, losses, the update);
- kind: convolution (XLA's, forward and input gradient), matrix product
  (the kernel gradient of `divdistill_jax/models/conv.py`, the classifier),
  and everything else (BatchNorm, BatchEnsemble scalings, ReLU, residual
  adds, the kernel gradient's tap slices and padding: memory-bound passes).

Thunks may overlap a little (XLA:CPU runs independent ones concurrently), so
the sums can exceed the step's wall time; per-thunk times are not reliable,
the sums are. XLA's Eigen convolutions, which the steps use on a CPU
(`conv.compiler_options()`), run on Eigen's thread pool and their thunk
events record only the dispatch: their time is in the gap between the
traced step's wall time and the thunks' sum, which the table's last line
gives. Run on a quiet machine:

  python experiments/profile_step.py --method=kd --out=/tmp/profile_kd

`experiments/torch_reference.py --profile` gives the official PyTorch step's
counterpart (torch.profiler, by ATen operator). Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = ("student forward", "student backward", "perturbation",
          "teachers' targets, losses, update")
KINDS = ("convolution", "matrix product", "elementwise / reduction")


def _instructions(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the op name in its metadata, for every instruction
  of the optimised HLO (fusions, convolutions, dots, loops)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def _line_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind, from what the instruction (or the computation
  a fusion calls) contains. YNNPACK fusions hold convolutions, dots or
  reductions, so the name alone does not say."""
  comps, current = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) [(\[].*\{$", line)
    if m:
      current = m.group(1)
    elif current and line.startswith("  "):
      comps[current].append(line)
  kinds = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = (.*)", line)
      if not m:
        continue
      body = m.group(2)
      called = re.search(r"calls=%?([\w.\-]+)", body)
      text = body + "".join(comps.get(called.group(1), [])) if called else body
      if " convolution(" in text:
        kinds[m.group(1)] = KINDS[0]
      elif " dot(" in text:
        kinds[m.group(1)] = KINDS[1]
      else:
        kinds[m.group(1)] = KINDS[2]
  return kinds


def phase_of(op_name: str) -> str:
  """The phase of an op, from its name: the step's named scopes first
  (`perturbation`, with its own forward and backward passes), then the
  autodiff transform of the student's loss."""
  if re.search(r"(^|/)perturbation(/|$)", op_name):
    return PHASES[2]
  if "transpose(" in op_name:
    return PHASES[1]
  if "jvp(" in op_name:
    return PHASES[0]
  return PHASES[3]


@functools.lru_cache(maxsize=1)
def _thunks(trace_dir: str, hlo_text: str) -> list[tuple[dict, str, str]]:
  """(event, op name, kind) of each executed thunk in the perfetto trace of
  one step; read once for `summarise` and `idle_after`."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                   recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names, kinds = _instructions(hlo_text), _line_kinds(hlo_text)
  return [(e, names[e["name"]], kinds.get(e["name"], KINDS[2]))
          for e in events if e.get("ph") == "X" and e["name"] in names]


def summarise(trace_dir: str, hlo_text: str) -> dict:
  """Thunk time (ms) by (phase, kind) from a perfetto trace of one step."""
  table = collections.Counter()
  for e, op_name, kind in _thunks(trace_dir, hlo_text):
    table[(phase_of(op_name), kind)] += e.get("dur", 0) / 1e3
  return {f"{p} | {k}": round(table[(p, k)], 1) for p in PHASES
          for k in KINDS}


def idle_after(trace_dir: str, hlo_text: str) -> dict:
  """Time (ms) with no thunk running on any thread, by the kind of the thunk
  that finished last before it.

  XLA's Eigen convolutions and YNNPACK's matrix products also run on
  threads the trace does not record, so their time shows as such gaps after
  their own (short) thunk events; the executor's loop and dispatch
  overheads fall in gaps too.
  """
  thunks = sorted((e["ts"], e["ts"] + e.get("dur", 0), kind)
                  for e, _, kind in _thunks(trace_dir, hlo_text))
  idle = dict.fromkeys(KINDS, 0.0)
  end, last = None, None
  for start, stop, kind in thunks:
    if end is not None and start > end:
      idle[last] += (start - end) / 1e3
    if end is None or stop >= end:
      end, last = stop, kind
  return {k: round(v, 1) for k, v in idle.items()}


def markdown(row: dict) -> str:
  out = [f"{row['case']}: steps {row['steps_ms']} ms (median "
         f"{row['median_ms']:,.0f}); traced step's thunks by phase and kind "
         "(ms):", "", "| phase | " + " | ".join(KINDS) + " | sum |",
         "|---|" + "---:|" * (len(KINDS) + 1)]
  for p in PHASES:
    ms = [row["ms"][f"{p} | {k}"] for k in KINDS]
    out.append(f"| {p} | " + " | ".join(f"{v:,.0f}" for v in ms)
               + f" | {sum(ms):,.0f} |")
  sums = [sum(row["ms"][f"{p} | {k}"] for p in PHASES) for k in KINDS]
  out.append("| all | " + " | ".join(f"{v:,.0f}" for v in sums)
             + f" | {sum(sums):,.0f} |")
  out += ["", f"The traced step took {row['traced_ms']:,.0f} ms; "
          f"{row['traced_ms'] - sum(sums):,.0f} ms of it is in no thunk "
          "event (work the trace does not record: XLA's Eigen "
          "convolutions record only their dispatch; negative when thunks "
          "overlap)."]
  if "idle_ms" in row:
    out += ["", "Time with no thunk running, by the kind of the thunk that "
            "finished last before it (ms): " + ", ".join(
                f"{k} {v:,.0f}" for k, v in row["idle_ms"].items()) + "."]
  return "\n".join(out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--method", default="kd", choices=("kd", "confods"))
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args(argv)
  # The optimised HLO of the executable that runs, for the op names; an
  # earlier run's dump and trace in --out would be read instead.
  dump = os.path.join(os.path.abspath(args.out), "hlo")
  trace_dir = os.path.join(args.out, "trace")
  for stale in (dump, trace_dir):
    shutil.rmtree(stale, ignore_errors=True)
  if "jax" in sys.modules:
    raise RuntimeError("Run profile_step.py in a fresh process (it sets "
                       "XLA_FLAGS before JAX starts).")
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump}",
      "--xla_dump_hlo_module_re=student_train_step"])
  # pylint: disable=g-import-not-at-top
  import jax
  from divdistill_jax import runtime
  jax.config.update("jax_threefry_partitionable", True)
  runtime.keep_freed_cpu_memory()  # As a job does.
  import benchmark
  from divdistill_jax import fileio
  from divdistill_jax.models import conv
  # benchmark.py's own case, with our kernel gradient (the default).
  case = next(c for c in benchmark.cpu_cases(["float32"])
              if c.name == f"student resnet32 {args.method} 128x4"
              and c.kernel_grad == "auto")
  os.makedirs(args.out, exist_ok=True)
  with conv.cpu_kernel_grad(case.kernel_grad):
    task, images, labels = benchmark.build(case)
    key = jax.random.key(0)
    state = task.state
    times = []
    for _ in range(1 + args.warmup):
      start = time.perf_counter()
      state, _ = task.train_step(state, images, labels, key)
      jax.block_until_ready(state)
      times.append(1e3 * (time.perf_counter() - start))
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    state, _ = task.train_step(state, images, labels, key)
    jax.block_until_ready(state)
    traced = 1e3 * (time.perf_counter() - start)
    jax.profiler.stop_trace()
  [hlo_path] = glob.glob(os.path.join(
      dump, "*student_train_step*cpu_after_optimizations.txt"))
  with open(hlo_path) as f:
    hlo = f.read()
  steps = [round(t) for t in times[1:]]
  row = {"case": case.name, "steps_ms": steps,
         "median_ms": statistics.median(steps), "traced_ms": round(traced),
         "ms": summarise(trace_dir, hlo),
         "idle_ms": idle_after(trace_dir, hlo)}
  text = markdown(row)
  print(text)
  fileio.write_json(os.path.join(args.out, "profile.json"), row, indent=2)
  fileio.write_text(os.path.join(args.out, "profile.md"), text + "\n")
  return row


if __name__ == "__main__":
  main()
