"""Tests for common.models.bpe: the byte-level BPE trainer shared by lm_pretrain and GEM."""

from common.models import bpe

TEXTS = [
  'The mtcars data were extracted from the 1974 Motor Trend US magazine.',
  'The data give the speed of cars and the distances taken to stop.',
  'A data frame with 50 observations on 2 variables: speed and distance.',
  'Monthly airline passenger numbers 1949-1960, in thousands.',
] * 5
UNSEEN = ['naïve café — 東京 🚀', 'tab\tand\nnewline', '<|endoftext|> is just text here', '']


def test_special_tokens_take_the_first_ids_and_every_byte_is_in_the_vocab():
  tok = bpe.train_byte_level(TEXTS, 400, special_tokens=['<|pad|>', '<|endoftext|>'])
  assert tok.token_to_id('<|pad|>') == 0 and tok.token_to_id('<|endoftext|>') == 1
  vocab = tok.get_vocab()
  assert len(vocab) > 2 + 256  # some merges were learnt
  assert tok.get_vocab_size() <= 400
  singles = [t for t in vocab if len(t) == 1]
  assert len(singles) == 256  # the byte-level alphabet, seen in the texts or not


def test_any_text_round_trips():
  tok = bpe.train_byte_level(TEXTS, 300)
  for text in TEXTS[:2] + UNSEEN:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_training_is_deterministic_and_depends_on_its_arguments():
  here = bpe.train_byte_level(TEXTS, 300, special_tokens=['<|endoftext|>']).to_str()
  assert bpe.train_byte_level(iter(TEXTS), 300, special_tokens=['<|endoftext|>']).to_str() == here
  assert bpe.train_byte_level(TEXTS, 280, special_tokens=['<|endoftext|>']).to_str() != here
  assert bpe.train_byte_level(TEXTS, 300).to_str() != here


def _merged(tok) -> list[str]:
  return [t for t in tok.get_vocab() if len(t) > 1]


def test_min_frequency_keeps_rare_pairs_out():
  texts = ['aaaa bbbb'] * 3 + ['xyzw']  # the pairs of 'xyzw' occur once
  rare = bpe.train_byte_level(texts, 300, min_frequency=0)
  common_only = bpe.train_byte_level(texts, 300, min_frequency=2)
  assert 'xy' in _merged(rare) and 'xy' not in _merged(common_only)
  assert 'aa' in _merged(common_only)  # the frequent pairs are still merged
