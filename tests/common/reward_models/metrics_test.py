"""Pairwise accuracy, calibration and Spearman against independent references (scipy)."""

import numpy as np
import pytest
from scipy import stats

from common.reward_models import metrics


def test_pairwise_accuracy_counts_ties_as_half():
  assert metrics.pairwise_accuracy([2, 1, 0], [1, 1, 3]) == pytest.approx(0.5)
  assert metrics.pairwise_accuracy(np.zeros(5), np.zeros(5)) == 0.5
  with pytest.raises(ValueError):
    metrics.pairwise_accuracy([], [])


def test_calibration_of_a_calibrated_model_is_near_zero_and_of_an_overconfident_one_is_not():
  rng = np.random.default_rng(0)
  d = rng.normal(0, 2, size=200_000)
  won = rng.random(d.size) < 1 / (1 + np.exp(-d))  # outcomes drawn from the model's own p
  chosen, rejected = np.where(won, d, 0.0), np.where(won, 0.0, d)  # orient each pair by outcome
  good = metrics.calibration(chosen, rejected)
  bad = metrics.calibration(5 * chosen, 5 * rejected)
  assert good['ece'] < 0.01 < 0.1 < bad['ece']
  assert good['log_loss'] < bad['log_loss']
  p = 1 / (1 + np.exp(-(chosen - rejected)))
  want_brier = np.mean(np.concatenate([(p - 1) ** 2, (1 - p) ** 2]))
  assert good['brier'] == pytest.approx(want_brier)


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 5, size=50)
  y = x + rng.normal(0, 2, size=50)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  np.testing.assert_allclose(metrics.rankdata(x), stats.rankdata(x))
  assert metrics.spearman(np.ones(4), np.arange(4)) == 0.0
