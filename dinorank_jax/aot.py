"""Compiling for a GPU that is not here, and whether a program fits one.

JAX's CUDA plugin builds a compile-only topology of `count` devices of a
named NVIDIA GPU from a text `GpuTargetConfigProto` (`gpu_targets/*.txtpb`,
shipped with the package): a program jitted over a mesh of those devices
lowers and compiles for that GPU on any machine, a 2-core CPU one included,
and XLA's memory analysis then says what it needs per device. Nothing is
allocated and no GPU is touched. The `gpu-aot` extra installs the plugin
and `ptxas` (`pip install 'dinorank_jax[gpu-aot]'`).

`fit_report` sets a `compilation.compile_ahead` report's peak per device
against what a device offers; `largest_fitting` searches the rows per
device that fit. `bench --suite compile --target h100 [--fit]` uses both,
and the trainer refuses a step that cannot fit before running it
(`compilation.check_fits`).
"""

import importlib.resources
import importlib.util
import math
import re
from collections.abc import Callable

from dinorank_jax.errors import UserError

TARGETS = ("h100", "h200", "a100")
# Dense bf16 peak of one device, TFLOP/s (NVIDIA's data sheets, SXM parts).
BF16_TFLOPS = {"h100": 989.4, "h200": 989.4, "a100": 312.0}
# JAX's GPU client preallocates this fraction of the card
# (XLA_PYTHON_CLIENT_MEM_FRACTION); 0.95 is what a run can be given at most.
DEFAULT_FRACTION = 0.75
MAX_FRACTION = 0.95
# Nothing can be autotuned without a device: XLA's own GEMMs instead of Triton's.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
EXTRA = "pip install 'dinorank_jax[gpu-aot]'"


class MissingPlugin(UserError, RuntimeError):
  """The CUDA plugin that compiles for a GPU is not installed."""


def target_config(name: str) -> str:
  """The text `GpuTargetConfigProto` of target `name` (one of `TARGETS`)."""
  if name not in TARGETS:
    raise UserError(f"unknown GPU target {name!r}: one of {TARGETS} (--target)")
  return importlib.resources.files("dinorank_jax").joinpath(
      "gpu_targets", f"{name}.txtpb").read_text()


def device_memory(name: str) -> int:
  """Bytes of memory of one device of target `name`."""
  return int(re.search(r"device_memory_size:\s*(\d+)", target_config(name)).group(1))


def memory_bandwidth(name: str) -> float:
  """Bytes/s of device memory bandwidth of one device of target `name`."""
  return float(re.search(r"memory_bandwidth:\s*(\d+)", target_config(name)).group(1))


def plugin_available() -> bool:
  """JAX's CUDA plugin is installed (the gpu-aot extra's CUDA 12 one, or a
  GPU machine's CUDA 13 one)."""
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
             for v in (12, 13))


def devices(name: str, count: int = 8) -> list:
  """`count` compile-only devices of target `name` (one host)."""
  config = target_config(name)
  if not plugin_available():
    raise MissingPlugin(f"compiling for --target {name} needs JAX's CUDA plugin: {EXTRA}")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(platform="cuda", target_config=config,
                                           topology=f"1x1x{count}").devices)


def fit_report(report: dict, memory: int) -> dict:
  """The peak against a device of `memory` bytes: usable at JAX's default
  preallocation and at 0.95, and whether the peak fits each."""
  peak = report["peak_bytes"]
  default, most = int(memory * DEFAULT_FRACTION), int(memory * MAX_FRACTION)
  return {"peak_bytes": peak, "device_bytes": memory, "usable_bytes": default,
          "usable_bytes_at_0.95": most, "fits": peak <= default,
          "fits_at_0.95": peak <= most}


def largest_fitting(peak_at: Callable[[int], int], limit: int, *, low: int = 64,
                    high: int = 1024, multiple: int = 64) -> tuple[int | None, dict]:
  """The largest multiple of `multiple` in [low, high] whose `peak_at(rows)`
  is at most `limit` (peaks grow with rows), and every peak it measured:
  `(rows or None, {rows: peak})`. Tries `high` first, then bisects."""
  tried = {}

  def fits(rows):
    tried[rows] = peak_at(rows)
    return tried[rows] <= limit
  if fits(high):
    return high, tried
  lo, hi = 0, math.ceil((high - low) / multiple)     # candidates low + k·multiple
  if not fits(low):
    return None, tried
  while hi - lo > 1:                                # low + lo fits, low + hi does not
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(low + mid * multiple) else (lo, mid)
  return low + lo * multiple, tried
