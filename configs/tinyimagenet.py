"""Tiny ImageNet-200 (64 px): DE-4 teachers -> BE-4 students.

The paper's Tiny ImageNet architecture and recipe are NOT known to us (neither
the paper's text we could read nor the official code gives them): only (alpha,
tau) = (0.9, 1) and eta = 1/255 are. We choose a standard network for 64 px
inputs, the pre-activation WRN-16-4 (2.8M parameters, three stages at 64/32/16
px), and the CIFAR-100 recipe scaled to 200 epochs; crop padding 8 as at paper
time (docs/SOURCES.md, Data). Treat its numbers as ours, not the paper's.

Data: the unzipped `tiny-imagenet-200` folder (train = first 90k of a fixed
seeded order, validation = the last 10k, test = the official val set).

Command:
  python -m divdistill_jax.main --config=configs/tinyimagenet.py:pipeline \
      --config.data.data_dir=PATH/tiny-imagenet-200 --workdir=W
"""

from divdistill_jax import configlib


def get_config(arg=None):
  config = configlib.base_config()
  # ceil(N / B) steps per epoch with a partial last batch, as the official
  # PyTorch loader (drop_last=False; one GPU assumed).
  config.data.drop_remainder = False
  config.data.name = "tinyimagenet"
  config.data.crop_padding = 8
  config.model.name = "wrn16x4"

  config.teacher.ensemble_size = 4
  config.teacher.batch_size = 256
  config.teacher.epochs = 200
  config.teacher.optim = configlib.optim_config(
      learning_rate=0.2, weight_decay=5e-4, milestones=(5, 100, 180))
  config.teacher.eval_every_epochs = 20
  config.teacher.eval_final_epochs = 20

  config.student.ensemble_size = 4
  config.student.batch_size = 64
  config.student.epochs = 200
  config.student.optim = configlib.optim_config(
      learning_rate=0.05, fast_learning_rate=0.025, weight_decay=5e-4,
      milestones=(5, 100, 180))
  config.student.eval_every_epochs = 20
  config.student.eval_final_epochs = 20

  config.kd.alpha = 0.9
  config.kd.temperature = 1.0
  config.eval.schedule = "official"
  return configlib.apply_variants(config, arg)
