"""Data scaling: the full method on the first 1 M or 2 M CC3M records, 32 epochs.

    python -m dinorank_jax.main --config configs/subset.py:1m \
        --config.data.path=/data/cc3m --workdir runs/subset-1m
    python -m dinorank_jax.main --config configs/subset.py:2m \
        --config.data.path=/data/cc3m --workdir runs/subset-2m
"""

from dinorank_jax.config import ablation

SIZES = {"1m": 1_000_000, "2m": 2_000_000}


def get_config(arg=None):
  if arg not in SIZES:
    raise ValueError(f"configs/subset.py needs a size, one of {sorted(SIZES)}: "
                     "--config configs/subset.py:1m")
  c = ablation()
  c.data.num_records = SIZES[arg]
  return c
