"""Whole CLIP checkpoints <-> our exports' `(model_config, params)`.

`from_open_clip(state, arch)` and `from_hf(state, config)` read a state dict
(NumPy arrays) into the `model_config.json` of an export (`dinorank_jax.export`:
the model fields, the image side, the tokenizer) and the trunks' and logit
scale's parameters; `to_open_clip` and `to_hf` write them back, with the model
config each library needs. The sizes come from the state dict's shapes
(open_clip, OpenAI) or from `config.json` (transformers), and must be sizes
of ours (`VIT_SIZES`, `TEXT_SIZES`).

What a CLIP checkpoint holds is the two trunks and the logit scale: an
export's students and fusion stay behind, and the exported model embeds with
its trunks alone (`students_left_behind` says so).
"""

import math
import re
from collections.abc import Mapping

import numpy as np

from dinorank_jax.convert.layout import (ConversionError, Dims, Tower, rules, size_name, to_ours,
                                         to_theirs, tower)
from dinorank_jax.data import transform
from dinorank_jax.data.tokenizer import CLIP_BPE_ID, CONTEXT_LENGTH
from dinorank_jax.models.dinorankclip import ARCHS
from dinorank_jax.models.text import TEXT_SIZES, text_size
from dinorank_jax.models.vit import IMAGE_MEAN, IMAGE_STD, VIT_SIZES, vit_size

TORCH_LN_EPS = 1e-5
# Our activations in transformers' names (`hidden_act`).
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _shape(state: Mapping, key: str) -> tuple[int, ...]:
  if key not in state:
    raise ConversionError(f"the checkpoint has no {key!r}: not an open_clip/OpenAI CLIP state dict")
  return tuple(np.shape(state[key]))


def _depth(state: Mapping, prefix: str) -> int:
  layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  return max(layers, default=-1) + 1


def model_config(d: Dims, arch: str, source: dict) -> dict:
  """The export `model_config.json` of a CLIP of sizes `d` (students off)."""
  if d.context != CONTEXT_LENGTH:
    raise ConversionError(f"the text tower has {d.context} positions; our tokenizer writes "
                          f"{CONTEXT_LENGTH} tokens")
  image = size_name(VIT_SIZES, d.image.width, d.image.depth, "the image tower")
  return {"model": {"embed_dim": d.embed, "image_trunk": f"{image}/{d.patch}",
                    "text_trunk": size_name(TEXT_SIZES, d.text.width, d.text.depth,
                                            "the text tower"),
                    "students": "none", "rank_order": 0, "arch": arch, "scan": True,
                    "dtype": "float32", "vocab_size": d.vocab, "eot_id": d.vocab - 1},
          "image_size": d.patch * d.grid, "preprocess": dict(transform.PREPROCESS),
          "tokenizer": CLIP_BPE_ID,
          "context_length": CONTEXT_LENGTH, "source": source}


def dims(model_config_: Mapping) -> Dims:
  """The sizes of an export's trunks."""
  m = model_config_["model"]
  width, depth, heads, patch = vit_size(m["image_trunk"])
  return Dims(image=Tower(width, depth, heads), patch=patch,
              grid=model_config_["image_size"] // patch, text=Tower(*text_size(m["text_trunk"])),
              vocab=m["vocab_size"], context=model_config_["context_length"],
              embed=m["embed_dim"])


def open_clip_arch(model_cfg: Mapping) -> str:
  """The arch (`ARCHS`) of an open_clip model config: quick GELU is OpenAI's;
  no `ln_pre` with a tanh GELU is ours (as `to_open_clip` writes it); else
  open_clip's exact GELU."""
  vision = model_cfg.get("vision_cfg", {})
  if model_cfg.get("quick_gelu"):
    return "openai"
  if vision.get("no_ln_pre") or vision.get("act_kwargs", {}).get("approximate") == "tanh":
    return "dinorank"
  return "open_clip"


def from_open_clip(state: Mapping[str, np.ndarray], arch: str,
                   source: dict | None = None) -> tuple[dict, dict]:
  """An open_clip or OpenAI state dict -> `(model_config, params)`; `arch`
  (`openai`: quick GELU, `open_clip`: exact GELU, `dinorank`: our own trunks
  as `to_open_clip` wrote them) is not in the weights."""
  if arch not in ARCHS:
    raise ConversionError(f"an open_clip/OpenAI checkpoint's trunks are 'openai' (quick GELU), "
                          f"'open_clip' (exact GELU) or 'dinorank' (ours), not {arch!r}")
  width, _, patch, _ = _shape(state, "visual.conv1.weight")
  tokens = _shape(state, "visual.positional_embedding")[0]
  grid = math.isqrt(tokens - 1)
  if grid * grid + 1 != tokens:
    raise ConversionError(f"'visual.positional_embedding' has {tokens} rows, not a square "
                          "grid of patches and a class token")
  vocab, text_width = _shape(state, "token_embedding.weight")
  d = Dims(image=tower(VIT_SIZES, width, _depth(state, "visual.transformer.resblocks."),
                       "the image tower"),
           patch=patch, grid=grid,
           text=tower(TEXT_SIZES, text_width, _depth(state, "transformer.resblocks."),
                      "the text tower"),
           vocab=vocab, context=_shape(state, "positional_embedding")[0],
           embed=_shape(state, "text_projection")[1])
  config = model_config(d, arch, {"format": "open_clip", **(source or {})})
  params = to_ours(state, rules("open_clip", d, ln_pre=ARCHS[arch]["ln_pre"]))
  if ARCHS[arch]["patch_bias"]:     # folded into the positions on export: zero here
    params["image_tower"]["patch_embed"]["bias"] = np.zeros(width, np.float32)
  return config, params


def from_hf(state: Mapping[str, np.ndarray], config: Mapping,
            source: dict | None = None) -> tuple[dict, dict]:
  """A transformers `CLIPModel` state dict and its `config.json` ->
  `(model_config, params)`."""
  vision, text = config["vision_config"], config["text_config"]
  acts = {part.get("hidden_act", "quick_gelu") for part in (vision, text)}
  eps = {float(part.get("layer_norm_eps", TORCH_LN_EPS)) for part in (vision, text)}
  arch = next((a for a in ("openai", "open_clip")
               if acts == {HF_ACTIVATIONS[ARCHS[a]["activation"]]}
               and eps == {ARCHS[a]["ln_eps"]}), None)
  if arch is None:
    raise ConversionError(f"hidden_act {sorted(acts)} with layer_norm_eps {sorted(eps)}: the "
                          "converter knows quick_gelu or gelu, the same in both towers, with "
                          f"eps {TORCH_LN_EPS}")

  def hf_tower(part, sizes, what):
    t = tower(sizes, int(part["hidden_size"]), int(part["num_hidden_layers"]), what)
    if int(part["num_attention_heads"]) != t.heads:
      raise ConversionError(f"{what}: {part['num_attention_heads']} heads, ours of width "
                            f"{t.width} has {t.heads}")
    if int(part.get("intermediate_size", 4 * t.width)) != 4 * t.width:
      raise ConversionError(f"{what}: intermediate_size {part['intermediate_size']} is not "
                            f"4 × hidden_size {t.width}, the only MLP ratio we build")
    return t

  patch = int(vision["patch_size"])
  d = Dims(image=hf_tower(vision, VIT_SIZES, "vision_config"), patch=patch,
           grid=int(vision["image_size"]) // patch,
           text=hf_tower(text, TEXT_SIZES, "text_config"), vocab=int(text["vocab_size"]),
           context=int(text["max_position_embeddings"]), embed=int(config["projection_dim"]))
  out = model_config(d, arch, {"format": "hf", **(source or {})})
  # transformers pools at the first `eos_token_id`, or (legacy configs saying
  # 2) at the largest id: CLIP's end of text, the last of its vocabulary.
  eot = int(text.get("eos_token_id") or 2)
  out["model"]["eot_id"] = d.vocab - 1 if eot == 2 else eot
  return out, to_ours(state, rules("hf", d))


def students_left_behind(model_config_: Mapping) -> str | None:
  """One line when the export has students and fusion a CLIP checkpoint cannot hold."""
  if model_config_["model"].get("students", "none") == "none":
    return None
  return ("students and fusion are not part of a CLIP checkpoint: the exported model embeds "
          "with its trunks alone (u = z_I/|z_I|, v = z_T/|z_T|), not with the fused "
          "embeddings dinorank_jax.load gives")


def _clip_params(params: Mapping, arch: str) -> dict:
  """The trunks and logit scale; a patch bias is folded into the patch
  positions (it is added to every patch token, as they are)."""
  image = dict(params["image_tower"])
  if ARCHS[arch]["patch_bias"]:
    patch = dict(image["patch_embed"])
    bias = np.asarray(patch.pop("bias"), np.float32)
    pos = np.array(image["pos_embedding"], np.float32)
    pos[1:] += bias
    image.update(patch_embed=patch, pos_embedding=pos)
  return {"image_tower": image, "text_tower": params["text_tower"],
          "logit_scale": params["logit_scale"]}


def to_open_clip(model_config_: Mapping, params: Mapping) -> tuple[dict, dict]:
  """`(state dict, open_clip model config)` of an export's trunks; any arch:
  ours sets `no_ln_pre`, a tanh GELU and its LayerNorm epsilon."""
  m, d = model_config_["model"], dims(model_config_)
  spec = ARCHS[m["arch"]]
  ln_pre = spec["ln_pre"]
  tower_kw = {}
  if spec["activation"] == "gelu_tanh":
    tower_kw["act_kwargs"] = {"approximate": "tanh"}
  if spec["ln_eps"] != TORCH_LN_EPS:
    tower_kw["norm_kwargs"] = {"eps": spec["ln_eps"]}
  vision = {"image_size": model_config_["image_size"], "layers": d.image.depth,
            "width": d.image.width, "head_width": d.image.width // d.image.heads,
            "patch_size": d.patch, **tower_kw, **({} if ln_pre else {"no_ln_pre": True})}
  text = {"context_length": d.context, "vocab_size": d.vocab, "width": d.text.width,
          "heads": d.text.heads, "layers": d.text.depth, **tower_kw}
  if m["eot_id"] != d.vocab - 1:   # open_clip pools at the largest id unless told
    text.update(pool_type="eos", eos_id=m["eot_id"])
  config = {"embed_dim": d.embed, "quick_gelu": spec["activation"] == "quick_gelu",
            "vision_cfg": vision, "text_cfg": text}
  return to_theirs(_clip_params(params, m["arch"]), rules("open_clip", d, ln_pre=ln_pre)), config


def open_clip_preprocess(model_config_: Mapping) -> dict:
  """open_clip's `preprocess_cfg`: our input side, CLIP's normalisation and
  the whole evaluation transform (`data.transform`), stated rather than
  left to open_clip's defaults."""
  return {"size": model_config_["image_size"], "mode": "RGB", "mean": list(IMAGE_MEAN),
          "std": list(IMAGE_STD), **transform.PREPROCESS, "fill_color": 0}


def hf_preprocessor(model_config_: Mapping) -> dict:
  """transformers' `preprocessor_config.json` (a `CLIPImageProcessor`) with
  the same steps: shorter side resized bicubic (`resample` 3), centre crop,
  RGB, CLIP's normalisation. Its centre crop rounds the offset down where
  ours rounds half to even, so the two may differ by a pixel's shift on
  images whose resized side has odd slack."""
  side = model_config_["image_size"]
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"shortest_edge": side}, "resample": 3, "do_center_crop": True,
          "crop_size": {"height": side, "width": side}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGE_MEAN),
          "image_std": list(IMAGE_STD), "do_convert_rgb": True}


def to_hf(model_config_: Mapping, params: Mapping) -> tuple[dict, dict]:
  """`(state dict, config.json)` of a transformers `CLIPModel` holding an
  export's trunks (their arch must have `ln_pre`, as CLIPModel always does)."""
  m, d = model_config_["model"], dims(model_config_)
  spec = ARCHS[m["arch"]]
  if not spec["ln_pre"]:
    raise ConversionError(f"config.model.arch={m['arch']!r} trunks have no LayerNorm before "
                          "the image encoder, which transformers' CLIPModel always applies: "
                          "export --format open_clip, or train with --config.model.arch=open_clip")
  common = {"hidden_act": HF_ACTIVATIONS[spec["activation"]], "layer_norm_eps": spec["ln_eps"],
            "projection_dim": d.embed}
  part = lambda t: {"hidden_size": t.width, "intermediate_size": 4 * t.width,
                    "num_hidden_layers": t.depth, "num_attention_heads": t.heads, **common}
  config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": d.embed,
            "text_config": {**part(d.text), "vocab_size": d.vocab,
                            "max_position_embeddings": d.context, "eos_token_id": m["eot_id"]},
            "vision_config": {**part(d.image), "image_size": model_config_["image_size"],
                              "patch_size": d.patch, "num_channels": 3}}
  return to_theirs(_clip_params(params, m["arch"]), rules("hf", d)), config
