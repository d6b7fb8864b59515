"""A run's trunks from a CLIP checkpoint (`config.init_from`), and the trained
run handed back to open_clip and transformers (`export --format`)."""

import logging
import os

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPModel

from dinorank_jax import convert, export, train
from dinorank_jax.convert.__main__ import main as convert_main
from dinorank_jax.errors import UserError
from tests import tiny_corpus
from tests.open_clip_cpu import import_open_clip
from tests.test_convert import _hf_embeddings, _inputs, _open_clip_embeddings, _perturbed
from tests.tiny_config import get_config as tiny_config

open_clip = import_open_clip()
# OpenAI-style CLIP of the demo's trunk sizes (tiny/8 at 32 px, tiny text, D = 64).
DEMO_SIZED = {"embed_dim": 64,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                             "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                           "layers": 2}}


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
  """`(open_clip model, its .pt state dict, the export convert import wrote)`."""
  root = tmp_path_factory.mktemp("clip")
  theirs = _perturbed(open_clip.model.CLIP(**DEMO_SIZED, quick_gelu=True))
  torch.save(theirs.state_dict(), root / "clip.pt")
  convert_main(["import", "--from", "openai", "--checkpoint", str(root / "clip.pt"),
                "--out", str(root / "imported")])
  return theirs, str(root / "clip.pt"), str(root / "imported")


@pytest.mark.slow
def test_a_run_starts_from_clip_trunks_and_hands_them_back(clip_checkpoint, tmp_path, caplog):
  """Import, train (students and order-3 heads fresh), export to open_clip and
  transformers: at a learning rate of 1e-12 the trunks are still the
  checkpoint's, so both libraries embed as the checkpoint did.
  Slow: a CLIP checkpoint is converted, trained from and exported back."""
  theirs, _, imported = clip_checkpoint
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  config = tiny_config(root)
  config.update(epochs=1, init_from=imported)                        # 2 steps
  config.data.eval_path = ""
  config.model.arch = "openai"
  config.optim.lr = 1e-12
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  train.train_and_evaluate(config, workdir)

  params, step = export.trained_params(workdir)
  _, start = export.read(imported)
  assert step == 2 and config.model.students == "both" and "image_student_net" in params
  for name in ("image_tower", "text_tower", "logit_scale"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params[name],
                 start[name])

  with caplog.at_level(logging.WARNING):
    export.main(["--workdir", workdir, "--out", out, "--format", "open_clip", "--format", "hf"])
  assert "students and fusion are not part of a CLIP checkpoint" in caplog.text
  pixels, tokens = _inputs(side=32)
  expected = _open_clip_embeddings(theirs, pixels, tokens)
  for embeddings in (
      _open_clip_embeddings(open_clip.create_model(f"local-dir:{out}/open_clip").eval(), pixels,
                            tokens),
      _hf_embeddings(CLIPModel.from_pretrained(os.path.join(out, "hf")).eval(), pixels, tokens)):
    for ours, reference in zip(embeddings, expected):
      np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_init_from_that_does_not_fit_the_run_names_the_flag(clip_checkpoint, tmp_path):
  _, pt, imported = clip_checkpoint
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  config = tiny_config(root)
  config.data.eval_path = ""
  cases = [
      ({"init_from": imported}, "holds arch 'openai', the run's is 'dinorank': set "
                                "--config.model.arch=openai"),
      ({"init_from": pt}, "is a CLIP checkpoint, whose trunks are not config.model.arch="
                          "'dinorank': set --config.model.arch=openai"),
      ({"init_from": imported, "model.arch": "openai", "model.image_trunk": "tiny/16"},
       "holds image_trunk 'tiny/8', the run's is 'tiny/16': set --config.model.image_trunk=tiny/8"),
      ({"init_from": pt, "model.arch": "openai", "data.image_size": 64},
       "was trained on 32 px images: set --config.data.image_size=32"),
      ({"init_from": str(tmp_path / "nowhere")}, "does not exist"),
  ]
  for overrides, message in cases:
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
      group, _, field = key.rpartition(".")
      (c[group] if group else c)[field] = value
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
      train.train_and_evaluate(c, str(tmp_path / "run"))


def test_a_transformers_checkpoint_reads_as_its_own_arch(clip_checkpoint, tmp_path):
  """`config.init_from` may name the checkpoint itself: a transformers
  directory says its arch in config.json."""
  theirs, _, imported = clip_checkpoint
  model_config, params = export.read(imported)
  convert.write_hf(str(tmp_path / "hf"), *convert.to_hf(model_config, params))
  again, trunks = convert.read(str(tmp_path / "hf"))
  assert again["model"]["arch"] == "openai"
  jax.tree.map(np.testing.assert_array_equal, trunks,
               {k: params[k] for k in ("image_tower", "text_tower", "logit_scale")})
