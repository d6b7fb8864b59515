"""The inference export: what it keeps, and that its embeddings equal the
trained model's for the same inputs."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dinorank_jax
from dinorank_jax import errors, export, train
from dinorank_jax.data import records, transform
from dinorank_jax.data.tokenizer import TextTokenizer
from dinorank_jax.models import DinoRankCLIP
from dinorank_jax.models.vit import normalise_images
from tests import tiny_corpus
from tests.tiny_config import get_config as tiny_config

CAPTIONS = ["a large red circle", "two shapes: a small blue square and a cross", "x",
            "a picture of a large dotted green triangle on a pink background"] * 3


@pytest.mark.slow
def test_export_round_trip_equals_the_trained_model(tmp_path, caplog):
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  config = tiny_config(root)
  config.epochs, config.data.eval_path = 2, ""          # 4 steps
  config.objective.criterion = "mse"                     # students get teacher projections
  train.train_and_evaluate(config, workdir)
  with caplog.at_level(logging.WARNING):
    export.main(["--workdir", workdir, "--out", out])
  # Orbax's note that the step's optional metadata is not inside `N/state`
  # reads like damage; it is dropped (real damage still fails the export).
  assert "Metadata file does not exist" not in caplog.text

  model_config = json.load(open(os.path.join(out, export.CONFIG_FILE)))
  assert model_config["source"]["step"] == 4 and model_config["image_size"] == 32
  loaded = dinorank_jax.load(out, batch_size=8)          # 12 inputs: a padded last batch
  params, _ = export.trained_params(workdir)
  # Trunks, students, fusion and logit scale; no rank heads, no teacher projections.
  assert "image_projection" in params and "image_rank_head" in params
  assert set(loaded.params) == set(params) - {"image_projection", "text_projection",
                                              "image_rank_head", "text_rank_head"}

  trained = train.build_model(config, records.read_metadata(config.data.path))
  variables = {"params": params}
  images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  expected = trained.apply(variables, normalise_images(jnp.asarray(images)),
                           method=DinoRankCLIP.embed_images)["image"]
  np.testing.assert_allclose(loaded.encode_image(images), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loaded.encode_image(images / 255.0), expected, rtol=1e-5, atol=1e-6)
  tokens = jnp.asarray(TextTokenizer()(CAPTIONS, 77))
  expected = trained.apply(variables, tokens, method=DinoRankCLIP.embed_texts)["text"]
  text = loaded.encode_text(CAPTIONS)
  np.testing.assert_allclose(text, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
  assert loaded.logit_scale == pytest.approx(float(np.exp(params["logit_scale"])))
  # Another size goes through the export's transform, as `preprocess` gives it.
  larger = np.repeat(np.repeat(images, 2, 1), 2, 2)
  np.testing.assert_array_equal(loaded.preprocess(larger)[0],
                                transform.preprocess(Image.fromarray(larger[0]), 32))
  np.testing.assert_allclose(loaded.encode_image(larger),
                             loaded.encode_image(loaded.preprocess(larger)), atol=1e-6)
  # A bare string is one text, not one per character.
  np.testing.assert_allclose(loaded.encode_text(CAPTIONS[0]), text[:1], rtol=1e-5, atol=1e-6)
  assert loaded.tokenize(CAPTIONS[0]).shape == (1, 77) and loaded.dtype == "float32"
  # One flipped byte in the parameters: refused in one line, never embedded.
  name, entry = max(json.load(open(os.path.join(out, export.MANIFEST))).items(),
                    key=lambda item: item[1]["bytes"])
  with open(os.path.join(out, name), "r+b") as f:
    f.seek(entry["bytes"] // 2)
    byte = f.read(1)
    f.seek(entry["bytes"] // 2)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(export.DamagedExport, match=f"{name} differs from the manifest"):
    dinorank_jax.load(out)


def test_export_without_a_checkpoint_names_the_fix(tmp_path):
  (tmp_path / "run").mkdir()
  with pytest.raises(errors.UserError, match="no checkpoint"):
    export.trained_params(str(tmp_path / "run"))
