"""The ranking terms of the objective (method §2-3).

`rank_losses` assembles the cross-modal and in-modal terms of eqs. 3 and 8
with rows sharded over a mesh axis; each list is scored by a list head, the
`models.rank_head.HighOrderPL` module of its item modality (order 0 is the
constant of CLIP, order 1 RankCLIP's ListMLE, `pl_nll`, orders ≥ 2 add gated
history corrections). `gate_penalty` is the regulariser of the heads' gates.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype, gather_items, global_mean
from dinorank_jax.losses.plackett_luce import pl_nll

__all__ = ["active_gates", "gate_penalty", "mutual_rank_term", "pl_nll", "rank_losses"]


def active_gates(gates: jax.Array, active_order) -> jax.Array:
  """Zeroes `g_r` for `r > active_order`; `gates` holds `g_2 … g_R`."""
  if active_order is None:
    return gates
  orders = jnp.arange(2, gates.shape[0] + 2)
  return jnp.where(orders <= active_order, gates, 0.0)


def gate_penalty(head_params: dict, active_order=None) -> jax.Array:
  """`Σ_r (r − 1) g_r²` over the `gate_{r}` parameters of one head.

  Multiply by `λ_g` (method §6). Inactive orders contribute nothing, so the
  loss before an order's start equals the lower-order loss.
  """
  orders = sorted(int(n.split("_")[1]) for n in head_params if n.startswith("gate_"))
  if not orders:
    return jnp.zeros((), jnp.float32)
  gates = jax.nn.sigmoid(jnp.stack([head_params[f"gate_{r}"] for r in orders]))
  gates = active_gates(gates.astype(jnp.float32), active_order)
  weights = jnp.asarray(orders, jnp.float32) - 1.0
  return jnp.sum(weights * gates ** 2)


# `head(pred, ref, items, *, tie_key, **kwargs) -> [rows]`, e.g.
# `functools.partial(models.rank_head.HighOrderPL(order=3).apply, params)`.
ListHead = Callable[..., jax.Array]


def mutual_rank_term(head_a: ListHead, a: jax.Array, items_a: jax.Array,
                     head_b: ListHead, b: jax.Array, items_b: jax.Array, *,
                     tie_keys=(None, None), **head_kwargs) -> jax.Array:
  """`½ [PL(A, B, items_a, θ_a) + PL(B, A, items_b, θ_b)]` per row, `[rows]`.

  Both terms of method §3 have this form: each matrix is ranked in the order
  of the other (cross-modal: A = S, B = Sᵀ; in-modal: A = S^I, B = S^T).

  Args:
    head_a, head_b: list heads for the items of A's and B's columns.
    a, b: `[rows, M]` scaled similarities.
    items_a, items_b: `[M, D]` embeddings of A's and B's column items.
    tie_keys: PRNG keys for the two lists.
    **head_kwargs: `active_order`, `list_len`, `high_order_len`, `pl_eps`.
  """
  return 0.5 * (head_a(a, b, items_a, tie_key=tie_keys[0], **head_kwargs)
                + head_b(b, a, items_b, tie_key=tie_keys[1], **head_kwargs))


def rank_losses(u: jax.Array, v: jax.Array, scale: jax.Array, *,
                image_head: ListHead, text_head: ListHead,
                axis_name: str | None = None, scope: str = "global",
                tie_key: jax.Array | None = None,
                **head_kwargs) -> tuple[jax.Array, jax.Array]:
  """`(L_cross^R, L_in^R)` of method §3 (paper eqs. 3, 8).

      L_cross = ½ [PL(S, Sᵀ, V, θ^T) + PL(Sᵀ, S, U, θ^I)]
      L_in    = ½ [PL(S^I, S^T, U, θ^I) + PL(S^T, S^I, V, θ^T)]

  Args:
    u: normalised image embeddings, local rows `[n, D]`.
    v: normalised text embeddings, local rows `[n, D]`.
    scale: logit scale τ.
    image_head: list head for lists whose items are images (θ^I).
    text_head: list head for lists whose items are texts (θ^T).
    axis_name: mesh axis the rows are sharded over (None: unsharded).
    scope: `global` ranks the whole global batch; `local` each shard's own
      rows only (cheaper, for ablation).
    tie_key: PRNG key; each of the four lists gets its own fold.
    **head_kwargs: `active_order`, `list_len`, `high_order_len`, `pl_eps`.
  Returns:
    Two float32 scalars, means over the global rows, equal on every shard.
  """
  if scope not in ("global", "local"):
    raise ValueError(f"rank scope must be 'global' or 'local' (config.objective.rank_scope), got {scope!r}")
  u = u.astype(accumulation_dtype(u))
  v = v.astype(u.dtype)
  gather = axis_name if scope == "global" else None
  u_items, _ = gather_items(u, gather)
  v_items, _ = gather_items(v, gather)
  s, s_t = scale * u @ v_items.T, scale * v @ u_items.T          # rows of S and of Sᵀ
  s_i, s_tt = scale * u @ u_items.T, scale * v @ v_items.T       # rows of S^I and of S^T
  # Each head scores its two lists (the terms of `mutual_rank_term`) in one
  # vmapped call: one copy of its program, not two.
  keys = None if tie_key is None else jax.random.split(tie_key, 4)
  pick = lambda *i: None if keys is None else keys[jnp.asarray(i)]
  both = lambda head, preds, refs, items, keys: jax.vmap(
      lambda p, r, k: head(p, r, items, tie_key=k, **head_kwargs),
      in_axes=(0, 0, None if keys is None else 0))(jnp.stack(preds), jnp.stack(refs), keys)
  text = both(text_head, (s, s_tt), (s_t, s_i), v_items, pick(0, 3))
  image = both(image_head, (s_t, s_i), (s, s_tt), u_items, pick(1, 2))
  cross, in_modal = 0.5 * (text[0] + image[0]), 0.5 * (image[1] + text[1])
  return global_mean(cross, axis_name), global_mean(in_modal, axis_name)
