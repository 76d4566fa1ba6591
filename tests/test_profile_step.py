"""experiments/profile_step.py: thunk times summed by phase and kind."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
from conftest import ROOT, load_config

from divdistill_jax import data, distill, ensemble, parallel, teachers

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import profile_step  # noqa: E402

# A hand-written optimised-HLO excerpt: a convolution fusion of the student's
# forward pass, a reduction fusion and a dot of its backward pass, and a
# loop fusion of the teachers (no jvp / transpose in the op name).
HLO = """\
%fused_computation.1 (param_0: f32[8,4,4,3], param_1: f32[3,3,3,16]) -> f32[8,4,4,16] {
  %param_0 = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,3,16]{3,2,1,0} parameter(1)
  ROOT %conv.1 = f32[8,4,4,16]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_computation.2 (param_0.1: f32[8,16]) -> f32[16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[16]{0} reduce(%param_0.1, %c), dimensions={0}, to_apply=%add
}

%fused_computation.3 (param_0.2: f32[8,16]) -> f32[8,16] {
  %param_0.2 = f32[8,16]{1,0} parameter(0)
  ROOT %mul.1 = f32[8,16]{1,0} multiply(%param_0.2, %param_0.2)
}

ENTRY %main (x: f32[8,4,4,3], w: f32[3,3,3,16]) -> f32[16] {
  %x = f32[8,4,4,3]{3,2,1,0} parameter(0)
  %w = f32[3,3,3,16]{3,2,1,0} parameter(1)
  %ynn_fusion.1 = f32[8,4,4,16]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(student_train_step)/jvp(CifarResNet)/BatchEnsembleConv_0/conv_general_dilated"}
  %ynn_fusion.2 = f32[16]{0} fusion(%b), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(student_train_step)/transpose(jvp(CifarResNet))/BatchNorm_0/reduce_sum"}
  %dot.7 = f32[3,16]{1,0} dot(%p, %q), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(student_train_step)/transpose(jvp(CifarResNet))/while/body/dot_general"}
  %multiply_fusion.3 = f32[8,16]{1,0} fusion(%b), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(student_train_step)/CifarResNet/BatchNorm_0/mul"}
  ROOT %r = f32[16]{0} copy(%ynn_fusion.2)
}
"""  # noqa: E501  (HLO lines as XLA prints them)


def _trace(tmp_path, events):
  path = tmp_path / "trace" / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  with gzip.open(path / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  return str(tmp_path / "trace")


def test_summarise_sums_thunks_by_phase_and_kind(tmp_path):
  events = [
      {"ph": "X", "name": "ynn_fusion.1", "dur": 3000},
      {"ph": "X", "name": "ynn_fusion.1", "dur": 1000},
      {"ph": "X", "name": "ynn_fusion.2", "dur": 500},
      {"ph": "X", "name": "dot.7", "dur": 2000},
      {"ph": "X", "name": "multiply_fusion.3", "dur": 700},
      # Not instructions of the program: the executor's own spans.
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000},
      {"ph": "i", "name": "dot.7", "dur": 5000},
  ]
  ms = profile_step.summarise(_trace(tmp_path, events), HLO)
  fwd, bwd, _, rest = profile_step.PHASES
  conv, dot, other = profile_step.KINDS
  expected = {(fwd, conv): 4.0, (bwd, other): 0.5, (bwd, dot): 2.0,
              (rest, other): 0.7}
  for p in profile_step.PHASES:
    for k in profile_step.KINDS:
      assert ms[f"{p} | {k}"] == expected.get((p, k), 0.0), (p, k)
  text = profile_step.markdown({"case": "c", "steps_ms": [1, 2],
                                "median_ms": 1.5, "traced_ms": 10, "ms": ms})
  assert text.splitlines()[-3].startswith("| all | 4 | 2 | 1 |")
  # 10 ms of wall time, 7.2 in thunk events (4 + 2 + 1.2).
  assert "took 10 ms; 3 ms of it is in no thunk event" in text


def test_idle_time_goes_to_the_kind_of_the_thunk_before_it(tmp_path):
  events = [  # times in us
      {"ph": "X", "name": "ynn_fusion.1", "ts": 0, "dur": 1000},
      # 3 ms with nothing recorded after the convolution's dispatch.
      {"ph": "X", "name": "dot.7", "ts": 4000, "dur": 1000},
      # Overlaps the product and ends after it: the next gap is its.
      {"ph": "X", "name": "multiply_fusion.3", "ts": 4500, "dur": 1500},
      # An executor span is not a thunk: it hides no gap.
      {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 99000},
      {"ph": "X", "name": "dot.7", "ts": 6500, "dur": 500},
      {"ph": "X", "name": "ynn_fusion.2", "ts": 9000, "dur": 100},
  ]
  idle = profile_step.idle_after(_trace(tmp_path, events), HLO)
  conv, dot, other = profile_step.KINDS
  assert idle == {conv: 3.0, other: 0.5, dot: 2.0}
  text = profile_step.markdown({"case": "c", "steps_ms": [1], "median_ms": 1,
                                "traced_ms": 10, "ms": {
                                    f"{p} | {k}": 0.0
                                    for p in profile_step.PHASES
                                    for k in profile_step.KINDS},
                                "idle_ms": idle})
  assert text.endswith(f"(ms): {conv} 3, {dot} 2, {other} 0.")


def _name_stacks(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.append((eqn.primitive.name, str(eqn.source_info.name_stack)))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      _name_stacks(sub, out)
  return out


def test_step_labels_the_perturbation_and_teachers_scopes():
  """A ConfODS student step's ops carry the scopes phase_of reads: the
  teacher's input-gradient pass is labelled perturbation, not student."""
  config = load_config("quickstart", "confods,smoke", **{
      "model.name": "resnet2_w4", "student.batch_size": 4})
  info = data.dataset_info(config.data.name)
  rng = np.random.default_rng(0)
  splits = {"train": (
      rng.integers(0, 256, (8, *info.image_shape), dtype=np.uint8),
      rng.integers(0, info.num_classes, 8, dtype=np.int32))}
  model = teachers.build_teacher_model(config)
  tvars = ensemble.init_members(model, jax.random.key(1),
                                config.teacher.ensemble_size,
                                jnp.zeros((1, *info.image_shape)))
  task = distill.make_student_task(config, parallel.make_mesh(1), splits,
                                   model, tvars)
  images, labels = task.batch_fn(0)
  # Traced as the top-level function: on a CPU the step's jit carries
  # compiler options, which JAX refuses inside another trace.
  jaxpr = task.step_fns[len(images)].trace(
      task.state, images, labels, jax.random.key(0), *task.step_args).jaxpr
  convs = [(profile_step.phase_of(stack), stack) for name, stack in
           _name_stacks(jaxpr.jaxpr, []) if name == "conv_general_dilated"]
  phases = {phase for phase, _ in convs}
  assert phases == set(profile_step.PHASES), phases
  # The perturbation differentiates a teacher: its transposed convolutions.
  assert any(phase == profile_step.PHASES[2] and "transpose(" in stack
             for phase, stack in convs)


def test_phase_of_reads_the_scopes_and_autodiff_transforms():
  fwd, bwd, perturbation, rest = profile_step.PHASES
  assert profile_step.phase_of("jit(s)/jvp(Net)/Conv_0/mul") == fwd
  assert profile_step.phase_of("jit(s)/transpose(jvp(Net))/Conv_0/mul") == bwd
  # The perturbation's own autodiff passes (a teacher's input gradient)
  # belong to the perturbation, not to the student.
  assert profile_step.phase_of(
      "jit(s)/perturbation/transpose(jvp(Net))/Conv_0/mul") == perturbation
  assert profile_step.phase_of("jit(s)/perturbation/jvp(Net)/mul") == (
      perturbation)
  assert profile_step.phase_of("jit(s)/teachers/Net/Conv_0/mul") == rest
  assert profile_step.phase_of("jit(s)/Net/perturbations_x/mul") == rest
