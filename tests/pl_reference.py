"""Direct float64 NumPy transcriptions of method §2, one position at a time.

Written as loops over positions with explicit remaining sets, so they share
no code or structure with the chunked JAX implementation they check.
"""

import math

import numpy as np


def order_of(ref_row):
  return np.argsort(-np.asarray(ref_row, np.float64), kind="stable")


def _logsumexp(x):
  top = np.max(x)
  return top + np.log(np.sum(np.exp(x - top)))


def _gelu(x):  # tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _full_history_layer(p, x, heads):
  """The whole pre-LN layer over all L tokens, then the last token."""
  length, d = x.shape
  y = _layer_norm(x, p["ln1_scale"], p["ln1_bias"])
  q, k, v = (y @ p[n] for n in ("query", "key", "value"))
  q, k, v = (t.reshape(length, heads, d // heads) for t in (q, k, v))
  logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d // heads)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  x = x + np.einsum("hqk,khd->qhd", att, v).reshape(length, d) @ p["out"]
  y = _layer_norm(x, p["ln2_scale"], p["ln2_bias"])
  x = x + _gelu(y @ p["mlp_in"] + p["mlp_in_bias"]) @ p["mlp_out"] + p["mlp_out_bias"]
  return x[-1]


def correction(params, r, history, items, candidates, heads=4):
  """`c_r(j | history)` for each candidate j (history oldest first)."""
  key = lambda name: items[candidates] @ params[name]["kernel"]
  if r == 2:
    h = items[history[-1]] @ params["query_2"]["kernel"]
  elif r == 3:
    a = items[history[0]] @ params["older_3"]["kernel"]
    b = items[history[1]] @ params["recent_3"]["kernel"]
    h = a + b + a * b
  else:
    tokens = items[history] @ params[f"history_{r}"]["kernel"] + params[f"position_{r}"]
    h = _full_history_layer(params[f"layer_{r}"], tokens, heads)
  return key(f"key_{r}") @ h / math.sqrt(h.shape[0])


def row_nll(pred_row, order, *, params=None, max_order=1, items=None,
            list_len=None, high_order_len=None, active_order=None, heads=4):
  """`(1/K) Σ_k ℓ_k` for one row in reference order `order`."""
  pred_row = np.asarray(pred_row, np.float64)
  m = len(order)
  k_max = m if list_len is None else min(list_len, m)
  h_max = k_max if high_order_len is None else min(high_order_len, k_max)
  active = max_order if active_order is None else active_order
  total = 0.0
  for k in range(k_max):
    remaining = order[k:]
    u = pred_row[remaining].copy()
    for r in range(2, min(max_order, active) + 1):
      if k >= r - 1 and k < h_max:
        gate = 1 / (1 + math.exp(-float(params[f"gate_{r}"])))
        c = correction(params, r, order[k - r + 1:k], items, remaining, heads)
        u += gate * (c - c.mean())
    total += _logsumexp(u) - u[0]
  return total / k_max


def to_numpy(tree):
  if isinstance(tree, dict):
    return {k: to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)
