"""Held-out evaluation during training: zero-shot classification and
image-text retrieval on a records directory.

Every process takes part: each decodes its rows of every global batch, the
embeddings are computed sharded over the mesh and gathered to every process,
which then all compute the same metrics (an evaluation on the lead process
alone would leave the others waiting at the next collective).

Zero-shot tasks are those the dataset's metadata lists (`zero_shot_tasks`,
class names per task; the synthetic corpus has `colour`, `shape` and the
fine-grained `colour_shape_texture`) with each record's `labels`. Class
embeddings average the normalised text embeddings of
`prompts.SYNTHETIC_TEMPLATES`. Retrieval R@1 counts a hit when the caption of
image i is the nearest of all captions (`i2t`), and the other way round
(`t2i`); `metrics` computes both. The full evaluation of an exported model
is `python -m dinorank_jax.evaluate`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dinorank_jax import parallel
from dinorank_jax.data import records
from dinorank_jax.data.pipeline import Decode, RecordSource
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH, TextTokenizer
from dinorank_jax.evaluate import metrics as metrics_lib
from dinorank_jax.evaluate.prompts import SYNTHETIC_TEMPLATES, class_embeddings
from dinorank_jax.models import DinoRankCLIP
from dinorank_jax.models.vit import normalise_images


def sharded_map(fn, params, mesh, n: int, load, batch_size: int) -> dict:
  """`fn(params, batch)` over rows `0 … n−1` in global batches of `batch_size`.

  `load(indices)` returns this process's rows as a dict of NumPy arrays (the
  last batch repeats row n−1 as padding); the outputs of every batch are
  gathered to every process and returned as NumPy arrays `[n, ...]`.
  """
  count, index = jax.process_count(), jax.process_index()
  rows = batch_size // count
  outputs = []
  for start in range(0, n, batch_size):
    indices = np.minimum(start + index * rows + np.arange(rows), n - 1)
    out = fn(params, parallel.global_batch(mesh, load(indices)))
    outputs.append(jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out))
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outputs)


def _split_loader(directory: str, image_size: int, tasks):
  shards = records.Shards(directory)
  source = RecordSource(shards)
  decode = Decode(image_size, augment=False, shards=shards)

  def load(indices):
    images, tokens, valid = [], [], []
    labels = {t: [] for t in tasks}
    for i in indices:
      read = source[int(i)]
      example = decode.map((int(i), read))
      ok = "_skip" not in example
      valid.append(ok)
      images.append(example["image"] if ok else np.zeros((image_size, image_size, 3), np.uint8))
      tokens.append(example["tokens"] if ok else np.zeros(CONTEXT_LENGTH, np.int32))
      record_labels = records.decode_joined(read[1]).get("labels", {}) if ok else {}
      for t in tasks:
        labels[t].append(record_labels.get(t, -1))
    return {"image": np.stack(images), "tokens": np.stack(tokens), "valid": np.asarray(valid),
            **{f"label_{t}": np.asarray(v, np.int32) for t, v in labels.items()}}
  return len(source), load


def evaluate(model: DinoRankCLIP, params, mesh, directory: str, *, batch_size: int,
             image_size: int) -> dict[str, float]:
  """`zero_shot/<task>` accuracy per task and `retrieval/{i2t,t2i}_r1` on the
  records at `directory`, plus `eval/skipped` (undecodable records) and
  `eval/examples` (those scored). Computed in float32 whatever the training
  dtype, as `python -m dinorank_jax.evaluate` computes by default, so the two
  agree."""
  model = model.clone(dtype=jnp.float32)
  meta = records.read_metadata(directory)
  tasks = meta.get("zero_shot_tasks") or {}

  @functools.partial(jax.jit, static_argnames="with_images")
  def embed(params, batch, with_images=True):
    variables = {"params": params}
    out = {"text": model.apply(variables, batch["tokens"], method=DinoRankCLIP.embed_texts)["text"]}
    if with_images:
      out["image"] = model.apply(variables, normalise_images(batch["image"]),
                                 method=DinoRankCLIP.embed_images)["image"]
      out.update({k: v for k, v in batch.items() if k == "valid" or k.startswith("label_")})
    return out

  n, load = _split_loader(directory, image_size, tasks)
  split = sharded_map(embed, params, mesh, n, load, batch_size)
  valid = split["valid"]
  image, text = split["image"][valid], split["text"][valid]
  recall = metrics_lib.retrieval(image, text, np.arange(len(image)), ks=(1,))
  metrics = {"eval/skipped": float(n - valid.sum()), "eval/examples": float(valid.sum()),
             **{f"retrieval/{k}": v for k, v in recall.items()}}

  tokenizer = TextTokenizer.from_id(meta["tokenizer"])   # the corpus' own

  def encode_text(texts):
    tokens = np.asarray(tokenizer(texts, CONTEXT_LENGTH), np.int32)
    return sharded_map(functools.partial(embed, with_images=False), params, mesh,
                       len(tokens), lambda i: {"tokens": tokens[i]}, batch_size)["text"]

  for task, names in tasks.items():
    classes = class_embeddings(encode_text, names, SYNTHETIC_TEMPLATES)
    labels = split[f"label_{task}"][valid]
    known = labels >= 0
    metrics[f"zero_shot/{task}"] = metrics_lib.zero_shot(image[known], classes, labels[known],
                                                         ks=(1,))["top1"]
  return metrics
