"""Inference export of a trained run, and the loader evaluation tools use.

    python -m dinorank_jax.export --workdir runs/r3 --out exports/r3 [--step N] [--data DIR]
                                  [--format open_clip] [--format hf]

writes `DIR/params` (an orbax checkpoint of the parameters that embed:
trunks, students, fusion and the logit scale; no optimiser state, no rank
heads, no teacher projections), `DIR/model_config.json` (the model's
constructor arguments, the input side, the tokenizer reference and where the
parameters came from) and `DIR/manifest.json` (the SHA-256 and size of every
file under `params/`, checked by `load`: a damaged or altered export is
refused in one line instead of embedding garbage). The model's vocabulary
and teacher widths are read from the run's dataset metadata
(`config.data.path`, or `--data`). `--format open_clip` also writes
`DIR/open_clip/` (open_clip's config and safetensors state dict), `--format hf`
`DIR/hf/` (a transformers `CLIPModel` directory): the trunks and logit scale,
without students or fusion (`dinorank_jax.convert`; docs/interop.md).

    import dinorank_jax
    model = dinorank_jax.load("exports/r3")
    u = model.encode_image(model.preprocess(images))   # PIL images or arrays, any size
    v = model.encode_text(["a photo of a dog", ...])   # or one string

returns the normalised fused embeddings as float32 NumPy arrays `[N, D]`,
computed in float32 (`dtype=`) in fixed-size jitted batches (the last one
padded).
"""

import argparse
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dinorank_jax import checkpoint, convert, errors
from dinorank_jax.data import records, transform
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH, TextTokenizer
from dinorank_jax.models import CONFIG_FIELDS, DinoRankCLIP, from_config
from dinorank_jax.models.layers import stack_layers
from dinorank_jax.models.vit import normalise_images

# 2: scanned encoders (`encoder/blocks`, stacked); 1: unrolled (`block_{i}`),
# converted by `stack_layers` on load.
FORMAT_VERSION = 2
CONFIG_FILE = "model_config.json"
MANIFEST = "manifest.json"


class DamagedExport(errors.UserError, ValueError):
  """An export whose files do not match its manifest."""


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
  """`{relative path: {"sha256", "bytes"}}` of every file under `directory/params`."""
  root = os.path.join(directory, "params")
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, directory)] = {"sha256": _sha256(path),
                                               "bytes": os.path.getsize(path)}
  return dict(sorted(out.items()))


def verify(directory: str) -> None:
  """Raises `DamagedExport` unless the files under `params/` are the manifest's."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    logging.warning("%s has no %s (exported before checksums): not verified", directory,
                    MANIFEST)
    return
  with open(path) as f:
    expected = json.load(f)
  found = manifest(directory)
  for name in sorted(expected.keys() | found.keys()):
    if name not in found:
      why = "is missing"
    elif name not in expected:
      why = "is not in the manifest"
    elif found[name] != expected[name]:
      why = "differs from the manifest (damaged or altered since the export)"
    else:
      continue
    raise DamagedExport(f"{os.path.join(directory, name)} {why}: export the run again "
                        "(python -m dinorank_jax.export)")


def _on_one_device(tree):
  """A restore target: the shapes and dtypes of `tree` on the default device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def trained_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The parameters saved at `step` (default: the latest) of a run, on one device."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise errors.UserError(f"no checkpoint {'' if step is None else step} in {directory}: "
                     "train the run first, or pass --step with one of "
                     f"{sorted(manager.all_steps())}")
  path = os.path.join(directory, str(step), "state")
  checkpoint.quiet_step_metadata_warning()
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(path, _on_one_device(checkpointer.metadata(path).item_metadata))
  return state["params"], step


def export(workdir: str, out: str, *, step: int | None = None, data: str | None = None,
           formats: tuple[str, ...] = ()) -> dict:
  """Writes the inference export of `workdir` to `out` (and the CLIP
  checkpoints of `formats`); returns its config."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise errors.UserError(f"no training run at --workdir {workdir} (no config.json): "
                           "pass the directory python -m dinorank_jax.main trained in") from None
  data = data or config.data.path
  try:
    meta = records.read_metadata(data)
  except FileNotFoundError:
    raise errors.UserError(f"the run's dataset {data!r} has no {records.METADATA}: pass "
                     "--data with the records it trained on (for the vocabulary)") from None
  params, step = trained_params(workdir, step)
  # Runs from before `config.model.scan` existed trained unrolled encoders;
  # every export holds the scanned layout.
  params = stack_layers(params)
  model_config = {
      "model": {**{k: config.model[k] for k in CONFIG_FIELDS if k in config.model},
                "scan": True, "vocab_size": meta["vocab_size"], "eot_id": meta["eot_id"]},
      "image_size": config.data.image_size,
      "preprocess": dict(transform.PREPROCESS),
      "tokenizer": meta["tokenizer"],
      "context_length": CONTEXT_LENGTH,
      "source": {"workdir": os.path.abspath(workdir), "step": step,
                 "rank_order": config.model.rank_order, "teacher": meta.get("teacher")},
  }
  model = _model(model_config)
  keep = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(model_config))["params"]
  params = {k: params[k] for k in keep}
  # Converted first: a format that cannot hold the trunks is refused before
  # anything is written.
  checkpoints = {fmt: clip_checkpoint(fmt, model_config, params) for fmt in formats}
  model_config = write(out, model_config, params)
  for fmt, checkpoint in checkpoints.items():
    write_clip_checkpoint(out, fmt, model_config, checkpoint)
    note = convert.students_left_behind(model_config)
    if note:
      logging.warning("--format %s: %s", fmt, note)
  return model_config


def write(out: str, model_config: dict, params: dict) -> dict:
  """`out/params`, its manifest and `out/model_config.json`; returns the
  config as written."""
  model_config = {"format_version": FORMAT_VERSION, **model_config}
  os.makedirs(out, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(os.path.abspath(out), "params"), params, force=True)
  checkpointer.wait_until_finished()
  records.write_json(os.path.join(out, MANIFEST), manifest(out))
  records.write_json(os.path.join(out, CONFIG_FILE), model_config)
  return model_config


def clip_checkpoint(fmt: str, model_config: dict, params: dict) -> tuple[dict, dict]:
  """`(state dict, config)` of an export's trunks as a CLIP checkpoint of
  `fmt` (`convert.FORMATS`)."""
  params = jax.tree.map(np.asarray, params)
  to = convert.to_open_clip if fmt == "open_clip" else convert.to_hf
  return to(model_config, params)


def write_clip_checkpoint(out: str, fmt: str, model_config: dict,
                          checkpoint: tuple[dict, dict]) -> None:
  """`out/<fmt>/`: a `clip_checkpoint` with the preprocessing its library
  reads (open_clip's model named `dinorank-<out's name>`)."""
  state, config = checkpoint
  directory = os.path.join(out, fmt)
  if fmt == "open_clip":
    name = "dinorank-" + os.path.basename(os.path.abspath(out))
    convert.write_open_clip(directory, state, config, convert.open_clip_preprocess(model_config),
                            name)
  else:
    convert.write_hf(directory, state, config, convert.hf_preprocessor(model_config))


def _model(model_config: dict, **overrides) -> DinoRankCLIP:
  """The exported network; rank heads are training-only (order 0 has none)."""
  m = model_config["model"]
  return from_config(m, vocab_size=m["vocab_size"], eot_id=m["eot_id"],
                     **{"rank_order": 0, **overrides})


def _dummy_inputs(model_config: dict):
  side = model_config["image_size"]
  return (jnp.zeros((1, side, side, 3), jnp.float32),
          jnp.zeros((1, model_config["context_length"]), jnp.int32))


class ExportedModel:
  """An exported DinoRankCLIP, used as open_clip's models are:

      model = dinorank_jax.load("exports/r3")
      pixels = model.preprocess(images)       # PIL images or arrays, any size, one or many
      u = model.encode_image(pixels)           # [N, D] unit rows
      v = model.encode_text(["a dog", "a cat"])  # a list, or one string

  Also `tokenize` (texts -> int32 `[N, 77]`), `logit_scale`, `dtype` (the
  compute dtype) and `image_student_tokens` (the image student's patch
  tokens, for distillation fidelity) when `has_image_student`."""

  def __init__(self, model: DinoRankCLIP, params: dict, model_config: dict,
               batch_size: int = 256):
    self.model, self.params, self.config = model, params, model_config
    self.image_size, self.batch_size = model_config["image_size"], batch_size
    self.dtype = jnp.dtype(model.dtype).name
    self.tokenizer = TextTokenizer.from_id(model_config["tokenizer"])
    self.logit_scale = float(jnp.exp(params["logit_scale"]))
    self.has_image_student = model.students != "none"
    self._images = jax.jit(lambda p, x: model.apply(
        {"params": p}, normalise_images(x), method=DinoRankCLIP.embed_images)["image"])
    self._student_tokens = jax.jit(lambda p, x: model.apply(
        {"params": p}, normalise_images(x),
        method=DinoRankCLIP.embed_images)["image_student"]["tokens"].astype(jnp.float32))
    self._texts = jax.jit(lambda p, t: model.apply(
        {"params": p}, t, method=DinoRankCLIP.embed_texts)["text"])

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
      out.append(np.asarray(fn(self.params, padded))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)

  def preprocess(self, images) -> np.ndarray:
    """uint8 `[N, S, S, 3]` at the export's side `S`: one image or many (PIL
    images, encoded bytes, uint8 arrays or float arrays in [0, 1], of any
    size and mode) through the export's evaluation transform
    (`data.transform`: shorter side resized, centre square, RGB)."""
    return transform.preprocess_many(images, self.image_size)

  def _pixels(self, images) -> np.ndarray:
    """`preprocess`'s output as it is; anything else through `preprocess`."""
    side = self.image_size
    if (isinstance(images, np.ndarray) and images.ndim == 4
        and images.shape[1:] == (side, side, 3)):
      return images.astype(np.float32) * (1.0 if images.dtype == np.uint8 else 255.0)
    return self.preprocess(images).astype(np.float32)

  def encode_image(self, images) -> np.ndarray:
    """`preprocess`'s output (or any input it takes) -> `[N, D]` unit rows."""
    return self._batched(self._images, self._pixels(images))

  def image_student_tokens(self, images) -> np.ndarray:
    """Images as for `encode_image` -> the image student's patch tokens `[N, n, c]`."""
    if not self.has_image_student:
      raise ValueError("this model has no image student (students='none')")
    return self._batched(self._student_tokens, self._pixels(images))

  def tokenize(self, texts: str | list[str]) -> np.ndarray:
    """One text or a list -> int32 `[N, context_length]`, as in training."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return np.asarray(self.tokenizer(texts, self.config["context_length"]), np.int32)

  def encode_text(self, texts: str | list[str]) -> np.ndarray:
    """One text or a list (a bare string is one text) -> `[N, D]` unit rows."""
    return self._batched(self._texts, self.tokenize(texts))


def read(directory: str) -> tuple[dict, dict]:
  """`(model_config, params)` of the export at `directory` (written by
  `export`), on the default device; its files are checked against its
  manifest first."""
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise errors.UserError(f"no export at {directory} (no {CONFIG_FILE}): write one with "
                           "python -m dinorank_jax.export --workdir RUN --out DIR")
  verify(directory)
  with open(config_path) as f:
    model_config = json.load(f)
  version = model_config.get("format_version")
  if version not in (1, FORMAT_VERSION):
    raise errors.UserError(f"{directory}: export format {version}, this code reads 1 and "
                     f"{FORMAT_VERSION}; export the run again (python -m dinorank_jax.export)")
  stored = _model(model_config, scan=version == FORMAT_VERSION)
  target = jax.eval_shape(stored.init, jax.random.key(0), *_dummy_inputs(model_config))["params"]
  params = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), _on_one_device(target))
  return model_config, stack_layers(params)


DTYPES = ("float32", "bfloat16")


def load(directory: str, *, batch_size: int = 256, dtype: str = "float32") -> ExportedModel:
  """The export at `directory` as an `ExportedModel` (see `read`), computing
  in `dtype`: float32 by default, as open_clip evaluates; `bfloat16` (the
  training dtype of the GPU recipes) is faster and moves embeddings by about
  1e-2."""
  if dtype not in DTYPES:
    raise errors.UserError(f"dtype {dtype!r}: pick one of {', '.join(DTYPES)}")
  model_config, params = read(directory)
  return ExportedModel(_model(model_config, scan=True, dtype=dtype), params, model_config,
                       batch_size)


@errors.guard
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dinorank_jax.export",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--out", required=True, help="export directory to write")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--data", help="the run's records (default: its config.data.path)")
  p.add_argument("--format", action="append", choices=convert.FORMATS, default=[],
                 help="also write the trunks as this CLIP checkpoint, in OUT/<format> "
                      "(repeatable)")
  args = p.parse_args(argv)
  model_config = export(args.workdir, args.out, step=args.step, data=args.data,
                        formats=tuple(dict.fromkeys(args.format)))
  print(f"exported step {model_config['source']['step']} of {args.workdir} to {args.out}")


if __name__ == "__main__":
  main()
