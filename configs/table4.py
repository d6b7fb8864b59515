"""Table 4, distillation-criterion and fusion-module ablations of the full
order-3 method on the first 1 M CC3M records, 32 epochs.

    python -m dinorank_jax.main --config configs/table4.py:VARIANT \
        --config.data.path=/data/cc3m --workdir runs/table4-VARIANT

VARIANT:
    criterion_{mse,cosine,rkd,crd,gram_rel}      Table 4a (gram_rel is the method)
    fusion_{concat,additive,single_scale,spp_no_cbam,spp_no_refiner,full}
                                                  Table 4c (full is the method)

Table 4b (ResNet-50 and MobileNetV3 students) is not reproducible here: only
ViT students are implemented; the ViT-Tiny row is `fusion_full`.
"""

from dinorank_jax.config import ablation

CRITERIA = ("mse", "cosine", "rkd", "crd", "gram_rel")
FUSIONS = ("concat", "additive", "single_scale", "spp_no_cbam", "spp_no_refiner", "full")
VARIANTS = [f"criterion_{c}" for c in CRITERIA] + [f"fusion_{f}" for f in FUSIONS]


def get_config(arg=None):
  if arg not in VARIANTS:
    raise ValueError(f"configs/table4.py needs a variant, one of {VARIANTS}: "
                     "--config configs/table4.py:fusion_full")
  kind, _, value = arg.partition("_")
  if kind == "fusion":
    return ablation(fusion_mode=value)
  c = ablation()
  c.objective.criterion = value
  return c
