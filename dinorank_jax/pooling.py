"""Adaptive pooling of token sequences over their valid tokens.

Segment `b` of `k` covers the valid tokens with valid-index in
`[floor(b·L/k), ceil((b+1)·L/k))`, `L` the sample's number of valid tokens —
PyTorch's adaptive pooling rule applied to each sample's own length, so
padding never enters a segment and every segment is non-empty when `L ≥ 1`.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def segment_membership(mask: jax.Array, num_segments: int | Sequence[int]) -> jax.Array:
  """bool `[B, k, n]`: token t of sample b belongs to segment s.

  Args:
    mask: bool `[B, n]`, the valid tokens (any pattern, not only a prefix).
    num_segments: k; or a pyramid of segment counts `(k_1, k_2, …)`, whose
      segments follow one another (`k = Σ k_i`), computed together.
  """
  counts = [num_segments] if isinstance(num_segments, int) else list(num_segments)
  mask = mask.astype(bool)
  index = jnp.cumsum(mask, axis=1) - 1                       # valid-index of each token
  length = jnp.sum(mask, axis=1, keepdims=True)[:, :, None]  # [B, 1, 1]
  s = jnp.asarray([i for k in counts for i in range(k)])[None, :, None]
  k = jnp.asarray([k for k in counts for _ in range(k)])[None, :, None]
  start = (s * length) // k
  end = -((-(s + 1) * length) // k)                          # ceil division
  inside = (index[:, None, :] >= start) & (index[:, None, :] < end)
  return inside & mask[:, None, :]


def adaptive_max_pool(x: jax.Array, mask: jax.Array,
                      num_segments: int | Sequence[int]) -> jax.Array:
  """`[B, n, c]` -> `[B, k, c]`, max over each segment's valid tokens (a
  pyramid of segment counts pools every level at once)."""
  member = segment_membership(mask, num_segments)[..., None]  # [B, k, n, 1]
  low = jnp.finfo(x.dtype).min
  return jnp.max(jnp.where(member, x[:, None, :, :], low), axis=2)


def masked_adaptive_avg_pool(x: jax.Array, mask: jax.Array, num_segments: int) -> jax.Array:
  """`[B, n, c]` -> `[B, k, c]`, mean over each segment's valid tokens (float32)."""
  weight = segment_membership(mask, num_segments).astype(jnp.float32)
  weight /= jnp.maximum(jnp.sum(weight, axis=2, keepdims=True), 1.0)
  return jnp.einsum("bkn,bnc->bkc", weight, x.astype(jnp.float32))
