"""DinoRankCLIP: CLIP towers + students + fusion per modality, and the rank heads.

Data flow of one batch (method §5, §7; docs/model.md draws it):

    images ─ ViT trunk ──────── z_I ─┐
           └ ViT-Ti student ─ c, X ──┴ Fusion_I ─ u = f_I/‖f_I‖
    tokens ─ text trunk ─────── z_T ─┐
           └ text student ─ c, X, m ─┴ Fusion_T ─ v = f_T/‖f_T‖

`students` switches the student/fusion branches: `"none"` gives the CLIP and
RankCLIP baselines (u, v = normalised trunk embeddings), `"image"` the
paper's image-only variant, `"both"` the full model. The modality-specific
rank heads θ^I, θ^T are `HighOrderPL` modules; the sharded loss calls them
through `list_heads`.
"""

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinorank_jax.models.fusion import Fusion
from dinorank_jax.models.layers import DEFAULT_LN_EPS
from dinorank_jax.models.rank_head import HighOrderPL
from dinorank_jax.models.text import EOT_ID, VOCAB_SIZE, TextStudent, TextTransformer
from dinorank_jax.models.vit import ViT

STUDENT_MODES = ("none", "image", "both")
# How the two trunks are built (`arch`): ours, or as CLIP's published weights
# expect them (`dinorank_jax.convert` loads those): a LayerNorm before the
# image encoder, a patch embedding without bias, torch's LayerNorm epsilon,
# and OpenAI's quick GELU or open_clip's exact one (its LAION models). The
# students always use ours.
ARCHS = {
    "dinorank": {"ln_pre": False, "patch_bias": True, "activation": "gelu_tanh",
                 "ln_eps": DEFAULT_LN_EPS},
    "openai": {"ln_pre": True, "patch_bias": False, "activation": "quick_gelu", "ln_eps": 1e-5},
    "open_clip": {"ln_pre": True, "patch_bias": False, "activation": "gelu", "ln_eps": 1e-5},
}
# The fields of `config.model` that are `DinoRankCLIP`'s constructor
# arguments: the trainer builds its model from them, an export stores them in
# `model_config.json`, and the loader rebuilds the model from that file.
CONFIG_FIELDS = ("embed_dim", "image_trunk", "text_trunk", "image_student", "text_student",
                 "students", "fusion_mode", "rank_order", "rank_head_dim", "rank_chunk_size",
                 "scan", "remat", "attention", "dtype", "arch")
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TeacherProjection(nn.Module):
  """Linear maps of student tokens and class token to the teacher's widths,
  for the `mse`, `cosine` and `crd` distillation criteria (method §4)."""
  token_dim: int
  cls_dim: int
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student: dict) -> dict:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    return {"tokens_proj": dense(self.token_dim, name="tokens")(student["tokens"]),
            "cls_proj": dense(self.cls_dim, name="cls")(student["cls"])}


class DinoRankCLIP(nn.Module):
  """The whole network (method §4, §5, §7).

  Attributes:
    embed_dim: D, the joint embedding width.
    image_trunk, text_trunk, image_student, text_student: size names
      (`"B/32"`, `"B"`, `"Ti/16"`, `"Ti"`; `"tiny/…"`, `"tiny"` for tests).
    students: `"none"`, `"image"` or `"both"`.
    fusion_mode: see `fusion.FUSION_MODES`.
    rank_order, rank_head_dim, rank_chunk_size, rank_dtype: the `HighOrderPL`
      heads (`rank_dtype`: input dtype of their score products).
    image_teacher_dims, text_teacher_dims: `(token width, class width)` of
      the teacher features when a projecting distillation criterion is used.
    scan: every tower and student runs its blocks as one `nn.scan` with
      stacked parameters (False: unrolled; `layers.stack_layers` converts).
    remat: recomputation inside each block, a key of `layers.REMAT_POLICIES`.
    attention: how the towers' and students' blocks compute attention, a key of
      `layers.ATTENTION`.
    arch: how the trunks are built, a key of `ARCHS`.
  """
  embed_dim: int = 512
  image_trunk: str = "B/32"
  text_trunk: str = "B"
  image_student: str = "Ti/16"
  text_student: str = "Ti"
  students: str = "both"
  fusion_mode: str = "full"
  rank_order: int = 3
  rank_head_dim: int = 64
  rank_chunk_size: int = 16
  rank_dtype: Any = jnp.float32
  image_teacher_dims: tuple[int, int] | None = None
  text_teacher_dims: tuple[int, int] | None = None
  vocab_size: int = VOCAB_SIZE
  eot_id: int = EOT_ID
  scan: bool = True
  remat: str = "none"
  attention: str = "flax"
  arch: str = "dinorank"
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.students not in STUDENT_MODES:
      raise ValueError(f"students must be one of {STUDENT_MODES} (config.model.students), "
                       f"got {self.students!r}")
    if self.arch not in ARCHS:
      raise ValueError(f"arch must be one of {tuple(ARCHS)} (config.model.arch), "
                       f"got {self.arch!r}")
    trunk = ARCHS[self.arch]
    text_trunk = {k: v for k, v in trunk.items() if k in ("activation", "ln_eps")}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stack_kw = dict(scan=self.scan, remat=self.remat, attention=self.attention, **kw)
    text_kw = dict(vocab_size=self.vocab_size, eot_id=self.eot_id, **stack_kw)
    self.image_tower = ViT(self.image_trunk, self.embed_dim, **trunk, **stack_kw)
    self.text_tower = TextTransformer(self.text_trunk, self.embed_dim, **text_trunk, **text_kw)
    if self.students != "none":
      self.image_student_net = ViT(self.image_student, None, **stack_kw)
      self.image_fusion = Fusion(self.fusion_mode, **kw)
      if self.image_teacher_dims:
        self.image_projection = TeacherProjection(*self.image_teacher_dims, **kw)
    if self.students == "both":
      self.text_student_net = TextStudent(self.text_student, **text_kw)
      self.text_fusion = Fusion(self.fusion_mode, **kw)
      if self.text_teacher_dims:
        self.text_projection = TeacherProjection(*self.text_teacher_dims, **kw)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(INIT_LOGIT_SCALE),
                                  (), jnp.float32)
    head = functools.partial(HighOrderPL, order=self.rank_order, head_dim=self.rank_head_dim,
                             chunk_size=self.rank_chunk_size, dtype=self.rank_dtype)
    self.image_rank_head = head()
    self.text_rank_head = head()

  def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, Any]:
    """Embeds a batch.

    Args:
      images: `[B, H, W, 3]` float, normalised.
      tokens: int `[B, 77]` CLIP BPE ids.
    Returns:
      `image`, `text`: the normalised embeddings `u`, `v` `[B, D]` (float32);
      `scale`: `τ = exp(min(t, log 100))`; with students, `image_student` /
      `text_student` (`cls`, `tokens`, text `mask`, and `tokens_proj`,
      `cls_proj` with teacher dims) and `image_gate` / `text_gate` `[B, D]`
      in gated fusion modes.
    """
    out = {"scale": jnp.exp(jnp.minimum(self.logit_scale, MAX_LOGIT_SCALE)),
           **self.embed_images(images), **self.embed_texts(tokens)}
    if self.is_initializing():  # create the heads' parameters
      sims = out["image"] @ out["text"].T
      self.image_rank_head(sims, sims, out["image"])
      self.text_rank_head(sims, sims, out["text"])
    return out

  def embed_images(self, images: jax.Array) -> dict[str, Any]:
    """The image half of `__call__`: `image` (and `image_student`, `image_gate`)."""
    image = self.image_tower(images)["embedding"]
    if self.students == "none":
      return {"image": normalise(image)}
    return self._fuse("image", image, self.image_student_net(images))

  def embed_texts(self, tokens: jax.Array) -> dict[str, Any]:
    """The text half of `__call__`: `text` (and `text_student`, `text_gate`)."""
    text = self.text_tower(tokens)["embedding"]
    if self.students != "both":
      return {"text": normalise(text)}
    return self._fuse("text", text, self.text_student_net(tokens))

  def _fuse(self, modality, z, student):
    fusion = getattr(self, f"{modality}_fusion")
    fused = fusion(z, student["cls"], student["tokens"], student.get("mask"))
    if getattr(self, f"{modality}_teacher_dims"):
      student = {**student, **getattr(self, f"{modality}_projection")(student)}
    out = {modality: fused["embedding"], f"{modality}_student": student}
    if "gate" in fused:
      out[f"{modality}_gate"] = fused["gate"]
    return out

  def image_rank(self, pred, ref, items, **kwargs):
    """θ^I: lists whose items are images (see `HighOrderPL.__call__`)."""
    return self.image_rank_head(pred, ref, items, **kwargs)

  def text_rank(self, pred, ref, items, **kwargs):
    """θ^T: lists whose items are texts."""
    return self.text_rank_head(pred, ref, items, **kwargs)


def from_config(fields: Mapping[str, Any], **overrides) -> DinoRankCLIP:
  """The model of `config.model` (or of an export's `model_config.json`):
  its `CONFIG_FIELDS` that are present, then `overrides` (the dataset's
  `vocab_size`, `eot_id`, teacher widths)."""
  kwargs = {k: fields[k] for k in CONFIG_FIELDS if k in fields}
  kwargs.update(overrides)
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return DinoRankCLIP(**kwargs)


def list_heads(model: DinoRankCLIP, variables) -> tuple:
  """`(image_head, text_head)` callables for `losses.ranking.rank_losses`."""
  return (functools.partial(model.apply, variables, method=DinoRankCLIP.image_rank),
          functools.partial(model.apply, variables, method=DinoRankCLIP.text_rank))
