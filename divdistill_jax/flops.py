"""Analytic FLOP counts of convolutions and matmuls in a traced function.

Walks the jaxpr (into jit, custom-derivative, remat, scan and cond bodies)
and counts 2 x multiply-accumulates of every `conv_general_dilated` and
`dot_general`. Everything else (elementwise ops, reductions, BatchNorm) is
left out: on accelerators it is memory-bound, and the usual "model FLOPs"
count it the same way. A transposed convolution (an input gradient of a
strided conv, written with `lhs_dilation`) is counted without the inserted
zeros, so the backward pass of a conv costs exactly twice its forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend import core


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  # Each output sums over the rhs window and its input features:
  # rhs_spec = (out feature dim, in feature dim, *spatial dims), and the in
  # feature size is already per group. With batch groups (vmapped kernel
  # gradients) the output batch size is already divided by the groups.
  macs_per_output = math.prod(rhs.shape) / rhs.shape[dn.rhs_spec[0]]
  zeros = math.prod(eqn.params.get("lhs_dilation") or (1,))
  return 2.0 * math.prod(out.shape) * macs_per_output / zeros


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _sub_jaxprs(eqn):
  """(jaxpr, multiplicity) pairs of the sub-computations of `eqn`."""
  name = eqn.primitive.name
  if name == "scan":
    return [(eqn.params["jaxpr"], eqn.params["length"])]
  if name == "cond":
    # The most expensive branch: an upper bound.
    return [(max(eqn.params["branches"], key=count_jaxpr), 1)]
  if name == "while":
    raise NotImplementedError(
        "while loops have no static trip count; use scan / fori_loop with "
        "static bounds.")
  subs = []
  for value in eqn.params.values():
    if isinstance(value, (core.Jaxpr, core.ClosedJaxpr)):
      subs.append((value, 1))
  return subs


def count_jaxpr(jaxpr) -> float:
  """FLOPs of the convs and matmuls of a (Closed)Jaxpr."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    else:
      for sub, times in _sub_jaxprs(eqn):
        total += times * count_jaxpr(sub)
  return total


def count(fn: Callable, *args, **kwargs) -> float:
  """FLOPs of the convs and matmuls of `fn(*args, **kwargs)`.

  Arguments may be arrays or `jax.ShapeDtypeStruct`s; nothing is computed.
  A jitted `fn` is traced as the top-level function: JAX refuses to trace
  one with `compiler_options` (the steps on a CPU) inside another trace.
  """
  if hasattr(fn, "trace"):
    return count_jaxpr(fn.trace(*args, **kwargs).jaxpr)
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
