"""JAX's CUDA plugin on a machine without a CUDA driver: a quiet CPU start.

The `gpu-aot` extra installs JAX's CUDA plugin so that a CPU machine can
compile for an H100 (`aot.py`). Without a driver, every shared object of that
plugin logs "Could not find cuda drivers" to stderr when it is loaded (their
logging starts before anything can configure it), and JAX, looking for a GPU
first, prints a traceback before it falls back to the CPU.

`quiet_without_driver`, called when the package is imported (before any
entry point imports JAX), does two things on such a machine only:
- `JAX_PLATFORMS` defaults to `cpu` (a value the user set is kept), so JAX
  does not look for a GPU; compiling for a GPU target does not need it to;
- `TF_CPP_MIN_LOG_LEVEL` defaults to 1: XLA's informational lines about
  compiling for a GPU that is not here are dropped, its warnings kept;
- the plugin's shared objects are loaded once with stderr closed, so their
  one-time initialisation has run when JAX loads them, and says nothing.

Where `libcuda.so.1` loads (a GPU machine) or no plugin is installed,
nothing changes.
"""

import ctypes
import glob
import importlib.util
import os

PLUGIN_PACKAGES = ("jax_cuda13_plugin", "jax_cuda12_plugin",
                   "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")


def plugin_libraries() -> list[str]:
  """The shared objects of the installed CUDA plugins (none if not installed).
  Found without importing the plugins, which would load them."""
  found = []
  for name in PLUGIN_PACKAGES:
    try:
      spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:                    # no jax_plugins namespace at all
      spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
      found += sorted(glob.glob(os.path.join(folder, "*.so")))
  return found


def driver_present() -> bool:
  """Whether the CUDA driver library loads here, as JAX's plugin will try."""
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    return False
  return True


def quiet_without_driver() -> None:
  libraries = plugin_libraries()
  if not libraries or driver_present():
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    for path in libraries:
      try:
        ctypes.CDLL(path)
      except OSError:          # a dependency missing: JAX will report it, if it needs it
        pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)
