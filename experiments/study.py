"""Where does the paper's effect appear on a CPU? Budget x eta x seeds study.

  python experiments/study.py --workdir=W --seeds=0,1,2 --budgets=30 \
      --etas=1,4,auto --methods=kd,gaussian,ods,confods,disagreement
  python experiments/study.py --workdir=W --collect_only --out=DIR

Every cell is the quick-start family (Fashion-MNIST, DE-4 -> BE-4,
`configs/quickstart.py`) with one thing changed: the seed (teachers AND
students re-seeded), the training-set size, the network, the student
budget (epochs; the schedule keeps the quick start's shape: 2 warm-up
epochs, a plateau to half the budget, then linear decay), the step size.
Teachers are trained once per (network, size, seed) and shared by every
student of that cell. Each finished student leaves `row.json` (the table's
columns plus diagnostics), so an interrupted study resumes where it stopped
and a wider sweep reuses what exists.

Diagnostics (on the first 500 training images, T = 1):
  train_acc           the student ensemble's training accuracy
  kl_teacher_clean    mean_m KL(teacher_m || student_m) on clean images
  kl_teacher_pert     the same on images perturbed like during training
  student_kl_pert     the student members' pairwise KL on those images
  teacher_kl_pert     the teachers' pairwise KL on those images
  confidence          mean max probability of the student on test
  agreement           fraction of test images where all members agree

`--clip_report` measures the clipping hypothesis: the fraction of pixels
at 0 and 1, and how much of an ODS / Gaussian step of eta survives
clipping (`analysis.step_kept`), on each cell's teachers.

`--collect_only` writes `summary.md` (mean +- standard error over seeds for
every cell, and the difference to KD with its standard error) and plots
of NLL, ACC and member KL vs eta and vs budget.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from divdistill_jax import (analysis, augment, calibrate, checkpointing,
                            configlib, distill, ensemble, fileio, metrics,
                            perturb, runtime, step, teachers)
from divdistill_jax.student import Student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
DIAGNOSTIC_IMAGES = 500
BASE_MODEL, BASE_SIZE = "resnet8_w8", 500  # The quick start's cell.


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def cell_config(*, seed: int, train_size: int, model: str, epochs: int = 12,
                method: str = "kd", eta="auto", job: str = "distill"):
  """The quick-start config with the study's fields set."""
  config = configlib.from_file(os.path.join(ROOT, "configs", "quickstart.py"),
                               "teachers" if job == "teachers" else method)
  config.unlock()
  config.seed = seed
  config.data.train_size = train_size
  config.model.name = model
  config.student.epochs = epochs
  config.student.optim.milestones = (3, max(3, epochs // 2), epochs)
  config.student.eval_every_epochs = max(1, epochs // 4)
  config.perturb.step_size = eta
  config.logging.progress_bar = False
  config.lock()
  configlib.validate(config)
  return config


def teachers_dir(root: str, model: str, n: int, seed: int) -> str:
  return os.path.join(root, f"{model}_n{n}_s{seed}", "teachers")


def student_dir(root: str, model: str, n: int, seed: int, epochs: int,
                method: str, eta, tag: str = "") -> str:
  name = "kd" if method == "kd" else f"{method}_eta{eta}"
  budget = f"e{epochs}" + (f"_{tag}" if tag else "")
  return os.path.join(root, f"{model}_n{n}_s{seed}", budget, name)


def _apply_overrides(config, overrides: list[str]) -> None:
  for item in overrides:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    target = config
    for p in parents:
      target = target[p]
    target[leaf] = type(target[leaf])(value)


def diagnostics(config, run_dir: str, teacher_dir: str, splits: dict,
                step_size: float) -> dict:
  """The student's fit to its teachers on clean and perturbed train images."""
  teacher_model, teacher_vars, _ = teachers.load_teachers(config,
                                                           teacher_dir)
  student = Student(config)
  variables = checkpointing.load_variables(os.path.join(run_dir, "best"))
  images, labels = splits["train"]
  x = augment.to_float(images[:DIAGNOSTIC_IMAGES])
  labels = labels[:DIAGNOSTIC_IMAGES]
  options = step.perturb_options(config, step_size)

  @jax.jit
  def probs(x, key):
    def student_fn(v, inputs):  # tdiv_sdiv perturbs through the student.
      return student.apply(v, student.tile(inputs), train=False)[0]

    context = perturb.Context(ensemble.member_fn(teacher_model), teacher_vars,
                              student_fn, variables)
    x_pert = perturb.apply(config.perturb.method, key, x, context, options)
    out = []
    for inputs in (x, x_pert):
      t = jax.nn.softmax(ensemble.apply_members(
          teacher_model, teacher_vars, inputs), -1)
      s, _ = student.apply(variables, student.tile(inputs), train=False)
      out += [t, jax.nn.softmax(s, -1)]
    return out

  t_clean, s_clean, t_pert, s_pert = (np.asarray(a, np.float64) for a in
                                      probs(x, jax.random.key(config.seed)))

  def kl_to_teacher(t, s):
    return float((t * (np.log(t + 1e-12) - np.log(s + 1e-12))).sum(-1).mean())

  with np.load(os.path.join(run_dir, "predictions.npz")) as f:
    test = f["test_probs"]
  top = test.argmax(-1)
  return {
      "train_acc": 100.0 * metrics.accuracy(s_clean.mean(0), labels),
      "kl_teacher_clean": kl_to_teacher(t_clean, s_clean),
      "kl_teacher_pert": kl_to_teacher(t_pert, s_pert),
      "student_kl_pert": metrics.pairwise_kl(s_pert),
      "teacher_kl_pert": metrics.pairwise_kl(t_pert),
      "confidence": float(test.mean(0).max(-1).mean()),
      "agreement": float((top == top[:1]).all(0).mean()),
  }


def run_cell(root: str, *, seed: int, n: int, model: str, epochs: int,
             method: str, eta, overrides: tuple[str, ...] = (),
             tag: str = "") -> dict:
  """Trains (or reuses) teachers and one student; returns its row."""
  out_dir = student_dir(root, model, n, seed, epochs, method, eta, tag)
  row_path = os.path.join(out_dir, "row.json")
  if os.path.exists(row_path):
    with open(row_path) as f:
      return json.load(f)
  t_dir = teachers_dir(root, model, n, seed)
  if not os.path.exists(os.path.join(t_dir, "done.json")):
    teachers.train_teachers(cell_config(seed=seed, train_size=n, model=model,
                                        job="teachers"), t_dir)
  config = cell_config(seed=seed, train_size=n, model=model, epochs=epochs,
                       method=method, eta=eta if method != "kd" else 1.0)
  config.unlock()
  config.teacher.workdir = t_dir
  _apply_overrides(config, list(overrides))
  config.lock()
  configlib.validate(config)
  start = time.time()
  summary = distill.distill(config, out_dir)
  splits = runtime.load_splits(config)
  with np.load(os.path.join(out_dir, "predictions.npz")) as f:
    row = metrics.table_row(f["validation_probs"], f["validation_labels"],
                            f["test_probs"], f["test_labels"])
    for rule in ("sb", "b", "sb_bn"):  # LatentBE: the merged network.
      if f"merged_{rule}_test_probs" in f.files:
        merged = metrics.table_row(
            f[f"merged_{rule}_validation_probs"], f["validation_labels"],
            f[f"merged_{rule}_test_probs"], f["test_labels"])
        row.update({f"merged_{rule}_{k}": merged[k]
                    for k in ("acc", "nll", "ece", "cnll")})
  step = summary.get("step_size") or 0.0
  row.update(diagnostics(config, out_dir, t_dir, splits, step))
  with np.load(os.path.join(t_dir, "predictions.npz")) as f:
    for k in (1, config.teacher.ensemble_size):
      de = metrics.table_row(f["validation_probs"][:k], f["validation_labels"],
                             f["test_probs"][:k], f["test_labels"])
      row[f"de{k}_acc"], row[f"de{k}_nll"] = de["acc"], de["nll"]
      row[f"de{k}_kl"] = de["kl"]
  calib = calibrate.load(t_dir)
  if calib is not None:
    row["teacher_kl_validation"] = calib["validation_kl"]
    row["teacher_kl_train"] = calib["train_kl"]
  row.update(seed=seed, train_size=n, model=model, epochs=epochs, tag=tag,
             overrides=list(overrides),
             method=method, eta=str(eta) if method != "kd" else "-",
             step_size=summary.get("step_size"),
             steps=summary["steps"], seconds=time.time() - start)
  fileio.write_json(row_path, row, indent=2)
  return row


# ---------------------------------------------------------------- summary

SUMMARY_COLUMNS = (("acc", "ACC", 2), ("nll", "NLL", 3), ("ece", "ECE", 3),
                   ("merged_sb_acc", "merged ACC", 2),
                   ("merged_sb_nll", "merged NLL", 3),
                   ("merged_b_nll", "merged NLL (bias b)", 3),
                   ("merged_sb_bn_nll", "merged NLL (BN re-est.)", 3),
                   ("cnll", "cNLL", 3), ("kl", "member KL", 3),
                   ("train_acc", "train ACC", 1),
                   ("kl_teacher_clean", "KL(T||S) train", 3),
                   ("kl_teacher_pert", "KL(T||S) pert.", 3),
                   ("student_kl_pert", "S KL pert.", 3),
                   ("teacher_kl_pert", "T KL pert.", 3),
                   ("step_size", "eta used", 2))

# Paired differences to KD (same seed, same teachers); a column a row
# lacks (the merged network of a BE student) is left out of the pairs.
PAIRED_COLUMNS = (("nll", "NLL"), ("cnll", "cNLL"), ("ece", "ECE"),
                  ("kl", "KL"), ("merged_sb_nll", "merged NLL"))


def load_rows(root: str) -> list[dict]:
  rows = []
  for dirpath, _, files in os.walk(root):
    if "row.json" in files:
      with open(os.path.join(dirpath, "row.json")) as f:
        rows.append(json.load(f))
  return rows


def _mean_se(values) -> tuple[float, float]:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return float("nan"), float("nan")
  se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
  return float(v.mean()), float(se)


def _cell(mean: float, se: float, digits: int) -> str:
  if np.isnan(mean):
    return "-"
  return f"{mean:.{digits}f}" + ("" if np.isnan(se) else
                                 f" ± {se:.{digits}f}")


def summarise(rows: list[dict]) -> str:
  """Markdown: one table per (model, size, budget), seeds aggregated."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["model"], r["train_size"], r["epochs"],
                       r.get("tag", "")), []).append(r)
  lines = []
  for (model, n, epochs, tag), group in sorted(groups.items()):
    seeds = sorted({r["seed"] for r in group})
    de1 = _mean_se([r["de1_acc"] for r in group if r["method"] == "kd"])
    de4n = _mean_se([r["de4_nll"] for r in group if r["method"] == "kd"])
    de4k = _mean_se([r["de4_kl"] for r in group if r["method"] == "kd"])
    extra = (f", {', '.join(group[0].get('overrides', []))}" if tag
             else "")
    lines += [f"### {model}, {n} training images, {epochs} student epochs "
              f"({group[0]['steps']} steps){extra}, seeds {seeds}", "",
              f"Teachers (mean over the seeds with a KD row): DE-1 ACC "
              f"{_cell(*de1, 2)}, DE-4 NLL {_cell(*de4n, 3)}, DE-4 member "
              f"KL {_cell(*de4k, 3)}.", ""]
    lines.append("| method | eta | n | " + " | ".join(
        c[1] for c in SUMMARY_COLUMNS) + " | " + " | ".join(
            f"d{label} vs KD" for _, label in PAIRED_COLUMNS) + " |")
    lines.append("|---|---|---:|" + "---:|" * (len(SUMMARY_COLUMNS)
                                                 + len(PAIRED_COLUMNS)))
    kd = {r["seed"]: r for r in group if r["method"] == "kd"}
    cells: dict = {}
    for r in group:
      cells.setdefault((r["method"], r["eta"]), []).append(r)
    order = {m: i for i, m in enumerate(configlib.METHODS)}
    for (method, eta), rs in sorted(
        cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
      out = [method, eta, str(len(rs))]
      for key, _, digits in SUMMARY_COLUMNS:
        out.append(_cell(*_mean_se([r.get(key) for r in rs]), digits))
      # Paired over seeds: same teachers, same data.
      for key, _ in PAIRED_COLUMNS:
        diffs = [r[key] - kd[r["seed"]][key] for r in rs
                 if key in r and key in kd.get(r["seed"], {})]
        out.append("-" if method == "kd" else _cell(*_mean_se(diffs), 3))
      lines.append("| " + " | ".join(out) + " |")
    lines.append("")
  return "\n".join(lines)


def plots(rows: list[dict], out_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = (("nll", "test NLL"), ("acc", "test ACC (%)"),
          ("kl", "student member KL (test)"))
  # The eta and budget plots: the base recipe (quick-start network and
  # size); the other sizes and widths are in the tables.
  base = [r for r in rows if r["model"] == BASE_MODEL
          and r["train_size"] == BASE_SIZE]
  for epochs, tag in sorted({(r["epochs"], r.get("tag", "")) for r in base}):
    sub = [r for r in base if r["epochs"] == epochs
           and r.get("tag", "") == tag]
    kd = {r["seed"]: r for r in sub if r["method"] == "kd"}
    if not kd or all(r["method"] == "kd" for r in sub):
      continue
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, keys):
      ax.axhline(0.0, color="k", ls="--", lw=1, label="KD")
      for i, method in enumerate(configlib.METHODS[1:]):
        # Paired with KD of the same seed: the seed sets of the cells differ.
        pts: dict = {}
        for r in sub:
          if r["method"] == method and r["seed"] in kd:
            pts.setdefault(r["eta"], []).append(
                (r["step_size"], r[key] - kd[r["seed"]][key]))
        color = f"C{i}"
        for j, (eta, vals) in enumerate(sorted(pts.items())):
          m, se = _mean_se([d for _, d in vals])
          x = float(np.mean([e for e, _ in vals]))
          ax.errorbar([x], [m], yerr=[0 if np.isnan(se) else se],
                      marker="*" if eta == "auto" else "o",
                      ms=9 if eta == "auto" else 4, capsize=2, color=color,
                      label=method if j == 0 else None)
        fixed = sorted((float(e), _mean_se([d for _, d in v])[0])
                       for e, v in pts.items() if e != "auto")
        if fixed:
          ax.plot(*zip(*fixed), color=color, lw=1)
      ax.set_xscale("log")
      ax.set(xlabel="eta (1/255 units; star = auto)",
             ylabel=f"{label} - KD")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{epochs} student epochs{', ' + tag if tag else ''}: "
                 "difference to KD of the same seed (mean ± s.e.)")
    fig.tight_layout()
    name = f"study_vs_eta_e{epochs}{'_' + tag if tag else ''}.png"
    fig.savefig(os.path.join(out_dir, name), dpi=90)
    plt.close(fig)
  rows = [r for r in base if not r.get("tag")]
  budgets = sorted({r["epochs"] for r in rows})
  if len(budgets) > 1:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, keys):
      for method in configlib.METHODS:
        for eta in sorted({r["eta"] for r in rows if r["method"] == method}):
          pts = [(_mean_se([r[key] for r in rows if r["method"] == method
                            and r["eta"] == eta and r["epochs"] == e]), e)
                 for e in budgets]
          pts = [(m, e) for m, e in pts if not np.isnan(m[0])]
          if len(pts) > 1:
            ax.errorbar([e for _, e in pts], [m[0] for m, _ in pts],
                        yerr=[0 if np.isnan(m[1]) else m[1] for m, _ in pts],
                        marker="o", ms=3, capsize=2,
                        label=f"{method} {eta}" if method != "kd" else "KD")
      ax.set(xlabel="student epochs", ylabel=label)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "study_vs_budget.png"), dpi=90)
    plt.close(fig)


def clip_report(root: str, seeds, sizes, models, etas) -> str:
  """Markdown: pixels at the range ends, and the step kept after clipping."""
  lines = ["| model | n | seed | pixels at 0 | pixels at 1 | method | eta | "
           "step kept (mean) | step kept (min) |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
  for model in models:
    for n in sizes:
      for seed in seeds:
        t_dir = teachers_dir(root, model, n, seed)
        if not os.path.exists(os.path.join(t_dir, "done.json")):
          continue
        config = cell_config(seed=seed, train_size=n, model=model,
                             method="ods", eta=1.0)
        teacher_model, teacher_vars, _ = teachers.load_teachers(config,
                                                                 t_dir)
        images = runtime.load_splits(config)["train"][0][:DIAGNOSTIC_IMAGES]
        x = np.asarray(augment.to_float(images))
        calib = calibrate.load(t_dir) or {"methods": {}}
        context = perturb.Context(ensemble.member_fn(teacher_model),
                                  teacher_vars)

        for method in ("gaussian", "ods"):
          for eta in etas:
            if eta == "auto":
              if method not in calib["methods"]:
                continue
              value = calib["methods"][method]["step_size"]
            else:
              value = float(eta)
            x_pert = perturb.apply(method, jax.random.key(seed), x, context,
                                   step.perturb_options(config, value))
            kept = analysis.step_kept(x, np.asarray(x_pert), value)
            lines.append(
                f"| {model} | {n} | {seed} | {100 * (x == 0).mean():.1f} % | "
                f"{100 * (x == 1).mean():.1f} % | {method} | "
                f"{value:.2f}{' (auto)' if eta == 'auto' else ''} | "
                f"{kept.mean():.3f} | {kept.min():.3f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  root = FLAGS.workdir
  if FLAGS.clip_report:
    text = clip_report(root, list(map(int, _split(FLAGS.seeds))),
                       list(map(int, _split(FLAGS.train_sizes))),
                       _split(FLAGS.models), _split(FLAGS.etas))
    print(text)
    if FLAGS.out:
      os.makedirs(FLAGS.out, exist_ok=True)
      fileio.write_text(os.path.join(FLAGS.out, "clip_report.md"),
                        text + "\n")
    return
  if not FLAGS.collect_only:
    start = time.time()
    for seed in map(int, _split(FLAGS.seeds)):
      for n in map(int, _split(FLAGS.train_sizes)):
        for model in _split(FLAGS.models):
          for epochs in map(int, _split(FLAGS.budgets)):
            for method in _split(FLAGS.methods):
              etas = ["-"] if method == "kd" else _split(FLAGS.etas)
              for eta in etas:
                value = eta if eta in ("auto", "-") else float(eta)
                row = run_cell(root, seed=seed, n=n, model=model,
                               epochs=epochs, method=method, eta=value,
                               overrides=tuple(FLAGS.student_override),
                               tag=FLAGS.tag)
                print(f"study: seed {seed} n {n} {model} e{epochs} {method} "
                      f"eta {eta}: ACC {row['acc']:.2f} NLL {row['nll']:.3f}"
                      f" KL {row['kl']:.3f} ({time.time() - start:.0f} s "
                      "since start)", flush=True)
  rows = load_rows(root)
  if not rows:
    raise SystemExit(f"study: no finished rows (row.json) under {root!r}; "
                     "nothing to summarise.")
  text = summarise(rows)
  print(text)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    fileio.write_text(os.path.join(FLAGS.out, "summary.md"), text + "\n")
    plots(rows, FLAGS.out)


def define_flags() -> None:
  """Defines the command's flags.

  Only when run as a command: importing this module (the tests do) must
  not define a second --workdir next to divdistill_jax.main's.
  """
  flags.DEFINE_string("workdir", None, "Root of the study.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
  flags.DEFINE_string("train_sizes", "500", "Training-set sizes.")
  flags.DEFINE_string("models", "resnet8_w8", "Networks (teachers = students).")
  flags.DEFINE_string("budgets", "30", "Student epochs.")
  flags.DEFINE_string("etas", "1,4,auto", "Step sizes (1/255 units) or auto.")
  flags.DEFINE_string("methods", ",".join(configlib.PIPELINE_METHODS),
                      "Methods.")
  flags.DEFINE_bool("collect_only", False, "Only summarise finished rows.")
  flags.DEFINE_string("out", None, "Folder for summary.md and plots.")
  flags.DEFINE_multi_string(
      "student_override", [], "KEY=VALUE set on the students' config, e.g. "
      "student.optim.learning_rate=0.1; the cells go to e<epochs>_<tag>.")
  flags.DEFINE_string("tag", "", "Names the student override in the folder.")
  flags.DEFINE_bool("clip_report", False,
                    "Only measure how much of an ODS / Gaussian step survives "
                    "clipping to [0, 1], on each (model, size, seed)'s "
                    "teachers at --etas; writes clip_report.md to --out.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
