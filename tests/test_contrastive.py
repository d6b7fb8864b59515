"""Symmetric InfoNCE (method §1): the math, and sharded == unsharded."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dinorank_jax import parallel
from dinorank_jax.losses.contrastive import clip_loss


def _embeddings(n=32, d=16, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  u = jax.random.normal(k1, (n, d))
  v = u + 0.8 * jax.random.normal(k2, (n, d))      # correlated pairs
  normalise = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  return normalise(u), normalise(v)


def test_clip_loss_matches_numpy_float64():
  u, v = _embeddings()
  s = 20.0 * np.asarray(u, np.float64) @ np.asarray(v, np.float64).T
  log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
  expected = -0.5 * (np.mean(np.diag(log_softmax(s))) + np.mean(np.diag(log_softmax(s.T))))
  loss, metrics = clip_loss(u, v, jnp.float32(20.0))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["i2t_top1"], np.mean(s.argmax(1) == np.arange(32)))
  np.testing.assert_allclose(metrics["t2i_top1"], np.mean(s.argmax(0) == np.arange(32)))


def test_sharded_clip_loss_equals_unsharded():
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  u, v = _embeddings()
  scale = jnp.float32(14.3)

  def sharded(u, v, scale):
    loss = jax.shard_map(lambda *a: clip_loss(*a, axis_name=parallel.DATA)[0], mesh=mesh,
                         in_specs=(P(parallel.DATA), P(parallel.DATA), P()), out_specs=P())
    return loss(u, v, scale)

  unsharded = lambda u, v, scale: clip_loss(u, v, scale)[0]
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(u, v, scale)
  value_ref, grads_ref = jax.value_and_grad(unsharded, argnums=(0, 1, 2))(u, v, scale)
  chex.assert_trees_all_close(value, value_ref, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-7)
