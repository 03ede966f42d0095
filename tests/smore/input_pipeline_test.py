"""The SmolLM2 chat mix: a task must not vanish from it silently (too long, or no gold answer)."""

import pytest

from projects.smore import input_pipeline
from tests.common.models import synthetic_gguf as syn


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  _, _, tokenizer = syn.load_private(tmp_path_factory.mktemp('smore_chat'))
  return tokenizer


class _Builder:
  def __init__(self, rows):
    self.rows = rows

  def as_data_source(self, split):
    del split
    return self.rows


def _tasks(monkeypatch, rows):
  monkeypatch.setattr(input_pipeline, '_rg_builder', lambda tasks, seed: _Builder(rows))
  return (('short', 2, 2, ()), ('long', 2, 2, ()))


def _row(task, question, answer):
  return {'task': task.encode(), 'question': question.encode(), 'answer': answer.encode()}


def test_rows_keep_their_task_and_counts(tok, monkeypatch):
  rows = [_row('short', 'hello world', '12'), _row('long', 'the world', 'x')] * 2
  chat = input_pipeline.ChatTasks(tok, _tasks(monkeypatch, rows), 0, 'train', seq_len=64)
  assert chat.kept == {'short': (2, 2), 'long': (2, 2)}
  assert [int(r['task']) for r in chat.rows] == [0, 1, 0, 1]
  assert all(r['inputs'].shape == (64,) and r['loss_mask'].sum() > 0 for r in chat.rows)


def test_a_task_that_mostly_does_not_fit_is_an_error(tok, monkeypatch):
  long_q = ' '.join(['hello world'] * 60)
  rows = [_row('short', 'hello', '1'), _row('long', long_q, '2')] * 3 + [_row('long', 'x', '3')]
  tasks = _tasks(monkeypatch, rows)
  with pytest.raises(ValueError, match=r"task 'long' \(test\): only 1 of 4 examples fit"):
    input_pipeline.ChatTasks(tok, tasks, 0, 'test', seq_len=64)
  chat = input_pipeline.ChatTasks(tok, tasks, 0, 'test', seq_len=64, max_dropped=0.8)
  assert chat.kept == {'short': (3, 3), 'long': (1, 4)}


def test_a_task_without_gold_answers_is_an_error(tok, monkeypatch):
  rows = [_row('short', 'hello', '1'), _row('long', 'which premise follows?', 'None')]
  with pytest.raises(ValueError, match="task 'long' has no gold answer"):
    input_pipeline.ChatTasks(tok, _tasks(monkeypatch, rows), 0, 'train', seq_len=64)
