"""The corpus format: one ArrayRecord record per image-caption pair (SPEC §7).

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

(the teacher fields are added by `dinorank_jax.teacher.export`). A dataset
is a directory of `shard-NNNNN.array_record` files, each with a
`shard-NNNNN.json` sidecar (counts, skipped keys), and a `metadata.json`.
Shards are written to a temporary name and renamed when complete, so a
re-run skips finished shards and never reads a partial one.
"""

import json
import os

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

SCHEMA_VERSION = 1
METADATA = "metadata.json"
TEACHER_FIELDS = ("teacher_cls", "teacher_patches", "teacher_text_tokens",
                  "teacher_text_mask", "teacher_text_pooled")


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
  writer = ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  for record in records:
    writer.write(encode_record(record))
    count += 1
  writer.close()
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


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {METADATA} in {directory}: build the dataset first "
                            "(python -m dinorank_jax.data.build --out DIR ...)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path}: schema_version {meta.get('schema_version')}, this code reads "
                     f"{SCHEMA_VERSION}; rebuild the dataset")
  return meta
