"""Q-RM's pairs: a corrupted trace differs from the correct one at exactly its recorded digit and
is wrong by the task's scorer; the metrics locate errors as constructed; steps to target."""

import numpy as np

from common.datasets import reasoning_gym as rgd
from experiments.qrm.configs import base
from projects.qrm import evaluate
from projects.qrm import input_pipeline


def test_corruption_changes_exactly_one_digit_at_the_recorded_position():
  rng = np.random.default_rng(0)
  digits = list(range(10, 20))
  trace = [5, 12, 13, 2]  # a non-digit, two digits, EOS
  for _ in range(50):
    bad, pos = input_pipeline.corrupt(trace, digits, rng)
    diff = [i for i, (a, b) in enumerate(zip(trace, bad, strict=True)) if a != b]
    assert diff == [pos] and pos in (1, 2) and bad[pos] in digits
  assert input_pipeline.corrupt([5, 2], digits, rng) is None
  assert input_pipeline.first_difference([1, 2, 3], [1, 4, 3]) == 1
  assert input_pipeline.first_difference([1, 2], [1, 2, 3]) == 2


def test_smoke_pairs_are_correct_vs_corrupted_and_scored_so():
  cfg = base.get_config('smoke,pairs.corrupted=40,pairs.eval_corrupted=8')
  text = input_pipeline.make_text(cfg)
  pairs = input_pipeline.make_pairs(cfg, 'train', text=text)
  a = pairs.arrays
  assert len(pairs) == 40 and (a['source'] == 0).all()
  examples = input_pipeline.load_examples('smoke', 'train', 0)
  for i in range(len(pairs)):
    c = a['chosen'][i, : a['chosen_lengths'][i]].tolist()
    r = a['rejected'][i, : a['rejected_lengths'][i]].tolist()
    assert [j for j in range(len(c)) if c[j] != r[j]] == [a['error_pos'][i]]
    ex = examples[i]
    assert rgd.score(ex['task'], text.tok.decode(c), ex, binary=True) == 1.0
    assert rgd.score(ex['task'], text.tok.decode(r), ex, binary=True) == 0.0
  rows = pairs.rows
  assert rows['targets'].shape == (80, cfg.rl.max_new_tokens)
  np.testing.assert_array_equal(rows['targets'][:40], a['chosen'])


def test_rm_metrics_locate_the_error_as_constructed():
  # 3 pairs, N = 4: rejected rewards lowest at the error in pairs 0 and 1, not in pair 2.
  tc = np.zeros((3, 4))
  tr = np.array([[0, -5, 0, 0], [-1, -0.5, -3, 0], [-4, 0, -1, 0]], float)
  arrays = {
    'chosen': np.zeros((3, 4), int),
    'chosen_lengths': np.array([3, 4, 3]),
    'rejected_lengths': np.array([3, 4, 3]),
    'error_pos': np.array([1, 2, 2]),
    'source': np.array([0, 0, 0]),
  }
  tok = np.concatenate([tc, tr])
  seq = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 2.0])
  out = evaluate.rm_metrics(tok, seq, arrays)
  assert out['localisation/corrupted'] == 2 / 3
  np.testing.assert_allclose(out['localisation_chance/corrupted'], np.mean([1 / 3, 1 / 4, 1 / 3]))
  assert out['pair_accuracy'] == 2 / 3
  np.testing.assert_allclose(out['concentration'], np.mean([1.0, 3 / 4.5, 1 / 5]))
  assert out['profile']['offsets'][3] == 0
  np.testing.assert_allclose(out['profile']['rejected'][3], np.mean([-5, -3, -1]))


def test_steps_to_target():
  steps = list(range(1, 11))
  vals = [0.1] * 4 + [0.9] * 6
  assert evaluate.steps_to_target(steps, vals, 0.5, window=2) == 5
  assert evaluate.steps_to_target(steps, vals, 0.5, window=5) == 7
  assert evaluate.steps_to_target(steps, vals, 0.95) is None
