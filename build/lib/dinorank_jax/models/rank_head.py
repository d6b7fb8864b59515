"""The high-order Plackett-Luce rank head θ (method §2, paper eqs. 6-7).

`HighOrderPL(order=R)` is the list likelihood of paper eq. 6 with the
transition heads of eq. 7: order 0 is the constant of CLIP, order 1 is
RankCLIP's ListMLE (`losses.plackett_luce.pl_nll`), orders 2, 3, … add
gated, row-centred history corrections. It is a module with parameters, so
it lives with the networks; the likelihoods it evaluates and the ranking
terms that call it are in `losses/`.

Choices where the method is silent (also in docs/ranking.md):
* Head projections carry no bias; the order ≥ 4 history layer has
  `history_heads` attention heads of width `head_dim / history_heads` and a
  4× MLP, and only its last token is computed (one layer: the other tokens'
  outputs never reach the last one).
* Self-transitions need no explicit mask: the history items have already
  left the remaining set `R_k`, so `c(j | …, j)` never enters a likelihood.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype
from dinorank_jax.losses.plackett_luce import (
    first_order_nll, high_order_nll, reference_order, scored_positions, uniform_nll)
from dinorank_jax.losses.ranking import active_gates

_xavier = nn.initializers.xavier_uniform()


def default_gate_init(order: int) -> float:
  """`a_r = −(r + 2)`: −4 for order 2, −5 for order 3, …; all gates start near 0."""
  return -(order + 2.0)


class HighOrderPL(nn.Module):
  """Order-R Plackett-Luce list likelihood, NLL per row (paper eqs. 6-7).

  Attributes:
    order: R. 0 = CLIP (constant), 1 = RankCLIP, ≥ 2 adds transitions.
    head_dim: `d_h` of the transition heads.
    gate_inits: gate logits `a_2 … a_R`; None uses `default_gate_init`.
    history_heads: attention heads of the order ≥ 4 history layer.
    chunk_size: positions per scan step of the high-order path.
    dtype: input dtype of the head projections and score products.
    param_dtype: parameter dtype.
  """
  order: int
  head_dim: int = 64
  gate_inits: Sequence[float] | None = None
  history_heads: int = 4
  chunk_size: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pred: jax.Array, ref: jax.Array, items: jax.Array, *,
               active_order: jax.Array | int | None = None,
               list_len: int | None = None, high_order_len: int | None = None,
               tie_key: jax.Array | None = None, pl_eps: float = 0.0) -> jax.Array:
    """NLL of the reference order of each row, mean over scored positions.

    Args:
      pred: predicted utilities `[rows, M]` (scaled similarities).
      ref: reference scores `[rows, M]`; row i is ranked by `argsort(−ref_i)`.
      items: embeddings of the M listed items `[M, D]`.
      active_order: orders above it contribute nothing (gates read as 0, so
        their parameters get exactly zero gradient). May be traced: the
        staged warm-start changes it without recompiling.
      list_len: positions scored, `K = min(list_len, M)`; None = all M.
      high_order_len: leading positions that carry corrections; the rest use
        first-order utilities. None = all K.
      tie_key: PRNG key for random tie-breaking of `ref`.
      pl_eps: RankCLIP's published eps in the first-order terms
        (`losses.plackett_luce.first_order_nll`); 0 is exact. Corrected
        positions (orders ≥ 2) never use it.
    Returns:
      `[rows]`, float32 (float64 for float64 inputs).
    """
    if self.order < 0:
      raise ValueError(f"rank order must be >= 0, got {self.order}")
    pred = pred.astype(accumulation_dtype(pred))
    rows, m = pred.shape
    k = scored_positions(m, list_len)
    if self.order == 0:
      return jnp.full((rows,), uniform_nll(m, list_len), pred.dtype)
    perm = reference_order(ref, tie_key)
    first = first_order_nll(pred, perm, pl_eps)
    if self.order == 1:
      return jnp.mean(first[:, :k], axis=1)

    queries, keys = self._transitions(items, perm, active_order)
    h = k if high_order_len is None else min(high_order_len, k)
    if h < 0:
      raise ValueError(f"high_order_len must be >= 0 or None, got {high_order_len}")
    if h == 0:
      return jnp.mean(first[:, :k], axis=1)

    def corrected():
      return high_order_nll(pred, perm, queries, keys, num_positions=h,
                            chunk_size=self.chunk_size, dtype=self.dtype).sum(1)

    def first_order_only():
      return first[:, :h].sum(1)

    if active_order is None:
      head = corrected()
    else:  # Skips the high-order work while only order 1 is active.
      head = jax.lax.cond(jnp.asarray(active_order) >= 2, corrected, first_order_only)
    return (head + first[:, h:k].sum(1)) / k

  def _transitions(self, items, perm, active_order):
    """Creates the heads; returns the fused query function and item keys.

    Order r's query at position k is `g_r · 1[k ≥ r−1] · h_r / √d_h` with
    `h_r` the head's summary of the history `π_{k−r+1} … π_{k−1}`, and its key
    `W_{k,r} e_j`, so `⟨q, key_j⟩` summed over orders is the gated
    correction `Σ_r g_r c_r(j | history)` in one matmul.
    """
    dense = functools.partial(nn.Dense, self.head_dim, use_bias=False,
                              kernel_init=_xavier, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    orders = range(2, self.order + 1)
    inits = self.gate_inits or [default_gate_init(r) for r in orders]
    if len(inits) != self.order - 1:
      raise ValueError(f"gate_inits needs {self.order - 1} values for order "
                       f"{self.order}, got {len(inits)}")
    gates = jnp.stack([
        self.param(f"gate_{r}", nn.initializers.constant(a), (), self.param_dtype)
        for r, a in zip(orders, inits)])
    gates = active_gates(jax.nn.sigmoid(gates), active_order)

    encoders, keys = [], []
    for r in orders:
      keys.append(dense(name=f"key_{r}")(items))
      if r == 2:  # c_2(j | p) = ⟨W_q e_p, W_k e_j⟩ / √d_h
        encoders.append(functools.partial(_take_last, dense(name="query_2")(items)))
      elif r == 3:  # h = a + b + a ⊙ b, a = W_a e_p, b = W_b e_q
        encoders.append(functools.partial(
            _pair_summary, dense(name="older_3")(items), dense(name="recent_3")(items)))
      else:  # one pre-LN transformer layer over the r − 1 history items
        position = self.param(f"position_{r}", nn.initializers.normal(0.02),
                              (r - 1, self.head_dim), self.param_dtype)
        layer = self.param(f"layer_{r}", init_history_layer, self.head_dim,
                           self.param_dtype)
        tables = _history_tables(dense(name=f"history_{r}")(items), position, layer)
        encoders.append(functools.partial(_sequence_summary, tables, layer,
                                          self.history_heads))
    keys = jnp.concatenate(keys, axis=-1)
    scale = self.head_dim ** -0.5

    def queries(positions):
      parts = []
      for r, encode, gate in zip(orders, encoders, gates):
        back = jnp.arange(-(r - 1), 0, dtype=positions.dtype)   # oldest first
        history = perm[:, jnp.maximum(positions[:, None] + back, 0)]
        weight = gate * scale * (positions >= r - 1)
        parts.append(encode(history) * weight[None, :, None].astype(keys.dtype))
      return jnp.concatenate(parts, axis=-1)

    return queries, keys


def _take_last(table, history):
  return jnp.take(table, history[..., -1], axis=0)


def _pair_summary(older, recent, history):
  a = jnp.take(older, history[..., 0], axis=0)
  b = jnp.take(recent, history[..., 1], axis=0)
  return a + b + a * b


def _history_tables(table, position, p):
  """What the history layer computes of each token alone, per item and slot.

  A history token is `x = W_h e_j + p_s` (item j at slot s); its layer norm
  and key/value projections (and, at the last slot, its query) depend on
  `(j, s)` alone, so they are computed once for the `M × (r − 1)` pairs, not
  for each of the `rows × positions` histories that gather them.
  """
  x = table[:, None, :] + position.astype(table.dtype)                 # [M, L, d]
  y = _layer_norm(x, p["ln1_scale"], p["ln1_bias"])
  return {"x": x[:, -1], "query": y[:, -1] @ p["query"], "key": y @ p["key"],
          "value": y @ p["value"]}


def _sequence_summary(tables, layer, num_heads, history):
  last, slots = history[..., -1], jnp.arange(history.shape[-1])
  return history_layer(layer, jnp.take(tables["x"], last, axis=0),
                       jnp.take(tables["query"], last, axis=0),
                       tables["key"][history, slots], tables["value"][history, slots],
                       num_heads)


def init_history_layer(key, width: int, dtype=jnp.float32) -> dict:
  """Parameters of the order ≥ 4 history layer (Xavier matrices, zero biases)."""
  names = ("query", "key", "value", "out", "mlp_in", "mlp_out")
  shapes = ((width, width),) * 4 + ((width, 4 * width), (4 * width, width))
  keys = jax.random.split(key, len(names))
  params = {n: _xavier(k, s, dtype) for n, k, s in zip(names, keys, shapes)}
  params.update(
      ln1_scale=jnp.ones((width,), dtype), ln1_bias=jnp.zeros((width,), dtype),
      ln2_scale=jnp.ones((width,), dtype), ln2_bias=jnp.zeros((width,), dtype),
      mlp_in_bias=jnp.zeros((4 * width,), dtype),
      mlp_out_bias=jnp.zeros((width,), dtype))
  return params


def history_layer(p: dict, x: jax.Array, query: jax.Array, key: jax.Array, value: jax.Array,
                  num_heads: int) -> jax.Array:
  """Pre-LN transformer layer over a history, read out at its last token.

  Takes the last token `x` `[..., d]`, its query and every token's key and
  value `[..., L, d]` (projections of the layer-normed tokens, see
  `_history_tables`); returns the last token's output `[..., d]`.
  """
  d = x.shape[-1]
  split = lambda t: t.reshape(*t.shape[:-1], num_heads, d // num_heads)
  q = split(query)                                            # [..., h, d/h]
  k, v = split(key), split(value)                             # [..., L, h, d/h]
  logits = jnp.einsum("...hd,...lhd->...hl", q, k) * (d // num_heads) ** -0.5
  attended = jnp.einsum("...hl,...lhd->...hd", jax.nn.softmax(logits, axis=-1), v)
  out = x + attended.reshape(*attended.shape[:-2], d) @ p["out"]
  y = _layer_norm(out, p["ln2_scale"], p["ln2_bias"])
  hidden = jax.nn.gelu(y @ p["mlp_in"] + p["mlp_in_bias"])
  return out + hidden @ p["mlp_out"] + p["mlp_out_bias"]


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
