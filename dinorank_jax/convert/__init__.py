"""CLIP checkpoints in and out: OpenAI's, open_clip's and transformers' weights
as our trunks, and our trunks as theirs (docs/interop.md).

    python -m dinorank_jax.convert import --from openai|open_clip|hf \\
        --checkpoint PATH --out DIR

writes an export (`dinorank_jax.export` format: `dinorank_jax.load(DIR)`,
`python -m dinorank_jax.evaluate --model DIR`, `config.init_from=DIR`);
`python -m dinorank_jax.export --format open_clip|hf` goes the other way.
`layout` holds the key-by-key mapping, `clip` whole models, `files` reading
and writing checkpoint files.
"""

import os

from dinorank_jax.convert.clip import (from_hf, from_open_clip, hf_preprocessor, open_clip_arch,
                                       open_clip_preprocess, students_left_behind, to_hf,
                                       to_open_clip)
from dinorank_jax.convert.files import (read_hf_config, read_open_clip_config, read_state_dict,
                                        write_hf, write_open_clip)
from dinorank_jax.convert.layout import FORMATS, ConversionError

_HF_KEY = "vision_model.embeddings.patch_embedding.weight"


def layout_of(state) -> str:
  """`"hf"` for transformers' names, else `"open_clip"` (open_clip's and OpenAI's)."""
  return "hf" if _HF_KEY in state else "open_clip"


def read(path: str, arch: str | None = None, *,
         layout: str | None = None) -> tuple[dict, dict]:
  """`(model_config, params)` of the CLIP checkpoint at `path`. A transformers
  checkpoint's `config.json` gives its arch; an open_clip/OpenAI state dict
  does not say its activation, so `arch` does (`openai`: quick GELU,
  `open_clip`: exact GELU), unless an `open_clip_config.json` lies beside it
  (open_clip's `local-dir:` layout, and our `export --format open_clip`): its
  model config then names the arch. `layout`: the names the caller expects."""
  state = read_state_dict(path)
  found = layout_of(state)
  exported = read_open_clip_config(path)
  if layout is not None and found != layout:
    names = {"hf": "transformers' names", "open_clip": "open_clip/OpenAI names"}
    raise ConversionError(f"{path} has {names[found]}, not {names[layout]}: check --from")
  source = {"checkpoint": os.path.abspath(path)}
  if found == "hf":
    return from_hf(state, read_hf_config(path), source)
  if exported is not None:     # written beside the weights: it names the arch
    arch = open_clip_arch(exported["model_cfg"])
  if arch is None:
    raise ConversionError(f"{path} is an open_clip/OpenAI state dict, which does not say its "
                          "activation: give the arch, openai (quick GELU) or open_clip (exact)")
  model_config, params = from_open_clip(state, arch, source)
  eos = (exported or {}).get("model_cfg", {}).get("text_cfg", {}).get("eos_id")
  if eos is not None:
    model_config["model"]["eot_id"] = int(eos)
  return model_config, params


__all__ = ["FORMATS", "ConversionError", "from_hf", "from_open_clip", "hf_preprocessor", "layout_of",
           "open_clip_arch", "open_clip_preprocess", "read", "read_hf_config",
           "read_open_clip_config", "read_state_dict",
           "students_left_behind", "to_hf", "to_open_clip", "write_hf",
           "write_open_clip"]
