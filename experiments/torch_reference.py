"""The official PyTorch student step timed on this machine's CPU.

  python experiments/torch_reference.py --giung2=PATH [--threads=2]

The reference rows of `benchmark.py --cpu` (`CPU_REFERENCE_MS`): the paper's
ResNet-32 / CIFAR-10 setting (four plain teachers, a BatchEnsemble-4
student, 128 images per step, 4 x 128 student rows), float32, synthetic
data. The networks and the optimiser come from the authors' own builders
in giung2 (https://github.com/cs-giung/giung2: `giung2.modeling.build`,
`giung2.solver.build`), configured as giung2's ResNet-32 CIFAR-10 configs
(`C10_R32_SGD.yaml` / `C10_R32_BE4.yaml`, in the repository's history up
to commit 0947c97; README, "Fidelity to the official code"); the step
follows the
KD and `c_ods_l2` (ConfODS) branches of
`projects/Diversity-Matters/scripts/train_student.py`: the teachers'
no-grad forward on their share of the tiled batch, the student's clean
(and perturbed) passes, CE + KD, backward, SGD. Needs `torch` and
`fvcore` (not project dependencies) and a giung2 checkout; nothing of it
is imported by the package or the tests.

Prints the median of `--repeats` steps after `--warmup` ones, in ms, and
the step's GFLOP/s from our own count of the same step (`gflop_per_step`
of the `benchmark.py --cpu` rows in `--flops_from`; the FLOPs are the
same on both sides), so the two rows compare on one machine and one day.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

M, B, K, TEMP, ALPHA, ETA = 4, 128, 10, 4.0, 0.9, 1.0
ROWS = os.path.join(os.path.dirname(__file__), "results", "cpu_step",
                    "benchmark.json")


def _cfg(get_cfg, batch_ensemble: bool):
  """ResNet-32 for CIFAR-10 (stem conv + BN + ReLU, 3 x 5 post-activation
  basic blocks of 16 / 32 / 64 channels, zero-padded identity shortcuts)."""
  cfg = get_cfg()
  cfg.MODEL.META_ARCHITECTURE.NAME = "ClassificationModelBase"
  cfg.MODEL.PIXEL_MEAN = [0.4914, 0.4822, 0.4465]
  cfg.MODEL.PIXEL_STD = [0.2470, 0.2435, 0.2616]
  r = cfg.MODEL.BACKBONE.RESNET
  cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
  r.CHANNELS, r.IN_PLANES = 3, 16
  r.FIRST_BLOCK.USE_NORM_LAYER = True
  r.FIRST_BLOCK.USE_ACTIVATION = True
  r.FIRST_BLOCK.USE_POOL_LAYER = False
  r.FIRST_BLOCK.CONV_KSP = [3, 1, 1]
  r.BLOCK, r.SHORTCUT = "BasicBlock", "IdentityShortcut"
  r.NUM_BLOCKS, r.WIDEN_FACTOR = [5, 5, 5], 1
  r.CONV_LAYERS = "Conv2d_BatchEnsemble" if batch_ensemble else "Conv2d"
  r.NORM_LAYERS, r.ACTIVATIONS = "BatchNorm2d", "ReLU"
  c = cfg.MODEL.CLASSIFIER.SOFTMAX_CLASSIFIER
  c.FEATURE_DIM, c.NUM_CLASSES = 64, K
  c.LINEAR_LAYERS = "Linear_BatchEnsemble" if batch_ensemble else "Linear"
  cfg.MODEL.BATCH_ENSEMBLE.ENABLED = batch_ensemble
  cfg.MODEL.BATCH_ENSEMBLE.ENSEMBLE_SIZE = M
  s = cfg.SOLVER.OPTIMIZER.SGD
  s.BASE_LR, s.WEIGHT_DECAY, s.MOMENTUM, s.NESTEROV = 0.1, 4e-4, 0.9, False
  if batch_ensemble:
    s.BASE_LR_BE, s.WEIGHT_DECAY_BE = 0.05, 0.0
    s.MOMENTUM_BE, s.NESTEROV_BE = 0.9, False
  cfg.NUM_GPUS = 0
  return cfg


def build_official(giung2: str, threads: int):
  """The official networks and optimiser, from giung2's own builders.

  Args:
    giung2: a checkout of github.com/cs-giung/giung2.
    threads: PyTorch's CPU threads.

  Returns:
    (teachers: M plain ResNet-32s in eval mode, student: the BE-M ResNet-32
    in training mode, its optimiser), built after `torch.manual_seed(0)`.
  """
  sys.path.insert(0, giung2)
  import collections.abc  # pylint: disable=g-import-not-at-top
  # giung2's optimiser package imports `collections.Iterable`, gone since
  # Python 3.10.
  collections.Iterable = collections.abc.Iterable
  import torch  # pylint: disable=g-import-not-at-top
  from giung2.config import get_cfg  # pylint: disable=g-import-not-at-top
  from giung2.modeling.build import build_model
  from giung2.solver.build import build_optimizer
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  teachers = [build_model(_cfg(get_cfg, False)).eval() for _ in range(M)]
  student_cfg = _cfg(get_cfg, True)
  student = build_model(student_cfg).train()
  return teachers, student, build_optimizer(student_cfg, student)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--giung2", required=True,
                      help="A checkout of github.com/cs-giung/giung2.")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default="kd,confods")
  parser.add_argument("--flops_from", default=ROWS)
  parser.add_argument("--profile", action="store_true",
                      help="Also print torch.profiler's table of one more "
                      "step per method, by ATen operator.")
  args = parser.parse_args()
  teachers, student, optimizer = build_official(args.giung2, args.threads)
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # noqa: N812

  with open(args.flops_from) as f:
    gflop = {r["name"]: r["gflop_per_step"] for r in json.load(f)["rows"]}
  images = torch.rand(B, 3, 32, 32)
  labels = torch.randint(0, K, (B,))

  def kd_loss(logits, t_logits):
    return F.kl_div(F.log_softmax(logits / TEMP, 1),
                    F.softmax(t_logits / TEMP, 1), reduction="batchmean"
                    ) * TEMP * TEMP

  def teacher_logits(x_tiled):
    with torch.no_grad():
      return torch.cat([t(x)["logits"] for t, x in
                        zip(teachers, torch.split(x_tiled, B))])

  def step(method):
    y = labels.repeat(M)
    x = images.repeat(M, 1, 1, 1)
    if method == "kd":
      out = student(x, y)
      ce = F.cross_entropy(out["logits"], out["labels"])
      loss = (1 - ALPHA) * ce + ALPHA * kd_loss(out["logits"],
                                                teacher_logits(x))
    else:  # ConfODS: one random teacher's output direction, scaled.
      xg = images.detach().clone().requires_grad_(True)
      p = torch.softmax(
          teachers[int(torch.randint(0, M, (1,)))](xg)["logits"] / TEMP, 1)
      grad = torch.autograd.grad(
          (torch.empty_like(p).uniform_(-1, 1) * p).sum(), xg,
          create_graph=True)[0].detach()
      flat = grad.view(B, -1)
      direction = flat.size(1) ** 0.5 * F.normalize(flat, dim=1)
      eps = (ETA / 255) * direction.view_as(grad)
      eps = eps * p.max(1)[0].detach().view(-1, 1, 1, 1)
      x_eps = (images + eps).clamp(0, 1).detach().repeat(M, 1, 1, 1)
      out, out_eps = student(x, y), student(x_eps, y)
      ce = F.cross_entropy(out["logits"], out["labels"])
      loss = (1 - ALPHA) * ce + ALPHA * kd_loss(out_eps["logits"],
                                                teacher_logits(x_eps))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"ResNet-32 BE-{M} student, {B} x {M} images, float32")
  for method in args.methods.split(","):
    for _ in range(args.warmup):
      step(method)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      step(method)
      times.append(1e3 * (time.perf_counter() - start))
    if args.profile:
      with torch.profiler.profile(
          activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(method)
      print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                      row_limit=15))
    ms = statistics.median(times)
    g = gflop[f"student resnet32 {method} {B}x{M}"]
    print(f"{method}: {ms:,.0f} ms (steps {[round(t) for t in times]}), "
          f"{g:.1f} GFLOP per step, {g / ms * 1e3:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
