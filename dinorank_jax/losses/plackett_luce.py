"""Plackett-Luce list likelihoods: the pure math of method §2 (paper eqs. 2, 6).

Shapes: `rows` list rows (the local rows of a shard), `M` items per list,
`C` positions per chunk, `Dq` the width of the fused correction queries.

A list term scores, for row `i`, the reference order `π = argsort(−Q_i)` under
utilities built from `P_i`. Positions are 0-indexed here (`k = 0 .. K−1`);
The method's 1-indexed `1[k ≥ r]` becomes `k ≥ r − 1`.

Two paths compute per-position negative log-likelihoods `ℓ_k`:

* `first_order_nll`: order 1 (RankCLIP's ListMLE). One gather into reference
  order and one reverse cumulative logsumexp, O(M log M) per row.
* `high_order_nll`: utilities with history-dependent corrections. The
  corrections of every order are fused into one query per (row, position),
  `q = Σ_r g_r h_r / √d_h` (concatenated), scored against the concatenated
  item keys in one matmul; positions are scanned in chunks under
  `jax.checkpoint`, so at most `rows × C × M` scores are live at once in the
  forward and the backward pass.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype


def reference_order(ref: jax.Array, tie_key: jax.Array | None = None) -> jax.Array:
  """`π = argsort(−ref)` per row, ties broken by a random column permutation.

  Duplicate captions make exact ties common. With `tie_key`, tied columns are
  ordered by one random permutation of the columns drawn from the key (the
  same for every row and every shard, so sharded and unsharded runs agree);
  without it, by column index. The columns are shuffled before one stable
  two-operand sort, which is cheaper than sorting on a second key.

  Args:
    ref: reference scores `[rows, M]`.
    tie_key: PRNG key or None.
  Returns:
    int32 `[rows, M]`: `π_i(k)` = the item at position k of row i.
  """
  ref = jax.lax.stop_gradient(ref)
  if tie_key is None:
    return _stable_argsort_descending(ref)
  shuffle = jax.random.permutation(tie_key, ref.shape[1]).astype(jnp.int32)
  return shuffle[_stable_argsort_descending(ref[:, shuffle])]


def _stable_argsort_descending(x):
  column = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
  return jax.lax.sort((-x, column), dimension=1, is_stable=True, num_keys=1)[1]


def inverse_order(perm: jax.Array) -> jax.Array:
  """`rank_i(j)`: the position of item j in row i of `perm` `[rows, M]`."""
  rows, m = perm.shape
  positions = jnp.broadcast_to(jnp.arange(m, dtype=perm.dtype), (rows, m))
  return jnp.zeros_like(perm).at[jnp.arange(rows)[:, None], perm].set(positions)


def suffix_logsumexp(x: jax.Array, block: int = 16) -> jax.Array:
  """`out[:, k] = logsumexp(x[:, k:])` for every k of `[rows, M]`, stable.

  Two levels of masked logsumexp: within blocks of `block` columns, then
  across the blocks' totals. O(M · block + (M / block)²) work per row (16 is
  near the best block from M = 1024 to 4096) in a small program whatever M:
  with its backward pass, 193 equations at M = 1024 against 816 for
  `lax.associative_scan(logaddexp)`, which unrolls 2 log₂ M levels.
  `lax.cumlogsumexp` lowers to an O(M²) window reduction on CPU and
  differentiates through the same scan. (docs/performance.md § Compile time
  has the cost of each on the CPU.)
  """
  rows, m = x.shape
  b = min(block, m)
  blocks = -(-m // b)
  # Padding sits after every real column and adds exp(−huge) = 0 to its sums.
  x = jnp.pad(x, ((0, 0), (0, blocks * b - m)), constant_values=jnp.finfo(x.dtype).min / 2)
  x = x.reshape(rows, blocks, b)
  upper = jnp.arange(b)[None, :] >= jnp.arange(b)[:, None]          # column ≥ position
  within = jax.nn.logsumexp(x[:, :, None, :], axis=-1, where=upper)  # [rows, blocks, b]
  later = jnp.arange(blocks)[None, :] >= jnp.arange(blocks)[:, None]
  suffix = jax.nn.logsumexp(within[:, None, :, 0], axis=-1, where=later)   # [rows, blocks]
  # What the blocks after each block add; nothing after the last.
  after = jnp.concatenate([suffix[:, 1:], jnp.full((rows, 1), -jnp.inf, x.dtype)], axis=1)
  return jnp.logaddexp(within, after[:, :, None]).reshape(rows, -1)[:, :m]


def first_order_nll(pred: jax.Array, perm: jax.Array, eps: float = 0.0) -> jax.Array:
  """Order-1 `ℓ_k = logsumexp_{m ≥ k} P_{π_m} − P_{π_k}` for all k, `[rows, M]`
  (the reverse cumulative logsumexp: `suffix_logsumexp`).

  `eps > 0` reproduces RankCLIP's published ListMLE, which adds `eps` inside
  the log after subtracting the row maximum `μ`:
  `ℓ_k = log(Σ_{m ≥ k} exp(P_{π_m} − μ) + eps) − (P_{π_k} − μ)`. That is not
  the Plackett-Luce likelihood (docs/ranking.md, "RankCLIP's eps"); 0 is exact.
  """
  scores = jnp.take_along_axis(pred, perm, axis=1)
  suffix = suffix_logsumexp(scores)
  if eps:
    top = jnp.max(scores, axis=1, keepdims=True)
    return jnp.logaddexp(suffix - top, math.log(eps)) - (scores - top)
  return suffix - scores


def pl_nll(pred: jax.Array, ref: jax.Array, *, list_len: int | None = None,
           tie_key: jax.Array | None = None, eps: float = 0.0) -> jax.Array:
  """First-order Plackett-Luce (RankCLIP ListMLE) NLL per row.

  Args:
    pred: predicted utilities `[rows, M]`.
    ref: reference scores `[rows, M]`; only their order is used.
    list_len: positions scored, `K = min(list_len, M)`; None scores all M.
    tie_key: PRNG key for random tie-breaking (see `reference_order`).
    eps: RankCLIP's published eps (see `first_order_nll`); 0 is exact.
  Returns:
    `[rows]` in `pred`'s dtype promoted to at least float32: `(1/K) Σ_{k<K} ℓ_k`.
  """
  pred = pred.astype(accumulation_dtype(pred))
  k = scored_positions(pred.shape[1], list_len)
  return jnp.mean(first_order_nll(pred, reference_order(ref, tie_key), eps)[:, :k], axis=1)


def uniform_nll(num_items: int, list_len: int | None = None) -> float:
  """Order 0: every remaining item equally likely, `mean_{k<K} log(M − k)`."""
  k = scored_positions(num_items, list_len)
  # Σ_{k<K} log(M − k) = log M! − log (M − K)!
  return (math.lgamma(num_items + 1) - math.lgamma(num_items - k + 1)) / k


def scored_positions(num_items: int, list_len: int | None) -> int:
  """`K = min(list_len, M)`, validated."""
  if list_len is None:
    return num_items
  if list_len < 1:
    raise ValueError(f"list_len must be >= 1 or None (exact full list), got {list_len}")
  return min(list_len, num_items)


def centred_utilities(pred: jax.Array, corr: jax.Array,
                      remaining: jax.Array) -> jax.Array:
  """`u_k(j) = P_ij + c(j) − mean_{j' ∈ R_k} c(j')`.

  The row-centring of method §2. The likelihood is shift invariant over `R_k`
  (the chosen item is in `R_k` too), so centring changes no loss value or
  gradient in exact arithmetic; it keeps the corrections' offsets out of the
  float32 logsumexp. The offset's exact derivative is zero
  (`∂ℓ/∂offset = 1 − Σ_{R_k} softmax = 0`), so the backward pass holds it
  constant instead of differentiating the masked mean.

  Args:
    pred: `[rows, M]` first-order utilities.
    corr: `[rows, C, M]` gated corrections summed over orders.
    remaining: bool `[rows, C, M]`, item j still unranked at the position.
  Returns:
    `[rows, C, M]` utilities; only entries where `remaining` holds matter.
  """
  count = jnp.sum(remaining, axis=-1, keepdims=True)
  mean = jnp.sum(jnp.where(remaining, corr, 0.0), axis=-1, keepdims=True) / count
  return pred[:, None, :] + corr - jax.lax.stop_gradient(mean)


# `queries(positions [C] int32) -> [rows, C, Dq]`: the fused, gated history
# queries at those positions (zero where an order has no history yet).
QueryFn = Callable[[jax.Array], jax.Array]


def high_order_nll(pred: jax.Array, perm: jax.Array, queries: QueryFn,
                   keys: jax.Array, *, num_positions: int, chunk_size: int,
                   dtype=jnp.float32) -> jax.Array:
  """`ℓ_k` with history corrections for the leading positions, `[rows, H]`.

  Args:
    pred: first-order utilities `[rows, M]`, float32 (or float64).
    perm: reference order `[rows, M]` (from `reference_order`).
    queries: see `QueryFn`.
    keys: item keys `[M, Dq]`; `corr[i, k, j] = ⟨queries(k)[i], keys[j]⟩`.
    num_positions: `H`, the positions scored with corrections (≤ M).
    chunk_size: positions per scan step; memory is O(rows · chunk · M).
    dtype: input dtype of the score product (accumulation in `pred`'s dtype).
  """
  rows, m = pred.shape
  rank = inverse_order(perm)
  chunk_size = min(chunk_size, num_positions)
  num_chunks = -(-num_positions // chunk_size)

  def chunk_nll(start):
    positions = start + jnp.arange(chunk_size, dtype=jnp.int32)
    valid = positions < num_positions
    # Padding positions of the last chunk repeat a valid one and are zeroed,
    # so no empty logsumexp (and no NaN gradient) is ever formed.
    positions = jnp.minimum(positions, num_positions - 1)
    corr = jnp.einsum("rcd,md->rcm", queries(positions).astype(dtype),
                      keys.astype(dtype), preferred_element_type=pred.dtype)
    remaining = rank[:, None, :] >= positions[None, :, None]
    utilities = centred_utilities(pred, corr, remaining)
    chosen = jnp.take_along_axis(utilities, perm[:, positions][..., None], axis=2)[..., 0]
    nll = jax.nn.logsumexp(utilities, axis=2, where=remaining) - chosen
    return jnp.where(valid, nll, 0.0)

  def step(carry, start):
    return carry, jax.checkpoint(chunk_nll)(start)

  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  _, nll = jax.lax.scan(step, None, starts)                     # [chunks, rows, C]
  return jnp.moveaxis(nll, 0, 1).reshape(rows, -1)[:, :num_positions]
