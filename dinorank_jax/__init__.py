"""DinoRankCLIP in JAX/Flax.

The method is specified in SPEC.md (shared with the project); the modules
follow its sections: `losses.contrastive` (§1), `losses.ranking` (§2-3).
"""
