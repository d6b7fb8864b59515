"""Our evaluation against the real tools on the same export and the same
odd-sized photographs (tests/photos.py): open_clip 3.3 loads our `export
--format open_clip` with its own factory and evaluation transform (read from
the config we wrote), CLIP_benchmark 1.6.2's own metric code scores it, and
`python -m dinorank_jax.evaluate`'s `wds:` suite scores our export of the same
trunks. Pixels, embeddings and every metric agree."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import dinorank_jax
from dinorank_jax.evaluate import suites
from tests import photos, tiny_corpus, tiny_export
from tests.open_clip_cpu import import_open_clip

open_clip = import_open_clip()
# `pip install --no-deps clip_benchmark==1.6.2` (the Makefile's): its metric code alone.
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ["astronaut", "coffee cup", "cat", "rocket", "galaxy", "camera"]
# CLIP_benchmark reads every line: a blank one is an empty prompt, `{c}` may repeat.
TEMPLATES = "a photo of a {c}.\n\na {c}, or rather a {c}.\n"


def _accuracy(logits, target, k: int) -> float:
  """`clip_benchmark.metrics.zeroshot_classification.accuracy`, one k."""
  pred = logits.topk(k, 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  return float(correct[:k].reshape(-1).float().sum()) / len(target)


class _Loader(list):
  """What CLIP_benchmark iterates: batches, and `.dataset.classes`."""

  class dataset:  # pylint: disable=invalid-name
    classes = CLASSES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip_benchmark")
  tiny_export.write(str(root / "export"), formats=("open_clip",))
  ours = dinorank_jax.load(str(root / "export"))
  checkpoint = root / "export" / "open_clip"
  theirs = open_clip.create_model(f"local-dir:{checkpoint}")
  # The evaluation transform open_clip builds from the preprocess_cfg we wrote.
  preprocess = open_clip.transform.image_transform_v2(
      open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(theirs)), is_train=False)
  tokenizer = open_clip.get_tokenizer(f"local-dir:{checkpoint}")
  return root, ours, theirs.eval(), preprocess, tokenizer


def _decoded(data: bytes) -> Image.Image:
  """As webdataset's "pil" image handler decodes: opened and loaded, mode kept."""
  image = Image.open(io.BytesIO(data))
  image.load()
  return image


def test_our_transform_gives_open_clips_pixels_on_odd_photos(setup):
  _, ours, _, preprocess, _ = setup
  for name, data in photos.encoded().items():
    theirs = preprocess(_decoded(data)).permute(1, 2, 0).numpy()
    mine = (ours.preprocess(_decoded(data))[0] / 255.0 - np.asarray(open_clip.OPENAI_DATASET_MEAN)
            ) / np.asarray(open_clip.OPENAI_DATASET_STD)
    np.testing.assert_allclose(mine, theirs, atol=1e-6, err_msg=name)


def test_zero_shot_and_retrieval_equal_clip_benchmarks_on_the_same_export(setup):
  root, ours, theirs, preprocess, tokenizer = setup
  items = list(photos.encoded().items())
  labelled = [(name, data, i % len(CLASSES)) for i, (name, data) in enumerate(items)]
  captioned = [(name, data, [f"a photo of {name}", f"{name}, {i}"])
               for i, (name, data) in enumerate(items)]
  batches = lambda rows, target: _Loader(
      (torch.stack([preprocess(_decoded(d)) for _, d, _ in rows[s:s + 8]]),
       target([t for _, _, t in rows[s:s + 8]])) for s in range(0, len(rows), 8))

  found = suites.run(f"wds:{tiny_corpus.wds(root / 'cls', labelled, classes=CLASSES, templates=TEMPLATES)}", ours, "")
  assert found["status"] == "ok" and found["skipped"] == 0
  # CLIP_benchmark's own classifier and logits; its `accuracy` ends in
  # `float(array of shape (1,))`, which NumPy 2 refuses, so its two lines
  # are transcribed (`_accuracy`), and the recall is sklearn's, as there.
  classifier = zeroshot_classification.zero_shot_classifier(
      theirs, tokenizer, CLASSES, [t.strip() for t in TEMPLATES.splitlines()], "cpu", amp=False)
  logits, target = zeroshot_classification.run_classification(
      theirs, classifier, batches(labelled, torch.tensor), "cpu", amp=False)
  bench = {"acc1": _accuracy(logits, target, 1), "acc5": _accuracy(logits, target, 5),
           "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(axis=1))}
  assert found["metrics"]["zero_shot/label/top1"] == pytest.approx(bench["acc1"], abs=1e-12)
  assert found["metrics"]["zero_shot/label/top5"] == pytest.approx(bench["acc5"], abs=1e-12)
  assert found["metrics"]["zero_shot/label/mean_per_class_recall"] == pytest.approx(
      bench["mean_per_class_recall"], abs=1e-12)

  found = suites.run(f"wds:{tiny_corpus.wds(root / 'ret', captioned)}", ours, "")
  bench = zeroshot_retrieval.evaluate(theirs, batches(captioned, list), tokenizer, "cpu",
                                      amp=False, recall_k_list=[1, 5, 10])
  for k in (1, 5, 10):
    # No two photos embed alike, so no ties: the tie rule does not enter.
    # CLIP_benchmark averages in float32: equal up to its rounding of hits / n.
    assert found["metrics"][f"retrieval/t2i_r{k}"] == pytest.approx(
        bench[f"image_retrieval_recall@{k}"], abs=1e-7)
    assert found["metrics"][f"retrieval/i2t_r{k}"] == pytest.approx(
        bench[f"text_retrieval_recall@{k}"], abs=1e-7)

  # The embeddings themselves, open_clip's against ours (float32 both).
  pixels = torch.stack([preprocess(_decoded(d)) for _, d in items])
  with torch.no_grad():
    image = torch.nn.functional.normalize(theirs.encode_image(pixels), dim=-1).numpy()
    text = torch.nn.functional.normalize(
        theirs.encode_text(tokenizer(["a cat", "a photo of a rocket"])), dim=-1).numpy()
  np.testing.assert_allclose(ours.encode_image([_decoded(d) for _, d in items]), image, atol=1e-5)
  np.testing.assert_allclose(ours.encode_text(["a cat", "a photo of a rocket"]), text, atol=1e-5)
