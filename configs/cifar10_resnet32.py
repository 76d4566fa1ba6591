"""CIFAR-10, ResNet-32: DE-4 teachers -> BE-4 students.

The official legacy configs (giung2 `C10_R32_{SGD,BE4}.yaml` at 0947c97):
teachers 200 epochs, batch 512, LR 0.4, milestones (5, 100, 180); students
250 epochs, batch 128 images (x4), LR 0.1 (fast 0.05), milestones
(5, 125, 225); coupled L2 4e-4; (alpha, tau) = (0.9, 4) [paper], eta = 1/255.
Validation at epochs 1, 20, ..., 180, 181..200 (teachers) and 1, 25, ...,
225, 226..250 (students).

Commands:
  python -m divdistill_jax.main --config=configs/cifar10_resnet32.py:pipeline \
      --config.data.data_dir=DATA --workdir=W
or stage by stage with the variants teachers, kd, gaussian, ods, confods,
disagreement (set --config.teacher.workdir=W/teachers for students).

Expected: the paper's CIFAR-10 table could not be retrieved; the
relational checks of `experiments/run_table.py` apply (ODS/ConfODS beat KD
on ACC and NLL; Gaussian does not).
"""

from divdistill_jax import configlib


def get_config(arg=None):
  config = configlib.base_config()
  # ceil(N / B) steps per epoch with a partial last batch, as the official
  # PyTorch loader (drop_last=False; one GPU): 88 teacher and 352 student
  # steps per epoch.
  config.data.drop_remainder = False
  config.data.name = "cifar10"
  config.model.name = "resnet32"

  config.teacher.ensemble_size = 4
  config.teacher.batch_size = 512
  config.teacher.epochs = 200
  config.teacher.optim = configlib.optim_config(
      learning_rate=0.4, weight_decay=4e-4, milestones=(5, 100, 180))
  config.teacher.eval_every_epochs = 20
  config.teacher.eval_final_epochs = 20

  config.student.ensemble_size = 4
  config.student.batch_size = 128
  config.student.epochs = 250
  config.student.optim = configlib.optim_config(
      learning_rate=0.1, fast_learning_rate=0.05, weight_decay=4e-4,
      milestones=(5, 125, 225))
  config.student.eval_every_epochs = 25
  config.student.eval_final_epochs = 25

  config.kd.alpha = 0.9
  config.kd.temperature = 4.0
  config.perturb.step_size = 1.0
  config.eval.schedule = "official"
  return configlib.apply_variants(config, arg)
