"""The Plackett-Luce hierarchy of method §2: CLIP ⊂ RankCLIP ⊂ order 2 ⊂ order 3 …"""

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinorank_jax.losses import plackett_luce as pl
from dinorank_jax.losses.ranking import gate_penalty, pl_nll
from dinorank_jax.models.rank_head import HighOrderPL
from tests import pl_reference as ref_np


def _inputs(rows, m, d=8, seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 3)
  pred = 3.0 * jax.random.normal(k[0], (rows, m), dtype)
  ref = jax.random.normal(k[1], (rows, m), dtype)
  items = jax.random.normal(k[2], (m, d), dtype)
  return pred, ref, items


def _head(order, pred, ref, items, gate_logit=0.0, dtype=jnp.float32, **fields):
  """A head and its params with every gate logit set to `gate_logit`."""
  module = HighOrderPL(order=order, head_dim=8, dtype=dtype, param_dtype=dtype, **fields)
  params = module.init(jax.random.key(1), pred, ref, items)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, gate_logit) if "gate_" in jax.tree_util.keystr(path) else x,
      params)
  return module, params


@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 1024])
def test_suffix_logsumexp_equals_the_float64_sums(m):
  # Two levels of blocks (16 columns) must give every suffix, at any M, and a
  # finite gradient when the scores span hundreds (exp underflows there).
  # Jitted, as the losses run it: one program instead of a compile per operation.
  x = 80.0 * np.random.default_rng(m).normal(size=(3, m))
  expected = np.stack([[np.logaddexp.reduce(row[k:]) for k in range(m)] for row in x])
  suffix = jax.jit(pl.suffix_logsumexp)
  with jax.enable_x64(True):
    np.testing.assert_allclose(suffix(jnp.asarray(x)), expected, rtol=1e-13)
  got = suffix(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(x).max())
  grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.cos(pl.suffix_logsumexp(v)))))
  assert np.isfinite(np.asarray(grad(jnp.asarray(x, jnp.float32)))).all()


def test_order0_is_constant_with_zero_gradient():
  pred, ref, items = _inputs(5, 7)
  module = HighOrderPL(order=0)
  for list_len in (None, 3):
    loss = lambda p, r, e: module.apply({}, p, r, e, list_len=list_len).sum()
    k = 7 if list_len is None else 3
    expected = np.mean([math.log(7 - i) for i in range(k)])
    chex.assert_trees_all_close(module.apply({}, pred, ref, items, list_len=list_len),
                                jnp.full((5,), expected), rtol=1e-6)
    grads = jax.grad(loss, argnums=(0, 1, 2))(pred, ref, items)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, (pred, ref, items)))


@pytest.mark.parametrize("list_len", [None, 4])
def test_pl_nll_matches_per_position_loop(list_len):
  pred, ref, _ = _inputs(6, 9)
  expected = [ref_np.row_nll(p, ref_np.order_of(r), list_len=list_len)
              for p, r in zip(np.asarray(pred), np.asarray(ref))]
  chex.assert_trees_all_close(pl_nll(pred, ref, list_len=list_len),
                              jnp.asarray(expected, jnp.float32), rtol=1e-5)


def test_order1_equals_pl_nll():
  pred, ref, items = _inputs(6, 9)
  module = HighOrderPL(order=1)
  for list_len in (None, 5):
    chex.assert_trees_all_close(module.apply({}, pred, ref, items, list_len=list_len),
                                pl_nll(pred, ref, list_len=list_len), rtol=1e-6)


@pytest.mark.parametrize("order,list_len,high_order_len,chunk_size", [
    (2, None, None, 16), (3, None, None, 3), (3, 7, 4, 3), (3, None, 5, 2),
    (4, None, None, 4), (5, 8, None, 3)])
def test_high_order_matches_per_position_loop(order, list_len, high_order_len, chunk_size):
  with jax.enable_x64(True):
    pred, ref, items = _inputs(4, 9, dtype=jnp.float64)
    module, params = _head(order, pred, ref, items, gate_logit=0.3, dtype=jnp.float64,
                           chunk_size=chunk_size)
    got = module.apply(params, pred, ref, items, list_len=list_len,
                       high_order_len=high_order_len)
    p = ref_np.to_numpy(params["params"])
    expected = [ref_np.row_nll(pr, ref_np.order_of(rr), params=p, max_order=order,
                               items=np.asarray(items), list_len=list_len,
                               high_order_len=high_order_len)
                for pr, rr in zip(np.asarray(pred), np.asarray(ref))]
    chex.assert_trees_all_close(got, np.asarray(expected), rtol=1e-10)
    # Corrections really act: the same rows at order 1 differ.
    assert np.max(np.abs(np.asarray(got) - np.asarray(pl_nll(pred, ref, list_len=list_len)))) > 1e-3


def test_closed_gate_reduces_to_lower_order():
  pred, ref, items = _inputs(6, 10)
  m2, p2 = _head(2, pred, ref, items, gate_logit=-1e4)     # g_2 = sigmoid(−∞) = 0
  chex.assert_trees_all_close(m2.apply(p2, pred, ref, items), pl_nll(pred, ref), rtol=1e-5)

  m3, p3 = _head(3, pred, ref, items, gate_logit=0.5)
  p3["params"]["gate_3"] = jnp.float32(-1e4)
  # The order-2 model with order 3's own order-2 head and gate.
  p2 = {"params": {n: p3["params"][n] for n in ("gate_2", "query_2", "key_2")}}
  chex.assert_trees_all_close(m3.apply(p3, pred, ref, items),
                              m2.apply(p2, pred, ref, items), rtol=1e-5)


def test_active_order_switches_orders_off():
  pred, ref, items = _inputs(6, 10)
  m3, p3 = _head(3, pred, ref, items, gate_logit=1.0)
  m2 = HighOrderPL(order=2, head_dim=8)
  p2 = {"params": {n: p3["params"][n] for n in ("gate_2", "query_2", "key_2")}}
  step = jax.jit(lambda a: m3.apply(p3, pred, ref, items, active_order=a))
  chex.assert_trees_all_close(step(jnp.int32(1)), pl_nll(pred, ref), rtol=1e-6)
  chex.assert_trees_all_close(step(jnp.int32(2)), m2.apply(p2, pred, ref, items), rtol=1e-5)
  chex.assert_trees_all_close(step(jnp.int32(3)), m3.apply(p3, pred, ref, items), rtol=1e-6)
  # Parameters of inactive orders get exactly zero gradient.
  grads = jax.grad(lambda p: m3.apply(p, pred, ref, items, active_order=2).sum())(p3)
  for name in ("gate_3", "older_3", "recent_3", "key_3"):
    chex.assert_trees_all_equal(grads["params"][name],
                                jax.tree.map(jnp.zeros_like, p3["params"][name]))
  assert float(jnp.abs(grads["params"]["gate_2"])) > 0


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [4, 5])
def test_probabilities_of_all_orders_sum_to_one(order, m):
  """Σ over all M! reference orders of exp(−Σ_k ℓ_k) = 1: a valid distribution."""
  with jax.enable_x64(True):
    orders = np.asarray(list(itertools.permutations(range(m))))
    ref = np.empty(orders.shape)                  # row n ranks items as orders[n]
    np.put_along_axis(ref, orders, np.arange(m, 0, -1, dtype=np.float64)[None], axis=1)
    pred, _, items = _inputs(1, m, dtype=jnp.float64, seed=3)
    pred = jnp.broadcast_to(pred, ref.shape)
    ref = jnp.asarray(ref)
    np.testing.assert_array_equal(np.asarray(pl.reference_order(ref)), orders)
    module, params = _head(max(order, 1), pred, ref, items, gate_logit=0.0,
                           dtype=jnp.float64, chunk_size=2)   # g_r = 0.5
    log_prob = -m * module.apply(params, pred, ref, items)   # row loss is a mean over M
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_prob))), 1.0, rtol=1e-12)


def test_row_centring():
  rows, chunk, m = 3, 4, 7
  k = jax.random.split(jax.random.key(5), 3)
  pred = jax.random.normal(k[0], (rows, m))
  corr = 5.0 + jax.random.normal(k[1], (rows, chunk, m))
  rank = pl.inverse_order(pl.reference_order(jax.random.normal(k[2], (rows, m))))
  remaining = rank[:, None, :] >= jnp.arange(chunk)[None, :, None]
  shift = pl.centred_utilities(pred, corr, remaining) - pred[:, None, :]
  np.testing.assert_allclose(jnp.sum(jnp.where(remaining, shift, 0.0), -1), 0.0, atol=1e-5)

  # A constant added to every candidate's correction leaves the loss unchanged.
  pred, ref, items = _inputs(4, 9)
  perm = pl.reference_order(ref)
  keys = jax.random.normal(k[0], (9, 6))
  queries = lambda pos: jnp.sin(pos[None, :, None] + jnp.arange(24.).reshape(4, 1, 6))
  with_const = lambda pos: jnp.concatenate([queries(pos), jnp.ones((4, len(pos), 1))], -1)
  nll = functools.partial(pl.high_order_nll, pred, perm, num_positions=9, chunk_size=4)
  chex.assert_trees_all_close(nll(with_const, jnp.concatenate([keys, jnp.full((9, 1), 7.)], -1)),
                              nll(queries, keys), rtol=1e-5, atol=1e-6)


def test_ties_break_by_key():
  ref = jnp.zeros((3, 64))
  a1 = pl.reference_order(ref, jax.random.key(1))
  chex.assert_trees_all_equal(a1, pl.reference_order(ref, jax.random.key(1)))
  assert not np.array_equal(a1, pl.reference_order(ref, jax.random.key(2)))
  chex.assert_trees_all_equal(a1[0], a1[1])        # one column permutation per step
  chex.assert_trees_all_equal(pl.reference_order(ref)[0], jnp.arange(64))
  # Ties only: strict order in `ref` always wins over the tie-break.
  ref = jnp.asarray([[0., 2., 1., 2., 0.]])
  order = pl.reference_order(ref, jax.random.key(3))
  assert set(order[0, :2].tolist()) == {1, 3} and int(order[0, 2]) == 2

  pred = jax.random.normal(jax.random.key(0), (3, 64))
  ref = jnp.zeros((3, 64))
  assert not np.allclose(pl_nll(pred, ref, tie_key=jax.random.key(1)),
                         pl_nll(pred, ref, tie_key=jax.random.key(2)))


def test_gate_penalty():
  pred, ref, items = _inputs(2, 5)
  _, params = _head(3, pred, ref, items, gate_logit=0.0)
  params["params"]["gate_3"] = jnp.float32(1.0)
  g3 = 1 / (1 + math.exp(-1.0))
  np.testing.assert_allclose(gate_penalty(params["params"]), 1 * 0.25 + 2 * g3 ** 2, rtol=1e-6)
  np.testing.assert_allclose(gate_penalty(params["params"], active_order=2), 0.25, rtol=1e-6)
  assert float(gate_penalty({})) == 0.0


def test_default_gates_start_near_zero():
  pred, ref, items = _inputs(2, 6)
  params = HighOrderPL(order=5).init(jax.random.key(0), pred, ref, items)["params"]
  assert [float(params[f"gate_{r}"]) for r in range(2, 6)] == [-4.0, -5.0, -6.0, -7.0]


def test_bfloat16_score_products_stay_close_and_float32():
  pred, ref, items = _inputs(8, 32)
  m32, p32 = _head(3, pred, ref, items, gate_logit=0.0)
  m16 = HighOrderPL(order=3, head_dim=8, dtype=jnp.bfloat16)
  got = m16.apply(p32, pred, ref, items)
  assert got.dtype == jnp.float32
  chex.assert_trees_all_close(got, m32.apply(p32, pred, ref, items), rtol=2e-2)


def test_bad_lengths_name_the_fix():
  pred, ref, items = _inputs(2, 6)
  with pytest.raises(ValueError, match="list_len"):
    pl_nll(pred, ref, list_len=0)
  with pytest.raises(ValueError, match="high_order_len"):
    _head(2, pred, ref, items)[0].init(jax.random.key(0), pred, ref, items, high_order_len=-1)
  with pytest.raises(ValueError, match="rank order"):
    HighOrderPL(order=-1).init(jax.random.key(0), pred, ref, items)


def _rankclip_listmle(pred, ref, eps):
  """RankCLIP's published ListMLE (allRank's `listMLE`), re-derived in NumPy
  float64 from its description: sort by the reference, subtract the row
  maximum, reverse cumulative sum of exponentials, `log(· + eps)`; summed
  over positions, mean over rows. No −1 entries occur (no padding)."""
  pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
  losses = []
  for p, r in zip(pred, ref):
    s = p[np.argsort(-r, kind="stable")]
    s = s - s.max()
    tails = np.cumsum(np.exp(s)[::-1])[::-1]
    losses.append(np.sum(np.log(tails + eps) - s))
  return float(np.mean(losses))


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_pl_eps_reproduces_rankclip_listmle(scale):
  """`eps=1e-10` gives the authors' value and gradient (finite differences of
  the NumPy formula); at CLIP's logit scale it differs from the exact
  likelihood, which `eps=0` is."""
  with jax.enable_x64(True):
    rows, m = 4, 12
    k = jax.random.split(jax.random.key(3), 2)
    pred = scale * jax.random.uniform(k[0], (rows, m), jnp.float64, -1, 1)
    ref = jax.random.normal(k[1], (rows, m), jnp.float64)
    ours = lambda p, eps: jnp.mean(pl_nll(p, ref, eps=eps)) * m   # per-position mean → sum
    np.testing.assert_allclose(ours(pred, 1e-10), _rankclip_listmle(pred, ref, 1e-10),
                               rtol=1e-12)
    exact = _rankclip_listmle(pred, ref, 0.0)
    np.testing.assert_allclose(ours(pred, 0.0), exact, rtol=1e-12)
    if scale == 100.0:   # tails below e^-23 ≈ 1e-10 are swamped by eps
      assert abs(ours(pred, 1e-10) - exact) > 0.05 * exact
    grad = np.asarray(jax.grad(ours)(pred, 1e-10))
    h = 1e-6
    for i, j in [(0, 0), (1, 5), (3, 11)]:
      bump = np.zeros((rows, m))
      bump[i, j] = h
      numeric = (_rankclip_listmle(pred + bump, ref, 1e-10)
                 - _rankclip_listmle(pred - bump, ref, 1e-10)) / (2 * h)
      np.testing.assert_allclose(grad[i, j], numeric, rtol=1e-5, atol=1e-8)


def test_pl_eps_reaches_the_head_and_spares_corrected_positions():
  """`HighOrderPL(pl_eps=…)` changes order 1's value as `pl_nll` does."""
  pred, ref, items = _inputs(3, 9)
  pred = 30.0 * pred
  module, params = _head(1, pred, ref, items)
  np.testing.assert_allclose(module.apply(params, pred, ref, items, pl_eps=1e-10),
                             pl_nll(pred, ref, eps=1e-10), rtol=1e-6)
  assert not np.allclose(module.apply(params, pred, ref, items, pl_eps=1e-10),
                         module.apply(params, pred, ref, items))
