"""Inference export of a trained run, and the loader evaluation tools use.

    python -m dinorank_jax.export --workdir runs/r3 --out exports/r3 [--step N|best] [--data DIR]
                                  [--format open_clip] [--format hf] [--overwrite]

writes `DIR/params` (an orbax checkpoint of the parameters that embed:
trunks, students, fusion and the logit scale; no optimiser state, no rank
heads, no teacher projections), `DIR/model_config.json` (the model's
constructor arguments, the input side, the tokenizer reference and where the
parameters came from) and `DIR/manifest.json` (the SHA-256 and size of every
other file, checked by `load`: a damaged or altered export is refused in one
line instead of embedding garbage). The export is written beside `DIR` and
renamed into place when complete; an existing export at `DIR` is replaced
only with `--overwrite`. The model's vocabulary
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
import errno
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dinorank_jax import checkpoint, convert, errors, parallel
from dinorank_jax.data import records, transform
from dinorank_jax.data.tokenizer import CONTEXT_LENGTH, TextTokenizer
from dinorank_jax.models import CONFIG_FIELDS, DinoRankCLIP, from_config
from dinorank_jax.models.layers import stack_layers
from dinorank_jax.models.vit import normalise_images

# 2: scanned encoders (`encoder/blocks`, stacked); 1: unrolled (`block_{i}`),
# converted by `stack_layers` on load. 3: format 2 whose manifest covers every
# file (the config and the CLIP checkpoints too) and must be present.
FORMAT_VERSION = 3
CONFIG_FILE = "model_config.json"
MANIFEST = "manifest.json"
_PARTS = ("params", *convert.FORMATS)     # an export's directories


class DamagedExport(errors.UserError, ValueError):
  """An export whose files do not match its manifest."""


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
  """`{relative path: {"sha256", "bytes"}}` of every file of the export at
  `directory` but the manifest itself."""
  out = {}
  for folder, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, directory)
      if relative != MANIFEST:
        out[relative] = {"sha256": _sha256(path), "bytes": os.path.getsize(path)}
  return dict(sorted(out.items()))


def _covered(name: str, legacy: bool) -> bool:
  """Whether the manifest must list `name`: every file of the export (format
  3 on), or those under `params/` (a format 1 or 2 manifest)."""
  top = name.split(os.sep)[0]
  return top == "params" if legacy else (name == CONFIG_FILE or top in _PARTS)


def verify(directory: str, required: bool = True) -> None:
  """Raises `DamagedExport` unless the export's files are its manifest's.
  Without a manifest: an error when `required` (format 3 on), else a warning
  (exports from before checksums)."""
  path = os.path.join(directory, MANIFEST)
  again = ("write it again (python -m dinorank_jax.export, or python -m dinorank_jax.convert "
           "import)")
  if not os.path.exists(path):
    if required:
      raise DamagedExport(f"{path} is missing, so the export's files cannot be checked: {again}")
    logging.warning("%s has no %s (exported before checksums): not verified", directory,
                    MANIFEST)
    return
  try:
    with open(path) as f:
      expected = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise DamagedExport(f"{path} is damaged (not JSON): {again}") from None
  legacy = CONFIG_FILE not in expected
  found = {k: v for k, v in manifest(directory).items() if _covered(k, legacy)}
  for name in sorted(expected.keys() | found.keys()):
    if name not in found:
      why = "is missing"
    elif name not in expected:
      why = "is not in the manifest"
    elif found[name] != expected[name]:
      why = "differs from the manifest (damaged or altered since the export)"
    else:
      continue
    raise DamagedExport(f"{os.path.join(directory, name)} {why}: {again}")


def check_finite(params: dict, where: str) -> None:
  """Raises a one-line `UserError` naming the first parameter that holds NaN or Inf."""
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not np.isfinite(np.asarray(value, np.float32)).all():
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise errors.UserError(f"{where}: parameter {name} holds NaN or Inf values: "
                             "not a usable model (export an earlier --step)")


def _on_one_device(tree):
  """A restore target: the shapes and dtypes of `tree` on the default device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def trained_params(workdir: str, step: int | str | None = None) -> tuple[dict, int]:
  """The parameters saved at `step` (default: the latest; "best": the best
  checkpoint of `config.eval.keep_best`) of a run, on one device."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if step == "best":
    best = checkpoint.read_best(workdir)
    if best is None:
      raise errors.UserError(f"--step best: {workdir} keeps no best checkpoint (no "
                             f"{checkpoint.BEST_FILE}): train it with config.eval.keep_best set, "
                             "or pass a step number")
    step = best["step"]
  steps = checkpoint.saved_steps(workdir)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None or step not in steps:
    raise errors.UserError(f"no checkpoint {'' if step is None else step} in {directory}: "
                           f"train the run first, or pass --step with one of {steps}")
  path = os.path.join(directory, str(step), "state")
  checkpoint.quiet_orbax_noise()
  try:
    saved = checkpoint.read_metadata(path)
  except checkpoint.MissingMetadata as e:
    raise errors.UserError(f"checkpoint {step} of {workdir} is damaged ({e}): pass --step with "
                           f"an earlier one of {steps}") from None
  state = ocp.StandardCheckpointer().restore(path, _on_one_device(saved))
  return state["params"], step


def export(workdir: str, out: str, *, step: int | None = None, data: str | None = None,
           formats: tuple[str, ...] = (), overwrite: bool = False) -> dict:
  """Writes the inference export of `workdir` to `out` (and the CLIP
  checkpoints of `formats`; see `write`); returns its config."""
  check_out(os.path.abspath(out), overwrite)             # before the restore
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
  model_config = write(out, model_config, params, formats=formats, overwrite=overwrite)
  note = convert.students_left_behind(model_config)
  for fmt in formats if note else ():
    logging.warning("--format %s: %s", fmt, note)
  return model_config


def write(out: str, model_config: dict, params: dict, *, formats: tuple[str, ...] = (),
          overwrite: bool = False) -> dict:
  """The export at `out`: `params/`, `model_config.json`, a CLIP checkpoint
  per format of `formats` (`convert.FORMATS`, in `out/<format>/`) and the
  manifest of them all; returns the config as written.

  Atomic and exclusive: everything is written to a temporary sibling of
  `out`, renamed into place only when complete, so a failure (a full disk
  included) leaves any previous export as it was. A non-empty `out` is
  refused unless `overwrite` and it holds an export, which is then replaced
  whole (no stale `open_clip/` or `hf/` stays beside the new files)."""
  out = os.path.abspath(out)
  check_out(out, overwrite)
  check_finite(params, out)
  model_config = {"format_version": FORMAT_VERSION,
                  **{k: v for k, v in model_config.items() if k != "format_version"}}
  # Converted first: a format that cannot hold the trunks is refused before
  # anything is written.
  clips = {fmt: clip_checkpoint(fmt, model_config, params) for fmt in formats}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-",
                             dir=os.path.dirname(out))
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, "params"), params)
    checkpointer.wait_until_finished()
    records.write_json(os.path.join(staging, CONFIG_FILE), model_config)
    for fmt, clip in clips.items():
      _write_clip_checkpoint(staging, os.path.basename(out), fmt, model_config, clip)
    records.write_json(os.path.join(staging, MANIFEST), manifest(staging))
    _replace(staging, out)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if "RESOURCE_EXHAUSTED" in str(e) or "No space left" in str(e):   # orbax's, tensorstore's
      raise OSError(errno.ENOSPC, "No space left on device", out) from None
    raise
  return model_config


def _is_export(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, name))
             for name in (CONFIG_FILE, MANIFEST, *_PARTS))


def check_out(out: str, overwrite: bool) -> None:
  """Refuses an `--out` that holds anything, unless `overwrite` and it is an export."""
  errors.check_output_directory(out, "--out")
  if not os.path.isdir(out) or not os.listdir(out):
    return
  if not _is_export(out):
    raise errors.UserError(f"--out {out} holds files that are not an export: choose another "
                           "--out (--overwrite replaces only an export)")
  if not overwrite:
    raise errors.UserError(f"--out {out} holds an export already: pass --overwrite to replace "
                           "it, or choose another --out")


def _replace(staging: str, out: str) -> None:
  """Renames the complete `staging` to `out`; a previous `out` is moved aside
  first and deleted only once the new one is in place."""
  if not os.path.exists(out):
    os.rename(staging, out)
    return
  aside = f"{staging}.previous"
  os.rename(out, aside)
  try:
    os.rename(staging, out)
  except BaseException:
    os.rename(aside, out)
    raise
  shutil.rmtree(aside)


def clip_checkpoint(fmt: str, model_config: dict, params: dict) -> tuple[dict, dict]:
  """`(state dict, config)` of an export's trunks as a CLIP checkpoint of
  `fmt` (`convert.FORMATS`)."""
  params = jax.tree.map(np.asarray, params)
  to = convert.to_open_clip if fmt == "open_clip" else convert.to_hf
  return to(model_config, params)


def _write_clip_checkpoint(directory: str, name: str, fmt: str, model_config: dict,
                           checkpoint: tuple[dict, dict]) -> None:
  """`directory/<fmt>/`: a `clip_checkpoint` with the preprocessing its
  library reads (open_clip's model named `dinorank-<name>`)."""
  state, config = checkpoint
  if fmt == "open_clip":
    convert.write_open_clip(os.path.join(directory, fmt), state, config,
                            convert.open_clip_preprocess(model_config), f"dinorank-{name}")
  else:
    convert.write_hf(os.path.join(directory, fmt), state, config,
                     convert.hf_preprocessor(model_config))


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
  tokens, for distillation fidelity) when `has_image_student`.

  With a `mesh` (the trainer's live parameters: `live`), each batch of
  `batch_size` rows is sharded over the mesh's batch axis, every process
  passing its rows of it, and the embeddings are gathered to every process."""

  def __init__(self, model: DinoRankCLIP, params: dict, model_config: dict,
               batch_size: int = 256, mesh=None):
    self.model, self.params, self.config, self.mesh = model, params, model_config, mesh
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
    if not len(x):                 # no rows: the output's shape, from tracing alone
      one = jax.ShapeDtypeStruct((self.batch_size, *x.shape[1:]), x.dtype)
      return np.zeros((0, *jax.eval_shape(fn, self.params, one).shape[1:]), np.float32)
    out = []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
      out.append(self._call(fn, padded)[:len(chunk)])
    return np.concatenate(out).astype(np.float32)

  def _call(self, fn, batch: np.ndarray) -> np.ndarray:
    if self.mesh is None:
      return np.asarray(fn(self.params, batch))
    rows = len(batch) // jax.process_count()
    mine = batch[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    out = fn(self.params, parallel.global_batch(self.mesh, {"x": mine})["x"])
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  def preprocess(self, images) -> np.ndarray:
    """uint8 `[N, S, S, 3]` at the export's side `S`: one image or many (PIL
    images, file paths, encoded bytes, uint8 arrays or float arrays in
    [0, 1], of any size and mode) through the export's evaluation transform
    (`data.transform`: shorter side resized, centre square, RGB)."""
    return transform.preprocess_many(images, self.image_size)

  def _pixels(self, images) -> np.ndarray:
    """`preprocess`'s output as it is; anything else through `preprocess`."""
    side = self.image_size
    if (isinstance(images, np.ndarray) and images.ndim == 4
        and images.shape[1:] == (side, side, 3)):
      if images.dtype == np.uint8:
        return images.astype(np.float32)
      return transform.unit_floats(images).astype(np.float32) * 255.0
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
  try:
    with open(config_path) as f:
      model_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    model_config = None
  if not isinstance(model_config, dict):
    model_config = {}                   # damaged: the manifest names it (or its absence)
  version = model_config.get("format_version")
  verify(directory, required=not isinstance(version, int) or version >= 3)
  if version not in (1, 2, FORMAT_VERSION):
    raise errors.UserError(f"{directory}: export format {version}, this code reads 1 to "
                           f"{FORMAT_VERSION}; write it again (python -m dinorank_jax.export)")
  stored = _model(model_config, scan=version >= 2)
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


def live(model: DinoRankCLIP, params: dict, mesh, meta: dict, image_size: int, *,
         batch_size: int) -> ExportedModel:
  """The model being trained, with its sharded parameters as they are, as
  an `ExportedModel` on `mesh` (the evaluation suites during training).
  Computed in float32, as `load` computes by default, so its numbers are an
  export's of the same step; `meta`: the training records' metadata (their
  tokenizer)."""
  model_config = {"image_size": image_size, "tokenizer": meta["tokenizer"],
                  "context_length": CONTEXT_LENGTH}
  return ExportedModel(model.clone(dtype=jnp.float32), params, model_config, batch_size, mesh)


def _step(text: str) -> int | str:
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a step number or best") from None


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.export",
                            description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--out", required=True, help="export directory to write")
  p.add_argument("--step", type=_step, help="checkpoint step, or best: the best checkpoint by "
                 "config.eval.keep_best (default: the latest)")
  p.add_argument("--data", help="the run's records (default: its config.data.path)")
  p.add_argument("--format", action="append", choices=convert.FORMATS, default=[],
                 help="also write the trunks as this CLIP checkpoint, in OUT/<format> "
                      "(repeatable)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the export at --out (removing its open_clip/ and hf/ too)")
  args = p.parse_args(argv)
  model_config = export(args.workdir, args.out, step=args.step, data=args.data,
                        formats=tuple(dict.fromkeys(args.format)), overwrite=args.overwrite)
  print(f"exported step {model_config['source']['step']} of {args.workdir} to {args.out}")


if __name__ == "__main__":
  main()
