"""ALIP's gates and adaptive loss: the authors' definition, exactly CLIP with
weights 1 for identical captions, sharded equals unsharded, no gradient
through the weights."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dinorank_jax import parallel
from dinorank_jax.losses.alip import consistency_gates
from dinorank_jax.losses.contrastive import clip_loss
from tests.test_contrastive import _embeddings

SCALE = 14.0


def _three(n=32):
  v, t = _embeddings(n=n, seed=0)
  _, c = _embeddings(n=n, seed=1)
  c = t + 0.9 * c                                  # captions that partly agree with the text
  return v, t, c / jnp.linalg.norm(c, axis=1, keepdims=True)


def _reference(v, t, c, momenta):
  """The authors' `train.py` and `Adaptive_loss`, line for line, in float64."""
  v, t, c = (np.asarray(x, np.float64) for x in (v, t, c))
  m_s, m_a, m_b = (float(m) for m in momenta)
  cur_sim = np.sum(t * c, axis=1)
  m_s = cur_sim.mean() * 0.01 + m_s * 0.99
  weight_sample_raw = np.exp(cur_sim - m_s) ** 2
  weight_sample = np.where(weight_sample_raw < 1, weight_sample_raw, 1.0)
  cur_sim_raw = np.sum(t * v, axis=1)
  m_a = cur_sim_raw.mean() * 0.01 + m_a * 0.99
  weight_raw = np.where(weight_sample_raw < 1, np.exp(cur_sim_raw - m_a) ** 2, 1.0)
  cur_sim_caption = np.sum(c * v, axis=1)
  m_b = cur_sim_caption.mean() * 0.01 + m_b * 0.99
  weight_caption = np.where(weight_sample_raw < 1, np.exp(cur_sim_caption - m_b) ** 2, 1.0)

  def adaptive(image, text, weight_pair):
    logits = SCALE * image @ text.T
    ce = lambda x: np.log(np.exp(x).sum(1)) - np.diag(x)
    return np.mean((ce(logits) + ce(logits.T)) / 2 * weight_sample * weight_pair)

  loss = adaptive(v, t, weight_raw) + adaptive(v, c, weight_caption)
  return loss, weight_sample * weight_raw, weight_sample * weight_caption, (m_s, m_a, m_b)


def _alip_loss(v, t, c, momenta, axis_name=None):
  weights, momenta, metrics = consistency_gates(v, t, c, momenta, axis_name)
  text, _ = clip_loss(v, t, SCALE, axis_name=axis_name, weights=weights["text"])
  caption, _ = clip_loss(v, c, SCALE, axis_name=axis_name, weights=weights["caption"])
  return text + caption, (weights, momenta, metrics)


def test_matches_the_authors_definition():
  v, t, c = _three()
  for momenta in ([1.0, 1.0, 1.0], [0.6, 0.3, 0.2]):       # the start, and mid-training
    momenta = jnp.asarray(momenta)
    loss, (weights, new, _) = _alip_loss(v, t, c, momenta)
    expected_loss, w_text, w_caption, expected_momenta = _reference(v, t, c, momenta)
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-5)
    np.testing.assert_allclose(weights["text"], w_text, rtol=2e-5)
    np.testing.assert_allclose(weights["caption"], w_caption, rtol=2e-5)
    np.testing.assert_allclose(new, expected_momenta, rtol=1e-6)


def test_identical_captions_are_clip_with_weights_one():
  v, t, _ = _three()
  momenta = jnp.ones(3)
  for step in range(3):                                     # the momenta of m_s stay at 1
    loss, (weights, momenta, metrics) = _alip_loss(v, t, t, momenta)
    assert float(momenta[0]) == 1.0
    assert np.all(np.asarray(weights["text"]) == 1.0)
    assert np.all(np.asarray(weights["caption"]) == 1.0)
    assert float(metrics["alip_sample_weight"]) == 1.0
    np.testing.assert_allclose(loss, 2 * clip_loss(v, t, SCALE)[0], rtol=1e-6)


def test_disagreeing_captions_are_down_weighted():
  v, t, c = _three()
  loss, (weights, momenta, metrics) = _alip_loss(v, t, c, jnp.ones(3))
  sample = float(metrics["alip_sample_weight"])
  assert 0.0 < sample < 1.0 and float(loss) > 0
  # Every sample's captions disagree more than the starting momentum (1),
  # so the pair weights apply everywhere, and they differ between the paths.
  assert not np.allclose(weights["text"], weights["caption"])
  assert np.all(np.asarray(weights["text"]) < 1.0)
  # Past the start, consistent samples keep weight 1 on both paths.
  s = np.sum(np.asarray(t) * np.asarray(c), axis=1)
  _, (weights, _, _) = _alip_loss(v, t, c, jnp.asarray([s.mean(), 1.0, 1.0]))
  consistent = s > s.mean()                                  # the momentum stays at the mean
  assert 8 < consistent.sum() < 24
  np.testing.assert_allclose(np.asarray(weights["text"])[consistent], 1.0, rtol=1e-6)


def test_sharded_equals_unsharded_and_weights_carry_no_gradient():
  mesh = parallel.make_mesh()
  v, t, c = _three()
  momenta = jnp.asarray([0.6, 0.3, 0.2])
  rows = P(parallel.BATCH)
  sharded = jax.shard_map(lambda v, t, c, m: _alip_loss(v, t, c, m, parallel.BATCH),
                          mesh=mesh, in_specs=(rows, rows, rows, P()),
                          out_specs=(P(), ({"text": rows, "caption": rows}, P(), P())))
  # Jitted, as the train step runs them (eagerly, each operation of the two
  # gradients compiles on its own: 20 s of the test).
  (value, (weights, new, _)), grads = jax.jit(jax.value_and_grad(
      sharded, argnums=(0, 1, 2), has_aux=True))(v, t, c, momenta)
  (expected, (expected_weights, expected_new, _)), expected_grads = jax.jit(jax.value_and_grad(
      _alip_loss, argnums=(0, 1, 2), has_aux=True))(v, t, c, momenta)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(new, expected_new, rtol=1e-6)
  np.testing.assert_allclose(weights["text"], expected_weights["text"], rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  # The gradient is that of the weighted InfoNCE terms with the weights held fixed.
  fixed = lambda v, t, c: (clip_loss(v, t, SCALE, weights=expected_weights["text"])[0]
                           + clip_loss(v, c, SCALE, weights=expected_weights["caption"])[0])
  for g, e in zip(expected_grads, jax.grad(fixed, argnums=(0, 1, 2))(v, t, c)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
