"""Checkpoint files: reading PyTorch and safetensors state dicts, writing the
open_clip and transformers directories.

`.safetensors` files and OpenAI's TorchScript archives are read with NumPy
alone (`torchscript`: as data, none of the archive's code runs); `.pt`,
`.pth` and `.bin` torch pickles need torch, imported here only when such a
file is read (the `convert` extra), and are read with `weights_only=True`.
"""

import json
import os
import pickle
import re
import zipfile

import numpy as np
import safetensors.numpy

from dinorank_jax import errors

from dinorank_jax.convert import torchscript
from dinorank_jax.convert.layout import NOT_PARAMETERS, ConversionError

# The weight files a checkpoint directory may hold, preferred first.
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin", "pytorch_model.bin")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"


def weights_path(path: str) -> str:
  """`path`, or the weight file of the checkpoint directory `path`."""
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise ConversionError(f"no checkpoint at {path}")
    return path
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise ConversionError(f"{path} holds none of {', '.join(WEIGHT_FILES)}: pass the weight "
                        "file itself")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The float32 arrays of the state dict at `path` (a file or a checkpoint
  directory). Nothing in the file is run: TorchScript archives are read as
  data (`torchscript`), torch pickles with `weights_only=True`."""
  path = weights_path(path)
  if path.endswith(".safetensors"):
    try:
      state = safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
      raise ConversionError(f"{path} is damaged ({e}): download or copy it again") from None
  elif torchscript.is_archive(path):
    state = torchscript.read(path)                                     # OpenAI's archives
  else:
    state = _read_torch(path)
  strip = lambda k: k[len("module."):] if k.startswith("module.") else k   # saved under DDP
  state = {strip(k): np.asarray(v, np.float32) for k, v in state.items()}
  for key, value in state.items():
    if not NOT_PARAMETERS.match(key) and not np.isfinite(value).all():   # a mask holds -inf
      raise ConversionError(f"{path}: '{key}' holds NaN or Inf values: not a usable checkpoint")
  return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # the `convert` extra; only for PyTorch pickles
  except ImportError:
    raise ConversionError(f"{path} is a PyTorch checkpoint: reading it needs torch (pip install "
                          "'dinorank_jax[convert]'), or give its .safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    raise ConversionError(
        f"{path} holds {found.group(1) if found else 'objects other than tensors'}, which torch's "
        "weights-only loader refuses (nothing of it was run): where you trust the file, load it "
        "with torch and save its state_dict()") from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
    if errors.one_line(e):                               # no permission, …: said as it is
      raise
    raise ConversionError(f"{path} is damaged ({' '.join(str(e).split())}): download or copy "
                          "it again") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]                                        # open_clip's training saves
  if not isinstance(state, dict):
    raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.detach().float().numpy() for k, v in state.items() if torch.is_tensor(v)}


def read_hf_config(path: str) -> dict:
  """The `config.json` of the transformers checkpoint `path` (its directory, or beside the file)."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config = os.path.join(directory, HF_CONFIG)
  if not os.path.isfile(config):
    raise ConversionError(f"no {HF_CONFIG} beside {path}: a transformers checkpoint needs its "
                          "config for the towers' sizes and activation")
  with open(config) as f:
    return json.load(f)


def read_open_clip_config(path: str) -> dict | None:
  """The `open_clip_config.json` beside the checkpoint `path` (in its
  directory), or None."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config = os.path.join(directory, OPEN_CLIP_CONFIG)
  if not os.path.isfile(config):
    return None
  with open(config) as f:
    found = json.load(f)
  if not isinstance(found, dict) or not isinstance(found.get("model_cfg"), dict):
    raise ConversionError(f"{config} has no model_cfg: not open_clip's config file")
  return found


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def write_open_clip(directory: str, state: dict, config: dict, preprocess: dict,
                    name: str) -> None:
  """open_clip's two ways in: `create_model("local-dir:DIR")` reads
  `open_clip_config.json` and `open_clip_model.safetensors`;
  `add_model_config("DIR/NAME.json")` then `create_model(NAME, pretrained=...)`
  reads the model config under its own name."""
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(state, os.path.join(directory, OPEN_CLIP_WEIGHTS))
  _write_json(os.path.join(directory, OPEN_CLIP_CONFIG),
              {"model_cfg": config, "preprocess_cfg": preprocess})
  _write_json(os.path.join(directory, f"{name}.json"), config)


def write_hf(directory: str, state: dict, config: dict, preprocessor: dict | None = None) -> None:
  """A directory `transformers.CLIPModel.from_pretrained` loads (and, with
  `preprocessor`, `CLIPImageProcessor.from_pretrained`)."""
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(state, os.path.join(directory, HF_WEIGHTS),
                              metadata={"format": "pt"})
  _write_json(os.path.join(directory, HF_CONFIG), config)
  if preprocessor is not None:
    _write_json(os.path.join(directory, HF_PREPROCESSOR), preprocessor)
