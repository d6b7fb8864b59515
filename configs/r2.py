"""Order sweep (Figure 2a): DinoRankCLIP at rank order 2, 32 epochs on CC3M.

    python -m dinorank_jax.main --config configs/r2.py:/data/cc3m --workdir runs/r2

The order-3 point is `configs/r3.py` with `--config.epochs=32`.
"""

from dinorank_jax.config import paper


def get_config(arg=None):
  c = paper(order=2, epochs=32)
  c.data.path = arg or ""
  return c
