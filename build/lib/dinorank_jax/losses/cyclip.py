"""CyCLIP's cyclic-consistency regularisers (Goel et al., NeurIPS 2022).

As the authors' code computes them (github.com/goel-shashank/CyCLIP,
`src/train.py`, `get_loss`), over the unit embeddings `u` (images) and `v`
(texts) of the global batch of N pairs:

    L_in    = (1/N) Σ_ij (u_i·u_j − v_i·v_j)²      in-modal consistency
    L_cross = (1/N) Σ_ij (u_i·v_j − u_j·v_i)²      cross-modal consistency

that is, the mean over the N × N entries times N, of *unscaled* cosine
similarities (the code multiplies both matrices by the logit scale and
divides its square out again). Both are zero exactly when the image-image
and text-text similarity matrices agree, and when the image-text matrix is
symmetric. The paper's weights are 0.25 each (`Objective.cyclic_in`,
`cyclic_cross`).
"""

import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype, gather_items, global_mean


def cyclic_losses(u: jax.Array, v: jax.Array,
                  axis_name: str | tuple | None = None) -> tuple[jax.Array, jax.Array]:
  """`(L_in, L_cross)` for local rows `u`, `v` `[n, D]` (unit norm).

  Inside `shard_map` over `axis_name`, each device squares its rows of the
  four similarity matrices against the gathered global batch.
  """
  dtype = accumulation_dtype(u)
  u, v = u.astype(dtype), v.astype(dtype)
  u_all, _ = gather_items(u, axis_name)
  v_all, _ = gather_items(v, axis_name)
  in_modal = jnp.sum((u @ u_all.T - v @ v_all.T) ** 2, axis=1)     # row i: Σ_j
  cross = jnp.sum((u @ v_all.T - v @ u_all.T) ** 2, axis=1)        # (u_i·v_j − u_j·v_i)²
  # (1/N) Σ_ij is the mean over the N rows of the row sums.
  return global_mean(in_modal, axis_name), global_mean(cross, axis_name)
