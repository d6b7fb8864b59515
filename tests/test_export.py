"""The inference export: what it keeps, and that its embeddings equal the
trained model's for the same inputs."""

import errno
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
from tests import tiny_corpus, tiny_export
from tests.tiny_config import get_config as tiny_config

CAPTIONS = ["a large red circle", "two shapes: a small blue square and a cross", "x",
            "a picture of a large dotted green triangle on a pink background"] * 3


@pytest.mark.slow
def test_export_round_trip_equals_the_trained_model(tmp_path, caplog):
  """Slow: a tiny run is trained (a compiled step) so that its export can be compared with it."""
  root = tiny_corpus.corpora(str(tmp_path / "data"), num_train=64, num_eval=32)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  config = tiny_config(root)
  config.epochs, config.data.eval_path = 2, ""          # 4 steps
  config.objective.criterion = "mse"                     # students get teacher projections
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
    export.main(["--workdir", workdir, "--out", out])
  # Orbax's note that the step's optional metadata is not inside `N/state`
  # reads like damage, and its note that our CPU array handler replaces its
  # own like a mistake: both are dropped (real damage still fails the export).
  assert "Metadata file does not exist" not in caplog.text
  assert "Type handler registry" not in caplog.text

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


# ------------------------------------------- atomic, exclusive, fully verified


def _image_embedding(directory) -> np.ndarray:
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  return dinorank_jax.load(str(directory), batch_size=2).encode_image(images)


def test_an_export_is_replaced_only_with_overwrite_and_then_whole(tmp_path):
  from dinorank_jax.convert.__main__ import main as convert_main
  out = tmp_path / "export"
  tiny_export.write(str(out), formats=("open_clip",))
  before = _image_embedding(out)
  model_config, params = export.read(str(out))
  with pytest.raises(errors.UserError, match=f"--out {out} holds an export already: pass "
                     "--overwrite to replace it"):
    export.write(str(out), model_config, params)
  # From the command line, refused before the checkpoint is read; the export is untouched.
  argv = ["import", "--from", "open_clip", "--checkpoint", str(out / "open_clip"),
          "--out", str(out)]
  with pytest.raises(SystemExit, match="holds an export already"):
    convert_main(argv)
  np.testing.assert_array_equal(_image_embedding(out), before)
  convert_main(argv + ["--overwrite"])
  assert sorted(os.listdir(out)) == ["manifest.json", "model_config.json", "params"]
  assert json.load(open(out / "model_config.json"))["source"]["from"] == "open_clip"
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no staging left
  # A directory of other files is never replaced, --overwrite or not.
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("keep me")
  with pytest.raises(errors.UserError, match="holds files that are not an export"):
    export.write(str(tmp_path / "notes"), model_config, params, overwrite=True)
  assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("failure", ["os", "orbax"])
def test_a_failed_export_leaves_the_previous_one_as_it_was(failure, tmp_path, monkeypatch):
  out = tmp_path / "export"
  tiny_export.write(str(out), formats=("open_clip",))
  before, files = _image_embedding(out), export.manifest(str(out))
  model_config, params = export.read(str(out))
  if failure == "os":                          # the disk fills up while the manifest is written
    def full(directory):
      raise OSError(errno.ENOSPC, "No space left on device", directory)
    monkeypatch.setattr(export, "manifest", full)
  else:                                        # tensorstore's error, through orbax
    def full(self, *args, **kwargs):
      raise ValueError("RESOURCE_EXHAUSTED: Error writing file: No space left on device")
    monkeypatch.setattr(export.ocp.StandardCheckpointer, "save", full)
  with pytest.raises(OSError) as raised:
    export.write(str(out), {**model_config, "source": {"test": "new"}}, params, overwrite=True)
  assert errors.one_line(raised.value).startswith("No space left on device")
  monkeypatch.undo()
  assert export.manifest(str(out)) == files
  np.testing.assert_array_equal(_image_embedding(out), before)
  assert sorted(os.listdir(tmp_path)) == ["export"]                  # no staging left


def test_the_manifest_covers_the_config_and_must_be_there(tmp_path):
  out = tmp_path / "export"
  tiny_export.write(str(out), formats=("open_clip",))
  assert {"model_config.json", "open_clip/open_clip_config.json"} <= set(export.manifest(str(out)))
  config = (out / "model_config.json").read_text()
  (out / "model_config.json").write_text(config.replace('"eot_id": 49407', '"eot_id": 49406'))
  with pytest.raises(export.DamagedExport, match="model_config.json differs from the manifest"):
    dinorank_jax.load(str(out))
  (out / "model_config.json").write_text(config)
  (out / "open_clip" / "extra.json").write_text("{}")
  with pytest.raises(export.DamagedExport, match="extra.json is not in the manifest"):
    dinorank_jax.load(str(out))
  (out / "open_clip" / "extra.json").unlink()
  manifest = (out / export.MANIFEST).read_text()
  (out / export.MANIFEST).unlink()
  with pytest.raises(export.DamagedExport, match="manifest.json is missing, so the export's "
                     "files cannot be checked"):
    dinorank_jax.load(str(out))
  # Format 2 (a manifest of params/ only, or none at all) still loads.
  legacy = {k: v for k, v in json.loads(manifest).items() if k.startswith("params")}
  (out / "model_config.json").write_text(config.replace('"format_version": 3',
                                                        '"format_version": 2'))
  records.write_json(str(out / export.MANIFEST), legacy)
  embedding = _image_embedding(out)
  (out / export.MANIFEST).unlink()
  np.testing.assert_array_equal(_image_embedding(out), embedding)


def test_non_finite_parameters_are_refused_before_anything_is_written(tmp_path):
  tiny_export.write(str(tmp_path / "fine"))
  model_config, params = export.read(str(tmp_path / "fine"))
  params["logit_scale"] = np.float32(np.inf)
  with pytest.raises(errors.UserError, match="parameter logit_scale holds NaN or Inf values"):
    export.write(str(tmp_path / "diverged"), model_config, params)
  assert sorted(os.listdir(tmp_path)) == ["fine"]
