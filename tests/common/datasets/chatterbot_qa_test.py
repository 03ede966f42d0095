"""chatterbot_qa: grouping by question key, the documented counts, split by question hash, the
deduplicated candidate pool and its relevance matrix, tiny TFDS build == the in-memory questions."""

import collections

import numpy as np
import pytest

from common import embeddings
from common.datasets import chatterbot_qa as cq


@pytest.fixture(scope='module')
def questions():
  return cq.questions()


def _split(questions, split):
  return [q for q in questions if cq.split_of(q.key) == split]


def test_key_groups_case_space_and_trailing_punctuation():
  assert cq.key('Will you  die?') == cq.key('will you die') == 'will you die'
  assert cq.key('Yes.') == cq.key('yes')
  assert cq.key('What is AI?') != cq.key('What is an AI?')
  assert cq.key('  ?! ') == ''


def test_counts_match_the_docstring(questions):
  pairs = [t for _, t in cq.conversations() if len(t) >= 2]
  assert len(pairs) == 2026
  assert len(questions) == 748
  assert len({cq.key(a) for q in questions for a in q.answers}) == 868
  assert sum(len(q.answers) > 1 for q in questions) == 75
  expected = {'train': (578, 695, 675), 'validation': (78, 91, 91), 'test': (92, 111, 111)}
  for split, (n_q, n_a, n_docs) in expected.items():
    rows = _split(questions, split)
    docs, relevant = cq.pool(rows)
    assert (len(rows), sum(len(q.answers) for q in rows), len(docs)) == (n_q, n_a, n_docs)
    assert relevant.shape == (n_q, n_docs)


def test_questions_are_unique_clean_and_keep_every_answer(questions):
  keys = [q.key for q in questions]
  assert len(set(keys)) == len(keys)
  first_answers = collections.defaultdict(set)
  for _, turns in cq.conversations():
    first_answers[cq.key(turns[0])].add(cq.key(turns[1]))
  for q in questions:
    assert q.question.strip() == q.question and q.question and q.key == cq.key(q.question)
    assert all(a.strip() == a and a for a in q.answers)
    assert len({cq.key(a) for a in q.answers}) == len(q.answers)  # distinct answers
    assert {cq.key(a) for a in q.answers} == first_answers[q.key]  # none dropped
  # 'Are you sentient?' is asked three times in ai.yml with three different answers.
  (sentient,) = [q for q in questions if q.key == 'are you sentient']
  assert len(sentient.answers) == 3 and sentient.topic == 'ai'
  # tech_support.yml: 1,050 conversations, 10 distinct (question, answer) pairs.
  assert sum(q.topic == 'tech_support' for q in questions) == 10


def test_splits_partition_the_questions_and_cover_the_topics(questions):
  splits = {s: {q.key for q in _split(questions, s)} for s in cq.SPLITS}
  assert sum(map(len, splits.values())) == len(questions)
  assert not (splits['train'] & splits['validation'] or splits['train'] & splits['test'])
  assert not splits['validation'] & splits['test']
  files = {p.stem for p in cq.corpus_dir().glob('*.yml')}
  assert len(files) == 21 and {q.topic for q in questions} == files
  assert len({q.topic for q in _split(questions, 'validation')}) >= 10
  assert cq.split_of('are you sentient') == cq.split_of('are you sentient')  # pure function


def test_pool_has_no_duplicate_documents_and_every_answer_is_relevant():
  rows = [
    cq.Question('a', 'A?', ('Paris', 'In France.'), 't'),
    cq.Question('b', 'B?', ('paris.',), 't'),  # same answer key as 'Paris'
    cq.Question('c', 'C?', ('Yes',), 't'),
  ]
  docs, relevant = cq.pool(rows)
  assert docs == ['Paris', 'In France.', 'Yes']
  np.testing.assert_array_equal(relevant, [[1, 1, 0], [1, 0, 0], [0, 0, 1]])
  # Scores that rank exactly the relevant answers first give perfect metrics.
  m = embeddings.retrieval_metrics(relevant.astype(float), relevant, ks=(1, 2))
  assert m['recall@2'] == m['mrr'] == m['ndcg@10'] == 1.0
  assert cq.chance_recall_at(10, 91) == pytest.approx(10 / 91)
  assert cq.chance_recall_at(10, 4) == 1.0


def test_chance_recall_matches_random_rankings(questions):
  rows = _split(questions, 'validation')
  docs, relevant = cq.pool(rows)
  rng = np.random.default_rng(0)
  got = np.mean(
    [
      embeddings.retrieval_metrics(rng.random(relevant.shape), relevant, ks=(10,))['recall@10']
      for _ in range(200)
    ]
  )
  assert got == pytest.approx(cq.chance_recall_at(10, len(docs)), abs=0.01)


def test_tiny_build_round_trips_and_is_deterministic(tmp_path, questions):
  by_key = {q.key: q for q in questions}
  first = {s: cq.load(s, 'tiny', tmp_path) for s in cq.SPLITS}
  again = {s: cq.load(s, 'tiny', tmp_path) for s in cq.SPLITS}
  assert first == again
  for split, rows in first.items():
    assert len(rows) == 10
    for q in rows:
      assert cq.split_of(q.key) == split
      assert by_key[q.key] == q  # the stored example is the in-memory one, answers in order
