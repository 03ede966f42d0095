"""`chatterbot_qa`: a real-text retrieval set, chatterbot-corpus questions vs their answers.

The pinned `chatterbot-corpus==1.3.3` wheel ships 21 English topic files
(`chatterbot_corpus/data/english/*.yml`, YAML `conversations:` lists of turns, 2,026 conversations).
Retrieval is "find an answer of this question among all answers of the split", scored by Recall@k,
MRR and nDCG@10 (common.embeddings) with a [Q, N] relevance matrix. This is an in-domain proxy for
MTEB-style retrieval, not an MTEB task; say so when reporting.

Construction (deterministic: files in name order, conversations in file order):
  * a pair is the (first turn, second turn) of a conversation; later turns are not used (80
    conversations have 3 to 88 turns, whose later turns answer the dialogue, not the first
    question);
  * questions are grouped by `key` (case-folded, whitespace collapsed, trailing '?', '.', '!'
    dropped): 'Will you die?' and 'Will you die' are one question. One example per distinct
    question, with every distinct answer it has (in order of first appearance): the corpus repeats
    questions with different answers (botprofile, ai: 'Are you sentient?' has 3), and all of them
    are correct, so none is dropped and any of them counts as relevant. The topic is the file of
    the question's first appearance (3 questions appear in two files);
  * tech_support.yml is 1,050 copies of 10 (question, answer) pairs: grouping makes it 10 examples;
  * the split is `split_of(key)`, a hash of the question key alone (80% train, 10% validation, 10%
    test), so a question and its answers are in one split only. An answer text can still occur in
    two splits when two different questions share it ('Paris', 'Yes.': 9 answer texts do);
  * within a split, answers are deduplicated by `key` into the candidate pool (`pool`), so no
    document appears twice; a shared answer is one candidate relevant to each of its questions.

Counts (version 1.0.0): 2,026 first-turn pairs, 748 distinct questions, 868 distinct answers (by
key); 75 questions have more than one answer (up to 30). Per split, questions / their answers /
distinct candidates in the pool: train 578 / 695 / 675, validation 78 / 91 / 91, test 92 / 111 /
111. `tests/common/datasets/chatterbot_qa_test.py` checks these numbers.

Chance level of Recall@k with every answer of the split a candidate: a random ranking puts each
relevant answer in the top k with probability k/N, so chance Recall@10 = 10/N (0.110 on the
validation split's 91 candidates), whatever the number of relevant answers per question.

Examples are {'key', 'question', 'answers' (a sequence), 'topic'} (bytes when read without
TensorFlow). BSD-3 data read from the installed wheel at build time, built into the cache outside the
repo, never committed.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import hashlib
import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from common.datasets import base

SPLITS = ('train', 'validation', 'test')
_SPLIT_PERCENT = {'train': 80, 'validation': 10, 'test': 10}


@dataclasses.dataclass(frozen=True)
class Question:
  key: str
  question: str
  answers: tuple[str, ...]
  topic: str


def key(text: str) -> str:
  """Grouping key of a turn: case-folded, whitespace collapsed, trailing '?.!' and spaces dropped."""
  return ' '.join(text.casefold().split()).rstrip('?.! ')


def split_of(question_key: str) -> str:
  """'train' | 'validation' | 'test' from a hash of the question key alone (stable)."""
  bucket = int.from_bytes(hashlib.sha256(question_key.encode()).digest()[:8], 'big') % 100
  edge = 0
  for split in SPLITS:
    edge += _SPLIT_PERCENT[split]
    if bucket < edge:
      return split
  raise AssertionError('split percentages must sum to 100')


def corpus_dir() -> pathlib.Path:
  """The installed wheel's English YAML folder (located without importing the package)."""
  spec = importlib.util.find_spec('chatterbot_corpus')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError('chatterbot-corpus is not installed: pip install -r requirements.txt')
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data' / 'english'


def conversations() -> list[tuple[str, list[str]]]:
  """[(topic, turns)] of every English file in name order, turns as the YAML gives them."""
  import yaml  # noqa: PLC0415

  out = []
  files = sorted(corpus_dir().glob('*.yml'))
  if not files:
    raise FileNotFoundError(f'no chatterbot-corpus English files in {corpus_dir()}')
  for path in files:
    doc = yaml.safe_load(path.read_text(encoding='utf-8'))
    for turns in doc.get('conversations') or []:
      out.append((path.stem, [str(t) for t in turns]))
  return out


def questions() -> list[Question]:
  """One Question per distinct first turn (by key), in order of first appearance."""
  found: dict[str, tuple[str, list[str], set[str], str]] = {}
  for topic, turns in conversations():
    if len(turns) < 2:
      continue
    q, a = turns[0].strip(), turns[1].strip()
    if not key(q) or not key(a):
      continue  # nothing to retrieve with or to retrieve
    k = key(q)
    if k not in found:
      found[k] = (q, [], set(), topic)
    _, answers, seen, _ = found[k]
    if key(a) not in seen:
      seen.add(key(a))
      answers.append(a)
  return [Question(k, q, tuple(ans), t) for k, (q, ans, _, t) in found.items()]


def pool(rows: list[Question]) -> tuple[list[str], np.ndarray]:
  """(candidate answers, [Q, N] bool relevance) of a split: every distinct answer (by key) once,
  in order of first appearance; relevant[i, j] when answer j is one of question i's answers."""
  index: dict[str, int] = {}
  docs: list[str] = []
  for r in rows:
    for a in r.answers:
      if key(a) not in index:
        index[key(a)] = len(docs)
        docs.append(a)
  relevant = np.zeros((len(rows), len(docs)), bool)
  for i, r in enumerate(rows):
    for a in r.answers:
      relevant[i, index[key(a)]] = True
  return docs, relevant


def chance_recall_at(k: int, num_candidates: int) -> float:
  """Expected Recall@k of a uniformly random ranking: each relevant answer is in the top k w.p. k/N."""
  return min(k, num_candidates) / num_candidates


@dataclasses.dataclass(eq=False)
class ChatterbotQaConfig(tfds.core.BuilderConfig):
  max_per_split: int | None = None


class ChatterbotQa(base.ArrayRecordBuilder):
  """Question -> answers retrieval examples from chatterbot-corpus (see the module docstring).

  Configs: 'full' (default) and 'tiny' (the first 10 questions of each split, for tests).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
    '1.0.0': 'chatterbot-corpus 1.3.3 English first-turn pairs grouped by question, 80/10/10.'
  }
  BUILDER_CONFIGS = [
    ChatterbotQaConfig(name='full', description='every distinct question'),
    ChatterbotQaConfig(name='tiny', description='10 questions per split', max_per_split=10),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'full'
  HOMEPAGE = 'https://pypi.org/project/chatterbot-corpus/1.3.3/'
  LICENSE = 'BSD-3-Clause (chatterbot-corpus)'

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
      {
        'key': tfds.features.Text(),
        'question': tfds.features.Text(),
        'answers': tfds.features.Sequence(tfds.features.Text()),
        'topic': tfds.features.Text(),
      }
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the text ships in the pinned wheel
    found = questions()
    return {split: self._generate_examples(found, split) for split in SPLITS}

  def _generate_examples(self, found: list[Question], split: str) -> Iterator[tuple[str, dict]]:
    limit = self.builder_config.max_per_split
    n = 0
    for q in found:
      if split_of(q.key) != split:
        continue
      if limit is not None and n >= limit:
        return
      n += 1
      yield (
        q.key,
        {'key': q.key, 'question': q.question, 'answers': list(q.answers), 'topic': q.topic},
      )


def _text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def load(split: str, config: str = 'full', data_dir=None) -> list[Question]:
  """The split's Questions in key order (tfds' order), building the data set once if needed."""
  builder = ChatterbotQa(
    config=config, data_dir=str(data_dir or base.data_dir()), file_format='array_record'
  )
  src = base.tfds_source(builder, split)
  out = []
  for i in range(len(src)):
    r = src[i]
    out.append(
      Question(
        _text(r['key']),
        _text(r['question']),
        tuple(_text(a) for a in r['answers']),
        _text(r['topic']),
      )
    )
  return out
