"""Distillation from the frozen teacher (SPEC §4, paper §4.1).

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
`masked_adaptive_avg_pool` (from `models.pooling`) brings both to `L_t`
slots first.
"""

import jax
import jax.numpy as jnp

from dinorank_jax.models.pooling import masked_adaptive_avg_pool

__all__ = ["CRITERIA", "distill_loss", "gram_loss", "gram_matrix",
           "masked_adaptive_avg_pool", "rkd_loss"]

CRITERIA = ("gram_rel", "mse", "cosine", "rkd", "crd")
PROJECTED = ("mse", "cosine", "crd")   # need the student projected to the teacher width


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
                     "(config.distill.criterion)")
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
