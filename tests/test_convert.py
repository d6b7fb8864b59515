"""Public CLIP weights in our towers: a random transformers `CLIPModel`, built
in torch on the CPU, converted, gives transformers' own embeddings."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from dinorank_jax import convert
from dinorank_jax.models import DinoRankCLIP

EOT = 49407


def _hf_clip(activation: str) -> CLIPModel:
  """ViT `tiny/8` at 16 px and text `tiny`, with every parameter perturbed
  (LayerNorms too, which start at exactly 1 and 0)."""
  tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, hidden_act=activation)
  config = CLIPConfig(text_config=dict(**tower, max_position_embeddings=77, vocab_size=49408,
                                       eos_token_id=EOT),
                      vision_config=dict(**tower, image_size=16, patch_size=8),
                      projection_dim=16)
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(rng):
  pixels = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)          # normalised images
  tokens = np.zeros((4, 77), np.int64)
  for row, length in enumerate((3, 9, 30, 76)):
    tokens[row, 0] = 49406
    tokens[row, 1:length] = rng.integers(1, 49406, length - 1)
    tokens[row, length] = EOT
  return pixels, tokens


@pytest.mark.parametrize("activation,arch", [("quick_gelu", "openai"), ("gelu", "open_clip")])
def test_converted_hf_clip_gives_its_image_and_text_embeddings(activation, arch):
  hf = _hf_clip(activation)
  pixels, tokens = _inputs(np.random.default_rng(0))
  with torch.no_grad():
    # The projected pooled features (transformers 5 returns them as `pooler_output`).
    image = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    text = hf.get_text_features(input_ids=torch.from_numpy(tokens))
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  fields, params = convert.from_hf(state, hf.config.to_dict())
  assert fields["arch"] == arch and fields["image_trunk"] == "tiny/8"
  model = DinoRankCLIP(**fields, dtype=jnp.float32)
  ours = model.apply({"params": params}, pixels, tokens.astype(np.int32))
  np.testing.assert_allclose(ours["image"], unit(image.numpy()), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours["text"], unit(text.numpy()), rtol=1e-4, atol=1e-5)
  assert float(ours["scale"]) == pytest.approx(float(np.exp(min(hf.logit_scale.item(),
                                                                np.log(100.0)))), rel=1e-6)


def test_a_checkpoint_the_converter_cannot_map_names_the_key():
  hf = _hf_clip("quick_gelu")
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  config = hf.config.to_dict()
  del state["vision_model.pre_layrnorm.bias"]
  with pytest.raises(convert.ConversionError, match=r"no 'vision_model.pre_layrnorm.bias' "
                     r"\(expected shape \(32,\)\)"):
    convert.from_hf(state, config)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  state["text_projection.weight"] = state["text_projection.weight"][:8]
  with pytest.raises(convert.ConversionError, match=r"'text_projection.weight' has shape "
                     r"\(8, 32\), expected \(16, 32\)"):
    convert.from_hf(state, config)
  config["vision_config"]["num_attention_heads"] = 4
  with pytest.raises(convert.ConversionError, match="no size of ours has width 32"):
    convert.from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, config)
