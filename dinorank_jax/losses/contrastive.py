"""Symmetric InfoNCE over the global batch (method §1, paper eq. 1).

Rows are sharded over a mesh axis: each device scores its local rows against
the all-gathered columns, as open_clip does, so memory is linear in the local
batch and the value and gradients equal the unsharded computation.
"""

import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype, gather_items, global_mean


def infonce_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy of each row's target column: `[n, M]`, `[n]` -> `[n]`."""
  target = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - target


def clip_loss(u: jax.Array, v: jax.Array, scale: jax.Array, *,
              axis_name: str | None = None,
              weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """`½ [CE(S, diag) + CE(Sᵀ, diag)]`, `S = τ U Vᵀ`, mean over global rows.

  Args:
    u: L2-normalised image embeddings, local rows `[n, D]`.
    v: L2-normalised text embeddings, local rows `[n, D]`.
    scale: the logit scale `τ = exp(t)`, a scalar.
    axis_name: mesh axis the rows are sharded over (None: unsharded).
    weights: per-pair weights of the local rows `[n]` (ALIP's adaptive
      loss): pair i's two cross-entropy terms are scaled by `weights[i]`
      before the mean. None: all 1.
  Returns:
    `(loss, metrics)`: the float32 loss, identical on every shard, and the
    global image->text / text->image top-1 accuracies.
  """
  u = u.astype(accumulation_dtype(u))
  v = v.astype(u.dtype)
  u_all, rows = gather_items(u, axis_name)
  v_all, _ = gather_items(v, axis_name)
  per_row, correct = [], []
  for queries, items in ((u, v_all), (v, u_all)):
    logits = scale * queries @ items.T                       # [n, N]
    per_row.append(infonce_nll(logits, rows))
    correct.append((jnp.argmax(logits, axis=1) == rows).astype(jnp.float32))
  per_pair = 0.5 * (per_row[0] + per_row[1])
  loss = global_mean(per_pair if weights is None else weights * per_pair, axis_name)
  metrics = {
      "i2t_top1": global_mean(correct[0], axis_name),
      "t2i_top1": global_mean(correct[1], axis_name),
  }
  return loss, metrics
