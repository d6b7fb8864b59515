"""Builds the demo's synthetic corpora with teacher features, when absent.

For each of the train and held-out paths: `dinorank_jax.data.build
--source synthetic` into `<path>-raw` (different corpus seeds), then the
teacher export with the tiny untrained teacher into `<path>`, which holds
the teacher's features and reads the images from `<path>-raw`. The export
runs as its own process (`python -m dinorank_jax.teacher.export`), as on a
cluster: torch never enters the training process. Both steps skip finished
shards, so an interrupted preparation resumes.
"""

import os
import subprocess
import sys

from dinorank_jax.data import build, records


def _complete(directory: str) -> bool:
  try:
    return records.read_metadata(directory).get("teacher") is not None
  except FileNotFoundError:
    return False


def synthetic_corpus(path: str, *, num: int, seed: int, image_size: int, teacher_size: int,
                     workers: int = 2) -> None:
  """Makes `path` a synthetic corpus of `num` pairs with teacher features."""
  if _complete(path):
    return
  raw = path.rstrip("/") + "-raw"
  build.build(build.parser().parse_args([
      "--source", "synthetic", "--out", raw, "--num", str(num), "--seed", str(seed),
      "--image_size", str(image_size), "--shard_size", "1024", "--workers", str(workers)]))
  subprocess.run([sys.executable, "-m", "dinorank_jax.teacher.export", "--data", raw,
                  "--out", path, "--image_teacher", "tiny-untrained",
                  "--image_size", str(teacher_size), "--pca_dim", "32",
                  "--pca_images", "256", "--text_length", "24"], check=True)
  if not _complete(path):
    raise RuntimeError(f"the teacher export did not complete {path}; delete it and rerun")


def prepare(config) -> None:
  """Runs the preparation `config.data.prepare` names ("" = none)."""
  kind = config.data.prepare
  if not kind:
    return
  if kind != "synthetic":
    raise ValueError(f"unknown config.data.prepare={kind!r}: '' or 'synthetic'")
  s = config.data.synthetic
  for path, num, seed in ((config.data.path, s.num_train, 0),
                          (config.data.eval_path, s.num_eval, 1)):
    if not path:          # no held-out path: no evaluation, nothing to build
      continue
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    synthetic_corpus(path, num=num, seed=seed, image_size=s.image_size,
                     teacher_size=s.teacher_size)
