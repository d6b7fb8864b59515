"""Where evaluation images, labels and captions come from.

A `Split` has `size` examples and `read(indices, side)`, which returns

    image     uint8 [n, side, side, 3]: the centre square, resized (bilinear)
    valid     bool [n]: False for an example that could not be decoded
    labels    {task: int [n]}          (labelled sources)
    captions  [[str, ...], ...]         (captioned sources; one list per image)
    teacher_patches, crop, flip         (our records with teacher features)

and `tasks` (task → class names). Three kinds:

* our records (`records_split`): a directory written by
  `dinorank_jax.data.build`; zero-shot tasks from its metadata, the raw
  caption and, when the record has one, the synthetic caption;
* image folders (`folder_split`): `ROOT/<class>/<image>`, classes in sorted
  order, named by their directory with `_` read as a space;
* prepared tensorflow-datasets (`tfds_split`): `DATA_DIR/<name>[/<config>]/
  <version>/` in the array_record file format, read through
  `tfds.builder_from_directory(...).as_data_source` — no TensorFlow, and no
  dataset code or download. Label names go through `prompts.class_names`
  (ImageNet WordNet ids become CLIP's class names); `captions/text`
  (coco_captions) gives captions.

A source that is not there raises `NotFound` naming the path it looked at.
"""

import dataclasses
import io
import os
from collections.abc import Callable

import numpy as np
from grain.sources import ArrayRecordDataSource
from PIL import Image

from dinorank_jax.data import records
from dinorank_jax.data.pipeline import Decode
from dinorank_jax.evaluate.prompts import class_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class NotFound(Exception):
  """A dataset missing from where it was looked for (reported as skipped)."""


@dataclasses.dataclass
class Split:
  name: str
  size: int
  read: Callable[[np.ndarray, int], dict]
  tasks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  captioned: bool = False


def square(image: Image.Image, side: int) -> np.ndarray:
  """The centre square of `image`, resized to `side` (as the trainer's evaluation decodes)."""
  width, height = image.size
  s = min(width, height)
  box = ((width - s) / 2, (height - s) / 2, (width + s) / 2, (height + s) / 2)
  return np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR, box=box))


def _blank(side: int) -> np.ndarray:
  return np.zeros((side, side, 3), np.uint8)


def records_split(directory: str) -> Split:
  try:
    meta = records.read_metadata(directory)
  except FileNotFoundError:
    raise NotFound(f"{directory} (records: no {records.METADATA})") from None
  source = ArrayRecordDataSource(records.shard_paths(directory))
  tasks = {t: list(names) for t, names in (meta.get("zero_shot_tasks") or {}).items()}

  def read(indices, side):
    decode = Decode(side, augment=False)
    out = {"image": [], "valid": [], "captions": [], "labels": {t: [] for t in tasks},
           "crop": [], "flip": []}
    teacher = []
    for i in indices:
      data = source[int(i)]
      example = decode.map((int(i), data))
      ok = "_skip" not in example
      record = records.decode_record(data) if ok else {}
      out["valid"].append(ok)
      out["image"].append(example["image"] if ok else _blank(side))
      out["crop"].append(example["crop"] if ok else np.asarray([0, 0, 1, 1], np.float32))
      out["flip"].append(False)
      out["captions"].append([record[k] for k in ("caption", "syn_caption") if k in record])
      for t in tasks:
        out["labels"][t].append(record.get("labels", {}).get(t, -1))
      teacher.append(example.get("teacher_patches"))
    out = {**out, "image": np.stack(out["image"]), "valid": np.asarray(out["valid"]),
           "crop": np.stack(out["crop"]), "flip": np.asarray(out["flip"]),
           "labels": {t: np.asarray(v, np.int32) for t, v in out["labels"].items()}}
    shapes = [t.shape for t in teacher if t is not None]
    if shapes:
      out["teacher_patches"] = np.stack([np.zeros(shapes[0]) if t is None else t
                                         for t in teacher]).astype(np.float32)
    return out

  return Split(f"records {directory}", len(source), read, tasks, captioned=True)


def folder_split(root: str) -> Split:
  if not os.path.isdir(root):
    raise NotFound(f"{root} (an image folder <class>/<image>)")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c)))
           if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not files:
    raise NotFound(f"{root} (no images in <class>/ subdirectories)")

  def read(indices, side):
    images, valid = [], []
    for i in indices:
      try:
        with Image.open(files[int(i)][0]) as image:
          images.append(square(image, side))
        valid.append(True)
      except Exception:  # an unreadable file is skipped and counted, never fatal
        images.append(_blank(side))
        valid.append(False)
    return {"image": np.stack(images), "valid": np.asarray(valid),
            "labels": {"label": np.asarray([files[int(i)][1] for i in indices], np.int32)}}

  return Split(f"folder {root}", len(files), read, {"label": class_names(classes)})


def _prepared_dir(data_dir: str, name: str) -> str:
  """`DATA_DIR/name/<latest version>` holding a prepared dataset."""
  root = os.path.join(data_dir, name)
  versions = sorted((d for d in (os.listdir(root) if os.path.isdir(root) else ())
                     if os.path.isfile(os.path.join(root, d, "dataset_info.json"))),
                    key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()))
  if not versions:
    raise NotFound(f"{root}/<version>/ (tensorflow-datasets {name!r}, prepared)")
  return os.path.join(root, versions[-1])


def tfds_split(data_dir: str, name: str, split: str) -> Split:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only here)
  path = _prepared_dir(data_dir, name)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise NotFound(f"{path} (no split {split!r}; it has {sorted(builder.info.splits)})")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise NotFound(f"{path} (prepared as {builder.info.file_format.value}: prepare it again "
                   "with file_format='array_record', read without TensorFlow)")
  source = builder.as_data_source(split=split)
  features = builder.info.features
  tasks = {"label": class_names(features["label"].names)} if "label" in features else {}
  captioned = "captions" in features

  def read(indices, side):
    images, valid, labels, captions = [], [], [], []
    for i in indices:
      try:
        example = source[int(i)]
        images.append(square(Image.fromarray(np.asarray(example["image"]).squeeze()), side))
        valid.append(True)
      except Exception:  # an undecodable example is skipped and counted, never fatal
        example = {}
        images.append(_blank(side))
        valid.append(False)
      labels.append(int(example.get("label", -1)))
      if captioned:
        text = example.get("captions", {}).get("text", [])
        captions.append([t.decode() if isinstance(t, bytes) else str(t) for t in text])
    out = {"image": np.stack(images), "valid": np.asarray(valid)}
    if tasks:
      out["labels"] = {"label": np.asarray(labels, np.int32)}
    if captioned:
      out["captions"] = captions
    return out

  return Split(f"tfds {name}:{split} at {path}", len(source), read, tasks, captioned)
