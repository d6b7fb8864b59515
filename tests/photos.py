"""Real-shaped images for the tests, all made offline.

Photographs from the scikit-image wheel's bundled samples (astronaut, coffee,
chelsea, rocket, …: several sizes and aspect ratios), downscaled to odd sizes
and stored as img2dataset stores them (JPEG), plus images generated here in
the modes and encodings a web crawl brings: grayscale, CMYK, a palette PNG
with transparency, an EXIF-rotated JPEG, a progressive JPEG, an RGBA PNG, 1 × N
and N × 1 strips. `PHOTOS` names them; `encoded()` gives each one's bytes.
"""

import functools
import io
import os

import numpy as np
from PIL import Image

# (name, sample file, stored size or None): several aspect ratios, portrait and landscape.
_SAMPLES = (("astronaut", "astronaut.png", (160, 160)), ("coffee", "coffee.png", (150, 100)),
            ("chelsea", "chelsea.png", (113, 75)), ("rocket", "rocket.jpg", (61, 91)),
            ("hubble", "hubble_deep_field.jpg", (97, 64)), ("camera", "camera.png", (77, 77)),
            ("motorcycle", "motorcycle_left.png", (129, 95)), ("retina", "retina.jpg", (64, 64)),
            ("horse", "horse.png", (40, 33)), ("logo", "logo.png", (91, 67)))


def _sample(file: str) -> Image.Image:
  import skimage  # the dev extra; its wheel ships these photographs
  return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", file))


def _jpeg(image: Image.Image, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, "JPEG", quality=90, **kwargs)
  return out.getvalue()


def _png(image: Image.Image, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, "PNG", **kwargs)
  return out.getvalue()


def _generated() -> dict[str, bytes]:
  rng = np.random.default_rng(0)
  noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
  photo = _sample("coffee.png").convert("RGB").resize((83, 59), Image.BICUBIC)
  rotated = photo.copy()
  exif = rotated.getexif()
  exif[0x0112] = 6                      # Orientation: rotate 90° clockwise to display
  palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  return {
      "gray_jpeg": _jpeg(photo.convert("L")),
      "cmyk_jpeg": _jpeg(photo.convert("CMYK")),
      "palette_alpha_png": _png(palette, transparency=0),
      "rgba_png": _png(_sample("logo.png").resize((45, 71))),
      "exif_rotated_jpeg": _jpeg(rotated, exif=exif),
      "progressive_jpeg": _jpeg(noise(70, 101), progressive=True),
      "strip_1xN_png": _png(noise(37, 1)),
      "strip_Nx1_jpeg": _jpeg(noise(1, 53)),
      "gray16_png": _png(Image.fromarray(rng.integers(0, 65535, (29, 41), np.uint16))),
  }


@functools.cache
def encoded() -> dict[str, bytes]:
  """`{name: file bytes}` of every test image."""
  out = {}
  for name, file, size in _SAMPLES:
    image = _sample(file)
    image = image.convert("RGB") if image.mode not in ("RGB", "L", "RGBA") else image
    image = image.resize(size, Image.BICUBIC)
    out[name] = _png(image) if image.mode == "RGBA" else _jpeg(image)
  out.update(_generated())
  return out


PHOTOS = tuple(name for name, _, _ in _SAMPLES) + (
    "gray_jpeg", "cmyk_jpeg", "palette_alpha_png", "rgba_png", "exif_rotated_jpeg",
    "progressive_jpeg", "strip_1xN_png", "strip_Nx1_jpeg", "gray16_png")
