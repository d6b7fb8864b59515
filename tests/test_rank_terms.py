"""The ranking terms of method §3 over a sharded batch, and their stability."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dinorank_jax import parallel
from dinorank_jax.losses.ranking import rank_losses
from dinorank_jax.models.rank_head import HighOrderPL
from tests.xla_options import TRAINER

ROWS = P(parallel.DATA)


def _setup(order, n=32, d=16, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  u = jax.random.normal(k[0], (n, d))
  v = u + jax.random.normal(k[1], (n, d))
  u, v = (x / jnp.linalg.norm(x, axis=1, keepdims=True) for x in (u, v))
  head = HighOrderPL(order=order, head_dim=8, chunk_size=8)
  dummy = jnp.zeros((n, n))
  init = lambda key: head.init(key, dummy, dummy, u)
  params = {"image": init(k[2]), "text": init(k[3])}
  # Open the gates so the corrections matter.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.5) if "gate_" in jax.tree_util.keystr(p) else x, params)
  return head, params, u, v


def _losses(head, params, u, v, scale, axis_name=None, scope="global", **kw):
  return rank_losses(u, v, scale, image_head=functools.partial(head.apply, params["image"]),
                     text_head=functools.partial(head.apply, params["text"]),
                     axis_name=axis_name, scope=scope, **kw)


def _total(losses):
  cross, in_modal = losses
  return cross + 0.5 * in_modal


def test_cross_term_is_rankclip_consistency():
  """Row i of the cross term ranks texts for image i in text i's order of images."""
  head, params, u, v = _setup(order=1)
  s = 10.0 * u @ v.T
  expected = 0.5 * (jnp.mean(head.apply({}, s, s.T, v)) + jnp.mean(head.apply({}, s.T, s, u)))
  cross, in_modal = _losses(head, params, u, v, 10.0)
  chex.assert_trees_all_close(cross, expected, rtol=1e-6)
  expected_in = 0.5 * (jnp.mean(head.apply({}, 10.0 * u @ u.T, 10.0 * v @ v.T, u))
                       + jnp.mean(head.apply({}, 10.0 * v @ v.T, 10.0 * u @ u.T, v)))
  chex.assert_trees_all_close(in_modal, expected_in, rtol=1e-6)


@pytest.mark.parametrize("order", [1, 3])
def test_sharded_rank_losses_equal_unsharded(order):
  mesh = parallel.make_mesh()
  head, params, u, v = _setup(order)
  kw = dict(tie_key=jax.random.key(7), active_order=jnp.int32(order))

  def sharded(params, u, v, scale):
    fn = lambda p, u, v, s: _total(_losses(head, p, u, v, s, axis_name=parallel.DATA, **kw))
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(), ROWS, ROWS, P()), out_specs=P())(
        params, u, v, scale)

  unsharded = lambda params, u, v, scale: _total(_losses(head, params, u, v, scale, **kw))
  args = (params, u, v, jnp.float32(12.0))
  value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
  value_ref, grads_ref = jax.value_and_grad(unsharded, argnums=(0, 1, 2, 3))(*args)
  chex.assert_trees_all_close(value, value_ref, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-6)
  if order > 1:
    assert float(jnp.abs(grads[0]["text"]["params"]["gate_3"])) > 0


def test_local_scope_ranks_each_shard_alone():
  mesh = parallel.make_mesh()
  head, params, u, v = _setup(order=2)
  fn = lambda u, v: _losses(head, params, u, v, 12.0, axis_name=parallel.DATA, scope="local")
  got = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(ROWS, ROWS), out_specs=P()))(u, v)
  blocks = [_losses(head, params, u[i:i + 4], v[i:i + 4], 12.0) for i in range(0, 32, 4)]
  chex.assert_trees_all_close(got, jax.tree.map(lambda *b: jnp.mean(jnp.stack(b)), *blocks),
                              rtol=1e-5)
  with pytest.raises(ValueError, match="config.objective.rank_scope"):
    _losses(head, params, u, v, 12.0, scope="batch")


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("case", ["equal", "duplicated"])
def test_finite_at_scale_100(order, case):
  """Logit scale 100, M = 256: all-equal embeddings, or every item twice."""
  n, d = 256, 32
  if case == "equal":
    u = v = jnp.full((n, d), d ** -0.5)
  else:
    half = jax.random.normal(jax.random.key(0), (n // 2, d))
    u = jnp.concatenate([half, half]) / jnp.linalg.norm(jnp.concatenate([half, half]), axis=1,
                                                       keepdims=True)
    v = u
  head = HighOrderPL(order=order, head_dim=16, chunk_size=64)
  params = {m: head.init(jax.random.key(i), u @ u.T, u @ u.T, u) for i, m in enumerate("it")}
  params = {"image": params["i"], "text": params["t"]}
  loss = lambda p, u, v: _total(_losses(head, p, u, v, 100.0, tie_key=jax.random.key(3)))
  # At XLA's optimisation level: unoptimised, orders 2-4 at M = 256 run for
  # longer than they compile (order 4: 1.9 s + 4.5 s, optimised 3.7 s + 1.4 s).
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  value, grads = grad.lower(params, u, v).compile(TRAINER)(params, u, v)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
