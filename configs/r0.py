"""Order sweep (Figure 2a): DinoRankCLIP at rank order 0, 32 epochs on CC3M.

    python -m dinorank_jax.main --config configs/r0.py:/data/cc3m --workdir runs/r0

The order-3 point is `configs/r3.py` with `--config.epochs=32`.
"""

from dinorank_jax.config import paper


def get_config(arg=None):
  c = paper(order=0, epochs=32)
  c.data.path = arg or ""
  return c
