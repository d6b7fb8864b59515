"""The pre-LN transformer block shared by every tower, student and refiner."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
  """`x + Attn(LN(x))`, then `x + MLP(LN(x))` (GELU, `mlp_ratio`× wide).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: hidden width of the MLP over the model width.
  """
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`x`: `[B, n, d]`; `mask`: bool `[B, 1, n, n]` (True = may attend)."""
    width = x.shape[-1]
    norm = lambda: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    y = norm()(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        deterministic=True)(y, y, mask=mask)
    x = x + y
    y = norm()(x)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, param_dtype=self.param_dtype)(y)
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(nn.gelu(y))
    return x + y


class Encoder(nn.Module):
  """`depth` blocks and a final LayerNorm."""
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype,
                name=f"block_{i}")(x, mask)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
