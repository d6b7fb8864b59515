"""CyCLIP's regularisers: the authors' definition, zero where it must be,
sharded equals unsharded, finite gradients."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from dinorank_jax import parallel
from dinorank_jax.losses.cyclip import cyclic_losses
from tests.test_contrastive import _embeddings


def _reference(u, v):
  """The authors' form: scaled matrices, mean of squares / scale² × N."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  scale, n = 17.0, len(u)
  text_per_image = scale * u @ v.T
  in_modal = ((scale * u @ u.T - scale * v @ v.T) ** 2).mean() / scale ** 2 * n
  cross = ((text_per_image - text_per_image.T) ** 2).mean() / scale ** 2 * n
  return in_modal, cross


def test_matches_the_authors_definition():
  u, v = _embeddings()
  np.testing.assert_allclose(cyclic_losses(u, v), _reference(u, v), rtol=1e-5)


def test_zero_exactly_when_consistent_positive_otherwise():
  u, v = _embeddings()
  in_modal, cross = cyclic_losses(u, u)                   # identical towers: both symmetric
  assert float(in_modal) < 1e-10 and float(cross) < 1e-10
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))[0]
  in_modal, cross = cyclic_losses(u, u @ rotation)        # same Gram matrix, asymmetric u·v
  assert float(in_modal) < 1e-10 and float(cross) > 1e-3
  in_modal, cross = cyclic_losses(u, v)
  assert float(in_modal) > 1e-3 and float(cross) > 1e-3


def test_sharded_equals_unsharded_with_finite_gradients():
  mesh = parallel.make_mesh()
  u, v = _embeddings()
  total = lambda l: l[0] + 2 * l[1]
  sharded = jax.shard_map(lambda u, v: total(cyclic_losses(u, v, parallel.BATCH)), mesh=mesh,
                          in_specs=(P(parallel.BATCH), P(parallel.BATCH)), out_specs=P())
  value, grads = jax.value_and_grad(sharded, argnums=(0, 1))(u, v)
  expected, expected_grads = jax.value_and_grad(lambda u, v: total(cyclic_losses(u, v)),
                                                argnums=(0, 1))(u, v)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
