"""Analytic FLOPs of a DinoRankCLIP train step, component by component.

Model FLOPs, as MFU counts them: a matmul `[m, k] × [k, n]` costs `2mkn`;
norms, activations, softmax and the rank heads' masked reductions are not
counted. A transformer layer over `n` tokens of width `w` (MLP 4w) costs
`24 n w²` in its projections and `4 n² w` in attention (`QKᵀ` and `AV`, with
the full square computed, causal or not). The backward pass costs twice the
forward, so a train step is 3 × the forward. `tests/test_bench.py` checks the
forward against XLA's own count of the compiled model.
"""

from dinorank_jax.models.text import text_size
from dinorank_jax.models.vit import vit_size

CONTEXT_LENGTH = 77


def encoder(tokens: int, width: int, depth: int) -> int:
  """One pre-LN transformer stack over `tokens` tokens (per sample)."""
  return depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)


def vit(variant: str, image_size: int, embed_dim: int | None = None) -> int:
  """Patch embedding, encoder (class token included), optional projection."""
  width, depth, _, patch = vit_size(variant)
  patches = (image_size // patch) ** 2
  flops = 2 * patches * (3 * patch ** 2) * width + encoder(patches + 1, width, depth)
  return flops + (2 * width * embed_dim if embed_dim else 0)


def text(variant: str, embed_dim: int | None = None, cls_token: bool = False) -> int:
  """The text trunk (77 tokens, projection) or student (class token + 77)."""
  width, depth, _ = text_size(variant)
  flops = encoder(CONTEXT_LENGTH + cls_token, width, depth)
  return flops + (2 * width * embed_dim if embed_dim else 0)


def fusion(width: int, embed_dim: int, bins=(1, 2, 4, 8), reduction: int = 16) -> int:
  """The full fusion module: CBAM's channel MLP (on the mean and the max),
  the refiner block over the pyramid's tokens, the residual and gate maps."""
  tokens = sum(bins)
  cbam = 2 * 2 * (2 * width * max(width // reduction, 1))
  return (cbam + encoder(tokens, width, 1) + 2 * (2 * width) * embed_dim
          + 2 * (2 * embed_dim) * embed_dim)


def forward(model, image_size: int) -> dict[str, int]:
  """Per-sample forward FLOPs of each part of `model` (a `DinoRankCLIP`)."""
  parts = {"image_trunk": vit(model.image_trunk, image_size, model.embed_dim),
           "text_trunk": text(model.text_trunk, model.embed_dim)}
  if model.students != "none":
    width = vit_size(model.image_student)[0]
    parts["image_student"] = vit(model.image_student, image_size)
    parts["image_fusion"] = fusion(width, model.embed_dim)
  if model.students == "both":
    width = text_size(model.text_student)[0]
    parts["text_student"] = text(model.text_student, cls_token=True)
    parts["text_fusion"] = fusion(width, model.embed_dim)
  return parts


def train_step(model, image_size: int, global_batch: int) -> dict[str, int]:
  """FLOPs of one train step over the global batch, by component, and `total`.

  The similarity matrices are the InfoNCE pair (`U Vᵀ`, `V Uᵀ`) and, from
  order 1 on, the in-modal pair (`U Uᵀ`, `V Vᵀ`) of the rank terms.
  """
  parts = {k: 3 * global_batch * v for k, v in forward(model, image_size).items()}
  matrices = 2 + (2 if model.rank_order >= 1 else 0)
  parts["similarities"] = 3 * matrices * 2 * global_batch ** 2 * model.embed_dim
  parts["total"] = sum(parts.values())
  return parts
