"""Conflict-aware multi-scale fusion (method §5, paper eq. 5).

Per modality, with its own weights: the student tokens `X` are pooled by a
1-D spatial pyramid (`bins` segments each, max), re-weighted by CBAM channel
then token attention, refined by one pre-LN transformer block, and summarised
with the student class token into a residual `r ∈ R^D`. A gate conditioned on
both streams, `g = σ(W_g [z; r] + b_g)`, forms `f = z + g ⊙ r`; the losses use
`f / ‖f‖`. Proposition 1: if `‖g ⊙ r‖ ≤ ε ‖z‖`, `∠(f, z) ≤ arcsin ε`.

Ablation modes (Tables 3b, 4c). `concat` and `additive` keep the pyramid,
attention and refiner and replace only the gate: `concat` projects `[z; r]`
to D, `additive` is `z + r`. `single_scale` pools one segment;
`spp_no_cbam` / `spp_no_refiner` drop that stage; `full` is the method.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinorank_jax.models.layers import Block
from dinorank_jax.pooling import adaptive_max_pool

FUSION_MODES = ("concat", "additive", "single_scale", "spp_no_cbam", "spp_no_refiner", "full")
GATED_MODES = ("single_scale", "spp_no_cbam", "spp_no_refiner", "full")


def gated_residual(z: jax.Array, g: jax.Array, r: jax.Array) -> jax.Array:
  """`f = z + g ⊙ r` (eq. 5)."""
  return z + g * r


class ChannelSpatialAttention(nn.Module):
  """CBAM on a token sequence `[B, k, c]`: channel attention, then token attention.

  `a_c = σ(MLP(mean_tok Y) + MLP(max_tok Y))` with one shared MLP
  (`c → c/reduction → c`, ReLU); `a_s = σ(Conv1D_k3([mean_ch Y; max_ch Y]))`.
  """
  reduction: int = 16
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    c = y.shape[-1]
    hidden = nn.Dense(max(c // self.reduction, 1), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="mlp_hidden")
    out = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_out")
    mlp = lambda t: out(nn.relu(hidden(t)))
    y = y * nn.sigmoid(mlp(jnp.mean(y, axis=1)) + mlp(jnp.max(y, axis=1)))[:, None, :]
    pooled = jnp.stack([jnp.mean(y, axis=2), jnp.max(y, axis=2)], axis=-1)   # [B, k, 2]
    a_s = nn.Conv(1, (3,), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                  name="token_conv")(pooled)
    return y * nn.sigmoid(a_s)


class ConflictGate(nn.Module):
  """`g = σ(W_g [z; r] + b_g)`, returns `(z + g ⊙ r, g)`."""
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nn.Dense(z.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                      name="gate")(jnp.concatenate([z, r], axis=-1))
    g = nn.sigmoid(logits.astype(jnp.float32))
    return gated_residual(z.astype(jnp.float32), g, r.astype(jnp.float32)), g


class Fusion(nn.Module):
  """Fuses a trunk embedding with its student's tokens.

  Attributes:
    mode: one of `FUSION_MODES`.
    bins: pyramid segment counts (15 tokens for the default).
    refiner_heads: heads of the refiner block; None = width // 64 (at least 1).
  """
  mode: str = "full"
  bins: Sequence[int] = (1, 2, 4, 8)
  refiner_heads: int | None = None
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, cls: jax.Array, tokens: jax.Array,
               mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Args: `z` `[B, D]` trunk embedding before normalisation, `cls` `[B, c]`,
    `tokens` `[B, n, c]` student outputs, `mask` bool `[B, n]` (None: all valid).

    Returns `embedding` (`f / ‖f‖`, float32), `fused` `f`, `residual` `r`
    and, in gated modes, `gate` `g` `[B, D]`.
    """
    if self.mode not in FUSION_MODES:
      raise ValueError(f"unknown fusion mode {self.mode!r}: one of {FUSION_MODES} "
                       "(config.model.fusion_mode)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = jnp.ones(tokens.shape[:2], bool) if mask is None else mask
    bins = (1,) if self.mode == "single_scale" else self.bins
    y = adaptive_max_pool(tokens, mask, bins)                   # every level at once
    if self.mode != "spp_no_cbam":
      y = ChannelSpatialAttention(**kw, name="cbam")(y)
    if self.mode != "spp_no_refiner":
      heads = self.refiner_heads or max(y.shape[-1] // 64, 1)
      y = Block(heads, **kw, name="refiner")(y)
    r = nn.Dense(z.shape[-1], **kw, name="residual")(
        jnp.concatenate([jnp.mean(y, axis=1), cls.astype(y.dtype)], axis=-1))
    out = {"residual": r.astype(jnp.float32)}
    if self.mode == "additive":
      f = z.astype(jnp.float32) + out["residual"]
    elif self.mode == "concat":
      f = nn.Dense(z.shape[-1], **kw, name="concat")(jnp.concatenate([z, r], axis=-1))
      f = f.astype(jnp.float32)
    else:
      f, out["gate"] = ConflictGate(**kw, name="conflict_gate")(z, r)
    out["fused"] = f
    out["embedding"] = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    return out
