"""The pre-LN transformer block shared by every tower, student and refiner,
and the encoder that stacks it.

`Encoder(scan=True)` is one `nn.scan` over a single block whose parameters
carry a leading layer axis (`encoder/blocks/...`, `[depth, ...]`): XLA sees
one block per tower, not `depth` copies, so the program it compiles stays
small whatever the depth. `scan=False` unrolls the same block as
`encoder/block_{i}` (the layout before scanning; `stack_layers` converts).
`remat` trades memory for recomputation inside each block (`REMAT_POLICIES`);
`attention` picks how attention is computed (`ATTENTION`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The MLP's activation: flax's tanh approximation of GELU (ours), the exact
# GELU (open_clip's LAION models) and OpenAI CLIP's x·σ(1.702 x).
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}
DEFAULT_LN_EPS = 1e-6        # flax's; CLIP's checkpoints were trained with torch's 1e-5

# What each block keeps for the backward pass, from the least recomputation
# to the most: "none" everything; "all_dots" every matmul's output, attention's
# QKᵀ and AV included (softmax, GELU and LayerNorms are recomputed);
# "dots" the weight matmuls' outputs (attention is recomputed too); "full"
# only the block's input. docs/performance.md measures what each needs.
REMAT_POLICIES = {
    "none": None,
    "all_dots": jax.checkpoint_policies.dots_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _fused_attention(implementation: str | None):
  """`jax.nn.dot_product_attention` behind flax's `attention_fn` interface
  (the blocks are deterministic: no dropout arguments are used; flax's masks
  are 0/1 floats)."""
  def attend(query, key, value, bias=None, mask=None, **unused):
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=None if mask is None else mask.astype(bool),
        implementation=implementation)
  return attend


# How attention is computed: "flax" flax's softmax(QKᵀ)V in the block's dtype;
# "xla", "cudnn" (GPU only: a fused flash-attention kernel) and "auto" (cuDNN
# where it applies, else XLA) are `jax.nn.dot_product_attention`'s.
ATTENTION = {
    "flax": nn.dot_product_attention,
    "xla": _fused_attention("xla"),
    "cudnn": _fused_attention("cudnn"),
    "auto": _fused_attention(None),
}


class Block(nn.Module):
  """`x + Attn(LN(x))`, then `x + MLP(LN(x))` (`mlp_ratio`× wide).

  The residual stream keeps the dtype of `x` (the towers give it `dtype`).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: hidden width of the MLP over the model width.
    activation: a key of `ACTIVATIONS`.
    ln_eps: the LayerNorms' epsilon.
    attention: a key of `ATTENTION`.
  """
  num_heads: int
  mlp_ratio: int = 4
  activation: str = "gelu_tanh"
  ln_eps: float = DEFAULT_LN_EPS
  attention: str = "flax"
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`x`: `[B, n, d]`; `mask`: bool `[B, 1, n, n]` (True = may attend)."""
    width = x.shape[-1]
    norm = lambda: nn.LayerNorm(self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    y = norm()(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        deterministic=True, attention_fn=ATTENTION[self.attention])(y, y, mask=mask)
    x = x + y
    y = norm()(x)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, param_dtype=self.param_dtype)(y)
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(
        ACTIVATIONS[self.activation](y))
    return x + y


def _scan_step(block: Block, x, mask):
  return block(x, mask), None


class Encoder(nn.Module):
  """`depth` blocks and a final LayerNorm.

  Attributes:
    scan: one scanned block with stacked parameters (True) or `depth`
      unrolled ones.
    remat: a key of `REMAT_POLICIES`.
    attention: a key of `ATTENTION`.
    activation, ln_eps: as in `Block` (also the final LayerNorm's epsilon).
  """
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  scan: bool = True
  remat: str = "none"
  attention: str = "flax"
  activation: str = "gelu_tanh"
  ln_eps: float = DEFAULT_LN_EPS
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}: one of {sorted(REMAT_POLICIES)} "
                       "(config.model.remat)")
    if self.attention not in ATTENTION:
      raise ValueError(f"unknown attention {self.attention!r}: one of {sorted(ATTENTION)} "
                       "(config.model.attention)")
    block = Block
    if self.remat != "none":
      # Under scan the loop already keeps XLA from merging the recomputation
      # into the forward pass, so CSE prevention is only needed unrolled.
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
              ln_eps=self.ln_eps, attention=self.attention, dtype=self.dtype,
              param_dtype=self.param_dtype)
    if self.scan:
      stack = nn.scan(_scan_step, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=self.depth)
      x, _ = stack(block(**kw, name="blocks"), x, mask)
    else:
      for i in range(self.depth):
        x = block(**kw, name=f"block_{i}")(x, mask)
    return nn.LayerNorm(self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="norm")(x)


def stack_layers(params: dict) -> dict:
  """Unrolled encoder parameters (`block_0 … block_{n-1}`) -> the scanned
  layout (`blocks`, each leaf stacked on a leading layer axis), anywhere in
  the tree; everything else is returned as it is."""
  if not isinstance(params, dict):
    return params
  names = [f"block_{i}" for i in range(len(params))]
  blocks = [k for k in names if k in params]
  out = {k: stack_layers(v) for k, v in params.items() if k not in blocks}
  if blocks:
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in blocks))
  return out
