"""CLIP checkpoints in and out, proven against the libraries' own model code
on the CPU: random open_clip `CLIP`s (open_clip's ViT-B-32 and a small
custom config; the same module names as OpenAI's `model.py`) and random
transformers `CLIPModel`s, converted in, embed as they do; our random models,
converted out and loaded by `open_clip.create_model` and
`CLIPModel.from_pretrained`, embed as ours do; import then export gives back
the same state dict, bit for bit."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import CLIPConfig, CLIPModel

import dinorank_jax
from dinorank_jax import convert
from dinorank_jax.convert.__main__ import main as convert_main
from dinorank_jax.data.tokenizer import CLIP_BPE_ID
from dinorank_jax.models import from_config
from tests.open_clip_cpu import import_open_clip

open_clip = import_open_clip()
EOT = 49407
# open_clip's model config of our "tiny/8" image and "tiny" text trunks at 16 px.
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2}}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
  """Every parameter moved off its initial value (LayerNorms start at 1 and 0)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _open_clip(config: dict, quick_gelu: bool):
  return _perturbed(open_clip.model.CLIP(**config, quick_gelu=quick_gelu))


def _hf_clip(activation: str) -> CLIPModel:
  tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, hidden_act=activation)
  config = CLIPConfig(text_config=dict(**tower, max_position_embeddings=77, vocab_size=49408,
                                       eos_token_id=EOT),
                      vision_config=dict(**tower, image_size=16, patch_size=8),
                      projection_dim=16)
  torch.manual_seed(0)
  return _perturbed(CLIPModel(config))


def _inputs(side: int = 16, n: int = 4):
  """Normalised NHWC pixels and CLIP tokens (end of text at several places)."""
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(n, side, side, 3)).astype(np.float32)
  tokens = np.zeros((n, 77), np.int64)
  for row, length in enumerate((3, 9, 30, 76)[:n]):
    tokens[row, 0] = EOT - 1
    tokens[row, 1:length] = rng.integers(1, EOT - 1, length - 1)
    tokens[row, length] = EOT
  return pixels, tokens


def _nchw(pixels):
  return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def _ours(model_config: dict, params, pixels, tokens):
  m = model_config["model"]
  model = from_config(m, vocab_size=m["vocab_size"], eot_id=m["eot_id"])
  out = model.apply({"params": params}, jnp.asarray(pixels), jnp.asarray(tokens, jnp.int32))
  return np.asarray(out["image"]), np.asarray(out["text"]), float(out["scale"])


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _numpy_state(model: torch.nn.Module) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _unit(x):
  x = np.asarray(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _open_clip_embeddings(model, pixels, tokens):
  with torch.no_grad():
    return (model.encode_image(_nchw(pixels), normalize=True).numpy(),
            model.encode_text(torch.from_numpy(tokens), normalize=True).numpy())


def _hf_embeddings(model, pixels, tokens):
  with torch.no_grad():
    image = model.get_image_features(pixel_values=_nchw(pixels))
    text = model.get_text_features(input_ids=torch.from_numpy(tokens))
  # transformers 5 returns the projected features as `pooler_output`.
  return tuple(_unit(getattr(x, "pooler_output", x).numpy()) for x in (image, text))


# ---------------------------------------------------------------------------- in


@pytest.mark.parametrize("name,quick_gelu,arch", [
    ("tiny", True, "openai"), ("tiny", False, "open_clip"), ("ViT-B-32", False, "open_clip")])
def test_converted_open_clip_gives_its_image_and_text_embeddings(name, quick_gelu, arch):
  config = TINY if name == "tiny" else open_clip.get_model_config(name)
  theirs = _open_clip(config, quick_gelu)
  side = config["vision_cfg"]["image_size"]
  pixels, tokens = _inputs(side, n=4 if name == "tiny" else 2)
  model_config, params = convert.from_open_clip(_numpy_state(theirs), arch)
  m = model_config["model"]
  assert (m["arch"], model_config["image_size"]) == (arch, side)
  assert (m["image_trunk"], m["text_trunk"]) == (("tiny/8", "tiny") if name == "tiny"
                                                 else ("B/32", "B"))
  image, text, scale = _ours(model_config, params, pixels, tokens)
  expected_image, expected_text = _open_clip_embeddings(theirs, pixels, tokens)
  _close(image, expected_image)
  _close(text, expected_text)
  assert scale == pytest.approx(min(theirs.logit_scale.exp().item(), 100.0), rel=1e-6)


@pytest.mark.parametrize("activation,arch", [("quick_gelu", "openai"), ("gelu", "open_clip")])
def test_converted_hf_clip_gives_its_image_and_text_embeddings(activation, arch):
  theirs = _hf_clip(activation)
  pixels, tokens = _inputs()
  model_config, params = convert.from_hf(_numpy_state(theirs), theirs.config.to_dict())
  assert model_config["model"]["arch"] == arch
  image, text, scale = _ours(model_config, params, pixels, tokens)
  expected_image, expected_text = _hf_embeddings(theirs, pixels, tokens)
  _close(image, expected_image)
  _close(text, expected_text)
  assert scale == pytest.approx(min(theirs.logit_scale.exp().item(), 100.0), rel=1e-6)


@pytest.mark.parametrize("name,image,text", [("ViT-B-16", "B/16", "B"), ("ViT-L-14", "L/14", "L"),
                                             ("ViT-L-14-336", "L/14", "L")])
def test_larger_clips_have_the_names_and_shapes_our_rules_give(name, image, text):
  """B/16 and L/14, built on torch's meta device (shapes, no memory), in
  open_clip's and transformers' layouts."""
  config = open_clip.get_model_config(name)
  side, embed = config["vision_cfg"]["image_size"], config["embed_dim"]
  d = convert.clip.dims({"model": {"image_trunk": image, "text_trunk": text, "embed_dim": embed,
                                   "vocab_size": 49408},
                         "image_size": side, "context_length": 77})
  with torch.device("meta"):
    theirs = open_clip.model.CLIP(**config)
    image_tower, text_tower = d.image, d.text
    hf = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=image_tower.width, intermediate_size=4 * image_tower.width,
                           num_hidden_layers=image_tower.depth,
                           num_attention_heads=image_tower.heads, image_size=side,
                           patch_size=d.patch),
        text_config=dict(hidden_size=text_tower.width, intermediate_size=4 * text_tower.width,
                         num_hidden_layers=text_tower.depth, num_attention_heads=text_tower.heads),
        projection_dim=embed))
  for fmt, model in (("open_clip", theirs), ("hf", hf)):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {r.theirs: r.shape for r in convert.layout.rules(fmt, d)} == shapes, fmt


# --------------------------------------------------------------------------- out


def _our_clip(arch: str, seed: int = 0):
  """A random model of ours (every leaf perturbed) and its export config."""
  model_config = {"model": {"embed_dim": 16, "image_trunk": "tiny/8", "text_trunk": "tiny",
                            "students": "none", "rank_order": 0, "arch": arch, "scan": True,
                            "dtype": "float32", "vocab_size": 49408, "eot_id": EOT},
                  "image_size": 16, "tokenizer": CLIP_BPE_ID, "context_length": 77}
  m = model_config["model"]
  model = from_config(m, vocab_size=m["vocab_size"], eot_id=m["eot_id"])
  pixels, tokens = _inputs()
  params = model.init(jax.random.key(seed), pixels[:1], tokens[:1].astype(np.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return model_config, jax.tree.map(np.asarray, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("arch", ["openai", "open_clip", "dinorank"])
def test_our_model_loaded_by_open_clip_gives_our_embeddings(arch, tmp_path):
  model_config, params = _our_clip(arch)
  state, config = convert.to_open_clip(model_config, params)
  out = tmp_path / "open_clip"
  convert.write_open_clip(str(out), state, config, convert.open_clip_preprocess(model_config),
                          f"dinorank-test-{arch}")
  pixels, tokens = _inputs()
  image, text, _ = _ours(model_config, params, pixels, tokens)
  # Both of open_clip's ways in: a local directory, and a named config plus weights.
  open_clip.add_model_config(str(out / f"dinorank-test-{arch}.json"))
  for theirs in (open_clip.create_model(f"local-dir:{out}"),
                 open_clip.create_model(f"dinorank-test-{arch}",
                                        pretrained=str(out / "open_clip_model.safetensors"))):
    expected_image, expected_text = _open_clip_embeddings(theirs.eval(), pixels, tokens)
    _close(image, expected_image)
    _close(text, expected_text)


@pytest.mark.parametrize("arch", ["openai", "open_clip"])
def test_our_model_loaded_by_transformers_gives_our_embeddings(arch, tmp_path):
  model_config, params = _our_clip(arch)
  convert.write_hf(str(tmp_path), *convert.to_hf(model_config, params))
  theirs = CLIPModel.from_pretrained(str(tmp_path)).eval()
  pixels, tokens = _inputs()
  image, text, _ = _ours(model_config, params, pixels, tokens)
  expected_image, expected_text = _hf_embeddings(theirs, pixels, tokens)
  _close(image, expected_image)
  _close(text, expected_text)


def test_trunks_without_ln_pre_are_refused_by_the_transformers_export_in_one_line():
  model_config, params = _our_clip("dinorank")
  with pytest.raises(convert.ConversionError, match="export --format open_clip, or train with "
                     "--config.model.arch=open_clip"):
    convert.to_hf(model_config, params)


# ---------------------------------------------------------------- round trip


def test_import_then_export_gives_back_the_open_clip_state_dict_bit_for_bit():
  for quick_gelu, arch in ((True, "openai"), (False, "open_clip")):
    state = _numpy_state(_open_clip(TINY, quick_gelu))
    model_config, params = convert.from_open_clip(state, arch)
    again, config = convert.to_open_clip(model_config, params)
    assert again.keys() == state.keys()
    for key, value in state.items():
      assert again[key].shape == value.shape and again[key].dtype == value.dtype, key
      np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert config["quick_gelu"] is quick_gelu


def test_import_then_export_gives_back_the_transformers_state_dict_bit_for_bit():
  theirs = _hf_clip("gelu")
  state = _numpy_state(theirs)
  again, config = convert.to_hf(*convert.from_hf(state, theirs.config.to_dict()))
  assert again.keys() == state.keys()
  for key, value in state.items():
    assert again[key].shape == value.shape and again[key].dtype == value.dtype, key
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  assert config["vision_config"]["hidden_act"] == "gelu"


@pytest.mark.parametrize("arch", ["openai", "open_clip", "dinorank"])
def test_our_open_clip_and_hf_exports_import_back_with_the_same_embeddings(arch, tmp_path):
  """`export --format open_clip|hf`, then `convert import` of that directory:
  the arch comes from the exported config (ours has no `ln_pre` and a tanh
  GELU, which a bare state dict cannot say), the embeddings are the export's."""
  model_config, params = _our_clip(arch)
  model_config["source"] = {"test": arch}
  from dinorank_jax import export
  formats = ["open_clip"] + (["hf"] if arch != "dinorank" else [])
  export.write(str(tmp_path / "ours"), model_config, params, formats=formats)
  texts = ["a photo of a dog", "two cats on a red sofa", "x"]
  original = dinorank_jax.load(str(tmp_path / "ours"))
  images = (np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3))).astype(np.uint8)
  for fmt in formats:                         # as `export --format` writes them
    directory = tmp_path / "ours" / fmt
    # --from open_clip for every arch: the config beside the weights decides.
    convert_main(["import", "--from", "hf" if fmt == "hf" else "open_clip",
                  "--checkpoint", str(directory), "--out", str(tmp_path / f"back_{fmt}")])
    back = dinorank_jax.load(str(tmp_path / f"back_{fmt}"))
    assert back.config["model"]["arch"] == arch and back.config["image_size"] == 16
    _close(back.encode_image(images), original.encode_image(images))
    _close(back.encode_text(texts), original.encode_text(texts))


# -------------------------------------------------------------- files, command


def test_import_command_reads_pickles_torchscript_and_safetensors(tmp_path):
  """`python -m dinorank_jax.convert import` writes an export whose
  embeddings are the checkpoint's: an open_clip `.pt` saved under DDP
  (`module.` names in a `state_dict` entry), OpenAI's TorchScript archive and
  a transformers directory."""
  pixels, tokens = _inputs()
  openai = _open_clip(TINY, quick_gelu=True)
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                         _open_clip(TINY, False).state_dict().items()}},
             tmp_path / "epoch_3.pt")
  torch.jit.script(openai).save(str(tmp_path / "openai.pt"))
  hf = _hf_clip("quick_gelu")
  hf.save_pretrained(tmp_path / "hf")
  cases = [("open_clip", tmp_path / "epoch_3.pt", _open_clip(TINY, False)),
           ("openai", tmp_path / "openai.pt", openai), ("hf", tmp_path / "hf", hf)]
  for source, path, theirs in cases:
    out = tmp_path / f"export_{source}"
    convert_main(["import", "--from", source, "--checkpoint", str(path), "--out", str(out)])
    loaded = dinorank_jax.load(str(out))
    params, model_config = loaded.params, loaded.config
    assert model_config["source"]["from"] == source
    expected = (_hf_embeddings if source == "hf" else _open_clip_embeddings)(theirs, pixels,
                                                                             tokens)
    image, text, _ = _ours(model_config, params, pixels, tokens)
    _close(image, expected[0])
    _close(text, expected[1])
  # The safetensors of an export, read back without torch, are the same checkpoint.
  state, config = convert.to_open_clip(*convert.from_open_clip(_numpy_state(openai), "openai"))
  safetensors.numpy.save_file(state, str(tmp_path / "openai.safetensors"))
  assert convert.read_state_dict(str(tmp_path / "openai.safetensors")).keys() == state.keys()


def test_a_checkpoint_the_converter_cannot_map_is_named_in_one_line(tmp_path, monkeypatch):
  state = _numpy_state(_open_clip(TINY, False))
  missing = {k: v for k, v in state.items() if k != "visual.ln_pre.bias"}
  with pytest.raises(convert.ConversionError,
                     match=r"no 'visual.ln_pre.bias' \(expected shape \(32,\)\)"):
    convert.from_open_clip(missing, "open_clip")
  wrong = {**state, "visual.proj": state["visual.proj"][:, :8]}
  with pytest.raises(convert.ConversionError,
                     match=r"'visual.proj' has shape \(32, 8\), expected \(32, 16\)"):
    convert.from_open_clip(wrong, "open_clip")
  extra = {**state, "visual.transformer.resblocks.0.ls_1.gamma": np.ones(32, np.float32)}
  with pytest.raises(convert.ConversionError, match="'visual.transformer.resblocks.0.ls_1.gamma' "
                     r"\(32,\) has no place"):
    convert.from_open_clip(extra, "open_clip")
  deeper = dict(state)
  for k in [k for k in state if k.startswith("transformer.resblocks.1.")]:
    deeper[k.replace(".1.", ".2.")] = state[k]
  with pytest.raises(convert.ConversionError, match="the text tower: no size of ours is 32 wide "
                     "and 3 layers deep"):
    convert.from_open_clip(deeper, "open_clip")
  config = _hf_clip("quick_gelu").config.to_dict()
  config["vision_config"]["num_attention_heads"] = 4
  with pytest.raises(convert.ConversionError, match="vision_config: 4 heads, ours of width 32 "
                     "has 2"):
    convert.from_hf(_numpy_state(_hf_clip("quick_gelu")), config)
  # On the command line: one line (`errors.guard` exits with it, status 1).
  torch.save(_open_clip(TINY, False).state_dict(), tmp_path / "open_clip.pt")
  with pytest.raises(SystemExit) as exit_:
    convert_main(["import", "--from", "hf", "--checkpoint", str(tmp_path / "open_clip.pt"),
                  "--out", str(tmp_path / "out")])
  message = str(exit_.value.code)
  assert message.startswith("error: ") and len(message.splitlines()) == 1
  assert "has open_clip/OpenAI names, not transformers' names: check --from" in message
  # Without torch, a pickle is refused naming the extra (safetensors need none).
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(convert.ConversionError, match=r"needs torch \(pip install "
                     r"'dinorank_jax\[convert\]'\), or give its .safetensors"):
    convert.read_state_dict(str(tmp_path / "open_clip.pt"))
