"""Public CLIP weights as our trunks' parameters.

`from_hf(state, config)` maps a Hugging Face `transformers.CLIPModel` state
dict (NumPy arrays, e.g. from `safetensors.numpy.load_file` or a torch state
dict's `.numpy()`) and its `config.json` dict to the `config.model` fields of
the matching `DinoRankCLIP` (`students="none"`, the `arch` of its activation,
its vocabulary and end-of-text id) and that model's parameters: both trunks and the logit scale, in the scanned
layout. The model then gives the CLIP model's image and text embeddings
(tests/test_convert.py compares them with transformers' own).

Layouts. torch's `Linear` stores `[out, in]`, flax's `Dense` `[in, out]`;
the attention's query, key and value are `[in, heads, head_dim]` and its
output `[heads, head_dim, out]` in flax; the patch convolution is
`[out, 3, p, p]` in torch, `[p, p, 3, out]` in flax. Layer `i` of an encoder
becomes row `i` of every stacked leaf of `encoder/blocks`.

Not yet here: the open_clip / OpenAI state-dict names, a command line,
starting a training run from converted trunks, and the export to PyTorch
formats.
"""

from collections.abc import Mapping

import jax
import numpy as np

from dinorank_jax.models.text import TEXT_SIZES
from dinorank_jax.models.vit import VIT_SIZES

# transformers' `hidden_act` -> our `arch` (both use LayerNorm epsilon 1e-5).
HF_ACTIVATIONS = {"quick_gelu": "openai", "gelu": "open_clip"}


class ConversionError(ValueError):
  """A checkpoint the converter cannot map; the message names the key."""


def _size(sizes: dict, width: int, depth: int, heads: int, what: str) -> str:
  for name, shape in sizes.items():
    if shape == (width, depth, heads):
      return name
  raise ConversionError(f"{what}: no size of ours has width {width}, {depth} layers and "
                        f"{heads} heads (known: {sizes})")


def _take(state: Mapping, key: str, shape: tuple) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"the checkpoint has no {key!r} (expected shape {shape})")
  value = np.asarray(state[key], np.float32)
  if value.shape != shape:
    raise ConversionError(f"{key!r} has shape {value.shape}, expected {shape}")
  return value


def _encoder(state: Mapping, prefix: str, width: int, depth: int, heads: int) -> dict:
  """HF `{prefix}.layers.{i}.…` -> our stacked `blocks` tree."""
  head_dim, mlp = width // heads, 4 * width

  def layer(i):
    at = lambda name, shape: _take(state, f"{prefix}.layers.{i}.{name}", shape)
    attention = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      attention[ours] = {
          "kernel": at(f"self_attn.{theirs}.weight", (width, width)).T.reshape(
              width, heads, head_dim),
          "bias": at(f"self_attn.{theirs}.bias", (width,)).reshape(heads, head_dim)}
    attention["out"] = {
        "kernel": at("self_attn.out_proj.weight", (width, width)).T.reshape(
            heads, head_dim, width),
        "bias": at("self_attn.out_proj.bias", (width,))}
    norm = lambda name: _norm(state, f"{prefix}.layers.{i}.{name}", width)
    return {"MultiHeadDotProductAttention_0": attention,
            "LayerNorm_0": norm("layer_norm1"), "LayerNorm_1": norm("layer_norm2"),
            "Dense_0": {"kernel": at("mlp.fc1.weight", (mlp, width)).T,
                        "bias": at("mlp.fc1.bias", (mlp,))},
            "Dense_1": {"kernel": at("mlp.fc2.weight", (width, mlp)).T,
                        "bias": at("mlp.fc2.bias", (width,))}}

  return jax.tree.map(lambda *leaves: np.stack(leaves), *(layer(i) for i in range(depth)))


def _norm(state: Mapping, key: str, width: int) -> dict:
  return {"scale": _take(state, f"{key}.weight", (width,)),
          "bias": _take(state, f"{key}.bias", (width,))}


def from_hf(state: Mapping[str, np.ndarray], config: Mapping) -> tuple[dict, dict]:
  """`(config.model fields, parameters)` of the CLIP model in `state`."""
  vision, text = config["vision_config"], config["text_config"]
  embed = int(config["projection_dim"])
  activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
  if len(activations) != 1 or next(iter(activations)) not in HF_ACTIVATIONS:
    raise ConversionError(f"hidden_act {sorted(activations)}: the converter knows "
                          f"{sorted(HF_ACTIVATIONS)}, the same in both towers")
  for part in (vision, text):
    if part.get("intermediate_size", 4 * part["hidden_size"]) != 4 * part["hidden_size"]:
      raise ConversionError(f"intermediate_size {part['intermediate_size']} is not 4 × "
                            f"hidden_size {part['hidden_size']}, the only MLP ratio we build")
  w, depth, heads = (int(vision[k]) for k in ("hidden_size", "num_hidden_layers",
                                              "num_attention_heads"))
  patch, side = int(vision["patch_size"]), int(vision["image_size"])
  image_trunk = f"{_size(VIT_SIZES, w, depth, heads, 'vision_config')}/{patch}"
  tokens = (side // patch) ** 2 + 1
  v = "vision_model"
  image = {
      "patch_embed": {"kernel": _take(state, f"{v}.embeddings.patch_embedding.weight",
                                      (w, 3, patch, patch)).transpose(2, 3, 1, 0)},
      "cls": _take(state, f"{v}.embeddings.class_embedding", (w,)).reshape(1, 1, w),
      "pos_embedding": _take(state, f"{v}.embeddings.position_embedding.weight", (tokens, w)),
      "ln_pre": _norm(state, f"{v}.pre_layrnorm", w),
      "encoder": {"blocks": _encoder(state, f"{v}.encoder", w, depth, heads),
                  "norm": _norm(state, f"{v}.post_layernorm", w)},
      "projection": {"kernel": _take(state, "visual_projection.weight", (embed, w)).T},
  }
  tw, tdepth, theads = (int(text[k]) for k in ("hidden_size", "num_hidden_layers",
                                               "num_attention_heads"))
  vocab, length = int(text["vocab_size"]), int(text["max_position_embeddings"])
  t = "text_model"
  text_params = {
      "embed": {"token": {"embedding": _take(state, f"{t}.embeddings.token_embedding.weight",
                                             (vocab, tw))},
                "position": _take(state, f"{t}.embeddings.position_embedding.weight",
                                  (length, tw))},
      "encoder": {"blocks": _encoder(state, f"{t}.encoder", tw, tdepth, theads),
                  "norm": _norm(state, f"{t}.final_layer_norm", tw)},
      "projection": {"kernel": _take(state, "text_projection.weight", (embed, tw)).T},
  }
  # Legacy configs say 2 and pool at the largest id: CLIP's end of text, the last one.
  eot = int(text.get("eos_token_id") or 2)
  fields = {"embed_dim": embed, "image_trunk": image_trunk,
            "text_trunk": _size(TEXT_SIZES, tw, tdepth, theads, "text_config"),
            "students": "none", "rank_order": 0, "arch": HF_ACTIVATIONS[activations.pop()],
            "vocab_size": vocab, "eot_id": vocab - 1 if eot == 2 else eot}
  params = {"image_tower": image, "text_tower": text_params,
            "logit_scale": _take(state, "logit_scale", ())}
  return fields, params
