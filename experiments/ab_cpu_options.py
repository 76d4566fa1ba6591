"""A CPU student step in two variants, built in one process and alternated.

Step times on this project's 2-core VMs wander by 10-20% between processes
and between minutes, more than the differences measured here, so this
script builds the same `benchmark.py` case twice in one process, runs one
step of each (tracing and compiling it), then alternates them for
`--rounds` rounds and prints each one's step times and median, with the
hypervisor's steal ticks over the run (`/proc/stat`). `--compare`:

- `compiler_options`: XLA's default options against
  `conv.compiler_options()` (XLA's Eigen convolutions instead of YNNPACK's).
- `fast_weight_grads`: the BatchEnsemble convolution as three
  differentiable steps, x r_m, the convolution, y s_m (autodiff's
  fast-weight gradients: activation-sized products), against
  `conv.batch_ensemble_conv2d` (the fast weights' gradients from
  per-member kernel gradients on a CPU).
- `kernel_grad_products`: each chunk of our CPU kernel gradient as k * k
  tap products [C, R] x [R, D] (the formulation before) against one
  product per row phase of shifted copies (`conv._chunk_kernel_grad`).

`--reverse` builds and runs the variants in the other order: which one
runs first in a round can favour it on these VMs, so compare both orders.
`--teacher` times the teachers' step (M members, unrolled) instead of a
student's (`--method` is then ignored).

  python experiments/ab_cpu_options.py --method=kd --rounds=6
  python experiments/ab_cpu_options.py --compare=fast_weight_grads
  python experiments/ab_cpu_options.py --compare=kernel_grad_products --reverse

Results: BENCHMARKS.md, "CPU step".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def steal_ticks() -> int:
  """The hypervisor's steal ticks so far, all CPUs (`/proc/stat`)."""
  with open("/proc/stat") as f:
    return int(f.readline().split()[8])


def cpu_case(net: str, method: str, teacher: bool):
  """The float32 `benchmark.py` CPU case of `net` with our kernel gradient:
  the teachers' step, or the student step of `method`."""
  # pylint: disable-next=g-import-not-at-top
  import benchmark
  prefix = f"teacher {net} " if teacher else f"student {net} {method} "
  return next(c for c in benchmark.cpu_cases(["float32"])
              if c.kernel_grad == "auto" and c.name.startswith(prefix))


def _three_step_batch_ensemble_conv2d(x, kernel, r, s, strides, padding,
                                      dtype, image_major=False):
  """`conv.batch_ensemble_conv2d` as autodiff sees three steps."""
  # pylint: disable-next=g-import-not-at-top
  from divdistill_jax.models import conv
  x = x * r[:, None, None, None, :].astype(x.dtype)
  y = conv.conv2d(conv.merge_members(x, image_major).astype(dtype),
                  kernel.astype(dtype), strides, padding)
  y = conv.split_members(y, x.shape[:2], image_major)
  return y * s[:, None, None, None, :].astype(dtype)


def _tap_products(xc, gc, k, s, p):
  """A chunk's kernel gradient as k * k products, one per kernel tap."""
  # pylint: disable-next=g-import-not-at-top
  import jax.numpy as jnp
  c, d = xc.shape[-1], gc.shape[-1]
  _, ho, wo, _ = gc.shape
  xp = jnp.pad(xc, ((0, 0), (p, p), (p, p), (0, 0)))
  taps = [xp[:, i:i + s * (ho - 1) + 1:s, t:t + s * (wo - 1) + 1:s, :]
          for i in range(k) for t in range(k)]
  return jnp.stack([jnp.dot(tap.reshape(-1, c).T, gc.reshape(-1, d),
                            preferred_element_type=jnp.float32)
                    for tap in taps]).reshape(k, k, c, d)


def _variants(compare: str) -> dict:
  """{name: a context manager to build and trace that variant's step in}."""
  # pylint: disable-next=g-import-not-at-top
  from divdistill_jax.models import conv
  if compare == "compiler_options":
    # The steps read conv.compiler_options() when they are built.
    return {"XLA defaults": lambda: mock.patch.object(
                conv, "compiler_options", lambda: None),
            "conv.compiler_options()": contextlib.nullcontext}
  if compare == "kernel_grad_products":
    # conv.kernel_grads_by_matmul calls it when the step is traced.
    return {"k * k tap products": lambda: mock.patch.object(
                conv, "_chunk_kernel_grad", _tap_products),
            "shifted copies, one product per row phase":
                contextlib.nullcontext}
  # The layers call conv.batch_ensemble_conv2d when the step is traced.
  return {"autodiff of x r, conv, y s": lambda: mock.patch.object(
              conv, "batch_ensemble_conv2d",
              _three_step_batch_ensemble_conv2d),
          "conv.batch_ensemble_conv2d": contextlib.nullcontext}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="kd", choices=("kd", "confods"))
  parser.add_argument("--net", default="resnet32",
                      choices=("resnet32", "quickstart"))
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--compare", default="compiler_options",
                      choices=("compiler_options", "fast_weight_grads",
                               "kernel_grad_products"))
  parser.add_argument("--reverse", action="store_true",
                      help="build and run the variants in the other order")
  parser.add_argument("--teacher", action="store_true",
                      help="the teachers' step instead of a student's")
  args = parser.parse_args(argv)
  # pylint: disable=g-import-not-at-top
  import jax
  from divdistill_jax import runtime
  jax.config.update("jax_threefry_partitionable", True)
  runtime.keep_freed_cpu_memory()  # As a job does.
  import benchmark
  case = cpu_case(args.net, args.method, args.teacher)
  key = jax.random.key(0)
  builds, states, times = {}, {}, {}
  variants = list(_variants(args.compare).items())
  for name, context in (variants[::-1] if args.reverse else variants):
    with context():
      task, images, labels = builds[name] = benchmark.build(case)
      states[name], _ = task.train_step(task.state, images, labels,
                                        key)  # traces and compiles
      jax.block_until_ready(states[name])
    times[name] = []
  steal = steal_ticks()
  for _ in range(args.rounds):
    for name, (task, images, labels) in builds.items():
      start = time.perf_counter()
      states[name], _ = task.train_step(states[name], images, labels, key)
      jax.block_until_ready(states[name])
      times[name].append(round(1e3 * (time.perf_counter() - start)))
  steal = steal_ticks() - steal
  out = {"case": case.name, "compare": args.compare, "steal_ticks": steal}
  print(f"{case.name}, {args.rounds} rounds alternating, steal ticks "
        f"{steal}:")
  for name, steps in times.items():
    out[name] = {"steps_ms": steps, "median_ms": statistics.median(steps)}
    print(f"  {name}: median {out[name]['median_ms']:,.0f} ms, steps "
          f"{steps}")
  return out


if __name__ == "__main__":
  main()
