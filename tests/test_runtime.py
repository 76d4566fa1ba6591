"""The process settings of `runtime`: host memory kept between CPU steps."""

import json
import os
import resource
import subprocess
import sys

import pytest
from conftest import ROOT, load_config, xla_flags

from divdistill_jax import runtime

# A child process: one jitted program with 128 MiB of temporaries (the
# flipped array, kept by the barrier), run eight times after compiling; it
# prints the minor page faults of each run.
_CHILD = """
import ctypes, json, resource, sys
import jax, jax.numpy as jnp
from divdistill_jax import runtime
applied = runtime.keep_freed_cpu_memory() if sys.argv[1] == "keep" else None
f = jax.jit(lambda x: jax.lax.optimization_barrier(jnp.flip(2 * x)).sum())
x = jnp.ones((1 << 25,), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
f(x).block_until_ready()
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The heap alone: a 256 MiB block allocated, written and freed three times.
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
heap = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(1 << 28)
  ctypes.memset(block, 1, 1 << 28)
  libc.free(block)
  heap.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "temp": temp,
                  "heap": heap}))
"""


def _faults(mode: str) -> dict:
  # One host device, as a CPU job runs: with the tests' four, more threads
  # than glibc has arenas for share them, the main arena included, and
  # even computations dispatched to another thread sometimes reuse pages.
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=ROOT,
                       env={**os.environ, "XLA_FLAGS": xla_flags(1)},
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's heap only")
def test_a_cpu_program_reuses_its_temporaries_pages_when_kept():
  pages = (1 << 27) // resource.getpagesize()
  default, kept = _faults("default"), _faults("keep")
  assert default["temp"] >= 1 << 27 and kept["temp"] == default["temp"]
  # glibc's defaults: the temporaries are mapped afresh and every page
  # faults again in every run (the reason for the setting).
  assert min(default["faults"]) > 0.9 * pages, default
  # Kept: the runs after the first reuse the heap's pages. Not every one:
  # small allocations made between runs can split the freed block, and
  # the heap then grows by one more block (seen under load, up to three
  # times in eight runs before it stops growing), so most of them.
  assert kept["applied"] is True
  reused = [f < 0.01 * pages for f in kept["faults"][1:]]
  assert sum(reused) >= 4, kept
  # The heap's part alone, with nothing else allocating: glibc maps a
  # block of 256 MiB afresh each time; kept, the freed block stays.
  assert min(default["heap"]) > 0.9 * 2 * pages, default
  assert max(kept["heap"][1:]) < 0.01 * pages, kept


@pytest.mark.parametrize("keep", [True, False])
def test_setup_runtime_keeps_freed_memory_as_the_config_says(
    keep, monkeypatch):
  calls = []
  monkeypatch.setattr(runtime, "keep_freed_cpu_memory",
                      lambda: calls.append(True))
  runtime.setup_runtime(load_config("quickstart", "smoke",
                                    cpu_keep_freed_memory=keep))
  assert calls == ([True] if keep else [])
