"""Table 3b, component ablation: six cells on the first 1 M CC3M records, 32 epochs.

    python -m dinorank_jax.main --config configs/table3b.py:CELL \
        --config.data.path=/data/cc3m --workdir runs/table3b-CELL

CELL (HO / Dist / Fus of the table):
    clip             –  / –  / –
    rankclip         R1 / –  / –
    high_order       R3 / –  / –
    image_distill    R3 / I  / SPP        (ungated: fusion "additive", f = z + r)
    image_text       R3 / IT / SPP
    full             R3 / IT / SPP+gate   (the method)

Every cell keeps the cosine rank-weight schedule, so cells differ only in
their components (`configs/rankclip.py` is the baseline with RankCLIP's ramp).
"""

from dinorank_jax.config import ablation

CELLS = {
    "clip": dict(order=0, students="none"),
    "rankclip": dict(order=1, students="none"),
    "high_order": dict(order=3, students="none"),
    "image_distill": dict(order=3, students="image", fusion_mode="additive"),
    "image_text": dict(order=3, students="both", fusion_mode="additive"),
    "full": dict(order=3, students="both", fusion_mode="full"),
}


def get_config(arg=None):
  if arg not in CELLS:
    raise ValueError(f"configs/table3b.py needs a cell, one of {sorted(CELLS)}: "
                     "--config configs/table3b.py:full")
  return ablation(**CELLS[arg])
