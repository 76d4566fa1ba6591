"""Every jitted step lowers for CPU, CUDA and TPU (jax.export).

No accelerator is needed: `jax.export` lowers one program for several
platforms, and fails when an operation has no lowering for one of them.
The steps are the jobs' own (`Task.step_fns`, built with `abstract=True`:
shapes only, nothing computed), at tiny shapes, float32 on one device and
bfloat16 on a 2-device mesh, for every registered method, a LatentBE
student, the teachers and the evaluation forward.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import grouped_config
from jax import export

from divdistill_jax import (data, distill, ensemble, parallel, perturb, stages,
                            teachers)

PLATFORMS = ("cpu", "cuda", "tpu")
SETTINGS = [("float32", 1), ("bfloat16", 2)]


def _images(config, mesh, batch, axis=0, lead=()):
  info = data.dataset_info(config.data.name)
  shape = (*lead, batch, *info.image_shape)
  sharding = parallel.batch_sharding(mesh, len(shape), axis)
  return (jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding),
          jax.ShapeDtypeStruct((*lead, batch), jnp.int32,
                               sharding=parallel.batch_sharding(
                                   mesh, len(lead) + 1, axis)))


def _key(mesh):
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                              sharding=parallel.replicated(mesh))


def _config(entry, dtype, devices):
  # The residual blocks (resnet8) and remat, so that every op of the
  # networks is lowered; the per-GPU groups, so the per-group draws are;
  # microbatches of two groups.
  return grouped_config(f"{entry},smoke", devices, **{
      "model.name": "resnet8", "model.dtype": dtype, "model.remat": "full",
      "teacher.bn_group_size": 8, "student.microbatches": 2,
      "teacher.microbatches": 2})


def _exported(fn, *args):
  exp = export.export(fn, platforms=PLATFORMS)(*args)
  assert exp.platforms == PLATFORMS
  return exp


def _student_task(config, mesh):
  model = teachers.build_teacher_model(config)
  info = data.dataset_info(config.data.name)
  tvars = jax.eval_shape(lambda: ensemble.init_members(
      model, jax.random.key(0), config.teacher.ensemble_size,
      jnp.zeros((1, *info.image_shape))))
  tvars = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=parallel.replicated(mesh)), tvars)
  return distill.make_student_task(config, mesh, _splits(config), model,
                                   tvars, abstract=True)


def _library_convolutions(hlo: str) -> int:
  """Convolutions inside the computations that YNNPACK fusions call."""
  called = set(re.findall(r"ynn_fusion[\w.\-]* = .*?calls=(%[\w.\-]+)", hlo))
  return sum(block.count(" convolution(") for block in hlo.split("\n\n")
             if block.strip() and block.split(" ", 1)[0].strip() in called)


def _splits(config):
  """Zero images: the task reads only their shape and number."""
  info = data.dataset_info(config.data.name)
  n = 2 * max(config.student.batch_size, config.teacher.batch_size)
  return {"train": (np.zeros((n, *info.image_shape), np.uint8),
                    np.zeros(n, np.int32))}


# Every entry once, the two settings alternating (ConfODS in both): each op
# of each method lowers for every platform in float32 and bfloat16, and on
# one and two devices.
_ENTRIES = [*perturb.methods(), "latentbe:kd"]
_STUDENT_CASES = [(e, *SETTINGS[i % 2]) for i, e in enumerate(_ENTRIES)]
_STUDENT_CASES += [("confods", *s) for s in SETTINGS
                   if ("confods", *s) not in _STUDENT_CASES]


@pytest.mark.parametrize("entry,dtype,devices", _STUDENT_CASES)
def test_student_step_exports_for_every_platform(entry, dtype, devices):
  config = stages.stage_config(_config("kd", dtype, devices), "distill",
                               entry)
  mesh = parallel.make_mesh(devices)
  task = _student_task(config, mesh)
  batch = config.student.batch_size
  (fn,) = task.step_fns.values()
  exp = _exported(fn, task.state, *_images(config, mesh, batch), _key(mesh),
                  *task.step_args)
  assert exp.nr_devices == devices
  # The evaluation forward of the same student.
  variables = {"params": task.state.params,
               "batch_stats": task.state.batch_stats}
  _exported(task.predict_fn, variables,
            _images(config, mesh, config.eval.batch_size)[0])


@pytest.mark.parametrize("dtype,devices", SETTINGS)
def test_teacher_step_exports_for_every_platform(dtype, devices):
  config = _config("kd", dtype, devices)
  mesh = parallel.make_mesh(devices)
  task = teachers.make_teacher_task(config, mesh, _splits(config),
                                    abstract=True)
  (fn,) = task.step_fns.values()
  m = config.teacher.ensemble_size
  images, labels = _images(config, mesh, config.teacher.batch_size, axis=1,
                           lead=(m,))
  exp = _exported(fn, task.state, images, labels, _key(mesh))
  assert exp.nr_devices == devices


def test_steps_compile_for_a_tpu_topology():
  """With the `tpu` extra installed, XLA:TPU compiles the teacher step and a
  ConfODS student step for one chip of a v5e 2x2 slice, deviceless (the
  test is skipped without it: libtpu is large)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc("v5e:2x2", "tpu")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no deviceless TPU compiler here: {e}")
  tpu = jax.sharding.Mesh(np.asarray(desc.devices[:1]), ("data",))
  cpu = parallel.make_mesh(1)

  def on_tpu(tree, axis=None):
    def put(a):
      sharding = (parallel.replicated(tpu) if axis is None
                  else parallel.batch_sharding(tpu, len(a.shape), axis))
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    return jax.tree.map(put, tree)

  config = _config("confods", "bfloat16", 1)
  task = _student_task(config, cpu)
  (fn,) = task.step_fns.values()
  images, labels = _images(config, cpu, config.student.batch_size)
  compiled = fn.lower(on_tpu(task.state), on_tpu(images, 0),
                      on_tpu(labels, 0), on_tpu(_key(cpu)),
                      *on_tpu(task.step_args)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  task = teachers.make_teacher_task(config, cpu, _splits(config),
                                    abstract=True)
  (fn,) = task.step_fns.values()
  images, labels = _images(config, cpu, config.teacher.batch_size, axis=1,
                           lead=(config.teacher.ensemble_size,))
  fn.lower(on_tpu(task.state), on_tpu(images, 1), on_tpu(labels, 1),
           on_tpu(_key(cpu))).compile()


@pytest.mark.parametrize("entry", ["kd", "confods"])
def test_the_student_step_is_data_parallel(entry):
  """On a 2-device mesh each device runs its own images: the compiled
  step gathers no activations across devices (only the gradient's
  all-reduce), and a device holds about half the activations. (A
  member-major merge of the tiled batch once made XLA gather the whole
  batch onto every device.)"""
  temps = {}
  for devices in (1, 2):
    config = stages.stage_config(
        grouped_config("kd,smoke", devices),
        "distill", entry)
    mesh = parallel.make_mesh(devices)
    task = _student_task(config, mesh)
    (fn,) = task.step_fns.values()
    compiled = fn.lower(task.state, *_images(config, mesh,
                                             config.student.batch_size),
                        _key(mesh), *task.step_args).compile()
    text = compiled.as_text()
    if devices == 2:
      assert "all-gather" not in text
    # On a CPU the step compiles with conv.compiler_options(): XLA's own
    # convolutions, not YNNPACK's (models/conv.py).
    assert " convolution(" in text and not _library_convolutions(text)
    temps[devices] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[2] < 0.75 * temps[1], temps


def test_the_teacher_step_compiles_with_the_cpu_options():
  """Like the student step's (above): XLA's own convolutions on a CPU, for
  the 32-channel ones too, which XLA:CPU's defaults give to YNNPACK."""
  config = _config("kd", "float32", 1)
  mesh = parallel.make_mesh(1)
  task = teachers.make_teacher_task(config, mesh, _splits(config),
                                    abstract=True)
  (fn,) = task.step_fns.values()
  images, labels = _images(config, mesh, config.teacher.batch_size, axis=1,
                           lead=(config.teacher.ensemble_size,))
  text = fn.lower(task.state, images, labels, _key(mesh)).compile().as_text()
  assert " convolution(" in text and not _library_convolutions(text)
