"""Token streams for LM pretraining: the procedural Markov language (real text arrives with the data
issue). Train and eval draw from disjoint example indices of the same seeded language."""

from __future__ import annotations

import ml_collections

from common import data

# Eval examples start far beyond any train index, so the two never overlap.
EVAL_OFFSET = 1 << 40


class _Offset:
  """A view of a random-access source shifted by `offset` indices."""

  def __init__(self, source, offset: int, length: int):
    self.source, self.offset, self.length = source, offset, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    return self.source[self.offset + i]


def language(config: ml_collections.ConfigDict) -> data.MarkovLanguage:
  d = config.data
  return data.MarkovLanguage(
    d.vocab_size,
    d.seq_len,
    seed=d.seed,
    branching=d.branching,
    alpha=d.alpha,
    num_examples=EVAL_OFFSET + d.eval_examples,
  )


def train_iterator(config: ml_collections.ConfigDict):
  lang = language(config)
  return data.batch_iterator(
    _Offset(lang, 0, EVAL_OFFSET), global_batch_size=config.data.batch_size
  )


def eval_batches(config: ml_collections.ConfigDict, process_index: int, process_count: int):
  """The fixed held-out set as a list of process-local batches (identical at every evaluation)."""
  lang = language(config)
  source = _Offset(lang, EVAL_OFFSET, config.data.eval_examples)
  it = data.batch_iterator(
    source,
    global_batch_size=config.data.batch_size,
    num_epochs=1,
    process_index=process_index,
    process_count=process_count,
    prefetch=0,
  )
  return list(it)
