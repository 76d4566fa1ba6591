"""Quick start: DE-4 -> BE-4 on Fashion-MNIST, on a CPU in minutes.

The offline default (Debian package `dataset-fashion-mnist`). Half-width
ResNet-8 teachers trained on a 500-image subset until they fit it, so
that (as for WRN-28-10 on CIFAR-100 in the paper) the teacher members agree
on training images and disagree on held-out ones.

The students get 45 epochs (450 steps), the shortest budget at which BE-4
KD reached one teacher's accuracy (experiments/RESULTS.md, "Findings",
1. Budget). The pipeline runs KD and KD+ConfODS (the paper's method) to
stay within minutes on 2 cores; add the others with
--config.pipeline.methods=kd,gaussian,ods,confods,disagreement.

Command:
  python -m divdistill_jax.main --config=configs/quickstart.py \
      --workdir=/tmp/quickstart
Variants: teachers, kd, gaussian, ods, confods, disagreement, tdiv_sdiv,
pipeline (default), evaluate, smoke.
"""

from divdistill_jax import configlib


def get_config(arg=None):
  config = configlib.base_config()
  config.job = "pipeline"
  config.data.name = "fashion_mnist"
  config.data.train_size = 500
  config.data.validation_size = 1000
  config.data.test_size = 2000
  # No augmentation: the teachers memorise their 500 images (train accuracy
  # 100%), so on those images they agree and only perturbed inputs show
  # their diversity, the regime of the paper.
  config.data.crop_padding = 0
  config.data.flip = False
  config.model.name = "resnet8_w8"

  config.teacher.ensemble_size = 4
  config.teacher.batch_size = 50
  config.teacher.epochs = 30
  # Two warm-up epochs, ramped per step: with 10 steps per epoch, the
  # official per-epoch ramp jumps the LR 50x at once, which stalled the
  # BatchEnsemble students (README, quick start, "Warm-up").
  config.teacher.optim = configlib.optim_config(
      learning_rate=0.1, weight_decay=5e-4, milestones=(3, 15, 30),
      granularity="step")
  config.teacher.eval_every_epochs = 10

  config.student.ensemble_size = 4
  config.student.batch_size = 50
  config.student.epochs = 45
  # Warm-up for 2 epochs, a plateau to half the budget, linear decay.
  config.student.optim = configlib.optim_config(
      learning_rate=0.05, fast_learning_rate=0.025, weight_decay=5e-4,
      milestones=(3, 22, 45), granularity="step")
  config.student.eval_every_epochs = 11

  config.kd.alpha = 0.9
  config.kd.temperature = 1.0
  config.eval.batch_size = 500
  config.checkpoint.every_steps = 200
  config.logging.every_steps = 20
  config.pipeline.methods = "kd,confods"
  return configlib.apply_variants(config, arg, {"smoke": _smoke})


def _smoke(config):
  # The smoke run checks a setup end to end: every method of the paper.
  config.pipeline.methods = ",".join(configlib.PIPELINE_METHODS)
