"""Where evaluation images, labels and captions come from.

A `Split` has `size` examples, `tasks` (task → class names) and
`read(indices, side)`, which decodes the examples on a thread pool (PIL
releases the GIL) and returns

    image     uint8 [n, side, side, 3]: `data.transform.preprocess`'s (the
              shorter side resized bicubic, the centre square; open_clip's)
    valid     bool [n]: False for an example that could not be decoded
    labels    {task: int [n]}          (labelled sources; -1 where unknown)
    captions  [[str, ...], ...]         (captioned sources; one list per image)
    teacher_patches, crop, flip         (our records with teacher features)

Four kinds:

* our records (`records_split`): a directory written by
  `dinorank_jax.data.build`; zero-shot tasks from its metadata, the raw
  caption and, when the record has one, the synthetic caption;
* image folders (`folder_split`): `ROOT/<class>/<image>`, classes in sorted
  order, named by their directory with `_` read as a space;
* prepared tensorflow-datasets (`tfds_split`): `DATA_DIR/<name>[/<config>]/
  <version>/` in the array_record file format, read through
  `tfds.builder_from_directory(...).as_data_source`, or in the tfrecord
  format, indexed once and read at the record offsets (`TFRecordSource`) —
  no TensorFlow either way, and no dataset code or download; each example is
  deserialised by the dataset's own features. Label names go through
  `prompts.class_names` (ImageNet WordNet ids become CLIP's class names);
  `captions/text` (coco_captions) gives captions;
* CLIP_benchmark's webdataset datasets (`wds_split`): `ROOT/<split>/
  {0..n-1}.tar` with `ROOT/<split>/nshards.txt`, `ROOT/classnames.txt`,
  optionally `ROOT/zeroshot_classification_templates.txt` and
  `ROOT/dataset_type.txt` (`retrieval`: captions, one per line, in `.txt`;
  otherwise the class index in `.cls`), images in `.webp`, `.png` or `.jpg`,
  as `clip_benchmark_export_wds` writes them and the `wds_*` datasets ship.

A source that is not there raises `NotFound` naming the path it looked at;
one whose files are damaged (a tar cut short or not a tar, an `nshards.txt`
that is not a count) raises `Damaged` naming the file. An example that
cannot be read is skipped and counted, never dropped unsaid: a TFRecord
file damaged part-way (a length that fails its CRC, a record cut short)
keeps the records before the damage, and the split still has
`dataset_info.json`'s count of examples, the lost ones counted as skipped.
"""

import concurrent.futures
import dataclasses
import io
import logging
import os
import struct
import tarfile
from collections.abc import Callable

import numpy as np
from PIL import Image

from dinorank_jax import errors
from dinorank_jax.data import records, tars, transform
from dinorank_jax.data.pipeline import Decode, RecordSource
from dinorank_jax.evaluate.prompts import class_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class NotFound(Exception):
  """A dataset missing from where it was looked for (reported as skipped)."""


class Damaged(errors.UserError):
  """A dataset whose files are damaged (reported as skipped, naming the file and the fix)."""


THREADS = min(16, os.cpu_count() or 1)


@dataclasses.dataclass
class Split:
  """`example(i, side)` decodes one example as a dict of the fields above
  (`labels` as `{task: int}`), or returns `{}` when it cannot."""
  name: str
  size: int
  example: Callable[[int, int], dict]
  tasks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  templates: list[str] | None = None      # the dataset's own zero-shot prompt templates

  def read(self, indices, side: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
      examples = list(pool.map(lambda i: self.example(int(i), side), indices))
    valid = np.asarray([bool(e) for e in examples])
    template = next((e for e in examples if e), {"image": np.zeros((side, side, 3), np.uint8)})
    blank = {k: _blank_like(v) for k, v in template.items()}
    examples = [e or blank for e in examples]
    out = {"valid": valid}
    for key in template:
      values = [e[key] for e in examples]
      if key == "labels":
        out[key] = {t: np.asarray([v[t] for v in values], np.int32) for t in template[key]}
      else:
        out[key] = values if key == "captions" else np.stack(values)
    return out


def _blank_like(value):
  """The stand-in for a field of an example that could not be decoded."""
  if isinstance(value, dict):
    return dict.fromkeys(value, -1)
  return [] if isinstance(value, list) else np.zeros_like(value)


def records_split(directory: str) -> Split:
  try:
    meta = records.read_metadata(directory)
  except FileNotFoundError:
    raise NotFound(f"{directory} (records: no {records.METADATA})") from None
  shards = records.Shards(directory, meta)
  source = RecordSource(shards)
  tasks = {t: list(names) for t, names in (meta.get("zero_shot_tasks") or {}).items()}

  def example(i, side):
    read = source[i]
    decoded = Decode(side, augment=False, shards=shards).map((i, read))
    if "_skip" in decoded:
      return {}
    record = records.decode_joined(read[1])
    out = {"image": decoded["image"], "crop": decoded["crop"], "flip": decoded["flip"],
           "labels": {t: record.get("labels", {}).get(t, -1) for t in tasks},
           "captions": [record[k] for k in ("caption", "syn_caption") if k in record]}
    if "teacher_patches" in decoded:
      out["teacher_patches"] = decoded["teacher_patches"].astype(np.float32)
    return out

  return Split(f"records {directory}", len(source), example, tasks)


def folder_split(root: str) -> Split:
  if not os.path.isdir(root):
    raise NotFound(f"{root} (an image folder <class>/<image>)")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c)))
           if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not files:
    raise NotFound(f"{root} (no images in <class>/ subdirectories)")

  def example(i, side):
    path, label = files[i]
    try:
      with Image.open(path) as image:
        return {"image": transform.preprocess(image, side), "labels": {"label": label}}
    except Exception as e:  # an unreadable file is skipped, named and counted, never fatal
      logging.warning("skipped %s: %s", path, " ".join(str(e).split()) or type(e).__name__)
      return {}

  return Split(f"folder {root}", len(files), example, {"label": class_names(classes)})


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
  features = builder.info.features
  size = None
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    source = builder.as_data_source(split=split)
  elif builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    source = TFRecordSource(builder.info.splits[split].filepaths, features)
    size = max(len(source), builder.info.splits[split].num_examples)
    for path, why in source.damaged:
      logging.warning("%s is damaged (%s): its records after the damage are counted as skipped",
                      path, why)
  else:
    raise NotFound(f"{path} (prepared as {builder.info.file_format.value}: prepare it again "
                   "with file_format='array_record' or 'tfrecord')")
  tasks = {"label": class_names(features["label"].names)} if "label" in features else {}

  def example(i, side):
    try:
      found = source[i]                 # IndexError past a damaged file's last record
      out = {"image": transform.preprocess(
          Image.fromarray(np.asarray(found["image"]).squeeze()), side),
             "labels": {t: int(found[t]) for t in tasks}}
    except Exception:  # an undecodable example is skipped and counted, never fatal
      return {}
    if "captions" in features:
      out["captions"] = [t.decode() if isinstance(t, bytes) else str(t)
                         for t in found["captions"]["text"]]
    return out

  return Split(f"tfds {name}:{split} at {path}", len(source) if size is None else size, example,
               tasks)


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1     # CRC-32C (Castagnoli), reflected
    table.append(n)
  return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data` (here only of 8-byte lengths)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordSource:
  """Random access to TFRecord files without TensorFlow. Each record is a
  little-endian uint64 length, its 4-byte masked CRC-32C, the bytes and
  their CRC; the files are indexed once (offsets only, nothing decoded), and
  item `i` is record `i` deserialised by `features.deserialize_example_np`.
  Each length is checked against its CRC while indexing: a file is indexed
  up to a length that fails it or a record that runs past the file's end,
  and named in `damaged` with why. The records' own CRCs are not checked: a
  damaged record fails to deserialise and is skipped and counted like any
  undecodable example."""

  def __init__(self, paths, features):
    self.features, self.index, self.damaged = features, [], []
    for path in map(str, paths):
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        offset = 0
        while offset < size:
          f.seek(offset)
          head = f.read(12)
          if len(head) < 12:
            self.damaged.append((path, f"cut short at byte {offset}"))
            break
          (length,), (crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
          if masked_crc32c(head[:8]) != crc:
            self.damaged.append((path, f"the length at byte {offset} fails its CRC"))
            break
          if offset + 16 + length > size:
            self.damaged.append((path, f"cut short in the record at byte {offset}"))
            break
          self.index.append((path, offset + 12, length))
          offset += 16 + length

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    return self.features.deserialize_example_np(_read_at(*self.index[i]))


def _read_at(path: str, offset: int, size: int) -> bytes:
  """`size` bytes of the file at `path` from `offset` (indexed sources)."""
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read(size)


WDS_IMAGES = ("webp", "png", "jpg", "jpeg")


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    return None


def wds_split(root: str, split: str = "test") -> Split:
  """A CLIP_benchmark webdataset directory (module docstring): the tars are
  indexed once (member offsets), and each example reads its own bytes."""
  shards = _read_text(os.path.join(root, split, "nshards.txt"))
  if shards is None:
    raise NotFound(f"{root}/{split}/nshards.txt (a CLIP_benchmark webdataset)")
  if not shards.strip().isdigit():
    raise Damaged(f"{root}/{split}/nshards.txt holds {shards.strip()[:40]!r}, not a number of "
                  "shards: export or download the dataset again")
  retrieval = (_read_text(os.path.join(root, "dataset_type.txt")) or "").strip() == "retrieval"
  samples = {}                          # key -> {extension: (tar, offset, size)}
  for n in range(int(shards)):
    tar_path = os.path.join(root, split, f"{n}.tar")
    if not os.path.isfile(tar_path):
      raise NotFound(f"{tar_path} (shard {n} of the {shards.strip()} in nshards.txt)")
    try:
      with tarfile.open(tar_path) as tar:
        for member in tars.members(tar):
          if member.isfile():
            key, _, ext = os.path.basename(member.name).partition(".")
            samples.setdefault((tar_path, key), {})[ext.lower()] = (
                tar_path, member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as e:
      raise Damaged(f"{tar_path} is damaged ({' '.join(str(e).split())}): export or download "
                    "the dataset again") from None
  items = [s for s in samples.values() if any(e in s for e in WDS_IMAGES)]
  classes = (_read_text(os.path.join(root, "classnames.txt")) or "").splitlines()
  templates = _read_text(os.path.join(root, "zeroshot_classification_templates.txt"))
  if not retrieval and not classes:
    raise NotFound(f"{root}/classnames.txt (a classification webdataset needs its class names)")

  def example(i, side):
    item = items[i]
    try:
      image = _read_at(*next(item[e] for e in WDS_IMAGES if e in item))
      with Image.open(io.BytesIO(image)) as opened:
        out = {"image": transform.preprocess(opened, side)}
      if retrieval:
        out["captions"] = _read_at(*item["txt"]).decode("utf-8").splitlines()
      else:
        label = int(_read_at(*item["cls"]))
        if not 0 <= label < len(classes):     # out of classnames.txt's range: not scorable
          return {}
        out["labels"] = {"label": label}
    except Exception:  # an undecodable example is skipped and counted, never fatal
      return {}
    return out

  return Split(f"webdataset {root} ({split})", len(items), example,
               {} if retrieval else {"label": [c.strip() for c in classes]},
               [t.strip() for t in templates.splitlines()] if templates is not None else None)
