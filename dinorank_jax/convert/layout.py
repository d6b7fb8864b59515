"""Where each parameter of our trunks lives in a CLIP state dict, both ways.

A checkpoint format is a list of `Rule`s, one per state-dict key: the key,
its shape, the leaves of our parameter tree it holds and the two pure
re-layouts between them (transposes and reshapes: a round trip is
bit-exact). `to_ours` reads a state dict through the rules, `to_theirs`
writes one. Two formats:

- `open_clip`: open_clip's `CLIP` and OpenAI's original `model.py` (the same
  names): `visual.conv1`, `visual.transformer.resblocks.{i}.attn.in_proj_weight`
  (query, key and value packed `[3w, w]`), `visual.proj` `[w, D]`, …
- `hf`: transformers' `CLIPModel`: `vision_model.encoder.layers.{i}.self_attn.q_proj`,
  `visual_projection.weight` `[D, w]`, …

Our layouts: torch's `Linear` weight is `[out, in]`, flax's `Dense` kernel
`[in, out]`; attention query/key/value kernels are `[in, heads, head_dim]`,
its output kernel `[heads, head_dim, out]`; the patch convolution is
`[out, 3, p, p]` in torch and `[p, p, 3, out]` in flax; layer `i` of an
encoder is row `i` of every stacked leaf under `encoder/blocks`.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from dinorank_jax.errors import UserError

FORMATS = ("open_clip", "hf")
# Entries a state dict may hold that are not parameters: TorchScript archives
# (OpenAI's) store their sizes and the causal mask, transformers (before 4.31)
# its position ids.
NOT_PARAMETERS = re.compile(r"^(input_resolution|context_length|vocab_size|attn_mask|"
                            r"(text|vision)_model\.embeddings\.position_ids)$")

Path = tuple[str, ...]


class ConversionError(UserError, ValueError):
  """A checkpoint the converter cannot map; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Tower:
  width: int
  depth: int
  heads: int


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes a checkpoint's shapes depend on."""
  image: Tower
  patch: int
  grid: int           # patches per side
  text: Tower
  vocab: int
  context: int
  embed: int


@dataclasses.dataclass(frozen=True)
class Rule:
  """State-dict entry `theirs` (`shape`) <-> our leaves `ours`; `layer`: the row
  of our stacked block leaves it is."""
  theirs: str
  shape: tuple[int, ...]
  ours: tuple[Path, ...]
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_theirs: Callable[..., np.ndarray]
  layer: int | None = None


def size_name(sizes: dict, width: int, depth: int, what: str) -> str:
  """Our name of the tower `width` wide and `depth` deep (its heads are ours)."""
  for name, (w, d, _) in sizes.items():
    if (w, d) == (width, depth):
      return name
  raise ConversionError(f"{what}: no size of ours is {width} wide and {depth} layers deep "
                        f"(known: {sizes})")


def tower(sizes: dict, width: int, depth: int, what: str) -> Tower:
  return Tower(*sizes[size_name(sizes, width, depth, what)])


# Re-layouts: (to ours, to theirs).
def _same():
  return (lambda a: (a,)), (lambda a: a)


def _reshaped(ours: tuple, theirs: tuple):
  return (lambda a: (a.reshape(ours),)), (lambda a: a.reshape(theirs))


def _linear():
  return (lambda a: (a.T,)), (lambda a: a.T)


def _qkv_kernel(t: Tower):
  """One of query/key/value, torch `[w, w]` <-> `[w, heads, head_dim]`."""
  w, shape = t.width, (t.width, t.heads, t.width // t.heads)
  return (lambda a: (a.T.reshape(shape),)), (lambda a: a.reshape(w, w).T)


def _out_kernel(t: Tower):
  w, shape = t.width, (t.heads, t.width // t.heads, t.width)
  return (lambda a: (a.T.reshape(shape),)), (lambda a: a.reshape(w, w).T)


def _packed_kernel(t: Tower):
  """Query, key and value packed `[3w, w]` (torch's `in_proj_weight`)."""
  w, shape = t.width, (t.width, t.heads, t.width // t.heads)
  return ((lambda a: tuple(p.T.reshape(shape) for p in a.reshape(3, w, w))),
          (lambda *xs: np.concatenate([x.reshape(w, w).T for x in xs])))


def _packed_bias(t: Tower):
  w, shape = t.width, (t.heads, t.width // t.heads)
  return ((lambda a: tuple(p.reshape(shape) for p in a.reshape(3, w))),
          (lambda *xs: np.concatenate([x.reshape(w) for x in xs])))


def _rule(theirs, shape, ours, relayout, layer=None) -> Rule:
  ours = (ours,) if isinstance(ours[0], str) else ours
  return Rule(theirs, tuple(shape), tuple(ours), *relayout, layer)


_ATTN = "MultiHeadDotProductAttention_0"
_QKV = ("query", "key", "value")


def _norm(theirs: str, ours: Path, width: int, names=("weight", "bias"), layer=None):
  return [_rule(f"{theirs}.{names[0]}", (width,), (*ours, "scale"), _same(), layer),
          _rule(f"{theirs}.{names[1]}", (width,), (*ours, "bias"), _same(), layer)]


def _dense(theirs: str, ours: Path, n_in: int, n_out: int, layer=None):
  return [_rule(f"{theirs}.weight", (n_out, n_in), (*ours, "kernel"), _linear(), layer),
          _rule(f"{theirs}.bias", (n_out,), (*ours, "bias"), _same(), layer)]


def _open_clip_blocks(prefix: str, encoder: Path, t: Tower) -> list[Rule]:
  blocks, out, w = (*encoder, "blocks"), [], t.width
  for i in range(t.depth):
    at = f"{prefix}.resblocks.{i}"
    out += _norm(f"{at}.ln_1", (*blocks, "LayerNorm_0"), w, layer=i)
    out += [_rule(f"{at}.attn.in_proj_weight", (3 * w, w),
                  [(*blocks, _ATTN, n, "kernel") for n in _QKV], _packed_kernel(t), i),
            _rule(f"{at}.attn.in_proj_bias", (3 * w,),
                  [(*blocks, _ATTN, n, "bias") for n in _QKV], _packed_bias(t), i),
            _rule(f"{at}.attn.out_proj.weight", (w, w), (*blocks, _ATTN, "out", "kernel"),
                  _out_kernel(t), i),
            _rule(f"{at}.attn.out_proj.bias", (w,), (*blocks, _ATTN, "out", "bias"), _same(), i)]
    out += _norm(f"{at}.ln_2", (*blocks, "LayerNorm_1"), w, layer=i)
    out += _dense(f"{at}.mlp.c_fc", (*blocks, "Dense_0"), w, 4 * w, layer=i)
    out += _dense(f"{at}.mlp.c_proj", (*blocks, "Dense_1"), 4 * w, w, layer=i)
  return out


def _hf_blocks(prefix: str, encoder: Path, t: Tower) -> list[Rule]:
  blocks, out, w = (*encoder, "blocks"), [], t.width
  for i in range(t.depth):
    at = f"{prefix}.layers.{i}"
    out += _norm(f"{at}.layer_norm1", (*blocks, "LayerNorm_0"), w, layer=i)
    for ours, theirs in zip(_QKV, ("q_proj", "k_proj", "v_proj")):
      out += [_rule(f"{at}.self_attn.{theirs}.weight", (w, w),
                    (*blocks, _ATTN, ours, "kernel"), _qkv_kernel(t), i),
              _rule(f"{at}.self_attn.{theirs}.bias", (w,), (*blocks, _ATTN, ours, "bias"),
                    _reshaped((t.heads, w // t.heads), (w,)), i)]
    out += [_rule(f"{at}.self_attn.out_proj.weight", (w, w), (*blocks, _ATTN, "out", "kernel"),
                  _out_kernel(t), i),
            _rule(f"{at}.self_attn.out_proj.bias", (w,), (*blocks, _ATTN, "out", "bias"),
                  _same(), i)]
    out += _norm(f"{at}.layer_norm2", (*blocks, "LayerNorm_1"), w, layer=i)
    out += _dense(f"{at}.mlp.fc1", (*blocks, "Dense_0"), w, 4 * w, layer=i)
    out += _dense(f"{at}.mlp.fc2", (*blocks, "Dense_1"), 4 * w, w, layer=i)
  return out


_IMAGE, _TEXT = ("image_tower",), ("text_tower",)


def rules(fmt: str, d: Dims, *, ln_pre: bool = True) -> list[Rule]:
  """The rules of format `fmt` for a CLIP of sizes `d`; `ln_pre=False`: an
  image tower without the LayerNorm before its encoder (open_clip's
  `no_ln_pre`; transformers' layout always has one, `clip.to_hf` refuses
  trunks without)."""
  w, tw, p, tokens = d.image.width, d.text.width, d.patch, d.grid ** 2 + 1
  conv = ((w, 3, p, p), (*_IMAGE, "patch_embed", "kernel"),
          ((lambda a: (a.transpose(2, 3, 1, 0),)), (lambda a: a.transpose(3, 2, 0, 1))))
  cls = ((w,), (*_IMAGE, "cls"), _reshaped((1, 1, w), (w,)))
  if fmt == "open_clip":
    out = [_rule("visual.conv1.weight", *conv), _rule("visual.class_embedding", *cls),
           _rule("visual.positional_embedding", (tokens, w), (*_IMAGE, "pos_embedding"), _same())]
    out += _norm("visual.ln_pre", (*_IMAGE, "ln_pre"), w) if ln_pre else []
    out += _open_clip_blocks("visual.transformer", (*_IMAGE, "encoder"), d.image)
    out += _norm("visual.ln_post", (*_IMAGE, "encoder", "norm"), w)
    out += [_rule("visual.proj", (w, d.embed), (*_IMAGE, "projection", "kernel"), _same()),
            _rule("token_embedding.weight", (d.vocab, tw), (*_TEXT, "embed", "token", "embedding"),
                  _same()),
            _rule("positional_embedding", (d.context, tw), (*_TEXT, "embed", "position"), _same())]
    out += _open_clip_blocks("transformer", (*_TEXT, "encoder"), d.text)
    out += _norm("ln_final", (*_TEXT, "encoder", "norm"), tw)
    out += [_rule("text_projection", (tw, d.embed), (*_TEXT, "projection", "kernel"), _same())]
  elif fmt == "hf":
    v, t = "vision_model", "text_model"
    out = [_rule(f"{v}.embeddings.patch_embedding.weight", *conv),
           _rule(f"{v}.embeddings.class_embedding", *cls),
           _rule(f"{v}.embeddings.position_embedding.weight", (tokens, w),
                 (*_IMAGE, "pos_embedding"), _same())]
    out += _norm(f"{v}.pre_layrnorm", (*_IMAGE, "ln_pre"), w)
    out += _hf_blocks(f"{v}.encoder", (*_IMAGE, "encoder"), d.image)
    out += _norm(f"{v}.post_layernorm", (*_IMAGE, "encoder", "norm"), w)
    out += [_rule("visual_projection.weight", (d.embed, w), (*_IMAGE, "projection", "kernel"),
                  _linear()),
            _rule(f"{t}.embeddings.token_embedding.weight", (d.vocab, tw),
                  (*_TEXT, "embed", "token", "embedding"), _same()),
            _rule(f"{t}.embeddings.position_embedding.weight", (d.context, tw),
                  (*_TEXT, "embed", "position"), _same())]
    out += _hf_blocks(f"{t}.encoder", (*_TEXT, "encoder"), d.text)
    out += _norm(f"{t}.final_layer_norm", (*_TEXT, "encoder", "norm"), tw)
    out += [_rule("text_projection.weight", (d.embed, tw), (*_TEXT, "projection", "kernel"),
                  _linear())]
  else:
    raise ConversionError(f"unknown checkpoint format {fmt!r}: one of {FORMATS}")
  return out + [_rule("logit_scale", (), ("logit_scale",), _same())]


def to_ours(state: Mapping[str, np.ndarray], rules_: list[Rule]) -> dict:
  """Our parameter tree from `state`; every key must be a rule's (or one of
  `NOT_PARAMETERS`), every rule's key present with its shape."""
  known = {r.theirs for r in rules_}
  for key in state:
    if key not in known and not NOT_PARAMETERS.match(key):
      raise ConversionError(f"the checkpoint's {key!r} {tuple(np.shape(state[key]))} has no "
                            "place in a CLIP of this layout (another architecture?)")
  flat, stacked = {}, {}
  for r in rules_:
    if r.theirs not in state:
      raise ConversionError(f"the checkpoint has no {r.theirs!r} (expected shape {r.shape})")
    value = np.asarray(state[r.theirs], np.float32)
    if value.shape != r.shape:
      raise ConversionError(f"{r.theirs!r} has shape {value.shape}, expected {r.shape}")
    for path, leaf in zip(r.ours, r.to_ours(value)):
      if r.layer is None:
        flat[path] = leaf
      else:
        stacked.setdefault(path, {})[r.layer] = leaf
  for path, rows in stacked.items():
    flat[path] = np.stack([rows[i] for i in range(len(rows))])
  return _unflatten(flat)


def to_theirs(params: Mapping, rules_: list[Rule]) -> dict[str, np.ndarray]:
  """The state dict of `rules_` from our parameter tree (float32, contiguous)."""
  out = {}
  for r in rules_:
    leaves = []
    for path in r.ours:
      leaf = params
      for name in path:
        leaf = leaf[name]
      leaves.append(np.asarray(leaf, np.float32)[r.layer] if r.layer is not None
                    else np.asarray(leaf, np.float32))
    out[r.theirs] = np.array(r.to_theirs(*leaves), np.float32, order="C")  # 0-d stays 0-d
  return out


def _unflatten(flat: dict[Path, np.ndarray]) -> dict:
  tree = {}
  for path, leaf in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return tree
