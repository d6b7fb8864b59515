"""Baseline CLIP: InfoNCE only (order 0, no students, no fusion), 64 epochs on CC3M.

    python -m dinorank_jax.main --config configs/clip.py:/data/cc3m --workdir runs/clip

Reads the same records as the other runs (the teacher fields go unused).
"""

from dinorank_jax.config import baseline


def get_config(arg=None):
  c = baseline(order=0)
  c.data.path = arg or ""
  return c
