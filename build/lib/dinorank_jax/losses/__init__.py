"""Losses: pure functions of embeddings (and list heads), float32 or wider."""
