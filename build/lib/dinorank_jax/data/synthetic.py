"""A procedurally drawn image-caption corpus for the demo and the tests.

Each scene has 1-3 objects on a plain background; an object has a shape,
colour, size, texture and position on a 3 × 3 grid, and the first object is
the main one (drawn large). Captions come from several templates that name
the objects compositionally; each scene also has a second, "synthetic"
caption in one fixed template of its own (`synthetic_caption`), standing in
for a captioning model's output in ALIP's bi-path training. Everything is a function of `(seed, index)`,
so a corpus is reproducible and any part of it can be rebuilt alone.

Zero-shot tasks label the main object: `colour` (8 classes), `shape` (5) and
the fine-grained `colour_shape_texture` (120).
"""

import io
import itertools

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 45, 40), "green": (40, 160, 70), "blue": (40, 85, 215),
           "yellow": (235, 205, 45), "purple": (135, 60, 175), "orange": (240, 135, 35),
           "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES = ("solid", "striped", "dotted")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"grey": (150, 150, 150), "beige": (225, 210, 180), "teal": (70, 140, 140),
               "pink": (230, 180, 190)}
TASKS = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "colour_shape_texture": [f"{c} {s} {t}" for c, s, t in
                             itertools.product(COLOURS, SHAPES, TEXTURES)],
}
_COUNT = {1: "one", 2: "two", 3: "three"}


def _phrase(obj):
  texture = "" if obj["texture"] == "solid" else obj["texture"] + " "
  return f"{obj['size']} {texture}{obj['colour']} {obj['shape']}"


def _listing(objects):
  names = [f"a {_phrase(o)}" for o in objects]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption(objects, background, template):
  main = objects[0]
  if template == 0:
    return _listing(objects)
  if template == 1:
    return f"a picture of {_listing(objects)} on a {background} background"
  if template == 2:
    word = "shape" if len(objects) == 1 else "shapes"
    return f"{_COUNT[len(objects)]} {word}: {_listing(objects)}"
  rest = objects[1:]
  tail = f", next to {_listing(rest)}" if rest else ""
  return f"a {_phrase(main)} in the {main['position']}{tail}"


def synthetic_caption(objects, background):
  """The scene as a captioner would describe it: every object with its place,
  in a template none of `caption`'s uses."""
  placed = [f"a {_phrase(o)} in the {o['position']}" for o in objects]
  listing = placed[0] if len(placed) == 1 else ", ".join(placed[:-1]) + " and " + placed[-1]
  return f"there is {listing} against a {background} background"


def _polygon(shape, cx, cy, r):
  if shape == "square":
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
  w = r / 3  # cross
  return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
          (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
          (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def _draw(image, obj, size):
  cell = size / 3
  row, col = divmod(POSITIONS.index(obj["position"]), 3)
  cx, cy = (col + 0.5) * cell + obj["jitter"][0] * cell * 0.15, (row + 0.5) * cell + obj["jitter"][1] * cell * 0.15
  r = cell * (0.45 if obj["size"] == "large" else 0.25)
  mask = Image.new("L", (size, size), 0)
  pen = ImageDraw.Draw(mask)
  if obj["shape"] == "circle":
    pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
  else:
    pen.polygon(_polygon(obj["shape"], cx, cy, r), fill=255)
  colour = COLOURS[obj["colour"]]
  fill = Image.new("RGB", (size, size), colour)
  if obj["texture"] != "solid":
    contrast = tuple(255 - c for c in colour)
    ink = ImageDraw.Draw(fill)
    step = max(int(size / 24), 3)
    for k in range(-size, size, step):
      if obj["texture"] == "striped":
        ink.line([(k, 0), (k + size, size)], fill=contrast, width=max(step // 3, 1))
      else:
        for j in range(0, size, step):
          ink.ellipse([k + size // 2, j, k + size // 2 + step // 2, j + step // 2], fill=contrast)
  image.paste(fill, (0, 0), mask)


def scene(seed: int, index: int) -> dict:
  """The objects, background and caption template of scene `index`."""
  rng = np.random.default_rng([seed, index])
  count = int(rng.integers(1, 4))
  cells = rng.choice(len(POSITIONS), count, replace=False)
  objects = [{"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(list(COLOURS))),
              "texture": str(rng.choice(TEXTURES)),
              "size": "large" if i == 0 else str(rng.choice(SIZES)),
              "position": POSITIONS[c], "jitter": rng.uniform(-1, 1, 2).tolist()}
             for i, c in enumerate(cells)]
  return {"objects": objects, "background": str(rng.choice(list(BACKGROUNDS))),
          "template": int(rng.integers(0, 4))}


def render(spec: dict, size: int = 96) -> bytes:
  """PNG bytes of a scene (the builder re-encodes to JPEG like any source)."""
  image = Image.new("RGB", (size, size), BACKGROUNDS[spec["background"]])
  for obj in reversed(spec["objects"]):    # main object on top
    _draw(image, obj, size)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def example(seed: int, index: int, size: int = 96) -> tuple[str, bytes, str, dict]:
  """`(key, image bytes, caption, extra)` of scene `index`; `extra` holds the
  zero-shot `labels` and the `syn_caption`."""
  spec = scene(seed, index)
  main = spec["objects"][0]
  labels = {"colour": TASKS["colour"].index(main["colour"]),
            "shape": TASKS["shape"].index(main["shape"]),
            "colour_shape_texture": TASKS["colour_shape_texture"].index(
                f"{main['colour']} {main['shape']} {main['texture']}")}
  text = caption(spec["objects"], spec["background"], spec["template"])
  extra = {"labels": labels, "syn_caption": synthetic_caption(spec["objects"], spec["background"])}
  return f"syn-{seed}-{index:07d}", render(spec, size), text, extra
