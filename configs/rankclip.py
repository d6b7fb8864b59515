"""Baseline RankCLIP: InfoNCE + first-order Plackett–Luce rank terms with
RankCLIP's linear rank-weight ramp, no students, no fusion, 64 epochs on CC3M.

    python -m dinorank_jax.main --config configs/rankclip.py:/data/cc3m --workdir runs/rankclip
"""

from dinorank_jax.config import baseline


def get_config(arg=None):
  c = baseline(order=1)
  c.data.path = arg or ""
  return c
