"""LatentBE (Nam et al., ICML 2022): a BatchEnsemble merged into one network.

A BatchEnsemble member m computes, in every conv and dense layer,
s_m * (W (r_m * x)), i.e. the layer with weight W * outer(r_m, s_m). After
training, the members are averaged in weight space: every layer gets
W_avg = W * outer(mean_m r_m, mean_m s_m) (the product of the averaged
factors, as the authors' code cs-giung/distill-latentbe does), BatchNorm
keeps its (shared) parameters and running statistics, and the result is
ONE plain network: the inference cost of a single member.

The classifier bias is the spec's open question: the authors' notebook keeps
b ('b'), their validation step uses mean_m s_m * b ('sb'). Only 'sb' merges a
BatchEnsemble of identical members exactly into that member, because the
member computes s * (W (r * x) + b). The distill job evaluates both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from divdistill_jax import augment, parallel, runtime
from divdistill_jax.models import conv, layers

PyTree = Any
BIAS_RULES = ("sb", "b")
_PLAIN_NAME = {"BatchEnsembleConv_": "Conv_", "BatchEnsembleDense_": "Dense_"}


def _plain_name(name: str) -> str:
  for be, plain in _PLAIN_NAME.items():
    if name.startswith(be):
      return plain + name[len(be):]
  return name


def _merge_layer(p: dict, bias_rule: str) -> dict:
  """One BatchEnsemble layer's params -> the plain layer's."""
  r, s = jnp.mean(p["fast_r"], 0), jnp.mean(p["fast_s"], 0)
  # r scales the input channels (axis -2), s the output channels (axis -1),
  # for conv kernels [kh, kw, C_in, C_out] and dense kernels [F, K] alike.
  out = {"kernel": p["kernel"] * r[:, None] * s[None, :]}
  if "bias" in p:  # Shared, added before s (LatentBE).
    out["bias"] = s * p["bias"] if bias_rule == "sb" else p["bias"]
  elif "member_bias" in p:  # Per member, added after s (NeurIPS 2021).
    out["bias"] = jnp.mean(p["member_bias"], 0)
  return out


def _merge_tree(tree: PyTree, bias_rule: str) -> PyTree:
  if not isinstance(tree, dict):
    return tree
  if "fast_r" in tree:
    return _merge_layer(tree, bias_rule)
  return {_plain_name(k): _merge_tree(v, bias_rule) for k, v in tree.items()}


def merge(variables: PyTree, bias_rule: str = "sb") -> PyTree:
  """BatchEnsemble variables -> plain-network variables (W_avg; BN reused).

  Args:
    variables: {'params', 'batch_stats'} of a BatchEnsemble network
      (`models.get_model(..., ensemble_size=M)`).
    bias_rule: 'sb' (mean_m s_m * b) or 'b' (b unchanged) for a shared
      classifier bias; a per-member bias is averaged.

  Returns:
    Variables for the same network built without `ensemble_size`.
  """
  if bias_rule not in BIAS_RULES:
    raise ValueError(f"Unknown bias_rule {bias_rule!r}; use {BIAS_RULES}.")
  return {"params": _merge_tree(dict(variables["params"]), bias_rule),
          "batch_stats": _merge_tree(dict(variables["batch_stats"]),
                                     bias_rule)}


def check_structure(merged: PyTree, plain_model, sample: jax.Array) -> None:
  """Raises a ValueError if merged variables do not fit the plain network."""
  want = jax.eval_shape(lambda: plain_model.init(jax.random.key(0), sample,
                                                 train=False))

  def shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), dict(tree))

  if shapes(merged) != shapes(want):
    raise ValueError("The merged BatchEnsemble does not match the plain "
                     "network (different architecture?).")


def reestimate_batch_stats(plain_model, variables: PyTree, images: np.ndarray,
                           batch_size: int = 500) -> PyTree:
  """Recomputes the merged network's BatchNorm statistics on `images`.

  Each layer's statistics are the example-weighted mean over batches of the
  training-mode batch statistics (mean, unbiased variance), the inputs of
  every layer normalised with batch statistics as in training.

  Args:
    plain_model: the plain network.
    variables: merged variables.
    images: float images [N, H, W, C] in [0, 1].
    batch_size: images per forward pass.

  Returns:
    Variables with the re-estimated `batch_stats`.
  """
  keep = layers.BatchNorm.momentum

  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def batch_stats(params, x):
    # From zero running statistics one update leaves (1 - momentum) x the
    # batch's statistics.
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, new = plain_model.apply({"params": params, "batch_stats": zeros}, x,
                               train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda a: a / (1 - keep), new["batch_stats"])

  total, count = None, 0
  for start in range(0, len(images), batch_size):
    x = jnp.asarray(images[start:start + batch_size], jnp.float32)
    stats = jax.tree.map(lambda a, n=len(x): a * n,
                         batch_stats(variables["params"], x))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += len(x)
  return {"params": variables["params"],
          "batch_stats": jax.tree.map(lambda a: a / count, total)}


def optimizer_fields(fields: dict, ensemble_size: int) -> dict:
  """LatentBE's fast group, from the student's optimiser fields.

  One LR for every parameter; the fast weights are decayed toward 1 with
  wd / M and their gradients are scaled by M, so their update direction is
  M g + wd (p - 1) (the authors' training script in
  cs-giung/distill-latentbe).

  Args:
    fields: `config.student.optim` as a dict.
    ensemble_size: M.

  Returns:
    A new dict for `optim.make_optimizer`.
  """
  return {**fields, "fast_learning_rate": fields["learning_rate"],
          "fast_weight_decay": fields["weight_decay"] / ensemble_size,
          "fast_decay_target": 1.0,
          "fast_grad_scale": float(ensemble_size)}


def merged_predictions(config: ml_collections.ConfigDict, plain_model,
                       variables, mesh, *, splits: dict) -> dict:
  """Predictions of the merged LatentBE network: one plain network.

  Args:
    config: the student's config (eval batch size, BN re-estimation).
    plain_model: the plain network the students merge into.
    variables: the selected BatchEnsemble variables.
    mesh: the device mesh.
    splits: the data splits (uint8 images).

  Returns:
    Arrays `merged_<rule>_{validation,test}_probs` [1, N, K] for the bias
    rules 'sb' and 'b', and `merged_sb_bn_*` when
    `student.merge_bn_reestimate` (statistics re-estimated on the training
    images).
  """
  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def predict(v, images):
    logits = plain_model.apply(v, augment.to_float(images), train=False)
    return jax.nn.softmax(logits, -1)[None]

  variables = jax.device_get(variables)
  sample = jnp.zeros((1, *splits["train"][0].shape[1:]), jnp.float32)
  merged = {rule: merge(variables, rule) for rule in BIAS_RULES}
  check_structure(merged["sb"], plain_model, sample)
  if config.student.merge_bn_reestimate:
    merged["sb_bn"] = reestimate_batch_stats(
        plain_model, merged["sb"], augment.to_float(splits["train"][0]),
        config.eval.batch_size)
  out = {}
  for name, v in merged.items():
    v = parallel.replicate(v, mesh)
    for split in ("validation", "test"):
      out[f"merged_{name}_{split}_probs"] = runtime.predict_split(
          predict, v, splits[split][0], mesh, config.eval.batch_size)
  return out


def merged_predict_fn(plain_model, bias_rule: str = "sb"):
  """Jitted probabilities of the merged network of BatchEnsemble variables.

  Returns:
    `(BatchEnsemble variables, uint8 images [B, H, W, C]) -> [1, B, K]`:
    the follow-up's validation of a LatentBE student (rule 'sb', as the
    authors' training script merges).
  """
  @functools.partial(jax.jit, compiler_options=conv.compiler_options())
  def predict(variables, images):
    logits = plain_model.apply(merge(variables, bias_rule),
                               augment.to_float(images), train=False)
    return jax.nn.softmax(logits, -1)[None]
  return predict
