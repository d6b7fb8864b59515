"""A tiny export without training, for the tests of what reads exports."""

import jax
import numpy as np

from dinorank_jax import export
from dinorank_jax.data.tokenizer import CLIP_BPE_ID
from dinorank_jax.models import from_config


STUDENTS = {"students": "both", "image_student": "tiny/8", "text_student": "tiny",
            "arch": "dinorank"}     # `write(..., **STUDENTS)`: with both students


def write(directory: str, image_size: int = 32, formats: tuple[str, ...] = (), **fields) -> dict:
  """A randomly initialised export (open_clip arch, `tiny/8` and `tiny`
  trunks, no students, or the `config.model` `fields` given) at `directory`,
  with the CLIP checkpoints of `formats`; returns its `model_config.json`."""
  model_config = {"model": {"embed_dim": 16, "image_trunk": "tiny/8", "text_trunk": "tiny",
                            "students": "none", "rank_order": 0, "arch": "open_clip",
                            "scan": True, "dtype": "float32", "vocab_size": 49408,
                            "eot_id": 49407, **fields},
                  "image_size": image_size, "tokenizer": CLIP_BPE_ID, "context_length": 77,
                  "source": {"test": "random", "rank_order": fields.get("rank_order", 0)}}
  m = model_config["model"]
  model = from_config(m, vocab_size=m["vocab_size"], eot_id=m["eot_id"])
  params = model.init(jax.random.key(0), np.zeros((1, image_size, image_size, 3), np.float32),
                      np.zeros((1, 77), np.int32))["params"]
  return export.write(directory, model_config, params, formats=formats)
