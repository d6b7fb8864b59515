"""DinoRankCLIP in JAX/Flax.

The method is stated in docs/method.md (cited as "method §N"); the modules
follow its sections: `losses.contrastive` (§1), `losses.ranking` (§2-3).
"""


def load(directory: str, *, batch_size: int = 256):
  """An exported model (`python -m dinorank_jax.export`): `encode_image`,
  `encode_text`. Imported here on first use, so `import dinorank_jax` stays
  free of JAX."""
  from dinorank_jax import export
  return export.load(directory, batch_size=batch_size)
