"""Token streams for LM pretraining: real English text (default) or the procedural Markov language.

`data.source` picks the stream:

  * a TFDS text data set with a 'text' feature (default 'rdatasets_docs', the R data-set help
    pages; 'rdatasets_docs/tiny' for tests). A byte-level BPE tokenizer (common.models.bpe) is trained on
    the train split only and saved in the workdir as tokenizer.json, which a resumed run reloads.
    Each split's documents are tokenized and PACKED: concatenated in the data set's (fixed) order,
    each followed by an EOS token, and cut into consecutive chunks of seq_len + 1 tokens (the last
    partial chunk is dropped), so example i is a deterministic function of i and every token of the
    stream appears in exactly one example. Training shuffles these chunks per epoch (seed
    data.seed); evaluation reads the first data.eval_examples chunks of the validation split.
  * 'markov': common.data.MarkovLanguage, whose exact entropy rate is known; train and eval draw
    from disjoint example indices of the same seeded language.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from common import cache
from common import config as config_lib
from common import data
from common import metrics as metrics_lib
from common.models import bpe

MARKOV = 'markov'
EOS = '<|endoftext|>'
TOKENIZER_FILE = 'tokenizer.json'
# BPE merges need a pair seen at least this often in the train split.
MIN_PAIR_FREQUENCY = 2
# Eval examples of the Markov language start far beyond any train index, so the two never overlap.
EVAL_OFFSET = 1 << 40


# ---------------------------------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE tokenizer (GPT-2 style) with EOS as id 0, trained on `texts`.

  Byte-level: every string round-trips exactly (decode(encode(s)) == s) and nothing is unknown.
  Deterministic: the same texts and vocab_size give the same tokenizer.json, byte for byte.
  """
  tok = bpe.train_byte_level(
    texts, vocab_size, special_tokens=[EOS], min_frequency=MIN_PAIR_FREQUENCY
  )
  return _text_only(tok)


def _text_only(tok):
  # Text that happens to contain '<|endoftext|>' is encoded as ordinary bytes; EOS ids come only
  # from `pack`. (A runtime setting that tokenizer.json does not store: set on every load.)
  tok.encode_special_tokens = True
  return tok


def load_tokenizer(path: str | os.PathLike):
  from tokenizers import Tokenizer  # noqa: PLC0415

  return _text_only(Tokenizer.from_file(os.fspath(path)))


def eos_id(tokenizer) -> int:
  return tokenizer.token_to_id(EOS)


def token_byte_lengths(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token id stands for; EOS counts as one byte (a document separator).

  In a byte-level BPE every character of a token's string is exactly one byte.
  """
  lengths = np.zeros(tokenizer.get_vocab_size(), np.int64)
  for token, i in tokenizer.get_vocab().items():
    lengths[i] = len(token)
  lengths[eos_id(tokenizer)] = 1
  return lengths


def _digest(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  ckpts = workdir / 'checkpoints'
  return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None):
  """The run's tokenizer; a run resuming from its workdir's checkpoints reloads tokenizer.json.

  Otherwise it is trained on the train split and written to workdir/tokenizer.json (process 0).
  Training is deterministic, so its result is also memoised in the monorepo cache (keyed by the data
  set's name/config/version, the vocab size and the `tokenizers` version), sparing fresh workdirs the
  few seconds it takes.
  """
  import tokenizers  # noqa: PLC0415

  vocab_size = config.data.vocab_size
  local = pathlib.Path(workdir) / TOKENIZER_FILE if workdir is not None else None
  if local is not None and _has_checkpoint(local.parent):
    if not local.is_file():
      raise config_lib.ConfigError(f'{local} is missing: the checkpoints here were trained with it')
    metrics_lib.log('reusing the tokenizer of this run: %s', local)
    return load_tokenizer(local)
  builder = data.prepare(config.data.source)
  key = _digest(
    builder.info.full_name, 'train', vocab_size, MIN_PAIR_FREQUENCY, tokenizers.__version__
  )
  cached = cache.cache_dir('lm_pretrain', 'tokenizers') / f'{key}.json'
  if cached.is_file():
    tok = load_tokenizer(cached)
  else:
    tok = train_tokenizer(documents(config.data.source, 'train'), vocab_size)
    cache.write_text(cached, tok.to_str())
  if tok.get_vocab_size() != vocab_size:
    # A corpus too small for the requested merges (e.g. a tiny test subset) gives fewer tokens: the
    # model keeps data.vocab_size rows and the unused ones are never targets.
    metrics_lib.log('tokenizer has %d tokens (asked for %d)', tok.get_vocab_size(), vocab_size)
  if local is not None and jax.process_index() == 0:
    local.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(local, tok.to_str())
  return tok


# ---------------------------------------------------------------------------------------------------
# Documents, packing.


def documents(source: str, split: str) -> list[str]:
  """The split's documents (the data set's 'text' feature) in the data set's fixed order."""
  ds = data.tfds_source(source, split)
  return [ex['text'].decode('utf-8') for ex in ds.__getitems__(range(len(ds)))]


def pack(docs: Sequence[Sequence[int]], eos: int) -> np.ndarray:
  """One token stream: each document followed by `eos`, in order."""
  lengths = np.array([len(d) + 1 for d in docs], np.int64)
  out = np.full(int(lengths.sum()), eos, np.int32)
  ends = np.cumsum(lengths)
  for doc, end, n in zip(docs, ends, lengths, strict=True):
    out[end - n : end - 1] = doc
  return out


class PackedSequences:
  """Random-access chunks of a token stream: example i = {'tokens': stream[i*(L+1) : (i+1)*(L+1)]}.

  Consecutive, non-overlapping chunks of L+1 tokens (inputs are the first L, targets the last L); the
  partial chunk at the end is dropped. `limit` keeps only the first `limit` chunks.
  """

  def __init__(self, stream: np.ndarray, seq_len: int, limit: int | None = None):
    self.stream, self.seq_len = np.asarray(stream), seq_len
    n = len(self.stream) // (seq_len + 1)
    self.num_examples = n if limit is None or limit < 0 else min(n, limit)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'example {index} out of range [0, {self.num_examples})')
    w = self.seq_len + 1
    return {'tokens': self.stream[index * w : (index + 1) * w].copy()}


def token_stream(source: str, split: str, tokenizer) -> np.ndarray:
  """The split tokenized and packed; memoised in the cache by (tokenizer file, data set, split)."""
  builder = data.prepare(source)
  key = _digest(tokenizer.to_str(), builder.info.full_name, split)
  path = cache.cache_dir('lm_pretrain', 'tokens') / f'{key}.npy'
  if path.is_file():
    return np.load(path)
  encoded = tokenizer.encode_batch_fast(documents(source, split), add_special_tokens=False)
  stream = pack([e.ids for e in encoded], eos_id(tokenizer))
  with cache.atomic_path(path) as tmp:
    np.save(tmp, stream)
  return stream


# ---------------------------------------------------------------------------------------------------
# Sources for train_and_evaluate.


class _Offset:
  """A view of a random-access source shifted by `offset` indices."""

  def __init__(self, source, offset: int, length: int):
    self.source, self.offset, self.length = source, offset, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    return self.source[self.offset + i]


@dataclasses.dataclass
class Data:
  """What training and evaluation read. Text fields are None for the Markov source and vice versa."""

  train: Any  # random-access source of {'tokens': int32 [seq_len + 1]}
  eval: Any  # the fixed held-out examples (a multiple of the batch size)
  vocab_size: int  # tokens that can occur (<= config.data.vocab_size, the model's vocabulary)
  train_counts: np.ndarray  # unigram counts of train targets, for the baseline
  tokenizer: Any = None
  byte_lengths: np.ndarray | None = None  # bytes per token id, for bits per byte
  language: data.MarkovLanguage | None = None


def language(config: ml_collections.ConfigDict) -> data.MarkovLanguage:
  d = config.data
  return data.MarkovLanguage(
    d.vocab_size,
    d.seq_len,
    seed=d.seed,
    branching=d.branching,
    alpha=d.alpha,
    num_examples=EVAL_OFFSET + max(d.eval_examples, 0),
  )


def _eval_count(config: ml_collections.ConfigDict, available: int) -> int:
  d = config.data
  n = available if d.eval_examples < 0 else min(d.eval_examples, available)
  n -= n % d.batch_size
  if n == 0:
    raise config_lib.ConfigError(
      f'data.eval_examples={d.eval_examples} leaves no full eval batch of {d.batch_size} '
      f'({available} held-out sequences of {d.seq_len + 1} tokens available)'
    )
  return n


def make_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Data:
  d = config.data
  if d.source == MARKOV:
    if d.eval_examples < 0:
      raise config_lib.ConfigError('data.eval_examples must be >= 0 for the markov source')
    lang = language(config)
    counts = np.zeros(d.vocab_size, np.int64)
    for i in range(512):  # the unigram baseline's fit: targets of the first 512 train examples
      counts += np.bincount(lang[i]['tokens'][1:], minlength=d.vocab_size)
    return Data(
      train=_Offset(lang, 0, EVAL_OFFSET),
      eval=_Offset(lang, EVAL_OFFSET, _eval_count(config, d.eval_examples)),
      vocab_size=d.vocab_size,
      train_counts=counts,
      language=lang,
    )
  tok = tokenizer_for(config, workdir)
  vocab = tok.get_vocab_size()
  if vocab > d.vocab_size:
    raise config_lib.ConfigError(f'tokenizer has {vocab} tokens > data.vocab_size {d.vocab_size}')
  train_stream = token_stream(d.source, 'train', tok)
  held = PackedSequences(token_stream(d.source, d.eval_split, tok), d.seq_len)
  train = PackedSequences(train_stream, d.seq_len)
  if len(train) < d.batch_size:
    raise config_lib.ConfigError(
      f'{d.source} train split has {len(train)} sequences of {d.seq_len + 1} tokens, fewer than '
      f'one batch of {d.batch_size}'
    )
  metrics_lib.log(
    '%s: %d train tokens (%d sequences), %s: %d sequences, %d used for eval; vocab %d',
    d.source,
    len(train_stream),
    len(train),
    d.eval_split,
    len(held),
    _eval_count(config, len(held)),
    vocab,
  )
  counts = np.bincount(train.stream[: len(train) * (d.seq_len + 1)], minlength=vocab)
  return Data(
    train=train,
    eval=PackedSequences(held.stream, d.seq_len, _eval_count(config, len(held))),
    vocab_size=vocab,
    train_counts=counts,
    tokenizer=tok,
    byte_lengths=token_byte_lengths(tok),
  )


def train_iterator(config: ml_collections.ConfigDict, d: Data):
  shuffle = None if d.language is not None else config.data.seed  # the language is endless
  return data.batch_iterator(
    d.train, global_batch_size=config.data.batch_size, shuffle_seed=shuffle
  )


def eval_batches(
  config: ml_collections.ConfigDict, d: Data, process_index: int, process_count: int
) -> list[dict[str, np.ndarray]]:
  """The fixed held-out set as a list of process-local batches (identical at every evaluation)."""
  it = data.batch_iterator(
    d.eval,
    global_batch_size=config.data.batch_size,
    num_epochs=1,
    process_index=process_index,
    process_count=process_count,
    prefetch=0,
  )
  return list(it)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The data keys, checked before the run creates its workdir (one line per problem)."""
  d = config.data
  if d.batch_size < 1 or d.batch_size % jax.process_count():
    raise config_lib.ConfigError(
      f'data.batch_size={d.batch_size} must be >= 1 and divisible by the {jax.process_count()} '
      'process(es)'
    )
  if d.seq_len < 1 or d.vocab_size < 2:
    raise config_lib.ConfigError(
      f'data.seq_len={d.seq_len} must be >= 1 and data.vocab_size={d.vocab_size} >= 2'
    )
  if d.source != MARKOV:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
      data.builder(d.source)
    except tfds.core.registered.DatasetNotFoundError:
      raise config_lib.ConfigError(
        f"data.source={d.source!r} is neither 'markov' nor a registered TFDS text data set "
        "(e.g. 'rdatasets_docs')"
      ) from None
