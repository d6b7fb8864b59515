"""Tests run JAX on the CPU with 8 virtual devices, so sharded paths run, and
compile with `tests/xla_options.py`'s `FAST_COMPILE` (XLA:CPU's backend at
optimisation level 0, its loop emitters, one LLVM module), inherited by every
process a test starts.

One persistent compilation cache serves the whole run: the controller makes
it and every xdist worker and every subprocess a test starts inherits it
(`JAX_COMPILATION_CACHE_DIR`, which `config.default_compilation_cache`
honours too), so a program compiled by one test is read back by every other
test that builds it. It is deleted when the run ends; set the variable
yourself to keep one across runs.
"""

import atexit
import os
import shutil
import tempfile

from tests.xla_options import FAST_COMPILE

for _flag in ("--xla_force_host_platform_device_count=8", *FAST_COMPILE):
  if _flag not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _cache = tempfile.mkdtemp(prefix="dinorank-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Programs that compile in a quarter second or more are worth a file.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
import dinorank_jax  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
# (imported before anything imports JAX: the CUDA plugin's quiet start, cuda_plugin.py)

pytest_plugins = ["tests.compile_times"]


def pytest_collection_modifyitems(config, items):
  """Slow tests first, dealt round-robin to the xdist workers. xdist's
  `--dist worksteal` (the Makefile's) hands worker k the k-th contiguous
  block of the collection and later steals from the ends of the queues, so
  each block starts with its share of the slow tests: they all start early,
  on different workers, and no worker ends the run with a row of them."""
  workers = getattr(config, "workerinput", {}).get("workercount", 1)
  slow = [item for item in items if item.get_closest_marker("slow")]
  fast = [item for item in items if not item.get_closest_marker("slow")]
  ordered, remaining = [], len(items)
  for k in range(workers):            # worksteal's block sizes: remaining // workers left
    size = remaining // (workers - k)
    block = slow[k::workers]
    take = max(0, size - len(block))
    ordered += block + fast[:take]
    del fast[:take]
    remaining -= size
  items[:] = ordered + fast
