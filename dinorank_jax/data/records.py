"""The corpus format: one ArrayRecord record per image-caption pair (method §7).

A record is a msgpack map; NumPy arrays are stored as `{"__nd__": dtype,
"shape": [...], "data": bytes}`, so any Python with msgpack and NumPy reads
it (no TensorFlow). Fields:

    key                   str
    jpeg                  bytes, short side ≤ the builder's bound
    caption               str
    tokens                int32 [77]
    syn_caption           str, optional: a synthetic caption (ALIP's second path)
    syn_tokens            int32 [77], with syn_caption
    teacher_cls           float16 [C]        image teacher class token
    teacher_patches       float16 [h, w, 256] PCA-reduced patch grid (whole image)
    teacher_text_tokens   float16 [T, c]
    teacher_text_mask     bool [T]
    teacher_text_pooled   float16 [c]

A dataset is a directory of `shard-NNNNN.array_record` files, each with a
`shard-NNNNN.json` sidecar (counts, skipped keys), and a `metadata.json`.
Shards are written to a temporary name and renamed when complete, so a
re-run skips finished shards and never reads a partial one.

The teacher fields live in a dataset of their own, written by
`dinorank_jax.teacher.export`: its records hold `key` and the teacher fields
only, in shards aligned one to one with the image dataset's, which its
`metadata.json` names (`images`, a path relative to it) together with that
dataset's `build.json` (`images_build`). Readers join the two by index, so
every image is stored once; a join whose keys, shard counts or build
arguments disagree is refused or skipped, never trained on.

Readers check every record against `metadata.json` (`check_record`: field
presence, dtypes, shapes, the teacher grid, the token range, a non-empty
caption, finite teacher features) and name a bad one by shard and index
(`Shards.where`); a record that fails is skipped for one of `SKIP_REASONS`.
"""

import bisect
import errno
import json
import logging
import os

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from dinorank_jax.errors import UserError

SCHEMA_VERSION = 1
METADATA = "metadata.json"
BUILD_FILE = "build.json"
TEACHER_FIELDS = ("teacher_cls", "teacher_patches", "teacher_text_tokens",
                  "teacher_text_mask", "teacher_text_pooled")
# Why a record is skipped: its bytes cannot be read from the shard; they are
# not a record or its JPEG does not decode; a field is missing or has the
# wrong dtype or shape; its teacher features are NaN or infinite.
SKIP_REASONS = ("unreadable", "corrupt", "invalid", "nonfinite")


class DataError(UserError, ValueError):
  """The dataset cannot be trained on; the message names the file and the fix."""


def _expected_fields(meta: dict, syn_captions: bool) -> dict:
  """Field -> (dtype kinds, shape) a record of `meta`'s dataset must have."""
  tokens = ("i", (meta.get("context_length", 77),))
  fields = {"tokens": tokens}
  if syn_captions:
    fields["syn_tokens"] = tokens
  teacher = meta.get("teacher")
  if teacher:
    length, width = teacher["text_length"], teacher["text_dim"]
    fields.update(teacher_patches=("f", (*teacher["grid"], teacher["pca_dim"])),
                  teacher_cls=("f", (teacher["cls_dim"],)),
                  teacher_text_tokens=("f", (length, width)),
                  teacher_text_mask=("b", (length,)),
                  teacher_text_pooled=("f", (width,)))
  return fields


def decode_joined(parts: list[bytes]):
  """The record `pipeline.RecordSource` read as `parts` (the record, then its
  image record for a teacher-feature dataset), decoded and joined; a string
  saying why when the two do not belong together. Bad bytes raise."""
  if len(parts) == 1:
    return decode_record(parts[0])
  features, images = map(decode_record, parts)
  if not (isinstance(features, dict) and isinstance(images, dict)):
    return "not a record"
  if features.get("key") != images.get("key"):
    return (f"teacher features of key {features.get('key')!r} sit beside the image record of "
            f"key {images.get('key')!r}: the two datasets are out of step (rerun the teacher "
            "export with --overwrite)")
  return {**images, **features}


def check_record(record, meta: dict, *, syn_captions: bool = False) -> tuple[str, str] | None:
  """`(reason, detail)` when the decoded `record` does not fit `meta`, else None.

  `reason` is `invalid` (missing field, wrong dtype or shape, token ids out
  of the vocabulary, no end-of-text id: an empty caption) or `nonfinite`
  (NaN or infinite teacher features). JPEG bytes are checked by decoding.
  """
  if not isinstance(record, dict):
    return "corrupt", f"not a record ({type(record).__name__})"
  for name, kind in (("key", str), ("caption", str), ("jpeg", bytes)):
    if not isinstance(record.get(name), kind):
      return "invalid", f"field {name!r} missing or not {kind.__name__}"
  if not record["caption"].strip():
    return "invalid", "empty caption"
  for name, (kinds, shape) in _expected_fields(meta, syn_captions).items():
    value = record.get(name)
    if not isinstance(value, np.ndarray):
      return "invalid", f"field {name!r} missing"
    if value.dtype.kind not in kinds or tuple(value.shape) != tuple(shape):
      return "invalid", (f"field {name!r} is {value.dtype}{list(value.shape)}, "
                         f"{METADATA} says {list(shape)}")
  for name in ("tokens", "syn_tokens") if syn_captions else ("tokens",):
    tokens = record[name]
    if tokens.min() < 0 or tokens.max() >= meta["vocab_size"]:
      return "invalid", (f"field {name!r} has ids outside [0, {meta['vocab_size']}) "
                         f"(the vocabulary in {METADATA})")
    if not np.any(tokens == meta["eot_id"]):
      return "invalid", f"field {name!r} has no end-of-text id {meta['eot_id']} (empty caption?)"
  if meta.get("teacher"):
    for name in TEACHER_FIELDS:
      if record[name].dtype.kind == "f" and not all_finite(record[name]):
        return "nonfinite", f"field {name!r} holds NaN or infinite values"
  return None


# A float is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00),
                  np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(values: np.ndarray) -> bool:
  """`np.isfinite(values).all()`, for float16 and float32 from the exponent
  bits: NumPy's float16 `isfinite` is not vectorised (100 µs for a record's
  teacher fields against 22)."""
  if values.dtype not in _EXPONENT_BITS:
    return bool(np.isfinite(values).all())
  bits, exponent = _EXPONENT_BITS[values.dtype]
  return int((values.view(bits) & exponent).max(initial=0)) != exponent


class Shards:
  """The shards of a dataset that can be opened, and where a record lives.

  A shard whose file is missing, truncated or holds another record count than
  its metadata says is left out, named in `unusable` with the reason, and
  its records are counted in `lost`.
  """

  def __init__(self, directory: str, meta: dict | None = None):
    self.directory = directory
    self.meta = read_metadata(directory) if meta is None else meta
    self.images = images_directory(directory, self.meta)   # None: the records hold the images
    self.paths, self.image_paths, self.counts, self.unusable, self.lost = [], [], [], [], 0
    for shard in self.meta["shards"]:
      path = os.path.join(directory, shard["file"])
      image_path = os.path.join(self.images, shard["file"]) if self.images else None
      problems = [_count_problem(path, shard["count"])]
      if image_path:
        problem = _count_problem(image_path, shard["count"])
        problems.append(problem and f"its images in {self.images}: {problem}")
      problems = [p for p in problems if p]
      if problems:
        self.unusable.append(f"{shard['file']} ({'; '.join(problems)})")
        self.lost += shard["count"]
      else:
        self.paths.append(path)
        self.image_paths.append(image_path)
        self.counts.append(shard["count"])
    self.starts = np.cumsum([0] + self.counts[:-1]).tolist()

  @property
  def total(self) -> int:
    return sum(self.counts) + self.lost

  def where(self, index: int) -> str:
    """`shard-NNNNN.array_record #i` for the `index`-th usable record."""
    shard = bisect.bisect_right(self.starts, index) - 1
    return f"{os.path.basename(self.paths[shard])} #{index - self.starts[shard]}"


def _count_problem(path: str, count: int) -> str | None:
  """Why the shard at `path` cannot serve its `count` records, or None."""
  if not os.path.exists(path):
    return "missing"
  try:
    reader = ArrayRecordReader(path)
    found = reader.num_records()
    reader.close()       # reports the damage of a truncated file, if the rest did not
  except Exception:  # Riegeli raises RuntimeError for a damaged footer or index
    found = 0
  return None if found == count else f"{found} readable records of {count}"


def read_build(directory: str) -> dict | None:
  """The arguments a builder recorded in `directory` (`build.json`); None
  when there is none or it does not parse."""
  try:
    with open(os.path.join(directory, BUILD_FILE)) as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


def images_directory(directory: str, meta: dict) -> str | None:
  """The image dataset a teacher-feature dataset joins (its `images`), checked
  to be the build the features were exported from; None for a dataset whose
  records hold their images."""
  if not meta.get("images"):
    return None
  images = os.path.normpath(os.path.join(directory, meta["images"]))
  try:
    image_meta, build = read_metadata(images), read_build(images)
  except (OSError, ValueError):
    raise DataError(f"{directory} holds teacher features of the images in {images}, which is "
                    f"missing or unreadable: keep the two directories side by side (the path "
                    f"is '{meta['images']}' in {METADATA}), or rerun the teacher export") from None
  if build != meta.get("images_build") or [
      (s["file"], s["count"]) for s in image_meta["shards"]] != [
      (s["file"], s["count"]) for s in meta["shards"]]:
    raise DataError(f"{images} was rebuilt after the teacher features in {directory} were "
                    "exported from it: rerun python -m dinorank_jax.teacher.export with "
                    "--overwrite")
  return images


def _pack(value):
  if isinstance(value, np.ndarray):
    return {"__nd__": value.dtype.str, "shape": list(value.shape),
            "data": np.ascontiguousarray(value).tobytes()}
  raise TypeError(f"cannot serialise {type(value).__name__} in a record")


def _unpack(obj):
  if "__nd__" in obj:
    return np.frombuffer(obj["data"], np.dtype(obj["__nd__"])).reshape(obj["shape"])
  return obj


def encode_record(record: dict) -> bytes:
  return msgpack.packb(record, default=_pack, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """The record's dict; arrays are read-only views of `data`."""
  return msgpack.unpackb(data, object_hook=_unpack, raw=False)


def shard_name(index: int) -> str:
  return f"shard-{index:05d}"


def shard_paths(directory: str) -> list[str]:
  """The record files of a dataset, in shard order (from its metadata)."""
  meta = read_metadata(directory)
  return [os.path.join(directory, s["file"]) for s in meta["shards"]]


def write_shard(directory: str, index: int, records, stats: dict) -> dict:
  """Writes `records` (dicts) as one shard atomically; returns its sidecar.

  `stats` (counts of skipped inputs and their keys) goes into the sidecar,
  which is written last: its presence marks the shard complete.
  """
  name = shard_name(index)
  final = os.path.join(directory, name + ".array_record")
  tmp = final + ".tmp"
  count = 0
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
      writer.write(encode_record(record))
      count += 1
    writer.close()
  except RuntimeError as e:               # array_record's C++ errors arrive as RuntimeError
    if "No space left" in str(e):
      raise OSError(errno.ENOSPC, "No space left on device", tmp) from None
    raise
  os.replace(tmp, final)
  sidecar = {"file": name + ".array_record", "count": count, **stats}
  write_json(os.path.join(directory, name + ".json"), sidecar)
  return sidecar


def read_sidecar(directory: str, index: int) -> dict | None:
  path = os.path.join(directory, shard_name(index) + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_shard(path: str) -> list[bytes]:
  reader = ArrayRecordReader(path)
  try:
    return reader.read_all()
  finally:
    reader.close()


def _dataset_file(name: str) -> bool:
  return name in (METADATA, BUILD_FILE, "pca.npz") or name.startswith("shard-")


def claim_directory(directory: str, arguments: dict, overwrite: bool) -> None:
  """Makes `directory` the output of the command run with `arguments`
  (recorded in its `build.json`): a new directory, or one the same command
  and arguments started (resumed), or, with `overwrite`, one emptied of an
  earlier dataset's files. Otherwise raises `DataError` naming the arguments
  that differ, so shards of two different builds never mix."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, BUILD_FILE)
  recorded = read_build(directory)
  existing = [n for n in os.listdir(directory) if _dataset_file(n) and n != BUILD_FILE]
  if recorded == arguments or not existing:
    write_json(path, arguments)
    return
  if not overwrite:
    if recorded is None:
      what = "a dataset whose build arguments were not recorded"
    else:
      differ = sorted(k for k in recorded.keys() | arguments.keys()
                      if recorded.get(k) != arguments.get(k))
      what = "a dataset written with other arguments (" + ", ".join(
          f"{k}: {recorded.get(k)} -> {arguments.get(k)}" for k in differ) + ")"
    raise DataError(f"--out {directory} holds {what}: pass --overwrite to replace it, or "
                    "choose another --out")
  for name in existing:
    os.remove(os.path.join(directory, name))
  logging.warning("--overwrite: removed the %d files of the earlier dataset in %s",
                  len(existing), directory)
  write_json(path, arguments)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


class MissingDataset(DataError, FileNotFoundError):
  """No `metadata.json` where a dataset was expected."""


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise MissingDataset(f"no {METADATA} in {directory}: build the dataset first "
                         "(python -m dinorank_jax.data.build --out DIR ...)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}): rebuild the dataset") from None
  if meta.get("schema_version") != SCHEMA_VERSION:
    raise DataError(f"{path}: schema_version {meta.get('schema_version')}, this code reads "
                    f"{SCHEMA_VERSION}; rebuild the dataset")
  return meta
