"""Real-shaped photographs (tests/photos.py) through every path that reads
images: the build, verify, the training decoder at every side, the
evaluation transform, an evaluation suite and `dinorank_jax.load`."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

import dinorank_jax
from dinorank_jax.data import build, pipeline, records, transform, verify
from dinorank_jax.evaluate import suites
from tests import photos, tiny_export

SIDES = range(16, 385)


def _record(jpeg: bytes) -> bytes:
  return records.encode_record({"jpeg": jpeg, "tokens": np.zeros(77, np.int32)})


def test_every_stored_photo_decodes_for_training_and_evaluation_at_every_side():
  """Stored as the builder stores them (RGB JPEG), every photo gives a
  `side` square at every side from 16 to 384, augmented or not. The JPEG
  draft scale rounds each side separately: mapping the crop with the width's
  ratio alone put the box outside the image of most non-square photos."""
  for name, data in photos.encoded().items():
    record = _record(build.reencode(data, max_side=256))
    for side in SIDES:
      for augment in (True, False):
        decode = pipeline.Decode(side, seed=side, crop_scale=(0.08, 1.0), augment=augment)
        for position in range(3 if augment else 1):
          example = decode.map((position, (0, [record])))
          assert "_skip" not in example, (name, side, augment, example.get("_why"))
          assert example["image"].shape == (side, side, 3)


def test_the_evaluation_transform_takes_every_mode_and_size():
  for name, data in photos.encoded().items():
    image = Image.open(io.BytesIO(data))
    for side in SIDES[::7]:
      pixels = transform.preprocess(image, side)
      assert pixels.shape == (side, side, 3) and pixels.dtype == np.uint8, (name, side)


def test_the_evaluation_transform_is_shortest_side_bicubic_then_the_centre():
  """Hand-computed on a 91 × 64 ramp: shorter side 64 -> 32, longer int(32 · 91 / 64) = 45;
  the crop starts at round(13 / 2) = 6 (half to even)."""
  assert transform.resized_size(91, 64, 32) == (45, 32)
  assert transform.resized_size(64, 91, 32) == (32, 45)
  assert transform.centre_box(45, 32, 32) == (6, 0, 38, 32)
  assert transform.centre_box(47, 32, 32) == (8, 0, 40, 32)       # 7.5 -> 8
  ramp = np.tile(np.arange(91, dtype=np.uint8)[None, :, None] * 2, (64, 1, 3))
  image = Image.fromarray(ramp)
  expected = np.asarray(image.resize((45, 32), Image.Resampling.BICUBIC))[:, 6:38]
  np.testing.assert_array_equal(transform.preprocess(image, 32), expected)
  x0, y0, w, h = transform.crop_fraction(91, 64, 32)
  assert (x0, y0, w, h) == (6 / 45, 0.0, 32 / 45, 1.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The photos as an img2dataset webdataset, built into records, and a tiny export."""
  root = tmp_path_factory.mktemp("photos")
  with tarfile.open(root / "00000.tar", "w") as tar:
    for i, (name, data) in enumerate(photos.encoded().items()):
      for ext, payload in (("jpg", data), ("txt", f"a photo of a {name}".encode())):
        info = tarfile.TarInfo(f"{i:09d}.{ext}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  args = build.parser().parse_args(["--source", "webdataset", "--input", str(root / "00000.tar"),
                                    "--out", str(root / "records"), "--workers", "1",
                                    "--shard_size", "8"])
  meta = build.build(args)
  tiny_export.write(str(root / "export"))
  return root, meta


def test_photos_go_through_build_verify_training_evaluation_and_load(built):
  root, meta = built
  n = len(photos.PHOTOS)
  assert meta["counts"]["written"] == n and meta["counts"]["corrupt"] == 0
  assert verify.verify(str(root / "records"), log=lambda s: None)["ok"] == n

  stream = pipeline.make_dataset(str(root / "records"), batch_size=n, image_size=16, seed=0,
                                 min_seen=1, max_skip_fraction=0.0)
  batch = next(iter(stream))
  assert batch["image"].shape == (n, 16, 16, 3) and batch["skipped"].sum() == 0

  model = dinorank_jax.load(str(root / "export"))
  result = suites.run(f"records:{root / 'records'}", model, "")
  assert result["status"] == "ok" and result["examples"] == n and result["skipped"] == 0

  originals = [Image.open(io.BytesIO(d)) for d in photos.encoded().values()]
  pixels = model.preprocess(originals)
  assert pixels.shape == (n, 32, 32, 3)
  embedded = model.encode_image(pixels)
  assert embedded.shape == (n, 16) and np.all(np.isfinite(embedded))
  np.testing.assert_allclose(model.encode_image(originals), embedded, atol=1e-6)

  # A path opens the file; float pixels 0-255 are refused, not saturated;
  # nothing in, nothing out.
  path = root / "photo"
  path.write_bytes(next(iter(photos.encoded().values())))
  np.testing.assert_array_equal(model.preprocess(path), model.preprocess(str(path)))
  np.testing.assert_array_equal(model.preprocess([str(path)]), pixels[:1])
  with pytest.raises(ValueError, match=r"^float image arrays must hold values in \[0, 1\], "
                     r"got values from 0 to 255: divide 0-255 pixels by 255, or pass them as uint8$"):
    model.encode_image(pixels.astype(np.float32))
  with pytest.raises(ValueError, match=r"got values from 0 to 255"):
    model.preprocess(np.asarray(originals[0].convert("RGB"), np.float32))
  assert model.encode_image([]).shape == (0, 16)
  assert model.encode_text([]).shape == (0, 16)
