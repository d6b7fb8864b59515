"""The networks of SPEC §4, §5, §7 as flax.linen modules."""

from dinorank_jax.models.dinorankclip import DinoRankCLIP, list_heads
from dinorank_jax.models.fusion import FUSION_MODES, Fusion
from dinorank_jax.models.text import TextStudent, TextTransformer
from dinorank_jax.models.vit import ViT

__all__ = ["DinoRankCLIP", "FUSION_MODES", "Fusion", "TextStudent", "TextTransformer", "ViT",
           "list_heads"]
