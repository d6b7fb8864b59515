"""Small synthetic corpora with stand-in teacher features, written without
torch (the teacher export has its own test): seeded Gaussian features of
the shapes the export writes."""

import io
import os
import tarfile

import numpy as np
from PIL import Image

from dinorank_jax.data import build, records

TEACHER = {"image": "gaussian-stand-in", "text": "gaussian-stand-in", "image_size": 64,
           "grid": [4, 4], "pca_file": None, "pca_dim": 8, "cls_dim": 10, "text_dim": 6,
           "text_length": 12}


def corpus(directory: str, *, num: int, seed: int = 0, poison: bool = False) -> str:
  """A corpus of `num` synthetic pairs: the images at `directory-raw`, the
  stand-in teacher features joined to them at `directory`, as the export
  writes them; `poison` makes every record's teacher patch grid infinite."""
  raw = directory + "-raw"
  args = build.parser().parse_args(["--source", "synthetic", "--out", raw, "--num", str(num),
                                    "--seed", str(seed), "--image_size", "48",
                                    "--shard_size", "64", "--workers", "1"])
  meta = build.build(args)
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for index, path in enumerate(records.shard_paths(raw)):
    features = []
    for r in records.read_shard(path):
      patches = rng.normal(size=(4, 4, 8)).astype(np.float16)
      features.append({
          "key": records.decode_record(r)["key"],
          "teacher_patches": np.full_like(patches, np.inf) if poison else patches,
          "teacher_cls": rng.normal(size=10).astype(np.float16),
          "teacher_text_tokens": rng.normal(size=(12, 6)).astype(np.float16),
          "teacher_text_mask": np.arange(12) < rng.integers(2, 12),
          "teacher_text_pooled": rng.normal(size=6).astype(np.float16)})
    records.write_shard(directory, index, features, {})
  records.write_json(os.path.join(directory, records.METADATA), {
      **meta, "teacher": TEACHER, "images": os.path.relpath(raw, directory),
      "images_build": records.read_build(raw)})
  return directory


def corpora(root: str, *, num_train: int, num_eval: int = 64, poison: bool = False) -> str:
  """`root/train` and `root/val` (different seeds), as `tiny_config` expects."""
  corpus(os.path.join(root, "train"), num=num_train, poison=poison)
  corpus(os.path.join(root, "val"), num=num_eval, seed=1)
  return root


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def build_args(**kw):
  """`data.build`'s arguments: `source` and `out`, then any field set."""
  args = build.parser().parse_args(["--source", kw.pop("source"), "--out", kw.pop("out")])
  for k, v in kw.items():
    setattr(args, k, v)
  return args


def synthetic(tmp_path, num: int = 64, **kw) -> str:
  """A synthetic dataset of `num` 48-px scenes in shards of 16, at `tmp_path/syn`."""
  out = str(tmp_path / "syn")
  build.build(build_args(source="synthetic", out=out, num=num, shard_size=16, workers=1,
                         image_size=48, **kw))
  return out


def wds(root, examples, *, classes=None, templates=None) -> str:
  """`examples` `[(name, image bytes, label)]` (with `classes`, and the
  `templates` text when given) or `[(name, image bytes, [captions])]` (a
  retrieval set, without) written as `clip_benchmark_export_wds` lays a test
  split out under the `pathlib.Path` `root`; returns `root`."""
  retrieval = classes is None
  os.makedirs(root / "test")
  with tarfile.open(root / "test" / "0.tar", "w") as tar:
    for i, (_, data, target) in enumerate(examples):
      ext = "png" if data.startswith(b"\x89PNG") else "jpg"
      text = "\n".join(target).encode() if retrieval else str(target).encode()
      for member, payload in ((ext, data), ("txt" if retrieval else "cls", text)):
        info = tarfile.TarInfo(f"s{i:07d}.{member}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  (root / "test" / "nshards.txt").write_text("1\n")
  if retrieval:
    (root / "dataset_type.txt").write_text("retrieval\n")
  else:
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    if templates is not None:
      (root / "zeroshot_classification_templates.txt").write_text(templates)
  return str(root)
