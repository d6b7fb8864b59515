"""Ahead-of-time compilation and JAX's persistent compilation cache.

`compile_ahead(jitted, *args)` traces, lowers and compiles a jitted function
for the given (concrete or `jax.ShapeDtypeStruct`) arguments and reports
what that cost and what the executable needs: the program's size in jaxpr
equations, the seconds of each phase and XLA's memory analysis per device.
The trainer runs its step through it, so compilation is measured once and
never enters a step time; `bench --suite compile` prints the same report.

`use_cache(directory)` turns on JAX's persistent cache, so a second process
compiling the same program on the same machine loads it from disk instead.
`main` takes the directory from `config.compilation_cache`; `bench` and
`evaluate` from `--compilation_cache DIR` / `--no_compilation_cache`
(`add_cache_flags`). All default to `config.default_compilation_cache()`.
"""

import argparse
import contextlib
import logging
import os
import time

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from jax.extend.core import jaxprs_in_params

from dinorank_jax.config import default_compilation_cache

def use_cache(directory: str | None) -> None:
  """Compiled programs are cached in `directory` (created if absent); None
  or "" turns the cache off (also when an earlier call in this process
  turned it on)."""
  jax.config.update("jax_enable_compilation_cache", bool(directory))
  if directory:
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    # JAX's own thresholds apply: programs that compiled in under a second
    # (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) are not written.
    jax.config.update("jax_compilation_cache_dir", directory)
    logging.info("compilation cache: %s", directory)
  # JAX decides once per process whether, and where, it caches: forget that.
  jax_cache.reset_cache()


@contextlib.contextmanager
def cache_off():
  """The persistent cache neither read nor written inside (for programs
  compiled for another machine's devices, which cannot be loaded back)."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  jax_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    jax_cache.reset_cache()


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
  """`--compilation_cache DIR` and `--no_compilation_cache`; pass the parsed
  arguments to `use_cache_from_flags`."""
  parser.add_argument("--compilation_cache", default=default_compilation_cache(),
                      help="persistent compilation cache directory (default: %(default)s)")
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help="compile everything afresh, reading and writing no cache")


def use_cache_from_flags(args: argparse.Namespace) -> None:
  use_cache(None if args.no_compilation_cache else args.compilation_cache)


def count_equations(jaxpr) -> int:
  """Equations of a (closed) jaxpr and of every sub-jaxpr it calls, each
  body counted once: a scanned block counts once, an unrolled one per layer."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = len(jaxpr.eqns)
  for eqn in jaxpr.eqns:
    for sub in jaxprs_in_params(eqn.params):
      total += count_equations(sub)
  return total


_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def compile_ahead(jitted, *args, compiler_options: dict | None = None):
  """`(compiled, report)` for `jitted(*args)`, compiled with XLA's
  `compiler_options` (e.g. `aot.COMPILER_OPTIONS`).

  The report holds `equations` (of the program's top level: a scanned stack
  is one equation) and `equations_total` (`count_equations`), `lower_seconds` (tracing and lowering to
  StableHLO), `compile_seconds` (XLA) and, per device, `argument_bytes`,
  `output_bytes`, `temp_bytes`, `alias_bytes` (donated inputs reused as
  outputs) and `peak_bytes` (arguments + temporaries + outputs not aliased
  to an argument) where the backend reports them, and `from_cache`: whether
  XLA's executable was read from the persistent cache (`compile_seconds` then
  counts the read).
  """
  start = time.perf_counter()
  traced = jitted.trace(*args)
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  hits = []
  listener = lambda event, **_: hits.append(event) if event == _CACHE_HIT else None
  jax.monitoring.register_event_listener(listener)
  try:
    compiled = lowered.compile(compiler_options)
  finally:
    jax.monitoring.unregister_event_listener(listener)
  report = {"equations": len(traced.jaxpr.jaxpr.eqns),
            "equations_total": count_equations(traced.jaxpr),
            "lower_seconds": lowered_at - start,
            "compile_seconds": time.perf_counter() - lowered_at,
            "from_cache": bool(hits)}
  memory = compiled.memory_analysis()
  if memory is not None:
    report.update(argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  temp_bytes=memory.temp_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes)
    report["peak_bytes"] = (report["argument_bytes"] + report["temp_bytes"]
                            + report["output_bytes"] - report["alias_bytes"])
  return compiled, report


def describe(report: dict) -> str:
  """One line of a `compile_ahead` report."""
  compiled = "read from the persistent cache" if report.get("from_cache") else "compiled"
  line = (f"{report['equations']} equations ({report['equations_total']} with sub-programs), "
          f"lowered in {report['lower_seconds']:.1f} s, {compiled} in "
          f"{report['compile_seconds']:.1f} s")
  if "temp_bytes" in report:
    gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
    line += (f"; per device: arguments {gib(report['argument_bytes'])}, outputs "
             f"{gib(report['output_bytes'])}, temporaries {gib(report['temp_bytes'])}")
  return line
