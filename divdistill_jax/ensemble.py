"""Deep ensembles as one pytree: member variables stacked on a leading axis.

Two execution strategies give identical results:
  'vmap'   : `jax.vmap` over the stacked variables (one batched program).
  'unroll' : a Python loop over members inside jit (M separate convs). XLA on
             CPU runs batched-kernel convs slowly, so this is often faster
             there; `experiments/benchmark.py` measures both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
STRATEGIES = ("vmap", "unroll")


def num_members(stacked: PyTree) -> int:
  """M, the length of the leading axis of a stacked pytree."""
  return jax.tree.leaves(stacked)[0].shape[0]


def select_member(stacked: PyTree, index) -> PyTree:
  """Member `index` (int or traced int scalar) of a stacked pytree."""
  return jax.tree.map(lambda x: x[index], stacked)


def stack_members(members: list[PyTree]) -> PyTree:
  """[tree_0, ..., tree_{M-1}] -> one tree with a leading member axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def map_members(fn: Callable[..., Any], stacked: PyTree, *args,
                strategy: str = "vmap") -> Any:
  """`fn(member_m, *args_m)` for every member, outputs stacked on axis 0.

  Args:
    fn: function of one member's pytree and per-member arguments.
    stacked: pytree with leading member axis M.
    *args: pytrees with leading axis M (member m gets slice m).
    strategy: 'vmap' or 'unroll'.

  Returns:
    fn's outputs stacked on a new leading axis M.
  """
  if strategy == "vmap":
    return jax.vmap(fn)(stacked, *args)
  if strategy == "unroll":
    outs = [fn(select_member(stacked, m), *(select_member(a, m) for a in args))
            for m in range(num_members(stacked))]
    return stack_members(outs)
  raise ValueError(f"Unknown ensemble strategy {strategy!r}; use {STRATEGIES}.")


def init_members(model: nn.Module, key: jax.Array, num_members: int,
                 sample_input: jax.Array) -> PyTree:
  """Initialises M members with independent keys; variables stacked.

  Args:
    model: a plain network (input [B, H, W, C]).
    key: PRNG key, split into M member keys.
    num_members: M.
    sample_input: float [B, H, W, C] example input (values unused).

  Returns:
    Variables dict whose leaves have a leading member axis M.
  """
  keys = jax.random.split(key, num_members)
  return jax.vmap(lambda k: model.init(k, sample_input, train=False))(keys)


def apply_members(model: nn.Module, variables: PyTree, x: jax.Array, *,
                  strategy: str = "vmap") -> jax.Array:
  """Eval-mode logits of every member.

  Args:
    model: the plain network.
    variables: stacked member variables (leading axis M).
    x: float images [B, H, W, C] shared by all members, or [M, B, H, W, C]
      with one batch per member.

  Returns:
    Logits [M, B, K].
  """
  m = num_members(variables)
  if x.ndim == 4:
    x = jnp.broadcast_to(x, (m, *x.shape))
  elif x.shape[0] != m:
    raise ValueError(
        f"Inputs of shape {x.shape} do not match the {m} ensemble members."
    )
  return map_members(lambda v, xi: model.apply(v, xi, train=False), variables,
                     x, strategy=strategy)


def member_fn(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
  """`(one member's variables, x [B, H, W, C]) -> logits [B, K]`, eval mode.

  The form a perturbation takes its teachers in (perturb.Context).
  """
  def logits(variables, x):
    return model.apply(variables, x, train=False)
  return logits


def probs_fn(model: nn.Module, strategy: str = "vmap"):
  """Jitted eval-mode member probabilities of float images.

  Returns:
    `(stacked variables, x float [B, H, W, C]) -> probs [M, B, K]`.
  """
  @jax.jit
  def probs(variables, x):
    return jax.nn.softmax(apply_members(model, variables, x,
                                        strategy=strategy), -1)
  return probs


def mean_probs(logits: jax.Array) -> jax.Array:
  """Ensemble predictive: mean over members of softmax, [M, B, K] -> [B, K]."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(0)
