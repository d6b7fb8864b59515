"""Text towers on CLIP BPE tokens (method §7).

`TextTransformer` is CLIP's text trunk: causal mask, learned positions,
pooled at the first end-of-text token, projected to the embedding. Pooling
at the *first* end-of-text token (not at the largest id) is independent of
the padding id a tokenizer uses. `TextStudent` is bidirectional, of the
ViT-Tiny width, with a class token; padding (after the end-of-text token)
is masked out of attention.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinorank_jax.models.layers import DEFAULT_LN_EPS, Encoder

# name: (width, depth, heads); "B" is CLIP's text trunk (ViT-B/32, B/16), "L" that of
# ViT-L/14, "Ti" the student.
TEXT_SIZES = {"tiny": (32, 2, 2), "Ti": (192, 12, 3), "B": (512, 12, 8), "L": (768, 12, 12)}
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
EOT_ID = 49407


def text_size(variant: str) -> tuple[int, int, int]:
  if variant not in TEXT_SIZES:
    raise ValueError(f"unknown text variant {variant!r}: one of {sorted(TEXT_SIZES)} "
                     "(config.model.text_trunk / text_student)")
  return TEXT_SIZES[variant]


def eot_index(tokens: jax.Array, eot_id: int = EOT_ID) -> jax.Array:
  """int `[B]`: position of the first end-of-text token (last position if none)."""
  is_eot = tokens == eot_id
  return jnp.where(jnp.any(is_eot, axis=1), jnp.argmax(is_eot, axis=1), tokens.shape[1] - 1)


def padding_mask(tokens: jax.Array, eot_id: int = EOT_ID) -> jax.Array:
  """bool `[B, L]`: True up to and including the first end-of-text token."""
  return jnp.arange(tokens.shape[1])[None, :] <= eot_index(tokens, eot_id)[:, None]


class _TokenEmbedding(nn.Module):
  """Token and learned position embeddings, in `dtype`."""
  vocab_size: int
  width: int
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=nn.initializers.normal(0.02), name="token")(tokens)
    pos = self.param("position", nn.initializers.normal(0.01),
                     (tokens.shape[1], self.width), self.param_dtype)
    return x + pos.astype(self.dtype)


class TextTransformer(nn.Module):
  """Tokens `[B, L]` -> `embedding` `[B, D]` and `tokens` `[B, L, w]`.

  `scan`, `remat`, `attention`: how the encoder runs its blocks (`layers.Encoder`);
  `activation`, `ln_eps`: the blocks' (`layers.Block`)."""
  variant: str = "B"
  embed_dim: int = 512
  vocab_size: int = VOCAB_SIZE
  eot_id: int = EOT_ID
  scan: bool = True
  remat: str = "none"
  attention: str = "flax"
  activation: str = "gelu_tanh"
  ln_eps: float = DEFAULT_LN_EPS
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    width, depth, heads = text_size(self.variant)
    x = _TokenEmbedding(self.vocab_size, width, self.dtype, self.param_dtype,
                        name="embed")(tokens)
    x = Encoder(depth, heads, scan=self.scan, remat=self.remat, attention=self.attention,
                activation=self.activation,
                ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                name="encoder")(x, nn.make_causal_mask(tokens))
    pooled = jnp.take_along_axis(x, eot_index(tokens, self.eot_id)[:, None, None], axis=1)[:, 0]
    embedding = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="projection")(pooled)
    return {"embedding": embedding, "tokens": x}


class TextStudent(nn.Module):
  """Tokens `[B, L]` -> `cls` `[B, w]`, `tokens` `[B, L, w]`, `mask` `[B, L]`.

  `scan`, `remat`, `attention`: how the encoder runs its blocks (`layers.Encoder`)."""
  variant: str = "Ti"
  vocab_size: int = VOCAB_SIZE
  eot_id: int = EOT_ID
  scan: bool = True
  remat: str = "none"
  attention: str = "flax"
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    width, depth, heads = text_size(self.variant)
    b = tokens.shape[0]
    mask = padding_mask(tokens, self.eot_id)
    x = _TokenEmbedding(self.vocab_size, width, self.dtype, self.param_dtype,
                        name="embed")(tokens)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)
    keys = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    attention_mask = nn.make_attention_mask(jnp.ones_like(keys), keys)
    x = Encoder(depth, heads, scan=self.scan, remat=self.remat, attention=self.attention,
                dtype=self.dtype,
                param_dtype=self.param_dtype, name="encoder")(x, attention_mask)
    return {"cls": x[:, 0], "tokens": x[:, 1:], "mask": mask}
