"""Tests for common.datasets.reasoning_gym: the TFDS build, split hygiene, extraction and scoring."""

import json

import pytest

from common import data
from common.datasets import reasoning_gym as rgd


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  data.prepare('reasoning_gym/tiny', root)
  return root


def _rows(source):
  return [source[i] for i in range(len(source))]


def test_tiny_build_reads_back_with_every_field_and_scores_its_own_gold_answers(tiny_dir):
  train = _rows(data.tfds_source('reasoning_gym/tiny', 'train', tiny_dir))
  test = _rows(data.tfds_source('reasoning_gym/tiny', 'test', tiny_dir))
  assert len(train) == 20  # 12 chain_sum + 8 leg_counting
  assert 0 < len(test) <= 10
  for row in train + test:
    assert set(row) == {
      'example_id',
      'index',
      'task',
      'question',
      'answer',
      'metadata',
      'task_config',
    }
    task = row['task'].decode()
    assert task in ('chain_sum', 'leg_counting')
    assert row['example_id'].decode().startswith(f'{task}/')
    json.loads(row['metadata'])
    # The stored metadata is enough for the re-created scorer to accept the gold answer.
    assert rgd.score(task, row['answer'].decode(), row, extract=False) == 1.0
  # Indices are the positions in the split; tasks interleave round-robin.
  assert sorted(int(r['index']) for r in train) == list(range(20))
  by_index = sorted(train, key=lambda r: int(r['index']))
  assert [r['task'].decode() for r in by_index[:4]] == ['chain_sum', 'leg_counting'] * 2
  ids = [r['example_id'] for r in train + test]
  assert len(set(ids)) == len(ids)


def test_splits_come_from_disjoint_seeds_and_test_never_repeats_a_train_question():
  spec = rgd.TaskSpec.make('chain_sum', 300, 300, min_terms=2, max_terms=2, max_digits=1)
  rows = rgd.examples([spec], seed=3)
  train_q = {r['question'] for r in rows['train']}
  assert rows['test'], 'dedup removed everything'
  assert not train_q & {r['question'] for r in rows['test']}
  assert len(rows['test']) < 300  # a 1-digit two-term question space is small: some were dropped
  assert rgd.split_seed(3, 'train') != rgd.split_seed(3, 'test')
  # Deterministic: the same seed gives the same examples; another seed different ones.
  assert rgd.examples([spec], seed=3) == rows
  assert rgd.examples([spec], seed=4)['train'] != rows['train']


def test_custom_config_names_are_stable_and_bad_tasks_fail_clearly():
  a = rgd.make_config([('chain_sum', 4, 2), ('leg_counting', 3, 1)], seed=1)
  b = rgd.make_config([('chain_sum', 4, 2), ('leg_counting', 3, 1)], seed=1)
  c = rgd.make_config([('chain_sum', 4, 2), ('leg_counting', 3, 1)], seed=2)
  assert a.name == b.name != c.name
  with pytest.raises(ValueError, match='unknown reasoning-gym task'):
    rgd.make_config([('no_such_task', 1, 1)])
  with pytest.raises(ValueError, match='unknown split'):
    rgd.split_seed(0, 'validation')


@pytest.mark.parametrize(
  'text, expected',
  [
    ('Let me think. 3 + 4 = 7\n#### 7', '7'),
    ('so the result is \\boxed{-12}.', '-12'),
    ('\\boxed{\\frac{1}{2}} no', '\\frac{1}{2}'),
    ('The answer is 42.', '42'),
    ('Final answer: 1,234 apples', '1234'),
    ('<answer> 15 </answer>', '15'),
    ('first 3 then 5 then 8', '8'),
    ('We get \u22124', '-4'),
    ('it is 12.50', '12.5'),
    ('7.0', '7'),
    ('The answer is yes', 'yes'),
    # SmolLM2-135M: a marker with no answer after it falls through to the last number.
    ('1 - 8 - 10 = -17\n\nThis is the final answer.', '-17'),
    ('The answer is: 6. Final answer.', '6'),
    ('no digits here\nFalse.', 'False'),
    ('', None),
    ('   \n ', None),
    (None, None),
  ],
)
def test_extract_answer_tolerates_the_formats_models_emit(text, expected):
  assert rgd.extract_answer(text) == expected


def test_score_counts_failures_instead_of_raising():
  rows = rgd.examples([rgd.TaskSpec.make('chain_sum', 2, 0)], seed=0)['train']
  row = rows[0]
  gold = row['answer']
  rgd.reset_score_failures()
  assert rgd.score('chain_sum', f'Working... #### {gold}', row) == 1.0
  assert rgd.score('chain_sum', f'{int(gold) + 1}', row, binary=True) == 0.0
  assert rgd.score('chain_sum', '', row) == 0.0
  assert rgd.score('chain_sum', None, row) == 0.0
  broken = dict(row, answer=None, metadata='{not json')
  assert rgd.score('chain_sum', '5', broken) == 0.0
  assert rgd.score('no_such_task', '5', row) == 0.0
  assert rgd.score_failures() == {'empty': 2, 'exception': 2}
  rgd.reset_score_failures()
  assert rgd.score_failures() == {}


def test_partial_credit_and_binary_scores():
  row = rgd.examples([rgd.TaskSpec.make('gsm_symbolic', 1, 0)], seed=0)['train'][0]
  wrong = str(int(float(row['answer'])) + 1)
  assert rgd.score('gsm_symbolic', f'#### {wrong}', row) == pytest.approx(
    0.01
  )  # rg's partial credit
  assert rgd.score('gsm_symbolic', f'#### {wrong}', row, binary=True) == 0.0
  assert rgd.score('gsm_symbolic', f'The answer is {row["answer"]}.', row, binary=True) == 1.0
