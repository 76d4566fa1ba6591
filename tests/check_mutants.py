"""Applies known wrong versions of the code one at a time; each must fail.

  python tests/check_mutants.py [--only NAME]

Each mutant is one small edit that a reviewer could make by mistake (a
swapped argument, a wrong input, a dropped option). The script copies the
repository to a temporary folder, applies one edit, runs the fast tests that
guard that code, and reports whether they failed (good: the mutant is
"killed") or passed (bad: the tests cannot see that mistake). Not collected
by pytest (the name does not start with `test_`); run it after changing the
distillation step, the metrics, the optimiser or the perturbations.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, old text, new text, tests that must catch it).
MUTANTS = {
    "teacher targets on clean images": (
        "divdistill_jax/distill.py",
        "teacher_logits = ensemble.apply_members(teacher_model, teacher_vars, "
        "x_kd,",
        "teacher_logits = ensemble.apply_members(teacher_model, teacher_vars, "
        "x,",
        ["tests/test_distill_step.py"]),
    "TDiv-SDiv through the best-so-far BN statistics, not the current": (
        "divdistill_jax/distill.py",
        '      {"params": state.params, "batch_stats": '
        'state.batch_stats})',
        '      {"params": state.params, "batch_stats": '
        'state.best_batch_stats})',
        ["tests/test_distill_step.py"]),
    "perturbed pass without the clean pass's BN statistics": (
        "divdistill_jax/distill.py",
        '{"params": params, "batch_stats": batch_stats}, tile(x_kd),',
        '{"params": params, "batch_stats": state.batch_stats}, tile(x_kd),',
        ["tests/test_distill_step.py"]),
    "CE on perturbed logits, KD on clean": (
        "divdistill_jax/distill.py",
        "clean, labels, kd_logits, targets, alpha=spec.alpha,",
        "kd_logits, labels, clean, targets, alpha=spec.alpha,",
        ["tests/test_distill_step.py"]),
    "alpha and 1 - alpha swapped": (
        "divdistill_jax/distill.py",
        "clean, labels, kd_logits, targets, alpha=spec.alpha,",
        "clean, labels, kd_logits, targets, alpha=1 - spec.alpha,",
        ["tests/test_distill_step.py"]),
    "one ODS draw per batch although groups are set": (
        "divdistill_jax/distill.py",
        "group_size=config.student.bn_group_size,",
        "group_size=None,",
        ["tests/test_distill_step.py",
         "tests/test_distill.py::test_step_spec_carries_the_config"]),
    "every teacher member on the same data order": (
        "divdistill_jax/teachers.py",
        "stream=member) for member in range(m)])",
        "stream=0) for member in range(m)])",
        ["tests/test_train.py::test_each_teacher_member_has_its_own_data_order"]),
    "ECE bins [lo, hi)": (
        "divdistill_jax/metrics.py",
        "in_bin = (confidence > lower) & (confidence <= upper)",
        "in_bin = (confidence >= lower) & (confidence < upper)",
        ["tests/test_metrics.py"]),
    "ECE with equal-mass bins": (
        "divdistill_jax/metrics.py",
        "edges = np.linspace(0.0, 1.0, num_bins + 1)",
        "edges = np.quantile(confidence, np.linspace(0.0, 1.0, num_bins + 1))",
        ["tests/test_metrics.py"]),
    "no weight decay on BatchNorm scale and bias": (
        "divdistill_jax/optim.py",
        'lambda p, _: "fast" if is_fast_weight(p) else "default", params)',
        'lambda p, _: "fast" if is_fast_weight(p) else ("bn" if any('
        'getattr(k, "key", "") in ("scale", "bias") for k in p) else '
        '"default"), params)',
        ["tests/test_optim.py", "tests/test_distill_step.py"]),
    "disagreement ignores confidence_scaled": (
        "divdistill_jax/perturb.py",
        "  if confidence_scaled:\n    p_bar",
        "  if False:\n    p_bar",
        ["tests/test_perturb.py"]),
    "disagreement makes every step the full eta": (
        "divdistill_jax/perturb.py",
        "scale = step_size / 255.0 / num_steps\n  if confidence_scaled:",
        "scale = step_size / 255.0\n  if confidence_scaled:",
        ["tests/test_perturb.py"]),
    "Figure-1 validation set drawn from training images": (
        "divdistill_jax/analysis.py",
        '"validation": (splits["validation"][0][:num_examples], None, None)',
        '"validation": (splits["train"][0][:num_examples], None, None)',
        ["tests/test_train.py::test_figure1_sets_come_from_their_splits"]),
}


def _patch_optimizer_groups(text: str) -> str:
  """The BN mutant also needs a third optimiser group without decay."""
  return text.replace(
      '"fast": group(fast_learning_rate, fast_weight_decay)}',
      '"fast": group(fast_learning_rate, fast_weight_decay),\n'
      '       "bn": group(learning_rate, 0.0)}')


def run(name: str, work: str) -> bool:
  """True when the tests fail on mutant `name` (it is killed)."""
  path, old, new, tests = MUTANTS[name]
  target = os.path.join(work, path)
  with open(os.path.join(ROOT, path)) as f:
    original = f.read()
  if original.count(old) != 1:
    raise SystemExit(f"{name}: the text to replace occurs "
                     f"{original.count(old)} times in {path}; update it.")
  mutated = original.replace(old, new)
  if name.startswith("no weight decay"):
    mutated = _patch_optimizer_groups(mutated)
  with open(target, "w") as f:
    f.write(mutated)
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *tests], cwd=work, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": work})
  finally:
    with open(target, "w") as f:
      f.write(original)
  return proc.returncode != 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=None, help="Run one mutant by name.")
  args = parser.parse_args()
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
