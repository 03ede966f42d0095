"""projects.blockpruner.input_pipeline: calibration subsets per seed, held-out windows fixed, and
multiple-choice items whose scored tokens are exactly the choices (the correct one at the label)."""

import numpy as np
import pytest

from common import config as config_lib
from experiments.blockpruner.configs import base
from projects.blockpruner import input_pipeline
from tests.blockpruner import util

TOK = util.ByteTokenizer()


def _config(*overrides):
  return base.get_config(','.join(('smoke', 'eval.mc_items=6', *overrides)))


def test_calibration_is_a_seeded_subset_of_full_windows():
  a = input_pipeline.calibration(_config(), TOK)
  assert a.tokens.shape == (32, 65) and a.mask[:, 1:].all() and not a.mask[:, 0].any()
  assert (a.tokens[:, 0] == TOK.eos_id).all()  # the start token is context
  np.testing.assert_array_equal(a.tokens, input_pipeline.calibration(_config(), TOK).tokens)
  b = input_pipeline.calibration(_config('seed=1'), TOK)
  assert not np.array_equal(a.tokens, b.tokens)
  # Every row is a span of a train page (real text).
  assert all(TOK.decode(row[1:]).isprintable() or '\n' in TOK.decode(row[1:]) for row in a.tokens)
  with pytest.raises(config_lib.ConfigError, match='only'):
    input_pipeline.calibration(_config('calib.seq_len=100000'), TOK)


def test_held_out_windows_do_not_depend_on_the_seed():
  a = input_pipeline.held_out(_config(), TOK)
  b = input_pipeline.held_out(_config('seed=2'), TOK)
  assert sorted(a) == ['chatterbot', 'rdocs']
  for k in a:
    np.testing.assert_array_equal(a[k].tokens, b[k].tokens)
    assert len(a[k]) <= 64 and a[k].tokens.shape[1] == 65


@pytest.mark.parametrize('name', input_pipeline.MC_TASKS)
def test_choice_rows_score_exactly_the_choices(name):
  config = _config()
  task = input_pipeline._TASKS[name](config, TOK)  # noqa: SLF001
  c = config.eval.mc_choices
  assert task.num_choices == c and task.num_items == 6
  assert task.rows.tokens.shape[0] == 6 * c and ((task.labels >= 0) & (task.labels < c)).all()
  rows = task.rows
  for item in range(task.num_items):
    contexts, choices = [], []
    for j in range(c):
      r = item * c + j
      scored = np.flatnonzero(rows.mask[r])
      assert len(scored) > 0 and np.all(np.diff(scored) == 1)  # one contiguous span
      contexts.append(tuple(rows.tokens[r, 1 : scored[0]]))
      choices.append(TOK.decode(rows.tokens[r, scored]))
    assert len(set(contexts)) == 1  # the same context for every choice
    assert len(set(choices)) == c  # distinct choices
    if name == 'arith_choice':  # the correct choice is the sum
      question = TOK.decode(contexts[0])
      expr = question.split('\n')[-1] if '\n' in question else question
      assert '=' in expr
  labels_again = input_pipeline._TASKS[name](config, TOK).labels  # noqa: SLF001
  np.testing.assert_array_equal(task.labels, labels_again)


def test_arith_choice_labels_the_true_result():
  config = _config()
  task = input_pipeline.arith_choice(config, TOK)
  from common.datasets import reasoning_gym  # noqa: PLC0415

  spec = reasoning_gym.TaskSpec.make(
    'chain_sum', 0, 6, min_terms=2, max_terms=2, min_digits=1, max_digits=2
  )
  answers = [int(ex['answer']) for ex in reasoning_gym.generate(spec, config.eval.seed, 'test')]
  for item, answer in enumerate(answers):
    r = item * task.num_choices + task.labels[item]
    assert TOK.decode(task.rows.tokens[r, task.rows.mask[r]]) == f' {answer}'


def test_make_data_pads_each_task_to_a_multiple_of_16_and_check_config_rejects_bad_values():
  config = _config()
  data = input_pipeline.make_data(config, TOK)
  for task in data.tasks:
    raw = input_pipeline._TASKS[task.name](config, TOK).rows  # noqa: SLF001
    width = task.rows.tokens.shape[1]
    assert width % 16 == 0 and raw.tokens.shape[1] <= width < raw.tokens.shape[1] + 16
    np.testing.assert_array_equal(task.rows.tokens[:, : raw.tokens.shape[1]], raw.tokens)
    assert not task.rows.mask[:, raw.tokens.shape[1] :].any()
  for bad, match in [
    ('prune.method=magnitude', 'prune.method'),
    ('prune.block_type=attn', 'block_type'),
    ('calib.num_samples=20', 'multiple'),
    ('eval.mc_choices=1', 'mc_choices'),
  ]:
    with pytest.raises(config_lib.ConfigError, match=match):
      input_pipeline.check_config(_config(bad))
  config = _config()
  config.eval.mc_tasks = ('piqa',)
  with pytest.raises(config_lib.ConfigError, match='mc_tasks'):
    input_pipeline.check_config(config)
