"""A direct pure-Python BPE over CLIP's merges file, for checking the tokenizer.

Greedy lowest-rank pair merging inside each regex word, `</w>` on the last
symbol — the algorithm of CLIP's reference tokenizer, written out plainly.
"""

import regex

from dinorank_jax.data.tokenizer import (CLIP_WORDS, byte_alphabet, clean, clip_bpe_path,
                                         clip_merges)


class ReferenceBPE:
  def __init__(self):
    merges = clip_merges(clip_bpe_path())
    self.ranks = {m: i for i, m in enumerate(merges)}
    alphabet = byte_alphabet()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    order = printable + [b for b in range(256) if b not in printable]
    self.byte_char = {b: alphabet[i] for i, b in enumerate(order)}
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    self.vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    self.pattern = regex.compile(CLIP_WORDS, regex.IGNORECASE)

  def _word(self, word):
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
      rank, i = min(pairs)
      if rank == float("inf"):
        break
      symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols

  def encode(self, text):
    text = " ".join(clean(text).split()).lower()
    ids = [self.vocab["<|startoftext|>"]]
    for word in self.pattern.findall(text):
      word = "".join(self.byte_char[b] for b in word.encode("utf-8"))
      ids += [self.vocab[s] for s in self._word(word)]
    return ids + [self.vocab["<|endoftext|>"]]
