"""projects.blockpruner.evaluate: log-likelihood multiple choice against a direct computation, and
the pairing of block and layer curves at equal removed parameters."""

import math

import numpy as np

from common.models import perplexity
from projects.blockpruner import evaluate
from projects.blockpruner import input_pipeline
from projects.blockpruner import models
from tests.blockpruner import util


def test_choice_accuracy_takes_the_best_mean_logprob_per_token():
  model = util.build()
  w = util.sample_windows(model, 8, 6)
  # 4 items x 2 choices; scored spans of different lengths per row.
  mask = np.zeros_like(w.mask)
  for r in range(8):
    mask[r, 6 - (r % 3) :] = True
  rows = perplexity.Windows(w.tokens, mask)
  sums, counts = perplexity.row_nll(model, rows, batch_size=8)
  per_token = (-sums / counts).reshape(4, 2)
  for labels in (np.argmax(per_token, 1), 1 - np.argmax(per_token, 1)):
    task = input_pipeline.ChoiceTask('t', rows, labels, 2)
    acc = evaluate.choice_accuracy(model, task, batch_size=4)
    assert acc == float(np.mean(np.argmax(per_token, 1) == labels))
  assert acc == 0.0


def test_equal_parameter_pairs_never_credit_blocks_with_removing_less():
  layers = [(0.0, 10.0), (100.0, 12.0), (200.0, 15.0), (300.0, 30.0)]
  blocks = [(0.0, 10.0), (30.0, 10.5), (120.0, 11.0), (150.0, 11.5), (210.0, 13.0)]
  pairs = evaluate.at_equal_params(blocks, layers)
  # 100 -> the first block point >= 100 (120); 200 -> 210; 300 is not reached: no pair.
  assert pairs == [(100.0, 11.0, 12.0, 120.0), (200.0, 13.0, 15.0, 210.0)]
  want = (math.log(11 / 12) + math.log(13 / 15)) / 2
  assert math.isclose(evaluate.mean_log_ratio(pairs), want)
  assert math.isnan(evaluate.mean_log_ratio([]))
  rows = [
    {'split': 'eval', 'step': 1, 'removed_params': 5.0, 'rdocs/perplexity': 2.0},
    {'split': 'train', 'step': 1, 'removed_params': 5.0, 'loss': 1.0},
    {'split': 'eval', 'step': 0, 'removed_params': 0.0, 'rdocs/perplexity': 1.5},
  ]
  assert evaluate.curve(rows, 'rdocs/perplexity') == [(0.0, 1.5), (5.0, 2.0)]


def test_removal_gap_is_zero_for_the_right_blocks_only():
  model = util.build()
  removed = [(1, 'mha'), (3, 'mlp')]
  small = models.remove(model, removed)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
  assert evaluate.removal_gap(model, small, removed, tokens) < 1e-4
  assert evaluate.removal_gap(model, small, [(1, 'mha')], tokens) > 1e-2


def test_evaluate_memo_reruns_nothing_it_has_seen_and_keys_on_weights_sets_and_mask(monkeypatch):
  model = util.build()
  w = util.sample_windows(model, 4, 6)
  task = input_pipeline.ChoiceTask('t', w, np.zeros(2, np.int64), 2)
  data = input_pipeline.Data(calibration=w, held_out={'rdocs': w}, tasks=[task])
  key = evaluate.fingerprint(model, data, batch_size=4)
  calls = []
  real = evaluate.evaluate
  monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: calls.append(1) or real(*a, **k))
  dense, pruned = models.mask_of([], 4), models.mask_of([(1, 'mha')], 4)
  first = evaluate.evaluate_memo(key, model, data, dense, batch_size=4)
  assert first == real(model, data, dense, batch_size=4)
  assert evaluate.evaluate_memo(key, model, data, dense, batch_size=4) == first
  assert len(calls) == 1
  assert evaluate.evaluate_memo(key, model, data, pruned, batch_size=4) != first
  evaluate.evaluate_memo(key, model, data, dense, batch_size=4, with_mc=False)
  evaluate.evaluate_memo(None, model, data, dense, batch_size=4)
  assert len(calls) == 4
  # Other weights, other sets or another batch size: another key.
  other = util.build(seed=1)
  assert evaluate.fingerprint(other, data, batch_size=4) != key
  assert evaluate.fingerprint(model, data, batch_size=2) != key
  data2 = input_pipeline.Data(calibration=w, held_out={'rdocs': w.take([0, 1])}, tasks=[task])
  assert evaluate.fingerprint(model, data2, batch_size=4) != key
  assert evaluate.fingerprint(util.build(), data, batch_size=4) == key


def test_interpolate_reads_a_curve_between_its_points_and_nowhere_else():
  pts = [(10.0, 4.0), (0.0, 1.0), (20.0, 16.0)]
  assert evaluate.interpolate(pts, 0.0) == 1.0 and evaluate.interpolate(pts, 20.0) == 16.0
  assert math.isclose(evaluate.interpolate(pts, 5.0), 2.0)  # geometric between 1 and 4
  assert math.isclose(evaluate.interpolate(pts, 15.0, log=False), 10.0)
  assert math.isnan(evaluate.interpolate(pts, 21.0)) and math.isnan(evaluate.interpolate([], 1.0))


def test_curve_reads_the_train_rows_on_request():
  rows = [
    {'split': 'train', 'step': 2, 'removed_params': 9.0, 'perplexity': 3.0},
    {'split': 'eval', 'step': 2, 'removed_params': 9.0, 'rdocs/perplexity': 4.0},
    {'split': 'train', 'step': 1, 'removed_params': 5.0, 'perplexity': 2.0},
  ]
  assert evaluate.curve(rows, 'perplexity', 'train') == [(5.0, 2.0), (9.0, 3.0)]
  assert evaluate.curve(rows, 'perplexity') == []
