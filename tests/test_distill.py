"""Distillation losses of method §4 and the masked pooling they rely on."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinorank_jax.losses.distill import (CRITERIA, distill_loss, gram_loss, gram_matrix,
                                         masked_adaptive_avg_pool, rkd_loss)
from dinorank_jax.pooling import adaptive_max_pool


def _tokens(b=3, n=10, c=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, n, c))


def _rotation(c, seed=1):
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(seed), (c, c)))
  return q


def test_gram_loss_invariances_and_sensitivity():
  x, t = _tokens(), _tokens(c=5, seed=2)
  np.testing.assert_allclose(jnp.linalg.norm(gram_matrix(x), axis=-1), 1.0, rtol=1e-5)
  assert float(gram_loss(x, x)) < 1e-10
  base = gram_loss(x, t)
  assert float(base) > 0
  np.testing.assert_allclose(gram_loss(x @ _rotation(8), t), base, rtol=1e-5)
  scale = jnp.exp(jax.random.normal(jax.random.key(3), (3, 10, 1)))   # per-token, positive
  np.testing.assert_allclose(gram_loss(x * scale, t), base, rtol=1e-5)
  swapped = x.at[:, [0, 1]].set(x[:, [1, 0]])                         # one side only
  assert float(gram_loss(swapped, x)) > 1e-3


def test_rkd_invariant_to_scale_and_rotation_of_either_side():
  s = jax.random.normal(jax.random.key(0), (12, 8))
  t = jax.random.normal(jax.random.key(1), (12, 6))
  key = jax.random.key(2)
  base, _ = rkd_loss(s, t, key)
  assert float(base) > 0
  assert float(rkd_loss(s, s, key)[0]) < 1e-10
  for s2, t2 in ((3.7 * s, t), (s, 0.2 * t), (s @ _rotation(8), t), (s, t @ _rotation(6, 4))):
    np.testing.assert_allclose(rkd_loss(s2, t2, key)[0], base, rtol=1e-4)


def test_a_pyramid_pools_every_level_at_once():
  # The fusion's spatial pyramid: one pass equals the levels pooled one by one.
  x = jax.random.normal(jax.random.key(0), (5, 13, 4))
  mask = jnp.asarray(np.random.default_rng(0).random((5, 13)) < 0.7).at[:, 0].set(True)
  levels = [adaptive_max_pool(x, mask, k) for k in (1, 2, 4, 8)]
  chex.assert_trees_all_equal(adaptive_max_pool(x, mask, (1, 2, 4, 8)),
                              jnp.concatenate(levels, axis=1))


def test_masked_pooling_ignores_padding_and_splits_like_adaptive_pooling():
  x = jnp.arange(7.0)[None, :, None]
  mask = jnp.asarray([[True] * 5 + [False] * 2])
  pooled = masked_adaptive_avg_pool(x, mask, 2)
  # L = 5 valid tokens, 2 slots: [0, 3) and [2, 5).
  np.testing.assert_allclose(pooled[0, :, 0], [1.0, 3.0])
  x2 = x.at[:, 5:].set(1e6)
  chex.assert_trees_all_equal(masked_adaptive_avg_pool(x2, mask, 2), pooled)
  # Fewer valid tokens (3) than slots (16): every slot averages valid tokens only.
  short = masked_adaptive_avg_pool(x, jnp.asarray([[True] * 3 + [False] * 4]), 16)[0, :, 0]
  assert bool(jnp.all((short >= 0.0) & (short <= 2.0))), short
  np.testing.assert_allclose(np.asarray(short)[[0, 5, 15]], [0.0, 0.5, 2.0])   # slot 5 covers [0, 2)


def _branch(b=6, n=10, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  student = {"tokens": jax.random.normal(k[0], (b, n, 8)), "cls": jax.random.normal(k[1], (b, 8))}
  teacher = {"tokens": jax.random.normal(k[2], (b, n, 5)), "cls": jax.random.normal(k[3], (b, 7))}
  student.update(tokens_proj=teacher["tokens"] + 0.1 * student["tokens"][..., :5],
                 cls_proj=teacher["cls"] + 0.1 * student["cls"][:, :7])
  return student, teacher


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_are_finite_and_smaller_for_a_matching_student(criterion):
  student, teacher = _branch()
  key = jax.random.key(0)
  loss, _ = distill_loss(criterion, student, teacher, key=key)
  grads = jax.grad(lambda s: distill_loss(criterion, s, teacher, key=key)[0])(student)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  shuffled = {k: v[::-1] for k, v in student.items()}     # pairs the wrong samples
  if criterion in ("mse", "cosine", "crd"):
    assert float(loss) < float(distill_loss(criterion, shuffled, teacher, key=key)[0])


def test_gram_rel_is_gram_plus_beta_relational():
  student, teacher = _branch()
  key = jax.random.key(0)
  loss, metrics = distill_loss("gram_rel", student, teacher, key=key, beta=0.5)
  rel, _ = rkd_loss(student["cls"], teacher["cls"], key)
  np.testing.assert_allclose(loss, gram_loss(student["tokens"], teacher["tokens"]) + 0.5 * rel,
                             rtol=1e-6)


def test_bad_criterion_and_missing_projection_name_the_fix():
  student, teacher = _branch()
  with pytest.raises(ValueError, match="config.objective.criterion"):
    distill_loss("kl", student, teacher, key=jax.random.key(0))
  bare = {"tokens": student["tokens"], "cls": student["cls"]}
  with pytest.raises(ValueError, match="teacher_dims"):
    distill_loss("cosine", bare, teacher, key=jax.random.key(0))
