"""The evaluation tool: metrics against hand-computed values, the linear probe,
every data source (our records, image folders, a tensorflow-datasets dataset
prepared in the test), missing datasets, and the CLI end to end on a trained
and exported tiny model, with `--compare`."""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dinorank_jax.evaluate import __main__ as cli
from dinorank_jax.evaluate import clip_benchmark, metrics, probe, prompts, report, suites
from dinorank_jax.evaluate.sources import tfds_split
from tests import tiny_corpus, tiny_export

CLASSES = ["red", "green", "blue", "sea_lion"]


class OneHotModel:
  """Image i of class c (pixel value 40 c) and every prompt naming class c embed
  to the same one-hot vector: zero-shot must be exact."""
  image_size, has_image_student = 16, False

  def encode_image(self, images):
    return np.eye(8, dtype=np.float32)[np.asarray(images)[:, 0, 0, 0] // 40]

  def encode_text(self, texts):
    """A text naming no class (a blank template) embeds to zeros."""
    names = [c.replace("_", " ") for c in CLASSES]
    return np.eye(9, 8, dtype=np.float32)[[next((i for i, n in enumerate(names) if n in t), 8)
                                           for t in texts]]


def _folder(root, per_class=3, bad=0):
  for c, name in enumerate(CLASSES):
    os.makedirs(root / name)
    for i in range(per_class):
      Image.fromarray(np.full((20, 24, 3), 40 * c, np.uint8)).save(root / name / f"{i}.png")
  for i in range(bad):
    (root / CLASSES[0] / f"broken{i}.jpg").write_bytes(b"not an image")
  return str(root)


def test_zero_shot_is_exact_for_identical_embeddings_and_chance_for_random(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    result = suites.run(f"folder:{_folder(tmp_path / 'set', bad=1)}", OneHotModel(), "")
  assert result["status"] == "ok" and result["examples"] == 12 and result["skipped"] == 1
  assert f"skipped {tmp_path / 'set' / CLASSES[0] / 'broken0.jpg'}: cannot identify" in caplog.text
  assert result["metrics"]["zero_shot/label/top1"] == 1.0
  assert result["metrics"]["zero_shot/label/mean_per_class_recall"] == 1.0

  # ImageNet-R's protocol: only the classes that occur compete (here 2 of 4).
  names = [c.replace("_", " ") for c in CLASSES]
  model, embedded = OneHotModel(), {"tasks": {"label": names}, "labels": {"label": np.array([3, 1])},
                                    "image": np.eye(8, dtype=np.float32)[[0, 0]]
                                             + 0.5 * np.eye(8, dtype=np.float32)[[1, 1]]}
  assert suites.zero_shot(model, embedded, ["{c}"])["label/top1"] == 0.0     # class 0 wins
  assert suites.zero_shot(model, embedded, ["{c}"], present_only=True)["label/top1"] == 0.5
  assert suites.ZERO_SHOT["imagenet_r"].present_only and not suites.ZERO_SHOT["imagenet"].present_only

  rng = np.random.default_rng(0)
  image, classes = rng.normal(size=(20000, 16)), rng.normal(size=(10, 16))
  scores = metrics.zero_shot(image, classes, rng.integers(0, 10, 20000))
  assert scores["top1"] == pytest.approx(0.1, abs=0.01)
  assert scores["top5"] == pytest.approx(0.5, abs=0.015)
  assert scores["mean_per_class_recall"] == pytest.approx(0.1, abs=0.01)


def test_retrieval_recall_equals_hand_computed_values_with_ties():
  # image i · caption j = S[i, j] (image rows are the identity); caption j describes image j.
  # Ties are pessimistic: every other caption scoring >= the true one ranks first.
  s = np.array([[0.9, 0.9, 0.1, 0.0, 0.0],    # tie with a later caption: rank 1
                [0.8, 0.5, 0.8, 0.1, 0.0],    # two above: rank 2
                [0.2, 0.2, 0.2, 0.2, 0.1],    # tied with two earlier, one later: rank 3
                [0.0, 0.0, 0.7, 0.7, 0.0],    # tied with an earlier caption: rank 1
                [0.3, 0.0, 0.0, 0.0, 0.6]])   # rank 0
  # i2t ranks 1, 2, 3, 1, 0; t2i (columns) ranks 0, 1, 2, 0, 0.
  got = metrics.retrieval(np.eye(5), s.T, np.arange(5), ks=(1, 2, 3))
  assert got == pytest.approx({"i2t_r1": 0.2, "i2t_r2": 0.6, "i2t_r3": 0.8,
                               "t2i_r1": 0.6, "t2i_r2": 0.8, "t2i_r3": 1.0})
  # Several captions per image: a hit is any of them in the top k.
  s = np.array([[0.1, 0.5, 0.9],     # image 0 owns captions 0 and 1: best is 1, rank 1
                [0.6, 0.2, 0.3]])    # image 1 owns caption 2: rank 1
  got = metrics.retrieval(np.eye(2), s.T, np.array([0, 0, 1]), ks=(1, 2))
  assert got == pytest.approx({"i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 1 / 3, "t2i_r2": 1.0})
  # Two positives tied with each other do not push each other down.
  s = np.array([[0.5, 0.5, 0.2], [0.1, 0.1, 0.9]])
  got = metrics.retrieval(np.eye(2), s.T, np.array([0, 0, 1]), ks=(1,))
  assert got["i2t_r1"] == 1.0


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = 4.0 * rng.normal(size=(5, 12))

  def split(n):
    y = rng.integers(0, 5, n)
    return (centres[y] + rng.normal(size=(n, 12))).astype(np.float32), y

  result = probe.linear_probe(split(300), split(100), split(300), 5, steps=100)
  assert result["top1"] >= 0.99 and result["mean_per_class_recall"] >= 0.99
  assert min(probe.COARSE) <= result["l2"] <= max(probe.COARSE) * 10 ** 0.5


def test_probe_fit_stops_at_scikit_learns_optimum():
  """The fit stops once its gradient is below `probe.TOL`, well before its
  iteration cap, at scikit-learn's optimum of the same objective (mean
  cross-entropy + λ/2 ‖W‖² is C = 1/(λ n) there, the bias unpenalised)."""
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  n, classes, l2 = 400, 4, 0.05
  y = rng.integers(0, classes, n)
  x = (rng.normal(size=(classes, 8))[y] + 1.5 * rng.normal(size=(n, 8))).astype(np.float32)
  params, iterations = probe.fit(x, y, classes, l2, steps=200)
  reference = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=10_000).fit(
      x.astype(np.float64), y)
  assert iterations < 100
  # λ-strong convexity in W: ‖W − W*‖ ≤ ‖∇‖ / λ, plus float32 rounding.
  np.testing.assert_allclose(np.asarray(params["w"]), reference.coef_.T,
                             atol=probe.TOL / l2 + 1e-5)
  logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
  probabilities = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(probabilities / probabilities.sum(1, keepdims=True),
                             reference.predict_proba(x), atol=1e-4)


def test_modality_gap_cone_numbers_and_gram_fidelity():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  image, text = unit(rng.normal(size=(50, 8)) + 2.0), unit(rng.normal(size=(50, 8)) - 2.0)
  gap = metrics.modality_gap(image, text)
  pairs = image @ image.T
  assert gap["cone_image"] == pytest.approx((pairs.sum() - np.trace(pairs)) / (50 * 49))
  assert gap["cross_cosine"] == pytest.approx(np.mean(image @ text.T))
  assert gap["gap"] == pytest.approx(np.linalg.norm(image.mean(0) - text.mean(0)))
  assert gap["gap"] > 1.0 and metrics.modality_gap(image, image)["gap"] == 0.0

  tokens = rng.normal(size=(3, 16, 6)).astype(np.float32)
  rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0].astype(np.float32)
  same = metrics.gram_fidelity(tokens @ rotation, tokens)
  np.testing.assert_allclose(same["cosine"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(same["distance"], 0.0, atol=1e-5)
  other = metrics.gram_fidelity(tokens[:, ::-1], tokens)
  assert np.all(other["cosine"] < 0.9) and np.all(other["distance"] > 0.01)


def test_prompts_are_clips_80_templates_and_imagenet_names():
  assert len(prompts.imagenet_templates()) == 80
  assert prompts.imagenet_templates()[0].format(c="dog") == "a bad photo of a dog."
  assert len(prompts.imagenet_class_names()) == 1000
  assert prompts.class_names(["n01440764", "n01443537"]) == ["tench", "goldfish"]
  assert prompts.class_names(["sea_lion"]) == ["sea lion"]
  # A class embedding is the renormalised mean of its normalised prompt embeddings.
  rng, table = np.random.default_rng(0), {}
  unit = lambda x: x / np.linalg.norm(x)
  encode = lambda texts: np.stack([table.setdefault(t, unit(rng.normal(size=4))) for t in texts])
  templates = ("a {c}", "the {c}, a {c}", "{c}!")       # {c} as often as a template likes
  got = prompts.class_embeddings(encode, ["cat", "dog"], templates)
  for row, name in zip(got, ("cat", "dog")):
    np.testing.assert_allclose(
        row, unit(sum(table[t.format(c=name)] for t in templates)), rtol=1e-6)
  assert "the dog, a dog" in table


def _prepare_tfds(data_dir: str, name: str, captions: bool = False):
  """A tiny dataset prepared as tensorflow-datasets does (array_record files and
  dataset_info.json), images given encoded: example i shows class i mod 4, as a
  label or as two captions naming it (coco_captions' layout)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  target = ({"captions": tfds.features.Sequence({"text": np.str_})} if captions
            else {"label": tfds.features.ClassLabel(names=CLASSES)})

  class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(20, 20, 3)), **target}))

    def _split_generators(self, dl_manager):
      if captions:
        return {"val": self._generate_examples(4), "test": self._generate_examples(4)}
      return {"train": self._generate_examples(40), "test": self._generate_examples(12)}

    def _generate_examples(self, n):
      for i in range(n):
        png = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 40 * (i % 4), np.uint8)).save(png, "PNG")
        png.seek(0)
        name = CLASSES[i % 4].replace("_", " ")
        yield i, {"image": png, **({"captions": {"text": [f"a {name}", f"{name}, again"]}}
                                   if captions else {"label": i % 4})}

  Tiny.name = name
  Tiny(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source_reads_a_prepared_dataset_and_probes_it(tmp_path):
  _prepare_tfds(str(tmp_path), "tiny_colours")
  split = tfds_split(str(tmp_path), "tiny_colours", "test")
  assert split.size == 12 and split.tasks == {"label": ["red", "green", "blue", "sea lion"]}
  batch = split.read(np.arange(5), 16)
  assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
  labels = batch["labels"]["label"]                     # TFDS shuffles: pixels must follow labels
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], 40 * labels)
  assert set(split.read(np.arange(12), 16)["labels"]["label"]) == {0, 1, 2, 3}

  result = suites.run("probe:tiny_colours", OneHotModel(), str(tmp_path))
  assert result["status"] == "ok" and result["examples"] == 12
  assert result["metrics"]["probe/label/top1"] == 1.0
  missing = suites.run("probe:tiny_colours", OneHotModel(), str(tmp_path / "elsewhere"))
  assert missing["status"].startswith("skipped: not found at ")
  assert str(tmp_path / "elsewhere" / "tiny_colours") in missing["status"]


def _as_tfrecord(data_dir: str, name: str) -> None:
  """Rewrites a prepared array_record dataset as tensorflow-datasets' tfrecord
  form: the same serialised examples, framed with masked CRC-32Cs."""
  import glob
  import struct
  from array_record.python.array_record_module import ArrayRecordReader
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  version = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json"))[0]
  for path in glob.glob(os.path.join(os.path.dirname(version), "*.array_record-*")):
    reader = ArrayRecordReader(path)
    with open(path.replace(".array_record-", ".tfrecord-"), "wb") as f:
      for data in reader.read_all():
        length = struct.pack("<Q", len(data))
        f.write(length + struct.pack("<I", masked_crc32c(length)) + data
                + struct.pack("<I", masked_crc32c(data)))
    reader.close()
    os.remove(path)
  info = json.load(open(version))
  json.dump({**info, "fileFormat": "tfrecord"}, open(version, "w"))


def test_tfds_source_reads_the_tfrecord_form_without_tensorflow(tmp_path):
  _prepare_tfds(str(tmp_path), "tiny_colours")
  expected = tfds_split(str(tmp_path), "tiny_colours", "test").read(np.arange(12), 16)
  _as_tfrecord(str(tmp_path), "tiny_colours")
  split = tfds_split(str(tmp_path), "tiny_colours", "test")
  assert split.size == 12 and split.tasks == {"label": ["red", "green", "blue", "sea lion"]}
  got = split.read(np.arange(12), 16)
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["labels"]["label"], expected["labels"]["label"])
  result = suites.run("probe:tiny_colours", OneHotModel(), str(tmp_path))
  assert result["status"] == "ok" and result["metrics"]["probe/label/top1"] == 1.0
  assert "tensorflow" not in __import__("sys").modules


def _webdataset(root, *, retrieval=False, per_class=3, shards=2):
  """A CLIP_benchmark webdataset (`clip_benchmark_export_wds`'s layout):
  example i shows class i mod 4, as `.cls` or as two captions naming it."""
  import tarfile
  os.makedirs(root / "test")
  count = 4 if retrieval else 4 * per_class
  tars = [tarfile.open(root / "test" / f"{n}.tar", "w") for n in range(shards)]
  for i in range(count):
    c, out = i % 4, io.BytesIO()
    extension = ("webp", "png", "jpg")[i % 3]
    Image.fromarray(np.full((20, 24, 3), 40 * c, np.uint8)).save(
        out, {"jpg": "JPEG", "webp": "WEBP"}.get(extension, "PNG"), lossless=True, quality=100)
    name = CLASSES[c].replace("_", " ")
    members = {extension: out.getvalue(),
               **({"txt": f"a {name}\n{name}, again".encode()} if retrieval
                  else {"cls": str(c).encode()})}
    for extension, data in members.items():
      info = tarfile.TarInfo(f"s{i:07d}.{extension}")
      info.size = len(data)
      tars[i % shards].addfile(info, io.BytesIO(data))
  broken = tarfile.TarInfo("s9999999.jpg")                 # an image that does not decode
  broken.size = 4
  tars[0].addfile(broken, io.BytesIO(b"junk"))
  for tar in tars:
    tar.close()
  (root / "test" / "nshards.txt").write_text(f"{shards}\n")
  if retrieval:
    (root / "dataset_type.txt").write_text("retrieval\n")
  else:
    (root / "classnames.txt").write_text("".join(c.replace("_", " ") + "\n" for c in CLASSES))
    (root / "zeroshot_classification_templates.txt").write_text(   # a blank line, {c} twice
        "a photo of a {c}.\n\nitap of the {c}, a {c}.\n")
  return str(root)


def test_clip_benchmark_webdatasets_give_zero_shot_and_retrieval(tmp_path):
  root = _webdataset(tmp_path / "wds_colours")
  result = suites.run(f"wds:{root}", OneHotModel(), str(tmp_path))
  assert result["status"] == "ok" and result["examples"] == 12 and result["skipped"] == 1
  assert result["metrics"]["zero_shot/label/top1"] == 1.0
  assert result["chance"] == {"zero_shot/label/top1": 0.25, "zero_shot/label/top3": 0.75,
                              "zero_shot/label/mean_per_class_recall": 0.25}
  split = suites.wds_split(root)
  assert split.templates == ["a photo of a {c}.", "", "itap of the {c}, a {c}."]   # CLIP_benchmark's
  assert split.tasks == {"label": ["red", "green", "blue", "sea lion"]}

  captions = _webdataset(tmp_path / "wds_captions", retrieval=True)
  result = suites.run(f"wds:{captions}", OneHotModel(), str(tmp_path))
  assert result["status"] == "ok" and result["examples"] == 4
  assert result["metrics"] == {f"retrieval/{d}_r{k}": 1.0 for d in ("i2t", "t2i")
                               for k in (1, 5, 10)}
  # Chance: 4 images with 2 captions each; image→text R@1 = 1 - 6/8.
  assert result["chance"]["retrieval/t2i_r1"] == 0.25 and result["chance"]["retrieval/t2i_r5"] == 1
  assert result["chance"]["retrieval/i2t_r1"] == pytest.approx(0.25)
  assert result["chance"]["retrieval/i2t_r5"] == pytest.approx(1 - (6 * 5 * 4 * 3 * 2) / (8 * 7 * 6 * 5 * 4))
  assert result["ties"] == metrics.TIES
  # Every suite that ran has its section in the report: counts, dtype, chance, tie rule.
  folder = suites.run(f"folder:{_folder(tmp_path / 'folder', bad=1)}", OneHotModel(), "")
  text = report.markdown({"models": {"m": {"path": "/m", "suites": {
      f"wds:{root}": {**suites.run(f"wds:{root}", OneHotModel(), ""), "dtype": "float32"},
      f"wds:{captions}": result, f"folder:{tmp_path / 'folder'}": folder}}}})
  for suite, skipped in ((f"wds:{root}", 1), (f"wds:{captions}", 1),
                         (f"folder:{tmp_path / 'folder'}", 1)):
    counts = text.split(f"## {suite}\n")[1].splitlines()[1]      # "- m: source; N examples, …"
    assert counts.startswith("- m: ") and f"{skipped} skipped" in counts, counts
  assert text.count("| chance |") == 3 and "computed in float32" in text
  assert f"retrieval ties: {metrics.TIES}" in text
  named = clip_benchmark.records({"models": {"m": {"path": "/m", "suites": {
      f"wds:{root}": {"metrics": {"zero_shot/label/top1": 1.0}}}}}})
  assert named[0]["dataset"] == "wds/wds_colours" and named[0]["metrics"] == {"acc1": 1.0}
  assert suites.run(f"wds:{tmp_path / 'none'}", OneHotModel(), "")["status"].startswith(
      f"skipped: not found at {tmp_path / 'none'}/test/nshards.txt")


def _add_to_tar(path, members: dict) -> None:
  import tarfile
  with tarfile.open(path, "a") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_damaged_webdatasets_are_named_and_unscorable_labels_counted(tmp_path):
  root = _webdataset(tmp_path / "wds_colours")
  good = _read(tmp_path / "wds_colours" / "test" / "1.tar")
  image = io.BytesIO()
  Image.fromarray(np.full((20, 24, 3), 40, np.uint8)).save(image, "PNG")
  _add_to_tar(tmp_path / "wds_colours" / "test" / "1.tar", {   # labels outside classnames.txt
      "t0000001.png": image.getvalue(), "t0000001.cls": b"9",
      "t0000002.png": image.getvalue(), "t0000002.cls": b"-1"})
  result = suites.run(f"wds:{root}", OneHotModel(), "")
  assert result["status"] == "ok" and result["examples"] == 12 and result["skipped"] == 3
  shard = tmp_path / "wds_colours" / "test" / "1.tar"
  for damage, why in ((good[:len(good) // 2], "is damaged"),
                      (b"<html>404</html>" * 40, "is damaged"),
                      (good[:_first_member_end(good)], "end-of-archive marker")):
    shard.write_bytes(damage)
    status = suites.run(f"wds:{root}", OneHotModel(), "")["status"]
    assert status.startswith(f"skipped: damaged: {shard} ") and why in status, status
    assert status.endswith("export or download the dataset again")
  shard.write_bytes(good)
  (tmp_path / "wds_colours" / "test" / "nshards.txt").write_text("two\n")
  status = suites.run(f"wds:{root}", OneHotModel(), "")["status"]
  assert "nshards.txt holds 'two', not a number of shards" in status


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _first_member_end(tar_bytes: bytes) -> int:
  import tarfile
  with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
    first = tar.next()
  return first.offset_data + -(-first.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize("damage", ["flipped_length", "cut_in_half"])
def test_a_damaged_tfrecord_split_counts_its_lost_examples_as_skipped(damage, tmp_path, caplog):
  import glob
  _prepare_tfds(str(tmp_path), "tiny_colours")
  _as_tfrecord(str(tmp_path), "tiny_colours")
  path = sorted(glob.glob(str(tmp_path / "tiny_colours" / "*" / "*test.tfrecord-*")))[0]
  data = bytearray(_read(path))
  if damage == "flipped_length":
    second = 16 + int.from_bytes(data[:8], "little")       # the second record's length
    data[second] ^= 0x01
  else:
    data = data[:len(data) // 2]
  with open(path, "wb") as f:
    f.write(bytes(data))
  with caplog.at_level(logging.WARNING):
    result = suites.run("probe:tiny_colours", OneHotModel(), str(tmp_path))
  assert result["status"] == "ok" and result["examples"] + result["skipped"] == 12
  assert result["skipped"] >= 1 and f"{path} is damaged" in caplog.text


def test_unusable_embeddings_stop_the_gap_analysis_in_one_line():
  class Diverged(OneHotModel):
    def encode_text(self, texts):
      return np.full((len(texts), 8), np.nan, np.float32)
  embedded = {"image": np.eye(4, 8, dtype=np.float32), "captions": [["a red"]] * 4}
  with pytest.raises(metrics.InvalidEmbeddings, match="4 of 4 text embeddings are unusable"):
    suites.gap(Diverged(), embedded)


def test_coco_retrieval_and_gap_read_captions_from_tfds(tmp_path):
  _prepare_tfds(str(tmp_path), "coco_captions", captions=True)
  coco = suites.run("coco", OneHotModel(), str(tmp_path))
  assert coco["status"] == "ok" and coco["examples"] == 4
  assert coco["metrics"] == {f"retrieval/{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
  gap = suites.run("gap", OneHotModel(), str(tmp_path))
  assert gap["metrics"]["gap/gap"] == 0.0 and gap["metrics"]["gap/matched_cosine"] == 1.0
  assert len(gap["plots"]["gap"]["image"]) == 4


def test_missing_datasets_are_reported_as_skipped(tmp_path, monkeypatch):
  names = suites.expand(["all"])
  assert {"imagenet", "coco", "gap", "probe:cifar10", "probe:flowers"} <= set(names)
  for name in ("imagenet", "imagenet_v2_mf", "coco", "gap", "probe:fgvc_aircraft", "synthetic",
               f"records:{tmp_path}", f"folder:{tmp_path / 'x'}"):
    status = suites.run(name, OneHotModel(), str(tmp_path))["status"]
    assert status.startswith(f"skipped: not found at {tmp_path}"), (name, status)
  with pytest.raises(ValueError, match="unknown suite"):
    suites.expand(["imagenet", "cocoa"])
  # A relative DIR is read from the current directory; the report says where.
  monkeypatch.chdir(tmp_path)
  for prefix in ("folder", "wds", "records"):
    status = suites.run(f"{prefix}:rel/x", OneHotModel(), "elsewhere")["status"]
    assert status.startswith(f"skipped: not found at {tmp_path / 'rel' / 'x'}"), status


def test_cli_evaluates_the_synthetic_suite_writes_the_report_and_compares(tmp_path, capsys):
  # An untrained export with both students (the trainer's exports are test_export.py's).
  root = tmp_path
  tiny_corpus.corpora(str(root / "data"), num_train=64, num_eval=32)
  tiny_export.write(str(root / "export"), **tiny_export.STUDENTS)
  cli.main(["--model", str(root / "export"), "--suite", "synthetic,table1",
            "--data_dir", str(root / "data"), "--out", str(root / "report")])
  printed = capsys.readouterr().out
  results = json.load(open(root / "report" / report.RESULTS))
  synthetic = results["models"]["export"]["suites"]["synthetic"]
  assert synthetic["status"] == "ok" and synthetic["examples"] == 32
  found = synthetic["metrics"]
  for key in ("zero_shot/colour/top1", "zero_shot/shape/top5", "retrieval/i2t_r10",
              "probe/colour/top1", "gap/gap", "gap/cone_text", "fidelity/cosine_mean",
              "fidelity/gram_distance"):
    assert np.isfinite(found[key]), key
  assert 0.0 <= found["zero_shot/colour/top1"] <= found["zero_shot/colour/top3"] <= 1.0
  # Two captions per held-out scene (raw and synthetic): R@k counts either.
  assert found["retrieval/i2t_r1"] <= found["retrieval/i2t_r5"] <= found["retrieval/i2t_r10"]
  for suite in ("imagenet", "coco"):
    assert results["models"]["export"]["suites"][suite]["status"].startswith("skipped: not found")
  assert "## synthetic: zero_shot (%)" in printed and "Not measured" in printed
  drawn = [f for f in report.FIGURES if f != "order_sweep.png"]     # one model: one order
  for figure in drawn:
    assert (root / "report" / figure).stat().st_size > 1000, figure
  assert results["figures"] == drawn and not (root / "report" / "order_sweep.png").exists()
  assert "The order sweep needs models of two rank orders or more; these are all R = " in printed
  # The same numbers in CLIP_benchmark's records and names.
  bench = {(r["dataset"], r["task"]): r for r in
           (json.load(open(root / "report" / f)) for f in results["clip_benchmark"])}
  colour = bench[("synthetic/colour", "zeroshot_classification")]
  assert set(colour) == {"dataset", "model", "pretrained", "task", "metrics", "language", "dtype"}
  assert colour["dtype"] == synthetic["dtype"] == "float32"
  assert colour["metrics"]["acc1"] == found["zero_shot/colour/top1"]
  assert colour["metrics"]["acc5"] == found["zero_shot/colour/top5"]
  assert colour["metrics"]["mean_per_class_recall"] == found["zero_shot/colour/mean_per_class_recall"]
  assert bench[("synthetic", "zeroshot_retrieval")]["ties"] == metrics.TIES
  retrieval = bench[("synthetic", "zeroshot_retrieval")]["metrics"]
  assert retrieval["text_retrieval_recall@5"] == found["retrieval/i2t_r5"]
  assert retrieval["image_retrieval_recall@5"] == found["retrieval/t2i_r5"]
  # An evaluation in which every suite was skipped fails in one line.
  with pytest.raises(SystemExit, match="nothing was evaluated: every suite was skipped"):
    cli.main(["--model", str(root / "export"), "--suite", "coco", "--data_dir", str(root),
              "--out", str(root / "none")])
  # Side by side, without a model: the second copy is renamed, numbers kept.
  cli.main(["--compare", str(root / "report"), str(root / "report"), "--out", str(root / "both")])
  both = json.load(open(root / "both" / report.RESULTS))["models"]
  assert list(both) == ["export", "export (2)"]
  assert both["export (2)"]["suites"]["synthetic"]["metrics"] == found
  # Reports of two rank orders: the sweep is drawn.
  other = json.load(open(root / "report" / report.RESULTS))
  other["models"]["export"]["model"]["source"]["rank_order"] += 1
  os.makedirs(root / "other")
  json.dump(other, open(root / "other" / report.RESULTS, "w"))
  cli.main(["--compare", str(root / "report"), str(root / "other"), "--out", str(root / "sweep")])
  assert json.load(open(root / "sweep" / report.RESULTS))["figures"] == list(report.FIGURES)
  assert (root / "sweep" / "order_sweep.png").stat().st_size > 1000
  assert "| export (2) |" in open(root / "both" / "report.md").read()
