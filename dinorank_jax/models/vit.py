"""Vision Transformer: pre-LN, class token, learned position embeddings (method §7).

Sizes are ml_collections-friendly names `"<size>/<patch>"`: `"Ti/16"` is the
image student (192 wide, 12 layers, 3 heads), `"B/32"` the image trunk (768,
12, 12); `"tiny/8"` is a two-layer, 32-wide model for tests and the demo.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinorank_jax.models.layers import DEFAULT_LN_EPS, Encoder

# CLIP's image normalisation, the towers' input convention.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# name: (width, depth, heads); the MLP is 4x the width.
VIT_SIZES = {
    "tiny": (32, 2, 2),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def vit_size(variant: str) -> tuple[int, int, int, int]:
  """`"B/32"` -> `(width, depth, heads, patch)`."""
  size, _, patch = variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit():
    raise ValueError(f"unknown ViT variant {variant!r}: use '<size>/<patch>' with size in "
                     f"{sorted(VIT_SIZES)}, e.g. 'B/32' (config.model.image_trunk)")
  return (*VIT_SIZES[size], int(patch))


def normalise_images(images: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32, CLIP mean/std (the towers' input)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)


class ViT(nn.Module):
  """Images `[B, H, W, 3]` -> class token, patch tokens and embedding.

  Attributes:
    variant: e.g. `"B/32"`.
    embed_dim: width of the projected class-token embedding (no bias, as in
      CLIP); None for the students, which return tokens only.
    scan, remat, attention: how the encoder runs its blocks (`layers.Encoder`).
    ln_pre: a LayerNorm between the embeddings and the encoder (CLIP's).
    patch_bias: the patch embedding has a bias (CLIP's has none).
    activation, ln_eps: the blocks' (`layers.Block`).
  """
  variant: str
  embed_dim: int | None = None
  scan: bool = True
  remat: str = "none"
  attention: str = "flax"
  ln_pre: bool = False
  patch_bias: bool = True
  activation: str = "gelu_tanh"
  ln_eps: float = DEFAULT_LN_EPS
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Returns `cls` `[B, w]`, `tokens` `[B, n, w]` (after the final LayerNorm)
    and, with `embed_dim`, `embedding` `[B, embed_dim]`."""
    width, depth, heads, patch = vit_size(self.variant)
    x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embed")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:],
                     self.param_dtype)
    x = x + pos.astype(x.dtype)       # a float32 add would lift the whole stream to float32
    if self.ln_pre:
      x = nn.LayerNorm(self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="ln_pre")(x)
    x = Encoder(depth, heads, scan=self.scan, remat=self.remat, attention=self.attention,
                activation=self.activation,
                ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                name="encoder")(x)
    out = {"cls": x[:, 0], "tokens": x[:, 1:]}
    if self.embed_dim is not None:
      out["embedding"] = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="projection")(x[:, 0])
    return out
