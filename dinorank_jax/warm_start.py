"""A new run's trunks from a CLIP checkpoint (`config.init_from`).

`config.init_from` names an export of ours (a directory with
`model_config.json`: one `python -m dinorank_jax.convert import` wrote, or a
trained run's) or a CLIP checkpoint itself: a transformers `CLIPModel`
directory or weight file (its `config.json` gives the arch), or an
open_clip/OpenAI state dict, whose activation `config.model.arch` gives
(`openai`: quick GELU, `open_clip`: exact GELU). Its image and text trunks and
logit scale replace the freshly initialised ones; the students, fusion, rank
heads and optimiser state start fresh. A run that resumes restores its own
checkpoint and reads nothing from `config.init_from`.
"""

import os

import jax
import numpy as np

from dinorank_jax import convert, export
from dinorank_jax.errors import UserError

TRUNKS = ("image_tower", "text_tower", "logit_scale")


def read_trunks(config, meta: dict) -> dict:
  """The trunks and logit scale of `config.init_from` (NumPy), after one clear
  line for each way they disagree with `config` or the dataset `meta`."""
  path, model = config.init_from, config.model
  where = f"config.init_from={path}"
  if not os.path.exists(path):
    raise UserError(f"{where} does not exist: give an export directory or a CLIP checkpoint")
  if not model.scan:
    raise UserError(f"{where} loads scanned trunks: set --config.model.scan=True")
  if os.path.isfile(os.path.join(path, export.CONFIG_FILE)):
    model_config, params = export.read(path)
  else:
    if model.arch not in ("openai", "open_clip"):
      raise UserError(f"{where} is a CLIP checkpoint, whose trunks are not "
                      f"config.model.arch={model.arch!r}: set --config.model.arch=openai "
                      "(OpenAI's weights, quick GELU) or open_clip (exact GELU)")
    model_config, params = convert.read(path, model.arch)
  found = model_config["model"]
  for field in ("arch", "image_trunk", "text_trunk", "embed_dim"):
    if found[field] != model[field]:
      raise UserError(f"{where} holds {field} {found[field]!r}, the run's is {model[field]!r}: "
                      f"set --config.model.{field}={found[field]}")
  if model_config["image_size"] != config.data.image_size:
    raise UserError(f"{where} was trained on {model_config['image_size']} px images: set "
                    f"--config.data.image_size={model_config['image_size']}")
  vocabulary = (found["vocab_size"], found["eot_id"])
  if vocabulary != (meta["vocab_size"], meta["eot_id"]):
    raise UserError(f"{where} has a vocabulary of {vocabulary[0]} (end of text "
                    f"{vocabulary[1]}), config.data.path={config.data.path} one of "
                    f"{meta['vocab_size']} ({meta['eot_id']}): build the data with the "
                    "checkpoint's tokenizer (CLIP's BPE)")
  return {k: jax.tree.map(np.asarray, params[k]) for k in TRUNKS}


def replace_trunks(params: dict, trunks: dict, shardings: dict) -> dict:
  """`params` with `trunks` in place, laid out as `shardings` (the run's)."""
  for name, tree in trunks.items():
    ours = jax.tree.map(np.shape, params[name])
    theirs = jax.tree.map(np.shape, tree)
    if ours != theirs:
      raise UserError(f"config.init_from: {name} does not fit the run's model (shapes "
                      f"{theirs} vs {ours})")

  def place(value, sharding):
    value = np.asarray(value, np.float32)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return {**params, **{k: jax.tree.map(place, trunks[k], shardings[k]) for k in trunks}}
