"""A CPU student step under XLA's default options and under ours, alternating.

`conv.compiler_options()` compiles the steps on a CPU with XLA's Eigen
convolutions instead of YNNPACK's. Step times on this project's 2-core VMs
wander by 10-20% between processes and between minutes, more than the
difference to be measured, so this script builds the same
`benchmark.py` case twice in one process (one step compiled with XLA's
defaults, one with ours), runs one step of each to compile, then
alternates them for `--rounds` rounds and prints each one's step times and
median, with the hypervisor's steal ticks over the run (`/proc/stat`).

  python experiments/ab_cpu_options.py --method=kd --rounds=6

Results: BENCHMARKS.md, "CPU step".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _steal_ticks() -> int:
  with open("/proc/stat") as f:
    return int(f.readline().split()[8])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="kd", choices=("kd", "confods"))
  parser.add_argument("--net", default="resnet32",
                      choices=("resnet32", "quickstart"))
  parser.add_argument("--rounds", type=int, default=6)
  args = parser.parse_args(argv)
  # pylint: disable=g-import-not-at-top
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  import benchmark
  from divdistill_jax.models import conv
  case = next(c for c in benchmark.cpu_cases(["float32"])
              if c.kind == "student" and c.kernel_grad == "auto"
              and c.name.startswith(f"student {args.net} {args.method} "))
  key = jax.random.key(0)
  builds, states, times = {}, {}, {}
  for name, options in (("XLA defaults", None),
                        ("conv.compiler_options()", conv.compiler_options())):
    # The steps read conv.compiler_options() when they are built.
    with mock.patch.object(conv, "compiler_options", lambda o=options: o):
      task, images, labels = builds[name] = benchmark.build(case)
    states[name], _ = task.train_step(task.state, images, labels,
                                      key)  # compiles
    jax.block_until_ready(states[name])
    times[name] = []
  steal = _steal_ticks()
  for _ in range(args.rounds):
    for name, (task, images, labels) in builds.items():
      start = time.perf_counter()
      states[name], _ = task.train_step(states[name], images, labels, key)
      jax.block_until_ready(states[name])
      times[name].append(round(1e3 * (time.perf_counter() - start)))
  steal = _steal_ticks() - steal
  out = {"case": case.name, "steal_ticks": steal}
  print(f"{case.name}, {args.rounds} rounds alternating, steal ticks "
        f"{steal}:")
  for name, steps in times.items():
    out[name] = {"steps_ms": steps, "median_ms": statistics.median(steps)}
    print(f"  {name}: median {out[name]['median_ms']:,.0f} ms, steps "
          f"{steps}")
  return out


if __name__ == "__main__":
  main()
