"""rdatasets_titles: title/description parsing, skip rules, split = the corpus's, tiny TFDS build."""

import pytest

from common.datasets import rdatasets_titles
from common.datasets import text_corpus

PAGE = """USMacroSWM| R Documentation
---|---

## Monthly US Macroeconomic Data (1947-2004, _Stock & Watson_)

### Description

Time series data on 4 US macroeconomic
variables for 1947-2004\\.

### Usage

    data("USMacroSWM")
"""


def test_title_and_description_of_a_page():
  title, desc = rdatasets_titles.title_and_description(PAGE)
  assert title == 'Monthly US Macroeconomic Data (1947-2004, Stock & Watson)'
  assert desc == 'Time series data on 4 US macroeconomic variables for 1947-2004.'
  assert rdatasets_titles.title_and_description('no headings here') == ('', '')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  return {s: rdatasets_titles.load(s, 'tiny', root) for s in text_corpus.SPLITS}


def test_tiny_build_pairs_are_clean_unique_and_split_like_the_corpus(tiny):
  found, skipped = rdatasets_titles.pairs(10)
  assert set(skipped) <= {'no_title', 'no_description', 'short_description', 'duplicate'}
  for split, rows in tiny.items():
    assert len(rows) == 10
    for doc_id, title, desc in rows:
      assert text_corpus.split_of(doc_id) == split
      assert found[doc_id] == (title, desc)
      assert len(desc.split()) >= rdatasets_titles.MIN_WORDS and title
      assert '##' not in title and '###' not in desc
  titles = [t.lower() for rows in tiny.values() for _, t, _ in rows]
  assert len(set(titles)) == len(titles)
