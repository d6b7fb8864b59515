"""The networks of method §4, §5, §7 as flax.linen modules, and the rank heads."""

from dinorank_jax.models.dinorankclip import (ARCHS, CONFIG_FIELDS, DinoRankCLIP, from_config,
                                              list_heads)
from dinorank_jax.models.fusion import FUSION_MODES, Fusion
from dinorank_jax.models.text import TextStudent, TextTransformer
from dinorank_jax.models.vit import ViT

__all__ = ["ARCHS", "CONFIG_FIELDS", "DinoRankCLIP", "FUSION_MODES", "Fusion", "TextStudent",
           "TextTransformer", "ViT", "from_config", "list_heads"]
