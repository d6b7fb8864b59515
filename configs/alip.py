"""Baseline ALIP (Yang et al., ICCV 2023): the bi-path model that learns from
the raw caption and a synthetic caption of each image through one text
tower, with the Language and Description Consistency Gates and the adaptive
contrastive loss (`dinorank_jax/losses/alip.py` gives the exact definition
and where it was read); no students, no fusion, 64 epochs on CC3M. The
records need synthetic captions (docs/data.md, "Synthetic captions").

    python -m dinorank_jax.main --config configs/alip.py:/data/cc3m --workdir runs/alip
    python -m dinorank_jax.main --config configs/alip.py:demo --workdir runs/alip-demo

`:demo` trains it at the demo's size on the demo's synthetic corpus, whose
scenes each carry a second, differently templated caption.
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
  c.objective.alip = True
  return c
