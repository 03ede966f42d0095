"""Host-side (numpy) metrics of a reward model on preference pairs and on scored responses.

pairwise_accuracy: P(r_w > r_l) over pairs, a tie counting 1/2 (a constant reward model scores
  exactly 0.5, not 0 as TRL's strict count gives).
calibration: the Bradley-Terry model predicts P(y_w preferred) = sigmoid(r_w - r_l). Pairs are
  scored in both orders, (w, l) with outcome 1 and (l, w) with outcome 0, so a perfectly calibrated
  model has reliability p = frequency in every bin of p; ECE is the |p - frequency| averaged over
  equal-width bins weighted by their counts (Guo et al. 2017), with the Brier score and log loss.
spearman: Spearman's rank correlation (Pearson on average ranks; ties share their mean rank).
"""

from __future__ import annotations

import numpy as np


def pairwise_accuracy(chosen, rejected) -> float:
  """Fraction of pairs whose chosen reward is higher; a tie counts 1/2."""
  c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  if c.shape != r.shape or c.size == 0:
    raise ValueError(f'need equal, non-empty shapes; got {c.shape} and {r.shape}')
  return float(np.mean((c > r) + 0.5 * (c == r)))


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def calibration(chosen, rejected, bins: int = 10) -> dict[str, float]:
  """ece, brier, log_loss (nats) and accuracy of P(y_w > y_l) = sigmoid(r_w - r_l), both orders."""
  c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  d = c - r
  logits = np.concatenate([d, -d])
  outcome = np.concatenate([np.ones_like(d), np.zeros_like(d)])
  p = 1.0 / (1.0 + np.exp(-logits))
  which = np.minimum((p * bins).astype(int), bins - 1)
  ece = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      ece += sel.mean() * abs(p[sel].mean() - outcome[sel].mean())
  log_loss = -np.mean(np.where(outcome > 0, _log_sigmoid(logits), _log_sigmoid(-logits)))
  return {
    'ece': float(ece),
    'brier': float(np.mean((p - outcome) ** 2)),
    'log_loss': float(log_loss),
    'accuracy': pairwise_accuracy(c, r),
  }


def rankdata(x) -> np.ndarray:
  """Average ranks (1-based, ties share their mean rank), as scipy.stats.rankdata."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='mergesort')
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def pearson(x, y) -> float:
  """Pearson correlation; 0 when either input is constant (no linear association to measure)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denom) if denom > 0 else 0.0


def spearman(x, y) -> float:
  """Spearman's rho: the Pearson correlation of the average ranks."""
  if len(x) != len(y) or len(x) < 2:
    raise ValueError(f'need two equal-length samples of at least 2; got {len(x)} and {len(y)}')
  return pearson(rankdata(x), rankdata(y))
