"""open_clip's own model code on a CPU-only torch.

open_clip 3.3 imports torchvision at module level: `FrozenBatchNorm2d` (for
its ResNets) and the image transforms. The registry's torchvision wheels are
CUDA builds that do not load with the CPU torch of these machines, so
`import_open_clip` puts a stand-in `torchvision` in `sys.modules` first: every
name it is asked for is a class that refuses to be built, except the five
transforms open_clip's evaluation transform composes on a PIL image
(`Compose`, `Resize`, `CenterCrop`, `ToTensor`, `Normalize`, with
`InterpolationMode`), transcribed below from torchvision's PIL code path
(`transforms.functional.resize`/`center_crop`/`to_tensor`/`normalize`), and
`RandomResizedCrop`, built but refusing to run. The
ViT CLIP, its factory (`create_model`, `create_model_and_transforms`,
`add_model_config`), its checkpoint loading and its eval transform run
unchanged; building a ResNet or a training augmentation fails loudly.
"""

import enum
import importlib.machinery
import sys
import types

import numpy as np
from PIL import Image


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


class InterpolationMode(enum.Enum):
  """torchvision's members, every one (transformers reads `NEAREST_EXACT`)."""
  NEAREST = "nearest"
  NEAREST_EXACT = "nearest-exact"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"


_PIL_MODES = {InterpolationMode.NEAREST: 0, InterpolationMode.NEAREST_EXACT: 0,
              InterpolationMode.LANCZOS: 1, InterpolationMode.BILINEAR: 2,
              InterpolationMode.BICUBIC: 3, InterpolationMode.BOX: 4,
              InterpolationMode.HAMMING: 5}


def _resized_size(height: int, width: int, size, max_size=None):
  """torchvision's `_compute_resized_output_size`: an int sets the shorter
  side, the longer one truncated (then both scaled down if the longer one
  exceeds `max_size`); a pair is `(h, w)`."""
  if isinstance(size, (list, tuple)) and len(size) == 2:
    return list(size)
  size = size[0] if isinstance(size, (list, tuple)) else size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  if max_size is not None and new_long > max_size:
    new_short, new_long = int(max_size * new_short / new_long), max_size
  return [new_long, new_short] if width <= height else [new_short, new_long]


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
  height, width = img.size[1], img.size[0]
  out = _resized_size(height, width, size, max_size)
  if out == [height, width]:
    return img
  return img.resize((out[1], out[0]), _PIL_MODES[interpolation])


def center_crop(img, output_size):
  """torchvision's, padding with zeros first where the crop is larger than the image."""
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  elif len(output_size) == 1:
    output_size = (output_size[0], output_size[0])
  crop_height, crop_width = output_size
  width, height = img.size
  if crop_width > width or crop_height > height:
    left = (crop_width - width) // 2 if crop_width > width else 0
    top = (crop_height - height) // 2 if crop_height > height else 0
    right = (crop_width - width + 1) // 2 if crop_width > width else 0
    bottom = (crop_height - height + 1) // 2 if crop_height > height else 0
    padded = Image.new(img.mode, (width + left + right, height + top + bottom), 0)
    padded.paste(img, (left, top))
    img, (width, height) = padded, padded.size
    if crop_width == width and crop_height == height:
      return img
  top, left = int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
  return img.crop((left, top, left + crop_width, top + crop_height))


def to_tensor(pic):
  import torch
  array = np.array(pic, np.uint8 if pic.mode in ("RGB", "L") else None, copy=True)
  if array.ndim == 2:
    array = array[:, :, None]
  return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


class Compose:
  def __init__(self, transforms):
    self.transforms = transforms

  def __call__(self, x):
    for t in self.transforms:
      x = t(x)
    return x


class Resize:
  def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None,
               antialias=True):
    self.size, self.interpolation, self.max_size = size, interpolation, max_size

  def __call__(self, img):
    return resize(img, self.size, self.interpolation, self.max_size)


class CenterCrop:
  def __init__(self, size):
    self.size = size

  def __call__(self, img):
    return center_crop(img, self.size)


class ToTensor:
  def __call__(self, pic):
    return to_tensor(pic)


class Normalize:
  def __init__(self, mean, std, inplace=False):
    self.mean, self.std = mean, std

  def __call__(self, tensor):
    import torch
    mean = torch.as_tensor(self.mean, dtype=tensor.dtype)[:, None, None]
    std = torch.as_tensor(self.std, dtype=tensor.dtype)[:, None, None]
    return (tensor - mean) / std


class RandomResizedCrop:
  """Built (open_clip builds its training transform beside the evaluation
  one), never used here."""

  def __init__(self, *args, **kwargs):
    pass

  def __call__(self, img):
    raise RuntimeError("torchvision is not installed: a training augmentation cannot run here")


_TRANSFORMS = {"Compose": Compose, "RandomResizedCrop": RandomResizedCrop, "Resize": Resize, "CenterCrop": CenterCrop,
               "ToTensor": ToTensor, "Normalize": Normalize,
               "InterpolationMode": InterpolationMode}
_FUNCTIONAL = {"resize": resize, "center_crop": center_crop, "to_tensor": to_tensor,
               "InterpolationMode": InterpolationMode}


def import_open_clip():
  """The `open_clip` package, with a stand-in torchvision if there is none."""
  try:
    import torchvision  # noqa: F401  (a working install is used as it is)
  except Exception:
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional")
    for name in names:
      sys.modules[name] = _module(name, package=not name.endswith(("misc", "functional")))
    for name, members in (("torchvision.transforms", _TRANSFORMS),
                          ("torchvision.transforms.functional", _FUNCTIONAL)):
      for attribute, value in members.items():
        setattr(sys.modules[name], attribute, value)
    for name in names[1:]:               # `import torchvision.transforms.functional as F`
      parent, _, child = name.rpartition(".")
      setattr(sys.modules[parent], child, sys.modules[name])
  import open_clip
  return open_clip
