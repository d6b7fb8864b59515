"""The teacher export (`dinorank_jax.teacher`): its PCA, the text teacher's
batching, the checkpoint checks, the exported records and the teacher's
pixels (method §7)."""

import argparse
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from dinorank_jax.data import build, pipeline, records, verify
from dinorank_jax.teacher.pca import fit_pca, project
from tests import tiny_corpus
from tests.tiny_corpus import build_args


def test_pca_reconstructs_a_rank_256_signal_exactly():
  rng = np.random.default_rng(0)
  signal = rng.normal(size=(2048, 256)) @ rng.normal(size=(256, 1024)) + 3.0
  mean, components = fit_pca(signal, 256)
  assert components.shape == (256, 1024)
  np.testing.assert_allclose(components @ components.T, np.eye(256), atol=1e-9)
  rebuilt = project(signal, mean, components) @ components + mean
  np.testing.assert_allclose(rebuilt, signal, atol=1e-8)


def test_teacher_text_features_do_not_depend_on_the_batch_or_its_padding():
  """Captions encoded in length-sorted batches padded to their longest equal
  each caption encoded alone at the full length: the same states where the
  mask is set (to float32 rounding of the other matmul shapes), zeros after,
  the masked mean as the pooled vector, in the captions' order."""
  import torch
  from dinorank_jax.teacher import export
  model, tokenizer, _ = export.load_text_teacher(export.MINILM)
  captions = ["a red square", "a small blue circle on a striped green background, seen from far",
              "dots", "a yellow triangle beside a purple star", "", "a cat"]
  tokens, mask, pooled = export.text_features(model, tokenizer, captions, 16, 2, "cpu")
  assert tokens.shape == (6, 16, 384) and mask.shape == (6, 16) and pooled.shape == (6, 384)
  for i, caption in enumerate(captions):
    enc = tokenizer([caption], padding="max_length", truncation=True, max_length=16,
                    return_tensors="pt")
    with torch.no_grad():
      alone = model(**enc).last_hidden_state[0].numpy()
    valid = enc["attention_mask"][0].numpy().astype(bool)
    np.testing.assert_array_equal(mask[i], valid)
    # Six layers of float32 at states of order 1: 1e-5 is a few hundred ulps.
    np.testing.assert_allclose(tokens[i][valid], alone[valid], rtol=1e-4, atol=1e-5)
    assert not tokens[i][~valid].any()
    np.testing.assert_allclose(pooled[i], alone[valid].mean(0), rtol=1e-4, atol=1e-5)


def test_a_teacher_path_that_is_not_a_local_checkpoint_is_one_line_before_anything_is_written(
    tmp_path):
  from dinorank_jax.teacher import export
  (tmp_path / "empty").mkdir()

  def mistake(*flags):
    with pytest.raises(SystemExit) as exit_:
      export.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *flags])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert not (tmp_path / "out").exists()
    return message

  assert mistake("--image_teacher", str(tmp_path / "dinov3")) == (
      f"error: --image_teacher {tmp_path / 'dinov3'} is not a directory: pass a local "
      "transformers checkpoint directory, with config.json and its weights; docs/data.md has "
      "the recipe")
  assert "huggingface-cli download facebook/dinov3-vitl16 --local-dir DIR" in mistake(
      "--image_teacher", "facebook/dinov3-vitl16")
  assert f"--text_teacher {tmp_path / 'empty'} is a directory without config.json" in mistake(
      "--image_teacher", "tiny-untrained", "--text_teacher", str(tmp_path / "empty"))


def test_teacher_export_on_the_tiny_teacher(tmp_path):
  from dinorank_jax.teacher import export
  directory = tiny_corpus.synthetic(tmp_path, num=24)
  second = records.shard_paths(directory)[1]
  recs = [dict(records.decode_record(r)) for r in records.read_shard(second)]
  recs[4]["jpeg"] = b"not a jpeg"                               # record 20: exported, skipped
  records.write_shard(directory, 1, recs, {})
  out = str(tmp_path / "teacher")
  meta = export.export(argparse.Namespace(
      data=directory, out=out, image_teacher=export.TINY_TEACHER, text_teacher=export.MINILM,
      image_size=64, pca_dim=256, pca_images=16, text_length=16, batch_size=8, overwrite=False))
  assert meta["teacher"]["grid"] == [4, 4] and meta["teacher"]["pca_dim"] == 64
  rec = records.decode_record(records.read_shard(records.shard_paths(out)[0])[0])
  # The teacher's fields only: the images stay in --data, stored once.
  assert set(rec) == {"key", *records.TEACHER_FIELDS} and meta["images"] == "../syn"
  assert rec["teacher_patches"].shape == (4, 4, 64) and rec["teacher_patches"].dtype == np.float16
  assert rec["teacher_cls"].shape == (64,) and rec["teacher_text_tokens"].shape == (16, 384)
  assert rec["teacher_text_mask"].dtype == bool and rec["teacher_text_pooled"].shape == (384,)
  assert np.isfinite(rec["teacher_patches"].astype(np.float32)).all()

  # Readers join the two by index: every batch has the image and its features.
  batch = next(iter(pipeline.make_dataset(out, batch_size=8, image_size=16, seed=0,
                                          num_epochs=1, shuffle=False)))
  source = [records.decode_record(r) for r in records.read_shard(records.shard_paths(directory)[0])]
  np.testing.assert_array_equal(batch["tokens"], [r["tokens"] for r in source[:8]])
  np.testing.assert_array_equal(batch["teacher_cls"][0], rec["teacher_cls"])
  checked = verify.verify(out, log=lambda line: None)
  assert checked["ok"] == 23 and checked["skipped"]["invalid"] == 1
  assert "shard-00001.array_record #4 (key 'syn-0-0000020'): field 'teacher_patches' missing" in checked["bad"][0]

  # The pair moves together (the path is relative); a rebuilt image dataset is refused.
  moved = tmp_path.parent / f"{tmp_path.name}-moved"
  os.rename(tmp_path, moved)
  assert records.Shards(str(moved / "teacher")).images == str(moved / "syn")
  build.build(build_args(source="synthetic", out=str(moved / "syn"), num=24, shard_size=16,
                          workers=1, image_size=48, seed=1, overwrite=True))
  with pytest.raises(records.DataError, match=r"syn was rebuilt after the teacher features in "
                     r".*teacher were exported from it: rerun .*teacher.export with --overwrite"):
    records.Shards(str(moved / "teacher"))


def test_teacher_pixels_follow_its_processor_config(tmp_path):
  from dinorank_jax.teacher import export
  model, _ = export.load_image_teacher(export.TINY_TEACHER)
  model.save_pretrained(tmp_path / "teacher")
  (tmp_path / "teacher" / export.PROCESSOR_CONFIG).write_text(json.dumps(
      {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.5], "resample": 2,
       "size": {"height": 32, "width": 32}}))
  prep = export.Preprocessing.of(str(tmp_path / "teacher"))
  assert prep == export.Preprocessing((0.5, 0.4, 0.3), (0.2, 0.25, 0.5), 2, 32)
  assert export.Preprocessing.of(str(tmp_path / "teacher"), 48).size == 48
  assert export.Preprocessing.of(export.TINY_TEACHER) == export.Preprocessing()
  jpeg = tiny_corpus.jpeg(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
  resized = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((32, 32),
                                                                          Image.BILINEAR))
  expected = (resized / 255.0 - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5]
  got = export.pixels([export.resized(jpeg, prep)], prep)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  meta = export.export(argparse.Namespace(
      data=tiny_corpus.synthetic(tmp_path, num=8), out=str(tmp_path / "t"),
      image_teacher=str(tmp_path / "teacher"), text_teacher=export.MINILM, image_size=None,
      pca_dim=8, pca_images=8, text_length=8, batch_size=8, overwrite=False))
  assert meta["teacher"]["grid"] == [2, 2] and meta["teacher"]["image_mean"] == [0.5, 0.4, 0.3]
