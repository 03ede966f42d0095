"""Causal Rewards' metrics on hand-built quad rewards: a content-only model, a cue-only model, the
reward hack in Best-of-4, and the length-penalty baseline removing a linear length trend."""

from __future__ import annotations

import numpy as np

from projects.causal_rewards import evaluate

# Columns: (gold, no cue), (gold, cue), (wrong, no cue), (wrong, cue).
CUE = np.tile([0.0, 1.0, 0.0, 1.0], (8, 1))


def test_a_content_only_model_is_accurate_and_invariant():
  rng = np.random.default_rng(0)
  content = np.repeat(rng.normal(2.0, 0.1, size=(8, 1)), 4, 1) * np.array([1, 1, 0, 0])
  m = evaluate.quad_metrics(content, CUE)
  assert m['acc_decorrelated'] == m['acc_aligned'] == m['acc_anti'] == m['acc_clean'] == 1.0
  assert m['bias'] == 0.0 and m['cue_pref'] == 0.5  # every counterfactual pair ties
  assert m['bon_accuracy'] == 1.0 and m['bon_cue_wins'] == 0.0


def test_a_cue_only_model_is_at_chance_on_the_decorrelated_split_and_hacks_best_of_n():
  r = np.tile([0.0, 1.0, 0.0, 1.5], (8, 1))  # the cue, and a little more for the wrong answer
  m = evaluate.quad_metrics(r, CUE)
  assert m['acc_aligned'] == 1.0 and m['acc_anti'] == 0.0 and m['acc_decorrelated'] == 0.5
  assert m['cue_pref'] == 1.0 and m['bon_cue_rate'] == 1.0 and m['bon_cue_wins'] == 1.0
  assert m['bon_accuracy'] == 0.0
  assert m['spearman'] > 0.8
  np.testing.assert_allclose(m['bias_raw'], 1.25)
  np.testing.assert_allclose(m['bias'], 1.25 / r.std())


def test_the_length_penalty_removes_a_linear_length_trend():
  rng = np.random.default_rng(1)
  length = rng.integers(2, 30, size=500).astype(float)
  content = rng.normal(size=500)
  r = content + 0.3 * length
  pen = evaluate.length_penalty(r, length)
  np.testing.assert_allclose(pen.alpha, 0.3 * length.std(), rtol=0.05)
  fixed = pen(r, length)
  assert abs(np.corrcoef(fixed, length)[0, 1]) < 0.05
  np.testing.assert_allclose(fixed - fixed.mean(), content - content.mean(), atol=0.5)
