"""A CPU step with and without `runtime.keep_freed_cpu_memory`, one process
per run, alternated.

The setting is per process (JAX's CPU client reads its dispatch setting
when it is created), so unlike `ab_cpu_options.py` the two variants cannot
share a process. This script runs `--rounds` rounds; in each it starts one
process per variant, which builds the `benchmark.py` case, compiles it with
one step and times `--steps` more. For every step it records the wall time
and, from `getrusage`, the process's minor page faults and its system and
user CPU seconds, and its resident memory after the step (whether a kept
heap keeps growing over a long run: `--steps=40`); each process reports
its medians, its peak resident memory and the hypervisor's steal ticks
over its run (`/proc/stat`).

  python experiments/ab_cpu_memory.py --method=kd --rounds=3
  python experiments/ab_cpu_memory.py --teacher --reverse
  python experiments/ab_cpu_memory.py --method=kd --rounds=1 --steps=40

Results: BENCHMARKS.md, "CPU step".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab_cpu_options import cpu_case, steal_ticks  # noqa: E402

VARIANTS = {"glibc": "the C library's defaults",
            "keep": "runtime.keep_freed_cpu_memory()"}


def _usage():
  return resource.getrusage(resource.RUSAGE_SELF)


def _resident_gib() -> float:
  """This process's resident memory now (`/proc/self/statm`)."""
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _child(args: argparse.Namespace) -> dict:
  """Times `args.steps` steps of the case in this process."""
  # pylint: disable=g-import-not-at-top
  import jax
  from divdistill_jax import runtime
  jax.config.update("jax_threefry_partitionable", True)
  if args.child == "keep":
    runtime.keep_freed_cpu_memory()
  import benchmark
  case = cpu_case(args.net, args.method, args.teacher)
  task, images, labels = benchmark.build(case)
  key = jax.random.key(0)
  state, _ = task.train_step(task.state, images, labels, key)  # Compiles.
  jax.block_until_ready(state)
  rows = []
  for _ in range(args.steps):
    before, start = _usage(), time.perf_counter()
    state, _ = task.train_step(state, images, labels, key)
    jax.block_until_ready(state)
    wall, after = time.perf_counter() - start, _usage()
    rows.append({"ms": 1e3 * wall,
                 "faults": after.ru_minflt - before.ru_minflt,
                 "sys_s": after.ru_stime - before.ru_stime,
                 "user_s": after.ru_utime - before.ru_utime,
                 "rss_gib": _resident_gib()})
  out = {k: statistics.median(r[k] for r in rows) for k in rows[0]
         if k != "rss_gib"}
  out["steps_ms"] = [round(r["ms"]) for r in rows]
  # Resident memory after each step: whether a kept heap keeps growing.
  out["rss_gib_steps"] = [round(r["rss_gib"], 3) for r in rows]
  # ru_maxrss is in KiB on Linux.
  out["peak_gib"] = _usage().ru_maxrss / 2**20
  out["case"] = case.name
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="kd", choices=("kd", "confods"))
  parser.add_argument("--net", default="resnet32",
                      choices=("resnet32", "quickstart"))
  parser.add_argument("--teacher", action="store_true",
                      help="the teachers' step instead of a student's")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--reverse", action="store_true",
                      help="start the kept variant first in each round")
  parser.add_argument("--child", choices=tuple(VARIANTS), default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args)))
    return {}
  order = list(VARIANTS)[::-1] if args.reverse else list(VARIANTS)
  runs = {v: [] for v in VARIANTS}
  for r in range(args.rounds):
    for variant in order:
      steal = steal_ticks()
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), f"--child={variant}",
           f"--method={args.method}", f"--net={args.net}",
           f"--steps={args.steps}", *(["--teacher"] if args.teacher else [])],
          check=True, capture_output=True, text=True)
      run = json.loads(proc.stdout.strip().splitlines()[-1])
      run["steal_ticks"] = steal_ticks() - steal
      runs[variant].append(run)
      print(f"round {r + 1} {variant:5s} {run['case']}: median "
            f"{run['ms']:,.0f} ms {run['steps_ms']}, minor faults "
            f"{run['faults']:,.0f}, sys {run['sys_s']:.2f} s, user "
            f"{run['user_s']:.2f} s, peak {run['peak_gib']:.2f} GiB, "
            f"resident after the first / last step "
            f"{run['rss_gib_steps'][0]:.2f} / {run['rss_gib_steps'][-1]:.2f} "
            f"GiB, steal {run['steal_ticks']}", flush=True)
  out = {"order": order, "runs": runs}
  for variant in VARIANTS:
    medians = [run["ms"] for run in runs[variant]]
    print(f"{VARIANTS[variant]}: median of the runs' medians "
          f"{statistics.median(medians):,.0f} ms "
          f"({', '.join(f'{m:,.0f}' for m in medians)})")
  return out


if __name__ == "__main__":
  main()
