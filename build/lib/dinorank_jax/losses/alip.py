"""ALIP's consistency gates (Yang et al., ICCV 2023).

As the authors' code computes them (github.com/deepglint/ALIP: `train.py`,
the block under `torch.no_grad()` after the forward pass, and
`src/open_alip/loss.py`, `Adaptive_loss`), from the unit embeddings of the
global batch, images `v`, raw texts `t` and synthetic captions `c`:

    s_i = t_i·c_i,   a_i = v_i·t_i,   b_i = v_i·c_i
    m_s, m_a, m_b ← 0.99 m + 0.01 · (batch mean of s, a, b)      (start at 1,
                                                                  updated first)
    LCG, per sample:  w_i   = min(1, exp(2 (s_i − m_s)))
    DCG, per pair:    w^t_i = exp(2 (a_i − m_a)),  w^c_i = exp(2 (b_i − m_b))
                      for the samples with s_i < m_s; 1 for the others
    L = mean_i w_i w^t_i ℓ_i(v, t) + mean_i w_i w^c_i ℓ_i(v, c)

where ℓ_i is pair i's symmetric InfoNCE term (`contrastive.clip_loss` with
`weights`). The weights carry no gradient, and the pair weights are not
clipped: where the raw text disagrees with the synthetic caption, a pair
that matches its image better than the running mean weighs more than 1.

One choice of ours: each similarity is computed as `1 − ½ ‖x − y‖²`, equal
to `x·y` for unit vectors, so identical raw and synthetic captions give
`s_i = 1 = m_s` exactly and every weight is exactly 1 (then L is CLIP's loss
on each path); a dot product would land within rounding of `m_s` on either
side and flip the DCG switch at random. For the same reason the momentum
update is written `m + 0.01 (mean − m)`.
"""

import jax
import jax.numpy as jnp

from dinorank_jax.losses.common import accumulation_dtype, global_mean

MOMENTUM = 0.99
GATES = ("text_caption", "image_text", "image_caption")   # the momenta m_s, m_a, m_b


def initial_momenta() -> jax.Array:
  return jnp.ones(len(GATES), jnp.float32)


def _similarity(x, y):
  return 1.0 - 0.5 * jnp.sum((x - y) ** 2, axis=-1)


def consistency_gates(v: jax.Array, t: jax.Array, c: jax.Array, momenta: jax.Array,
                      axis_name: str | tuple | None = None) -> tuple[dict, jax.Array, dict]:
  """The LCG and DCG weights of the local rows and the updated momenta.

  Args:
    v, t, c: unit image, raw-text and synthetic-caption embeddings, local
      rows `[n, D]` (inside `shard_map` over `axis_name`).
    momenta: `[3]` running means of `GATES`' similarities.
  Returns:
    `(weights, momenta, metrics)`: `weights["text"]`, `weights["caption"]`
    `[n]` are the products `w_i w^t_i` and `w_i w^c_i` to pass to
    `clip_loss`; the metrics are the batch means of the three weights and
    the new momenta.
  """
  dtype = accumulation_dtype(v)
  v, t, c = (jax.lax.stop_gradient(x.astype(dtype)) for x in (v, t, c))
  sims = jnp.stack([_similarity(t, c), _similarity(v, t), _similarity(v, c)])     # [3, n]
  means = jnp.stack([global_mean(s, axis_name) for s in sims])
  momenta = momenta + (1.0 - MOMENTUM) * (means.astype(momenta.dtype) - momenta)
  excess = jnp.exp(2.0 * (sims - momenta[:, None].astype(dtype)))
  sample = jnp.minimum(excess[0], 1.0)                                          # LCG
  inconsistent = sims[0] < momenta[0]
  text, caption = (jnp.where(inconsistent, e, 1.0) for e in excess[1:])         # DCG
  metrics = {"alip_sample_weight": global_mean(sample, axis_name),
             "alip_text_weight": global_mean(text, axis_name),
             "alip_caption_weight": global_mean(caption, axis_name),
             **{f"alip_momentum_{g}": m for g, m in zip(GATES, momenta)}}
  return {"text": sample * text, "caption": sample * caption}, momenta, metrics
