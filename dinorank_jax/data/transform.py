"""The evaluation transform: an image of any size and mode -> the model's square input.

    1. resize so that the shorter side is `side` (the longer one becomes
       `int(side * longer / shorter)`), bicubic;
    2. crop the centre `side` × `side` square, its offsets `(extent - side) / 2`
       rounded half to even;
    3. convert to RGB (grayscale, palette, CMYK and alpha images included).

These are open_clip's evaluation steps for `resize_mode="shortest"` (torchvision's
`Resize(side)`, `CenterCrop(side)`, then `convert("RGB")`, in that order, on a
PIL image), so an export scores the same pixels here, in open_clip and in
CLIP_benchmark. Like them it ignores EXIF orientation: a photo is read as its
pixels are stored. Every evaluation source, the trainer's held-out pass and
`dinorank_jax.load(...).preprocess` go through `preprocess`; an export states
the transform in its `model_config.json` (`PREPROCESS`) and in what it writes
for open_clip and transformers.

Training crops go through `data.pipeline.Decode` instead (a random resized
crop, bilinear, as CLIP trains).
"""

import io
import os

import numpy as np
from PIL import Image

# What an export records, in open_clip's `preprocess_cfg` terms.
PREPROCESS = {"resize_mode": "shortest", "interpolation": "bicubic"}


def resized_size(width: int, height: int, side: int) -> tuple[int, int]:
  """`(width, height)` after the shorter side is resized to `side`."""
  if width <= height:
    return side, int(side * height / width)
  return int(side * width / height), side


def centre_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
  """The centre `side` square of a `width` × `height` image, `(left, top, right, bottom)`."""
  left, top = round((width - side) / 2), round((height - side) / 2)
  return left, top, left + side, top + side


def preprocess(image: Image.Image, side: int) -> np.ndarray:
  """uint8 `[side, side, 3]`: `image` through the three steps of the module docstring."""
  size = resized_size(*image.size, side)
  if size != image.size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  return np.asarray(image.crop(centre_box(*size, side)).convert("RGB"))


def crop_fraction(width: int, height: int, side: int) -> tuple[float, float, float, float]:
  """The square `preprocess` keeps, `(x0, y0, w, h)` as fractions of the image
  (where the teacher's patch grid is resampled for distillation fidelity)."""
  size = resized_size(width, height, side)
  left, top, _, _ = centre_box(*size, side)
  return left / size[0], top / size[1], side / size[0], side / size[1]


def as_pil(image) -> Image.Image:
  """A PIL image from a PIL image, a file path (`str` or `os.PathLike`),
  encoded bytes, or an array `[H, W]` / `[H, W, 1|3|4]` (uint8, or float in
  [0, 1])."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (str, os.PathLike)):
    return Image.open(image)
  if isinstance(image, (bytes, bytearray)):
    return Image.open(io.BytesIO(image))
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"an image is [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {array.shape}")
  if array.dtype != np.uint8:
    array = np.rint(unit_floats(array) * 255.0).astype(np.uint8)
  return Image.fromarray(array)


SLACK = 1 / 512       # float rounding past 0 or 1 by under half a grey level is clipped


def unit_floats(array: np.ndarray) -> np.ndarray:
  """`array` clipped to [0, 1] when it is floating point with every value in
  [0, 1] (± `SLACK`); otherwise a ValueError in one line saying what to pass."""
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"image arrays are uint8, or float in [0, 1]; got {array.dtype}")
  if not array.size:
    return array
  low, high, nan = np.nanmin(array), np.nanmax(array), np.isnan(array).any()
  if nan or low < -SLACK or high > 1 + SLACK:
    raise ValueError(f"float image arrays must hold values in [0, 1], got values from {low:g} "
                     f"to {high:g}{' and NaN' if nan else ''}: divide 0-255 pixels by 255, or "
                     "pass them as uint8")
  return np.clip(array, 0.0, 1.0)


def preprocess_many(images, side: int) -> np.ndarray:
  """uint8 `[N, side, side, 3]` from one image (PIL, a path, bytes or
  `[H, W(, C)]`) or many (a list of those, or an array `[N, H, W, C]`)."""
  if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray)):
    images = [images]
  elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
    images = [images]
  out = [preprocess(as_pil(x), side) for x in images]
  if not out:
    return np.zeros((0, side, side, 3), np.uint8)
  return np.stack(out)
