"""open_clip's own model code on a CPU-only torch.

open_clip 3.3 imports torchvision at module level: `FrozenBatchNorm2d` (for
its ResNets) and the image transforms. The registry's torchvision wheels are
CUDA builds that do not load with the CPU torch of these machines, so
`import_open_clip` puts a stand-in `torchvision` in `sys.modules` first: every
name it is asked for is a class that refuses to be built. The ViT CLIP, its
factory (`create_model`, `add_model_config`) and its checkpoint loading run
unchanged; building a ResNet or an image transform would fail loudly.
"""

import importlib.machinery
import sys
import types


class _Refuses(type):
  def __getattr__(cls, name):          # `InterpolationMode.BICUBIC` as a default argument
    return cls


class _Absent(metaclass=_Refuses):
  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is not installed: open_clip runs with a stand-in here")


def _stand_in(attribute: str):
  if attribute.startswith("__"):        # `__file__`, `__wrapped__`: what tools probe for
    raise AttributeError(attribute)
  return _Absent


def _module(name: str, package: bool = False) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
  module.__getattr__ = _stand_in
  if package:
    module.__path__ = []
  return module


def import_open_clip():
  """The `open_clip` package, with a stand-in torchvision if there is none."""
  try:
    import torchvision  # noqa: F401  (a working install is used as it is)
  except Exception:
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional")
    for name in names:
      sys.modules[name] = _module(name, package=not name.endswith(("misc", "functional")))
  import open_clip
  return open_clip
