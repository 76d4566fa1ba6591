"""Applies known wrong versions of the code one at a time; each must fail.

  python tests/check_mutants.py [--only NAME]   run the guarding tests
  python tests/check_mutants.py --check         only check every edit applies

Each mutant is one small mistake a reviewer could make (a swapped argument,
a wrong input, a dropped option), written as edits. An edit names a file,
the function (or `Class.method`) it lives in, a short code pattern and its
replacement. The pattern is matched token by token with any whitespace
between tokens, inside that function only, so reformatting or moving the
function within its file does not break it; if the pattern is not found
exactly once, the edit says so and names what to update.

The script copies the repository to a temporary folder, applies one
mutant, runs the fast tests that guard that code, and reports whether they
failed (good: the mutant is "killed") or passed (bad: the tests cannot see
that mistake). Not collected by pytest (the name does not start with
`test_`); `tests/test_mutants_apply.py` runs `--check` in the suite, so a
mutant that no longer applies fails CI. Run the full script after changing
the distillation step, the metrics, the optimiser or the perturbations.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Edit:
  path: str  # Relative to the repository root.
  function: str  # 'name' or 'Class.name'; the edit stays inside it.
  old: str
  new: str


@dataclasses.dataclass(frozen=True)
class Mutant:
  edits: tuple[Edit, ...]
  tests: tuple[str, ...]


def _one(path, function, old, new, *tests) -> Mutant:
  return Mutant((Edit(path, function, old, new),), tests)


STEP = "divdistill_jax/step.py"
STEP_TESTS = ("tests/test_distill_step.py",)

MUTANTS = {
    "teacher targets on clean images": _one(
        STEP, "student_train_step",
        "ensemble.apply_members(teacher_model, teacher_vars, x_kd,",
        "ensemble.apply_members(teacher_model, teacher_vars, x,",
        *STEP_TESTS),
    "TDiv-SDiv through the best-so-far BN statistics, not the current": _one(
        STEP, "student_train_step",
        '{"params": state.params, "batch_stats": state.batch_stats})',
        '{"params": state.params, "batch_stats": state.best_batch_stats})',
        *STEP_TESTS),
    "perturbed pass without the clean pass's BN statistics": _one(
        STEP, "student_train_step",
        '{"params": params, "batch_stats": batch_stats}, tile(x_kd),',
        '{"params": params, "batch_stats": state.batch_stats}, tile(x_kd),',
        *STEP_TESTS),
    "CE on perturbed logits, KD on clean": _one(
        STEP, "student_train_step",
        "clean, labels, kd_logits, targets, alpha=spec.alpha,",
        "kd_logits, labels, clean, targets, alpha=spec.alpha,",
        *STEP_TESTS),
    "alpha and 1 - alpha swapped": _one(
        STEP, "student_train_step",
        "alpha=spec.alpha,", "alpha=1 - spec.alpha,", *STEP_TESTS),
    "one ODS draw per batch although groups are set": _one(
        STEP, "perturb_options",
        "group_size=config.student.bn_group_size,", "group_size=None,",
        *STEP_TESTS,
        "tests/test_distill.py::test_step_spec_carries_the_config"),
    "Figure-1 and calibration draws ignore the BatchNorm groups": _one(
        "divdistill_jax/analysis.py", "teacher_perturbation",
        "options = step.perturb_options(config, eta)",
        "options = dataclasses.replace(step.perturb_options(config, eta), "
        "group_size=None)",
        "tests/test_train.py::"
        "test_figure1_sets_draw_per_batchnorm_group_like_training"),
    "student BatchNorm ignores student.bn_group_size": _one(
        "divdistill_jax/distill.py", "make_student_task",
        "student=Student(config, group, **merge)",
        "student=Student(config, None, **merge)",
        *STEP_TESTS),
    "fused pass with one group per pass although groups are set": _one(
        "divdistill_jax/distill.py", "make_student_task",
        "fused = Student(config, group or images // microbatches, **merge)",
        "fused = Student(config, images // microbatches, **merge)",
        *STEP_TESTS),
    "kd.clean_pass does not reach the step": _one(
        STEP, "StepSpec.from_config",
        "clean_pass=config.kd.clean_pass", "clean_pass=True", *STEP_TESTS),
    "calibration batches ignore the BatchNorm groups": _one(
        "divdistill_jax/analysis.py", "batch_size_for_groups",
        "if group_size is None or batch_size % group_size == 0:",
        "if True:",
        "tests/test_calibrate.py::"
        "test_calibration_draws_ods_per_batchnorm_group_like_training"),
    "LatentBE fast weights drawn with fast_init_std": _one(
        "divdistill_jax/student.py", "Student.__init__",
        "fast_init_std=0.0 if latent else config.student.fast_init_std",
        "fast_init_std=config.student.fast_init_std",
        "tests/test_latentbe.py::"
        "test_latentbe_fast_weights_start_at_one_whatever_the_init_std"),
    "a calibration of zero examples passes validation": _one(
        "divdistill_jax/configlib.py", "validate",
        "if config.perturb.auto_num_examples < 1:",
        "if config.perturb.auto_num_examples < 0:",
        "tests/test_configs.py::test_validate_names_the_field"),
    "partial last batch in one BatchNorm group": _one(
        "divdistill_jax/runtime.py", "partial_last_batch",
        "else last // replicas", "else last",
        "tests/test_distill_step.py::"
        "test_partial_last_batch_step_matches_reference",
        "tests/test_groups.py::"
        "test_teacher_partial_last_batch_normalises_per_replica"),
    "the last partial batch dropped although drop_remainder is False": _one(
        "divdistill_jax/data.py", "steps_per_epoch",
        "return -(-per_replica // (batch_size // replicas))",
        "return per_replica // (batch_size // replicas)",
        "tests/test_data.py"),
    "every teacher member on the same data order": _one(
        "divdistill_jax/teachers.py", "make_teacher_task",
        "stream=member,", "stream=0,",
        "tests/test_train.py::"
        "test_each_teacher_member_has_its_own_data_order"),
    "ECE bins [lo, hi)": _one(
        "divdistill_jax/metrics.py", "expected_calibration_error",
        "in_bin = (confidence > lower) & (confidence <= upper)",
        "in_bin = (confidence >= lower) & (confidence < upper)",
        "tests/test_metrics.py"),
    "ECE with equal-mass bins": _one(
        "divdistill_jax/metrics.py", "expected_calibration_error",
        "edges = np.linspace(0.0, 1.0, num_bins + 1)",
        "edges = np.quantile(confidence, np.linspace(0.0, 1.0, "
        "num_bins + 1))",
        "tests/test_metrics.py"),
    "no weight decay on BatchNorm scale and bias": Mutant((
        Edit("divdistill_jax/optim.py", "param_labels",
             '"fast" if is_fast_weight(p) else "default"',
             '"fast" if is_fast_weight(p) else ("bn" if any(getattr(k, '
             '"key", "") in ("scale", "bias") for k in p) else "default")'),
        Edit("divdistill_jax/optim.py", "make_optimizer",
             '{"default": group(learning_rate, weight_decay),',
             '{"default": group(learning_rate, weight_decay), '
             '"bn": group(learning_rate, 0.0),'),
    ), ("tests/test_optim.py", "tests/test_distill_step.py")),
    "disagreement ignores confidence_scaled": _one(
        "divdistill_jax/perturb.py", "disagreement",
        "if confidence_scaled:", "if False:",
        "tests/test_perturb.py"),
    "disagreement makes every step the full eta": _one(
        "divdistill_jax/perturb.py", "disagreement",
        "scale = to_pixels(step_size) / num_steps",
        "scale = to_pixels(step_size)", "tests/test_perturb.py"),
    "Figure-1 validation set drawn from training images": _one(
        "divdistill_jax/analysis.py", "teacher_diversity",
        'augment.to_float(splits["validation"][0][:num_examples])',
        'augment.to_float(splits["train"][0][:num_examples])',
        "tests/test_train.py::test_figure1_sets_come_from_their_splits"),
    "accumulation keeps only the last microbatch": _one(
        "divdistill_jax/accumulate.py", "mean_value_and_grad",
        "return jax.tree.map(jnp.add, total, out), None",
        "return jax.tree.map(lambda t, o: o * microbatches, total, out), "
        "None",
        "tests/test_accumulate.py"),
    "member-major merge of the tiled batch in the convolutions": Mutant((
        Edit("divdistill_jax/models/conv.py", "merge_members",
             "x = jnp.swapaxes(x, 0, 1)", "pass"),
        Edit("divdistill_jax/models/conv.py", "split_members",
             "return jnp.swapaxes(y.reshape((lead[1], lead[0], "
             "*y.shape[1:])), 0, 1)",
             "return y.reshape((*lead, *y.shape[1:]))"),
    ), ("tests/test_export.py::test_the_student_step_is_data_parallel",)),
    "kernel gradient: a row tap's phase ignored": _one(
        "divdistill_jax/models/conv.py", "_chunk_kernel_grad",
        "taps[s * q + f] = prod[:, :, q]", "taps[q + f] = prod[:, :, q]",
        "tests/test_conv.py"),
    "kernel gradient: the gradient's rows shifted the wrong way": _one(
        "divdistill_jax/models/conv.py", "_chunk_kernel_grad",
        "gp[:, shifts - 1 - q:shifts - 1 - q + rows]", "gp[:, q:q + rows]",
        "tests/test_conv.py"),
    "kernel gradient: row and column taps swapped": _one(
        "divdistill_jax/models/conv.py", "_chunk_kernel_grad",
        "return jnp.stack(taps)", "return jnp.swapaxes(jnp.stack(taps), 0, 1)",
        "tests/test_conv.py"),
    "kernel gradient: column shifts without the stride": _one(
        "divdistill_jax/models/conv.py", "_chunk_kernel_grad",
        "xp[:, :, t:t + s * (wo - 1) + 1:s]", "xp[:, :, t:t + wo]",
        "tests/test_conv.py"),
    "kernel gradient: a phase's rows without the stride": _one(
        "divdistill_jax/models/conv.py", "_chunk_kernel_grad",
        "cols[:, f:f + s * (rows - 1) + 1:s]", "cols[:, f:f + rows]",
        "tests/test_conv.py"),
    "kernel gradient keeps only the last chunk": _one(
        "divdistill_jax/models/conv.py", "kernel_grads_by_matmul",
        "return acc + update", "return 0 * acc + update",
        "tests/test_conv.py"),
    "per-member kernel gradients keep only the last chunk": _one(
        "divdistill_jax/models/conv.py", "kernel_grads_by_matmul",
        "total = jax.lax.dynamic_slice(acc,",
        "total = 0 * jax.lax.dynamic_slice(acc,", "tests/test_conv.py"),
    "kernel gradients: every member's chunks summed into the first's": _one(
        "divdistill_jax/models/conv.py", "kernel_grads_by_matmul",
        "start = (member, 0, 0, 0, 0)", "start = (0, 0, 0, 0, 0)",
        "tests/test_conv.py"),
    "BatchEnsemble conv: r's gradient from r instead of s": _one(
        "divdistill_jax/models/conv.py", "_batch_ensemble_bwd",
        'jnp.einsum("mijcd,ijcd,md->mc", grads, w32, s32)',
        'jnp.einsum("mijcd,ijcd,md->mc", grads, w32, r32[:, :1])',
        "tests/test_conv.py"),
    "BatchEnsemble conv: the fast weights' gradients by autodiff on CPU": _one(
        "divdistill_jax/models/conv.py", "_batch_ensemble_bwd",
        "cpu=from_member_grads", "cpu=autodiff", "tests/test_conv.py"),
    "CPU kernel gradient is XLA's convolution after all": _one(
        "divdistill_jax/models/conv.py", "_conv2d_bwd",
        "cpu=by_matmul", "cpu=native", "tests/test_conv.py"),
    "cpu_kernel_grad sets nothing": _one(
        "divdistill_jax/models/conv.py", "cpu_kernel_grad",
        "with _CPU_KERNEL_GRAD(how):", "with contextlib.nullcontext():",
        "tests/test_conv.py", "tests/test_benchmark.py"),
    "remat option ignored": _one(
        "divdistill_jax/models/resnet.py", "remat_block",
        'if remat == "none":', "if True:", "tests/test_accumulate.py"),
    "kept CPU memory: computations still dispatched to another thread": _one(
        "divdistill_jax/runtime.py", "keep_freed_cpu_memory",
        '"jax_cpu_enable_async_dispatch", False',
        '"jax_cpu_enable_async_dispatch", True', "tests/test_runtime.py"),
    "kept CPU memory: the heap still maps large blocks": _one(
        "divdistill_jax/runtime.py", "keep_freed_cpu_memory",
        "libc.mallopt(_M_MMAP_MAX, 0)", "libc.mallopt(_M_MMAP_MAX, 65536)",
        "tests/test_runtime.py"),
    "kept CPU memory: the heap's top still trimmed": _one(
        "divdistill_jax/runtime.py", "keep_freed_cpu_memory",
        "libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)",
        "libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)",
        "tests/test_runtime.py"),
    "setup_runtime ignores cpu_keep_freed_memory": _one(
        "divdistill_jax/runtime.py", "setup_runtime",
        "if config.cpu_keep_freed_memory:", "if True:",
        "tests/test_runtime.py"),
    "profile: idle time credited to the thunk after it": _one(
        "experiments/profile_step.py", "idle_after",
        "idle[last] += (start - end) / 1e3",
        "idle[kind] += (start - end) / 1e3", "tests/test_profile_step.py"),
    "cpu_parts: convolution totals not weighted by their counts": _one(
        "experiments/cpu_parts.py", "_with_totals",
        "n * times[", "times[", "tests/test_cpu_parts.py"),
}


class StaleMutant(ValueError):
  """An edit whose code is no longer there."""


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _pattern(text: str) -> re.Pattern:
  """`text` token by token, any whitespace (or none) between tokens."""
  return re.compile(r"\s*".join(re.escape(t) for t in _TOKEN.findall(text)))


def _function_span(source: str, dotted: str, path: str) -> tuple[int, int]:
  """Character offsets of a (possibly nested or method) def in `source`."""
  tree = ast.parse(source)
  node, found = tree, None
  for part in dotted.split("."):
    found = next((n for n in ast.walk(node) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.name == part), None)
    if found is None:
      raise StaleMutant(f"{path} has no function {dotted!r}")
    node = found
  lines = source.splitlines(keepends=True)
  start = sum(len(line) for line in lines[:found.lineno - 1])
  end = sum(len(line) for line in lines[:found.end_lineno])
  return start, end


def apply_edit(source: str, edit: Edit) -> str:
  """`source` with one edit applied.

  Raises:
    StaleMutant: the function is gone, or the pattern is not in it exactly
      once.
  """
  start, end = _function_span(source, edit.function, edit.path)
  body = source[start:end]
  matches = list(_pattern(edit.old).finditer(body))
  if len(matches) != 1:
    raise StaleMutant(
        f"{edit.path}, {edit.function}(): the pattern {edit.old!r} occurs "
        f"{len(matches)} times (expected once); update the mutant in "
        "tests/check_mutants.py")
  m = matches[0]
  return source[:start + m.start()] + edit.new + source[start + m.end():]


def mutated_sources(name: str, root: str = ROOT) -> dict[str, str]:
  """{path: mutated source} for every file a mutant edits."""
  out = {}
  for edit in MUTANTS[name].edits:
    if edit.path not in out:
      with open(os.path.join(root, edit.path)) as f:
        out[edit.path] = f.read()
    try:
      out[edit.path] = apply_edit(out[edit.path], edit)
    except StaleMutant as e:
      raise StaleMutant(f"mutant {name!r}: {e}") from None
  for path, text in out.items():
    compile(text, path, "exec")  # The mutant must still be valid Python.
  return out


def check_all() -> None:
  """Raises StaleMutant unless every mutant applies to today's code."""
  for name in MUTANTS:
    mutated_sources(name)


def run(name: str, work: str) -> bool:
  """True when the tests fail on mutant `name` (it is killed)."""
  originals = {}
  for path, text in mutated_sources(name).items():
    with open(os.path.join(work, path)) as f:
      originals[path] = f.read()
    with open(os.path.join(work, path), "w") as f:
      f.write(text)
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *MUTANTS[name].tests], cwd=work, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": work})
  finally:
    for path, text in originals.items():
      with open(os.path.join(work, path), "w") as f:
        f.write(text)
  return proc.returncode != 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=None, help="Run one mutant by name.")
  parser.add_argument("--check", action="store_true",
                      help="Only check that every mutant applies.")
  args = parser.parse_args()
  if args.check:
    check_all()
    print(f"all {len(MUTANTS)} mutants apply")
    return
  names = [args.only] if args.only else list(MUTANTS)
  survivors = []
  with tempfile.TemporaryDirectory() as tmp:
    work = os.path.join(tmp, "repo")
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(
        ".git", "workdirs", "__pycache__", "*.egg-info"))
    for name in names:
      start = time.time()
      killed = run(name, work)
      print(f"{'killed ' if killed else 'SURVIVED'} {name} "
            f"({time.time() - start:.0f} s)", flush=True)
      if not killed:
        survivors.append(name)
  if survivors:
    raise SystemExit(f"{len(survivors)} mutant(s) survived: {survivors}")
  print(f"all {len(names)} mutants killed")


if __name__ == "__main__":
  main()
