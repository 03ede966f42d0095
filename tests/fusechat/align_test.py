"""Cross-tokenizer alignment: identical tokenizers give the identity, the mapping is deterministic,
DTW on a constructed case, spans and the teacher transfer."""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np
import pytest

from common import text
from common.models import bpe
from common.models import spec
from projects.fusechat import align
from projects.fusechat import corpora

TEXTS = [
  "The data frame has 32 rows and 11 variables: mpg, cyl, disp and hp.",
  ">>> rev('plum')\n'mulp'\n>>> up('kiwi')\n'KIWI'\n",
  'A numeric vector giving the weight of each chick, in grams.',
  'Measurements of the sepal length and width, in centimetres, of 150 irises.',
] * 4


@functools.cache
def _tok(vocab_size: int, which: str):
  texts = TEXTS if which == 'all' else TEXTS[::2]
  raw = bpe.train_byte_level(texts, vocab_size, special_tokens=['<|endoftext|>'])
  path = pathlib.Path(tempfile.mkdtemp()) / 'tokenizer.json'
  raw.save(str(path))
  return spec.file_tokenizer(path, eos='<|endoftext|>')


def _pairs(a, b, texts):
  out = []
  for t in texts:
    a_ids, b_ids = a.encode(t, add_bos=False), b.encode(t, add_bos=False)
    out.append((a_ids, b_ids, align.align_tokens(a, a_ids, b, b_ids)))
  return out


def test_spans_cover_the_text():
  tok = _tok(300, 'all')
  for t in TEXTS[:4]:
    ids = tok.encode(t, add_bos=False)
    text, sp = align.spans(tok, ids)
    assert text == t
    assert sp[0][0] == 0 and sp[-1][1] == len(t)
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(sp, sp[1:], strict=False))
    assert ''.join(t[s:e] for s, e in sp) == t


def test_identical_tokenizers_give_the_identity():
  tok = _tok(300, 'all')
  for a_ids, _, aligned in _pairs(tok, tok, TEXTS[:4]):
    assert aligned == [(i, i) for i in range(len(a_ids))]
  mapping = align.vocab_mapping(tok, tok, _pairs(tok, tok, TEXTS))
  np.testing.assert_array_equal(mapping, np.arange(tok.vocab_size))


def test_mapping_is_deterministic_and_order_free():
  a, b = _tok(300, 'all'), _tok(270, 'half')
  assert a.vocab_size != b.vocab_size
  pairs = _pairs(a, b, TEXTS)
  m1 = align.vocab_mapping(a, b, pairs)
  m2 = align.vocab_mapping(a, b, _pairs(a, b, TEXTS))
  m3 = align.vocab_mapping(a, b, pairs[::-1])
  np.testing.assert_array_equal(m1, m2)
  np.testing.assert_array_equal(m1, m3)
  assert m1.shape == (a.vocab_size,) and m1.max() < b.vocab_size
  assert (m1 >= 0).sum() > a.vocab_size // 2


def test_most_frequent_target_wins():
  a = b = _tok(300, 'all')
  x, y, z = 5, 6, 7
  pairs = [([x], [y], [(0, 0)])] * 2 + [([x], [z], [(0, 0)])] * 3 + [([y], [z], [(0, 0)])]
  m = align.vocab_mapping(a, b, pairs)
  assert m[x] == z and m[y] == z
  # a tie goes to the smaller target id
  m = align.vocab_mapping(a, b, [([x], [z], [(0, 0)]), ([x], [y], [(0, 0)])])
  assert m[x] == min(y, z)


def test_dtw_on_a_constructed_case():
  # 'abcd' as [ab, c, d] and [a, b, c, d]: 'ab' spans a and b (many-to-one), c and d one-to-one.
  a_sp, b_sp = [(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]
  path = align.dtw(a_sp, b_sp, ['ab', 'c', 'd'], ['a', 'b', 'c', 'd'])
  assert path == [(0, 0), (0, 1), (1, 2), (2, 3)]
  assert text.edit_distance('kitten', 'sitting') == 3


def test_transfer_maps_merges_and_falls_back_to_gold():
  k = 3
  src_ids = np.array([[1, 2, 3], [4, 5, 6]])
  src_logp = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
  mapping = np.array([-1, 10, 10, 11, 12, -1, -1])  # 1 and 2 both map to 10; 5, 6 unmapped
  ids, probs = align.transfer(src_ids, src_logp, mapping, [(0, 1), (1, 2)], np.array([7, 8, 9]), 4)
  assert ids.shape == (4, k)
  # position 0: not aligned -> one-hot gold 7
  assert ids[0, 0] == 7 and probs[0].tolist() == [1.0, 0.0, 0.0]
  # position 1: 0.5 + 0.3 on 10, 0.2 on 11
  assert ids[1, :2].tolist() == [10, 11]
  np.testing.assert_allclose(probs[1, :2], [0.8, 0.2], rtol=1e-6)
  # position 2: only id 4 -> 12 survives, renormalised to 1
  assert ids[2, 0] == 12 and probs[2, 0] == pytest.approx(1.0)
  # position 3: beyond the target's tokens: nothing scored there (zeros)
  assert probs[3].sum() == 0
  np.testing.assert_allclose(probs[:3].sum(-1), 1.0, rtol=1e-6)


def test_code_items_have_one_right_answer():
  items = corpora.code_items(20, seed=0)
  for it in items:
    assert len(set(it.choices)) == 4
    word = it.context.split("'")[1]
    op = it.context.split('(')[0].removeprefix('>>> ')
    assert it.choices[it.label] == f"'{corpora.OPS[op](word)}'\n"
