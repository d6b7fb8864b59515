"""Baseline CyCLIP (Goel et al., NeurIPS 2022): InfoNCE plus the in-modal and
cross-modal cyclic-consistency regularisers, weights 0.25 each (the paper's
defaults; `dinorank_jax/losses/cyclip.py` gives the exact definition and
where it was read), no students, no fusion, 64 epochs on CC3M.

    python -m dinorank_jax.main --config configs/cyclip.py:/data/cc3m --workdir runs/cyclip
    python -m dinorank_jax.main --config configs/cyclip.py:demo --workdir runs/cyclip-demo

`:demo` trains it at the demo's size on the demo's synthetic corpus.
"""

import runpy
import os

from dinorank_jax.config import baseline


def get_config(arg=None):
  if arg == "demo":
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "demo.py"))["get_config"]()
    c.model.update(students="none", rank_order=0)
  else:
    c = baseline(order=0)
    c.data.path = arg or ""
  c.objective.update(cyclic_in=0.25, cyclic_cross=0.25)
  return c
