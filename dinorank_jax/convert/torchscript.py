"""TorchScript archives (OpenAI's CLIP checkpoints) read as data, without torch.

`torch.jit.load` compiles the archive's TorchScript and runs it: a module's
`__setstate__` is code the archive brings, and it can write files or worse.
Here nothing of the archive runs. Its `data.pkl` (the module tree: each
module's attributes, tensors as references to the archive's storages) is
unpickled by a loader that builds only what a tree of tensors needs —
stand-ins for the `__torch__` module classes, tensors rebuilt from the raw
storages with NumPy, and the list helpers TorchScript pickles use — and
refuses every other global in one line. Which attributes are parameters and
buffers (a `state_dict`'s entries) is read from the class declarations of
the archive's `code/` as text; a class that restores itself with its own
`__setstate__` is refused, since its stored state means what its code says.
"""

import functools
import io
import pickle
import re
import zipfile
import zlib

import ml_dtypes
import numpy as np

from dinorank_jax.convert.layout import ConversionError

_DTYPES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
           "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64,
           "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
           "ByteStorage": np.uint8, "BoolStorage": np.bool_}
# TorchScript's list and type-tag helpers: each returns its first argument.
_PASS_THROUGH = {("torch.jit._pickle", name) for name in (
    "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
    "build_genericlist", "restore_type_tag")}


def is_archive(path: str) -> bool:
  """Whether `path` is a TorchScript archive (a zip with `constants.pkl`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("constants.pkl") for n in archive.namelist())


class _Module:
  """A TorchScript object as data: its class and the state it was pickled with."""
  qualname = ""
  state = None

  def __setstate__(self, state):
    self.state = state


@functools.cache
def _stand_in(qualname: str) -> type:
  return type(qualname.rsplit(".", 1)[-1], (_Module,), {"qualname": qualname})


class _Storage:
  def __init__(self, name: str):
    self.dtype = _DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused                                 # requires_grad, hooks, metadata
  size, stride = tuple(size), tuple(stride)
  end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
  if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0 or end > storage.size:
    raise ValueError(f"a tensor of shape {size} reaches past its storage of {storage.size}")
  if not all(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride], writeable=False)
  return np.array(view)


class _Unpickler(pickle.Unpickler):

  def __init__(self, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
    self._archive, self._root, self._path = archive, root, path

  def find_class(self, module: str, name: str):
    if module == "__torch__" or module.startswith("__torch__."):
      return _stand_in(f"{module}.{name}")
    if module == "torch" and name in _DTYPES:
      return _Storage(name)            # a storage type, named in references
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return lambda data, *unused: data
    if (module, name) == ("collections", "OrderedDict"):
      return dict
    if (module, name) in _PASS_THROUGH:
      return lambda value, *unused: value
    raise ConversionError(f"{self._path}: its data asks for {module}.{name}, which a TorchScript "
                          "archive of weights does not need: refused, nothing of it was run")

  def persistent_load(self, pid):
    kind, storage, key, _, numel = pid
    if kind != "storage" or not isinstance(storage, _Storage):
      raise ConversionError(f"{self._path}: an unknown reference {kind!r} in its data")
    data = np.frombuffer(self._archive.read(f"{self._root}/data/{key}"), storage.dtype)
    if data.size != numel:
      raise ValueError(f"storage {key} holds {data.size} values, its reference says {numel}")
    return data


def _classes(archive: zipfile.ZipFile, root: str) -> dict[str, str]:
  """`{qualname: declaration}` of every class in the archive's `code/`, as text."""
  prefix, classes = f"{root}/code/", {}
  for name in archive.namelist():
    if name.startswith(prefix) and name.endswith(".py"):
      module = name[len(prefix):-len(".py")].replace("/", ".")
      text = archive.read(name).decode("utf-8", "replace")
      for found in re.finditer(r"^class (\w+)\(.*?(?=^class |\Z)", text, re.M | re.S):
        classes[f"{module}.{found.group(1)}"] = found.group(0)
  return classes


def _names(declaration: str, field: str) -> list[str]:
  """The names a class declares as `__parameters__` or `__buffers__`."""
  found = re.search(rf"^  {field} = \[([^\]]*)\]", declaration, re.M)
  return re.findall(r'"([^"]*)"', found.group(1)) if found else []


def _collect(module, prefix: str, classes: dict, path: str, state: dict) -> None:
  declaration = classes.get(getattr(module, "qualname", None))
  if declaration is None:
    raise ConversionError(f"{path}: {prefix or 'its root'} is not a module the archive's code "
                          "declares: not a TorchScript module")
  if "def __setstate__(" in declaration or not isinstance(module.state, dict):
    raise ConversionError(f"{path}: {module.qualname} restores itself with its own code "
                          "(__setstate__), which is never run here: where you trust the file, "
                          "save its state_dict() with torch and import that")
  for name in _names(declaration, "__parameters__") + _names(declaration, "__buffers__"):
    if isinstance(module.state.get(name), np.ndarray):     # None: an absent bias
      state[prefix + name] = module.state[name]
  for name, value in module.state.items():
    if isinstance(value, _Module):
      _collect(value, f"{prefix}{name}.", classes, path, state)


def read(path: str) -> dict[str, np.ndarray]:
  """The parameters and buffers of the TorchScript archive at `path` by
  their `state_dict()` names, read without running any of it."""
  try:
    with zipfile.ZipFile(path) as archive:
      roots = {n.split("/")[0] for n in archive.namelist()
               if n.count("/") == 1 and n.endswith("/data.pkl")}
      if len(roots) != 1:
        raise ConversionError(f"{path} has no data.pkl at its top: not a TorchScript module")
      root = roots.pop()
      tree = _Unpickler(archive, root, path).load()
      classes = _classes(archive, root)
  except ConversionError:
    raise
  except (zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError,
          zlib.error) as e:
    raise ConversionError(f"{path} is damaged ({' '.join(str(e).split())}): download or "
                          "copy it again") from None
  state = {}
  _collect(tree, "", classes, path, state)
  return state
