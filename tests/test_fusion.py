"""The conflict-aware fusion of method §5 and its ablation modes."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinorank_jax.models.fusion import FUSION_MODES, Fusion, gated_residual


def test_proposition_1_angle_bound():
  """‖g ⊙ r‖ = ε‖z‖ with ε < 1 ⇒ ∠(z + g ⊙ r, z) ≤ arcsin ε, for random z, r, g."""
  rng = np.random.default_rng(0)
  worst = 0.0
  for _ in range(2000):
    d = int(rng.integers(2, 64))
    eps = rng.uniform(0.0, 0.99)
    z, r = rng.normal(size=d), rng.normal(size=d)
    if rng.uniform() < 0.5:        # steer r against z, where the bound is nearly tight
      r -= rng.uniform(0, 3) * z / np.linalg.norm(z) * np.linalg.norm(r)
    g = rng.uniform(0.01, 1.0, size=d)
    g *= eps * np.linalg.norm(z) / np.linalg.norm(g * r)
    f = np.asarray(gated_residual(jnp.asarray(z), jnp.asarray(g), jnp.asarray(r)), np.float64)
    cos = f @ z / (np.linalg.norm(f) * np.linalg.norm(z))
    angle = math.acos(min(1.0, cos))
    assert angle <= math.asin(eps) + 1e-5, (eps, angle)
    worst = max(worst, angle / max(math.asin(eps), 1e-9))
  assert worst > 0.95      # the samples do reach the bound, so the test can see a violation


def _inputs(b=3, n=12, c=32, d=16, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, d)), jax.random.normal(k[1], (b, c)),
          jax.random.normal(k[2], (b, n, c)))


def _apply(mode, z, cls, tokens, mask=None):
  fusion = Fusion(mode, dtype=jnp.float32)
  params = fusion.init(jax.random.key(1), z, cls, tokens, mask)
  return fusion.apply(params, z, cls, tokens, mask)


def test_every_mode_is_a_different_function():
  z, cls, tokens = _inputs()
  outs = {m: _apply(m, z, cls, tokens)["embedding"] for m in FUSION_MODES}
  for a, b in itertools.combinations(FUSION_MODES, 2):
    assert not np.allclose(outs[a], outs[b], atol=1e-4), (a, b)
  for m in FUSION_MODES:
    np.testing.assert_allclose(jnp.linalg.norm(outs[m], axis=1), 1.0, rtol=1e-5)


def test_additive_is_z_plus_r_and_gated_modes_are_z_plus_g_r():
  z, cls, tokens = _inputs()
  out = _apply("additive", z, cls, tokens)
  chex.assert_trees_all_close(out["fused"], z + out["residual"], rtol=1e-6)
  assert "gate" not in out
  out = _apply("full", z, cls, tokens)
  chex.assert_trees_all_close(out["fused"], z + out["gate"] * out["residual"], rtol=1e-6)
  assert bool(jnp.all((out["gate"] > 0) & (out["gate"] < 1)))


def test_padding_never_reaches_the_fused_embedding():
  z, cls, tokens = _inputs()
  mask = jnp.arange(12)[None, :] < jnp.asarray([[3], [7], [12]])
  out = _apply("full", z, cls, tokens, mask)
  noisy = jnp.where(mask[..., None], tokens, 1e3)
  chex.assert_trees_all_close(_apply("full", z, cls, noisy, mask), out, rtol=1e-6)


def test_unknown_mode_names_the_config_key():
  with pytest.raises(ValueError, match="config.model.fusion_mode"):
    _apply("gated", *_inputs())
