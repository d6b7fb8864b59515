"""The paper's main recipe: order 3, both students, gated fusion, 64 epochs
on CC3M (ViT-B/32 + CLIP text trunk, global batch 4096; method §6, §7).

    python -m dinorank_jax.main --config configs/r3.py:/data/cc3m --workdir runs/r3
    python -m dinorank_jax.main --config configs/r3.py \
        --config.data.path=/data/cc3m --config.data.eval_path=/data/cc3m-val --workdir runs/r3

The records directory is made by `dinorank_jax.data.build` and then
`dinorank_jax.teacher.export` (docs/data.md). As the order-sweep point,
add `--config.epochs=32`.
"""

from dinorank_jax.config import paper


def get_config(arg=None):
  c = paper(order=3)
  c.data.path = arg or ""
  return c
