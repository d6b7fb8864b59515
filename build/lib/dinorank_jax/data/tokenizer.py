"""CLIP's BPE tokenizer, built offline with `tokenizers` (no torch, no download).

The vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (49,408 ids),
read from the `open_clip_torch` wheel's package directory without importing
the package (`pip install --no-deps open_clip_torch==3.3.0`; the Makefile
does). The pipeline is CLIP's: ftfy + HTML-unescape clean-up, NFC, whitespace
collapse, lower case, CLIP's word regex, byte-level BPE with `</w>` word ends.
Rows are `<start> … <end>` padded with 0 to 77 ids; truncation keeps the end
token. Any local Hugging Face tokenizer directory (`tokenizer.json`) works too.
"""

import gzip
import html
import importlib.util
import os

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

CONTEXT_LENGTH = 77
CLIP_BPE_ID = "openai-clip-bpe-16e6"
CLIP_WORDS = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
              r"|[^\s\p{L}\p{N}]+")
_NUM_MERGES = 49152 - 256 - 2


def open_clip_file(name: str) -> str:
  """A data file shipped in the open_clip_torch wheel (the package is never imported)."""
  spec = importlib.util.find_spec("open_clip")
  path = spec and os.path.join(spec.submodule_search_locations[0], name)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"open_clip's {name} not found: run `pip install --no-deps "
                            "open_clip_torch==3.3.0`")
  return path


def clip_bpe_path() -> str:
  """CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz` of the open_clip_torch wheel)."""
  return open_clip_file("bpe_simple_vocab_16e6.txt.gz")


def byte_alphabet() -> list[str]:
  """CLIP/GPT-2's reversible map of the 256 bytes to printable characters."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
  return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def clip_merges(path: str) -> list[tuple[str, str]]:
  lines = gzip.open(path).read().decode("utf-8").split("\n")
  return [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]


def clean(text: str) -> str:
  """CLIP's `basic_clean`: repair mojibake, unescape HTML twice, strip."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clip_tokenizer(path: str) -> Tokenizer:
  merges = clip_merges(path)
  alphabet = byte_alphabet()
  tokens = (alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
            + ["<|startoftext|>", "<|endoftext|>"])
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   unk_token="<|endoftext|>", continuing_subword_prefix="",
                   end_of_word_suffix="</w>", fuse_unk=False)
  tokenizer = Tokenizer(bpe)
  tokenizer.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return tokenizer


class TextTokenizer:
  """Captions -> int32 `[B, 77]`.

  Args:
    directory: None for CLIP's BPE, or a local Hugging Face tokenizer
      directory holding `tokenizer.json` (its own special tokens are used).
  Attributes:
    name: the id written into dataset metadata.
    vocab_size, sot_id, eot_id, pad_id.
  """

  def __init__(self, directory: str | None = None):
    if directory is None:
      self._tokenizer = _clip_tokenizer(clip_bpe_path())
      self.name, self.sot_id, self.eot_id, self.pad_id = CLIP_BPE_ID, 49406, 49407, 0
      self._specials = True
    else:
      file = os.path.join(directory, "tokenizer.json")
      if not os.path.exists(file):
        raise FileNotFoundError(f"no tokenizer.json in {directory} (--tokenizer)")
      self._tokenizer = Tokenizer.from_file(file)
      self.name = os.path.abspath(directory)
      ends = self._tokenizer.encode("", add_special_tokens=True).ids
      self.sot_id, self.eot_id = (ends[0], ends[-1]) if ends else (None, None)
      self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0
      self._specials = False
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, texts: list[str], length: int = CONTEXT_LENGTH) -> np.ndarray:
    encoded = self._tokenizer.encode_batch([clean(t) for t in texts],
                                           add_special_tokens=not self._specials)
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, enc in zip(out, encoded):
      ids = [self.sot_id, *enc.ids, self.eot_id] if self._specials else list(enc.ids)
      if len(ids) > length:           # keep the end token
        ids = ids[:length - 1] + ids[-1:]
      row[:len(ids)] = ids
    return out
