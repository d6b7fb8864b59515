"""The tiny model used by the model tests."""

import jax.numpy as jnp

from dinorank_jax.models import DinoRankCLIP

VOCAB, EOT, IMAGE = 100, 99, 32
TINY = dict(embed_dim=16, image_trunk="tiny/16", text_trunk="tiny", image_student="tiny/8",
            text_student="tiny", vocab_size=VOCAB, eot_id=EOT, rank_head_dim=8)


def tiny_model(**overrides) -> DinoRankCLIP:
  return DinoRankCLIP(**{**TINY, **overrides})


def tokens(lengths, context=77):
  """Token rows `[98, 5, 6, …, 99, 0, 0, …]` with `lengths` tokens before the end."""
  rows = []
  for n in lengths:
    body = [98] + [(7 * i + 5) % 90 + 1 for i in range(n)] + [EOT]
    rows.append(body + [0] * (context - len(body)))
  return jnp.asarray(rows, jnp.int32)
