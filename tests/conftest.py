"""Tests run JAX on the CPU with 8 virtual devices, so sharded paths run.

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

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _cache = tempfile.mkdtemp(prefix="dinorank-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Programs that compile in a quarter second or more are worth a file.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")

pytest_plugins = ["tests.compile_times"]


def pytest_collection_modifyitems(config, items):
  """Slow tests first, so the longest ones start at once; with xdist's
  `--dist worksteal` (the Makefile's) an idle worker takes half of another's
  remaining queue, so no worker ends the run with a row of slow tests."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
