"""DinoRankCLIP in JAX/Flax.

The method is stated in docs/method.md (cited as "method §N"); the modules
follow its sections: `losses.contrastive` (§1), `losses.ranking` (§2-3).
"""

from dinorank_jax import cuda_plugin

cuda_plugin.quiet_without_driver()    # before any entry point imports JAX


def load(directory: str, *, batch_size: int = 256, dtype: str = "float32"):
  """An exported model (`python -m dinorank_jax.export`): `preprocess`,
  `tokenize`, `encode_image`, `encode_text` (`export.ExportedModel`).
  Imported here on first use, so `import dinorank_jax` stays free of JAX."""
  from dinorank_jax import export
  return export.load(directory, batch_size=batch_size, dtype=dtype)
