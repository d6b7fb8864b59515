"""Distillation from the frozen teacher (method §4, paper §4.1).

All losses take the student and teacher features of the *local* batch and
return float32 `(loss, metrics)`:

* `gram_loss`: `(1/n) ‖G(X_s) − G(X_t)‖_F²`, `G(X)` the Gram matrix of the
  row-normalised tokens with each row then normalised; independent of the
  channel widths, so no projection is needed.
* `rkd_loss`: RKD distance + 2 × angle on class tokens across the batch,
  compared with smooth-L1; angles over a bounded random subset of triples.
* `distill_loss`: the criteria of Table 4a — `gram_rel` (default),
  `mse`, `cosine`, `rkd`, `crd`.

Text tokens of the student and the teacher come from different tokenisers;
`masked_adaptive_avg_pool` (from `dinorank_jax.pooling`) brings both to
`L_t` slots first. Image tokens of the student look at a random crop of the
image the teacher saw whole: `align_teacher_grid` resamples the teacher's
patch grid onto them.

Crop alignment. The teacher saw the whole stored image resized to its square
input, so teacher cell `(i, j)` of an `h_t × w_t` grid is centred at the
image fraction `((j + ½)/w_t, (i + ½)/h_t)`. Student token `(a, b)` of an
`h_s × w_s` grid looks at the crop `(x0, y0, w, h)`; its centre is the
fraction `(x0 + x' w, y0 + (a + ½)/h_s · h)` with `x' = (b + ½)/w_s`, or
`1 − (b + ½)/w_s` when flipped. The target is the teacher grid sampled
bilinearly (edges clamped) at that point.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dinorank_jax.pooling import masked_adaptive_avg_pool

__all__ = ["CRITERIA", "align_teacher_grid", "distill_loss", "gram_loss", "gram_matrix",
           "masked_adaptive_avg_pool", "rkd_loss", "token_centres"]

CRITERIA = ("gram_rel", "mse", "cosine", "rkd", "crd")
PROJECTED = ("mse", "cosine", "crd")   # need the student projected to the teacher width


def token_centres(crop, grid, flip):
  """Image-fraction centres `(x, y)`, each `[..., h_s, w_s]`, of the student
  tokens; `crop` `[..., 4]` = `(x0, y0, w, h)` fractions, `flip` `[...]`
  (NumPy or JAX arrays)."""
  xp = jnp if isinstance(crop, jax.Array) else np
  rows, cols = grid
  fx = (xp.arange(cols) + 0.5) / cols                                   # [w_s]
  fy = (xp.arange(rows) + 0.5) / rows                                   # [h_s]
  fx = xp.where(xp.asarray(flip)[..., None, None], 1.0 - fx, fx)        # [..., 1, w_s]
  x = crop[..., 0, None, None] + fx * crop[..., 2, None, None]
  y = crop[..., 1, None, None] + fy[:, None] * crop[..., 3, None, None]  # [..., h_s, 1]
  shape = crop.shape[:-1] + (rows, cols)
  return xp.broadcast_to(x, shape), xp.broadcast_to(y, shape)


def align_teacher_grid(grid: jax.Array, crop: jax.Array, flip: jax.Array,
                       student_grid: tuple[int, int]) -> jax.Array:
  """Teacher grids `[B, h_t, w_t, k]` resampled onto the student tokens of
  each crop: `[B, h_s · w_s, k]` float32 (bilinear, edges clamped)."""
  b, h_t, w_t, k = grid.shape
  x, y = token_centres(crop.astype(jnp.float32), student_grid, flip)
  u = jnp.clip(x * w_t - 0.5, 0, w_t - 1)
  v = jnp.clip(y * h_t - 0.5, 0, h_t - 1)
  u0, v0 = jnp.floor(u).astype(jnp.int32), jnp.floor(v).astype(jnp.int32)
  u1, v1 = jnp.minimum(u0 + 1, w_t - 1), jnp.minimum(v0 + 1, h_t - 1)
  du, dv = (u - u0)[..., None], (v - v0)[..., None]
  flat = grid.reshape(b, h_t * w_t, k).astype(jnp.float32)
  at = lambda vv, uu: jnp.take_along_axis(flat, (vv * w_t + uu).reshape(b, -1, 1), axis=1
                                          ).reshape(*vv.shape, k)
  out = ((1 - dv) * ((1 - du) * at(v0, u0) + du * at(v0, u1))
         + dv * ((1 - du) * at(v1, u0) + du * at(v1, u1)))
  return out.reshape(b, -1, k)


def _safe_norm(x, axis=-1, keepdims=False, eps=1e-8):
  """`‖x‖` with a finite gradient at 0 (clamping the norm itself leaves 0 · NaN)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=keepdims), eps * eps))


def _unit(x, axis=-1):
  return x / _safe_norm(x, axis=axis, keepdims=True)


def _smooth_l1(x):
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def gram_matrix(x: jax.Array) -> jax.Array:
  """`[B, n, c]` -> `[B, n, n]`: rows of `X̄ X̄ᵀ`, `X̄` row-normalised, each row normalised."""
  x = _unit(x.astype(jnp.float32))
  return _unit(jnp.einsum("bnc,bmc->bnm", x, x))


def gram_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean over the batch of `(1/n) ‖G(student) − G(teacher)‖_F²`; tokens aligned."""
  diff = gram_matrix(student) - gram_matrix(teacher)
  return jnp.mean(jnp.sum(diff * diff, axis=(1, 2)) / student.shape[1])


def _distance_potentials(x):
  off = 1.0 - jnp.eye(x.shape[0])
  d = _safe_norm(x[:, None, :] - x[None, :, :]) * off
  mu = jnp.sum(d * off) / jnp.sum(off)
  return d / jnp.maximum(mu, 1e-8), off


def _angle_potentials(x, a, b, c):
  return jnp.sum(_unit(x[a] - x[b]) * _unit(x[c] - x[b]), axis=-1)


def rkd_loss(student: jax.Array, teacher: jax.Array, key: jax.Array,
             max_triples: int = 4096) -> tuple[jax.Array, dict]:
  """`L_D + 2 L_A` on class tokens `[B, c_s]` vs `[B, c_t]` (needs B ≥ 3).

  `max_triples` triples `(a, b, c)` are drawn from `key`; those with a
  repeated index are masked out, so the subset is bounded and unbiased over
  distinct triples.
  """
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  ds, off = _distance_potentials(s)
  dt, _ = _distance_potentials(t)
  distance = jnp.sum(_smooth_l1(ds - dt) * off) / jnp.sum(off)
  a, b, c = jax.random.randint(key, (3, max_triples), 0, s.shape[0])
  distinct = ((a != b) & (b != c) & (a != c)).astype(jnp.float32)
  diff = _angle_potentials(s, a, b, c) - _angle_potentials(t, a, b, c)
  angle = jnp.sum(_smooth_l1(diff) * distinct) / jnp.maximum(jnp.sum(distinct), 1.0)
  return distance + 2.0 * angle, {"rkd_distance": distance, "rkd_angle": angle}


def _crd(student_cls, teacher_cls, temperature):
  logits = _unit(student_cls.astype(jnp.float32)) @ _unit(teacher_cls.astype(jnp.float32)).T
  logits /= temperature
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))


def distill_loss(criterion: str, student: dict, teacher: dict, *, key: jax.Array,
                 beta: float = 1.0, max_triples: int = 4096,
                 crd_temperature: float = 0.1) -> tuple[jax.Array, dict]:
  """One branch's distillation loss.

  Args:
    criterion: one of `CRITERIA`.
    student: `tokens` `[B, n, c_s]`, `cls` `[B, c_s]`, and for the projecting
      criteria `tokens_proj` `[B, n, c_t]`, `cls_proj` `[B, c'_t]`.
    teacher: `tokens` `[B, n, c_t]`, `cls` `[B, c'_t]`, aligned one-to-one
      with the student's tokens.
    key: PRNG key for the RKD triples.
    beta: weight of the relational term in `gram_rel`.
    crd_temperature: temperature of the `crd` InfoNCE.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"unknown distillation criterion {criterion!r}: one of {CRITERIA} "
                     "(config.objective.criterion)")
  if criterion in PROJECTED and "tokens_proj" not in student:
    raise ValueError(f"criterion {criterion!r} needs the student projected to the teacher "
                     "width: set the model's image/text_teacher_dims")
  t_tokens, t_cls = teacher["tokens"].astype(jnp.float32), teacher["cls"]
  if criterion == "gram_rel":
    gram = gram_loss(student["tokens"], t_tokens)
    rel, metrics = rkd_loss(student["cls"], t_cls, key, max_triples)
    return gram + beta * rel, {"gram": gram, **metrics}
  if criterion == "rkd":
    return rkd_loss(student["cls"], t_cls, key, max_triples)
  if criterion == "mse":
    mse = jnp.mean(jnp.square(student["tokens_proj"].astype(jnp.float32) - t_tokens))
    return mse, {"mse": mse}
  if criterion == "cosine":
    cos = jnp.sum(_unit(student["tokens_proj"].astype(jnp.float32)) * _unit(t_tokens), axis=-1)
    return jnp.mean(1.0 - cos), {"cosine": jnp.mean(cos)}
  crd = _crd(student["cls_proj"], t_cls, crd_temperature)
  return crd, {"crd": crd}
