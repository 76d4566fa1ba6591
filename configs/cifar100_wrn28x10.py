"""CIFAR-100, WRN-28-10: DE-4 teachers -> BE-4 students.

The official recipe (giung2 `C100_WRN28x10_{SGD,BE4}.yaml`): teachers 300
epochs, batch 256, LR 0.2; students 300 epochs, batch 64 images (x4 members),
LR 0.05 (fast weights 0.025, no decay), WarmupLinearDecay (5, 150, 270),
coupled L2 5e-4, (alpha, tau, eta) = (0.9, 1, 1/255). Validation on the last
5k training images at epochs 1, 30, ..., 270, 271, ..., 300.

Commands (one GPU; `experiments/run_table.py` runs them all):
  python -m divdistill_jax.main --config=configs/cifar100_wrn28x10.py:teachers \
      --config.data.data_dir=DATA --workdir=W/teachers
  python -m divdistill_jax.main --config=configs/cifar100_wrn28x10.py:confods \
      --config.data.data_dir=DATA --config.teacher.workdir=W/teachers \
      --workdir=W/students/confods
or everything at once: `--config=configs/cifar100_wrn28x10.py:pipeline
--workdir=W`.

Expected (official README, single run; experiments/expected.json):
  DE-4            ACC 82.54  NLL 0.670  cNLL 0.655
  BE-4 KD         ACC 80.40  NLL 0.804  cNLL 0.750
  BE-4 KD+ODS     ACC 81.92  NLL 0.685  cNLL 0.682
  BE-4 KD+ConfODS ACC 82.25  NLL 0.670  cNLL 0.665

BatchNorm as in the official 4-GPU runs (`NUM_GPUS: 4`, no SyncBN;
docs/SOURCES.md, Per-GPU BatchNorm), by default: statistics per group of 64
teacher images and of 16 student images x 4 members, and ODS / ConfODS draw
their teacher member and output weights per group of 16 images, as each GPU
did. Variant `syncbn`: whole-batch statistics and one ODS draw per batch (what
one large device would do). `ghostbn` is accepted and means the default.
"""

from divdistill_jax import configlib

# Images per official GPU: 256 / 4 teacher images, 64 / 4 student images.
GPUS = 4
TEACHER_IMAGES_PER_GPU = 64
STUDENT_IMAGES_PER_GPU = 16


def sync_bn(config):
  config.teacher.bn_group_size = None
  config.student.bn_group_size = None


def get_config(arg=None):
  config = configlib.base_config()
  config.data.name = "cifar100"
  config.model.name = "wrn28x10"
  # Every epoch as the official 4-GPU runs: ceil(N / B) steps, each GPU's
  # last batch partial (176 teacher, 704 student steps per epoch).
  config.data.drop_remainder = False
  config.data.sampler_replicas = GPUS

  config.teacher.ensemble_size = 4
  config.teacher.batch_size = 256
  config.teacher.bn_group_size = TEACHER_IMAGES_PER_GPU
  config.teacher.epochs = 300
  config.teacher.optim = configlib.optim_config(
      learning_rate=0.2, weight_decay=5e-4, milestones=(5, 150, 270))
  config.teacher.eval_every_epochs = 30
  config.teacher.eval_final_epochs = 30

  config.student.ensemble_size = 4
  config.student.batch_size = 64
  config.student.bn_group_size = STUDENT_IMAGES_PER_GPU
  config.student.epochs = 300
  config.student.optim = configlib.optim_config(
      learning_rate=0.05, fast_learning_rate=0.025, weight_decay=5e-4,
      milestones=(5, 150, 270))
  config.student.eval_every_epochs = 30
  config.student.eval_final_epochs = 30

  config.kd.alpha = 0.9
  config.kd.temperature = 1.0
  config.perturb.step_size = 1.0
  config.eval.schedule = "official"
  config.checkpoint.every_steps = 2000
  return configlib.apply_variants(config, arg, {"syncbn": sync_bn,
                                               "ghostbn": lambda c: None})
