"""The KD step's parts timed alone, ours and the official PyTorch code's.

Where `profile_step.py` splits one traced step of ours, this script times
the parts that both implementations have, each alone, at the paper's
ResNet-32 / CIFAR-10 shapes (four teachers of 128 images each, a
BatchEnsemble-4 student on 4 x 128 images, float32):

- the teachers' eval forward (one network per member, as both steps run it);
- the student's forward in training mode, and its forward and backward
  (cross-entropy, parameter gradients);
- every convolution shape of ResNet-32, its forward, input gradient and
  kernel gradient over 512 images, and their sum over the network's 31
  convolutions (times the number of convolutions of each shape).

Ours: `models.get_model` and `models/conv.py` compiled with
`conv.compiler_options()`, the per-member kernel gradient the BatchEnsemble
convolution computes on a CPU (`conv.kernel_grads_by_matmul`), freed memory
kept (`runtime.keep_freed_cpu_memory`), as a job runs. Official: giung2's
own model builder (see `torch_reference.py`) and ATen's
`convolution_backward` on NCHW tensors, the official code's layout. Each
side runs in its own process (one after the other; `--side` runs one);
the medians of `--repeats` calls after two warm-up calls, in ms.

  python experiments/cpu_parts.py --giung2=PATH

Results: BENCHMARKS.md, "CPU step".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

M, B, K = 4, 128, 10
# (input size, input channels, output channels, stride) of ResNet-32's
# 3 x 3 convolutions and how many of each (stem, 3 stages of 5 blocks).
CONVS = (((32, 3, 16, 1), 1), ((32, 16, 16, 1), 10), ((32, 16, 32, 2), 1),
         ((16, 32, 32, 1), 9), ((16, 32, 64, 2), 1), ((8, 64, 64, 1), 9))
PARTS = ("teachers' forward", "student forward", "student forward + backward")


def _median_ms(fn, repeats: int) -> float:
  for _ in range(2):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times)


def _ours(repeats: int, images: int = B) -> dict:
  """{part: ms} of this project's code."""
  # pylint: disable=g-import-not-at-top
  from divdistill_jax import runtime
  runtime.keep_freed_cpu_memory()
  import jax
  import optax
  from divdistill_jax import ensemble
  from divdistill_jax.models import conv, get_model
  opts = conv.compiler_options()
  teacher = get_model("resnet32", num_classes=K)
  student = get_model("resnet32", num_classes=K, ensemble_size=M)
  x = jax.random.uniform(jax.random.key(0), (M, images, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (M, images), 0, K)
  tvars = ensemble.init_members(teacher, jax.random.key(2), M, x[0, :1])
  svars = student.init(jax.random.key(3), x[:, :2], train=False)

  def forward(params, x):
    return student.apply({**svars, "params": params}, x, train=True,
                         mutable=["batch_stats"])[0]

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        forward(params, x), y).mean()

  fns = {
      PARTS[0]: (jax.jit(lambda v, x: ensemble.apply_members(
          teacher, v, x, strategy="unroll"), compiler_options=opts),
                 tvars, x),
      PARTS[1]: (jax.jit(forward, compiler_options=opts), svars["params"], x),
      PARTS[2]: (jax.jit(jax.grad(loss), compiler_options=opts),
                 svars["params"], x, y),
  }
  def flat(a):  # [M, N, ...] -> [M N, ...]: all members' images at once
    return a.reshape(-1, *a.shape[2:])

  for (size, c, d, s), _ in CONVS:
    xi = jax.random.normal(jax.random.key(4), (M, images, size, size, c))
    w = jax.random.normal(jax.random.key(5), (3, 3, c, d))
    g = jax.random.normal(jax.random.key(6),
                          (M, images, size // s, size // s, d))
    name = f"{size}x{size}x{c}->{d}/{s}"
    fns[f"{name} forward"] = (jax.jit(
        lambda x, w, s=s: conv.conv2d(flat(x), w, s, 1),
        compiler_options=opts), xi, w)
    fns[f"{name} input gradient"] = (jax.jit(
        lambda x, w, g, s=s: jax.vjp(lambda v: conv.conv2d(v, w, s, 1),
                                     flat(x))[1](flat(g))[0],
        compiler_options=opts), xi, w, g)
    fns[f"{name} kernel gradient"] = (jax.jit(
        lambda x, g, s=s: conv.kernel_grads_by_matmul(x, g, 3, s, 1),
        compiler_options=opts), xi, g)
  return {name: _median_ms(lambda f=f, a=a: jax.block_until_ready(f(*a)),
                           repeats)
          for name, (f, *a) in fns.items()}


def _official(giung2: str, repeats: int, images: int = B) -> dict:
  """{part: ms} of the official PyTorch code."""
  # pylint: disable=g-import-not-at-top
  import torch_reference
  teachers, student, _ = torch_reference.build_official(giung2, threads=2)
  import torch
  import torch.nn.functional as F  # noqa: N812
  x = torch.rand(M * images, 3, 32, 32)
  y = torch.randint(0, K, (M * images,))

  def teachers_forward():
    with torch.no_grad():
      return [t(xi)["logits"]
              for t, xi in zip(teachers, torch.split(x, images))]

  def forward():
    with torch.no_grad():
      return student(x, y)["logits"]

  def forward_backward():
    out = student(x, y)
    F.cross_entropy(out["logits"], out["labels"]).backward()

  fns = {PARTS[0]: teachers_forward, PARTS[1]: forward,
         PARTS[2]: forward_backward}
  for (size, c, d, s), _ in CONVS:
    xi = torch.randn(M * images, c, size, size)
    w = torch.randn(d, c, 3, 3)
    g = torch.randn(M * images, d, size // s, size // s)
    name = f"{size}x{size}x{c}->{d}/{s}"

    def backward(mask, xi=xi, w=w, g=g, s=s):
      return torch.ops.aten.convolution_backward(
          g, xi, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask)

    fns[f"{name} forward"] = lambda xi=xi, w=w, s=s: torch.conv2d(
        xi, w, None, s, 1)
    fns[f"{name} input gradient"] = lambda b=backward: b([True, False, False])
    fns[f"{name} kernel gradient"] = lambda b=backward: b([False, False, True])
  return {name: _median_ms(fn, repeats) for name, fn in fns.items()}


def _with_totals(times: dict) -> dict:
  """Adds the network's 31 convolutions' sums, by kind."""
  for kind in ("forward", "input gradient", "kernel gradient"):
    times[f"all 31 convolutions, {kind}"] = sum(
        n * times[f"{size}x{size}x{c}->{d}/{s} {kind}"]
        for (size, c, d, s), n in CONVS)
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--giung2", default=None,
                      help="A checkout of github.com/cs-giung/giung2 (for "
                      "the official side).")
  parser.add_argument("--side", choices=("both", "ours", "official"),
                      default="both")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--images", type=int, default=B,
                      help="Images per member (the paper's 128; fewer for "
                      "a smoke run of our side).")
  args = parser.parse_args(argv)
  if args.side == "ours":
    print(json.dumps(_with_totals(_ours(args.repeats, args.images))))
    return
  if args.side == "official":
    if not args.giung2:
      parser.error("--side=official needs --giung2.")
    print(json.dumps(_with_totals(_official(args.giung2, args.repeats,
                                            args.images))))
    return
  sides = ["ours"] + (["official"] if args.giung2 else [])
  results = {}
  for side in sides:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--side={side}",
         f"--repeats={args.repeats}", f"--images={args.images}"]
        + ([f"--giung2={args.giung2}"] if args.giung2 else []),
        check=True, capture_output=True, text=True).stdout
    results[side] = json.loads(out.strip().splitlines()[-1])
  print(f"median of {args.repeats} calls, ms, {M} x {args.images} images "
        "(one process per side, one after the other)\n")
  print("| part | " + " | ".join(sides) + " |")
  print("|---|" + "---:|" * len(sides))
  for name in results["ours"]:
    print(f"| {name} | "
          + " | ".join(f"{results[s][name]:,.1f}" for s in sides) + " |")


if __name__ == "__main__":
  main()
