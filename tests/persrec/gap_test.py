"""The gap-recovered statistic and verdict (projects/persrec/gap.py) and the claims' rule wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import reproduce
from experiments.persrec import claims
from projects.persrec import gap


def _brute_force_interval(r, p, f, t):
  """Fieller's set {theta : (a - theta b)^2 <= t^2 var(a - theta b)} on a fine grid."""
  da, db = np.subtract(p, r), np.subtract(f, r)
  thetas = np.linspace(-5, 5, 200_001)
  diffs = da[None, :] - thetas[:, None] * db[None, :]  # per-seed a_i - theta b_i
  mean = diffs.mean(1)
  var = diffs.var(1, ddof=1) / len(r)
  inside = thetas[mean**2 <= t * t * var]
  return inside.min(), inside.max()


def test_fraction_is_the_ratio_of_seed_means_and_fieller_matches_brute_force():
  r, p, f = [0.20, 0.22, 0.21], [0.27, 0.26, 0.30], [0.30, 0.31, 0.32]
  s = gap.gap_stats(r, p, f)
  assert s.fraction == pytest.approx((np.mean(p) - np.mean(r)) / (np.mean(f) - np.mean(r)))
  assert s.gap_significant
  lo, hi = _brute_force_interval(r, p, f, gap.t975(2))
  assert s.low == pytest.approx(lo, abs=1e-4) and s.high == pytest.approx(hi, abs=1e-4)
  assert s.low < s.fraction < s.high
  assert gap.t975(2) == pytest.approx(4.303, abs=1e-3)  # the table value


def test_no_gap_is_inconclusive_with_that_reason_and_never_nan():
  # The smoke ML-100K recalls that gave nan before: the mean gap is ~0 (one seed exactly 0).
  r, p, f = [0.0085, 0.0074, 0.0085], [0.0085, 0.0085, 0.0074], [0.0095, 0.0074, 0.0053]
  s = gap.gap_stats(r, p, f)
  label, reason = gap.verdict(s)
  assert label == gap.INCONCLUSIVE and reason.startswith('no gap to recover')
  assert math.isnan(s.low) and math.isnan(s.high)  # Fieller is unbounded: no interval
  # An exactly zero mean gap: defined verdict, the shares are nan (0/0) but the verdict is not.
  s0 = gap.gap_stats([0.1, 0.2], [0.3, 0.1], [0.2, 0.1])
  assert s0.gap == 0 and gap.verdict(s0)[0] == gap.INCONCLUSIVE
  assert 'no gap' in gap.verdict(s0)[1]
  # Full significantly *worse* than recent: still no gap to recover, not a negative fraction.
  neg = gap.gap_stats([0.3, 0.31, 0.32], [0.3, 0.3, 0.3], [0.2, 0.2, 0.21])
  assert gap.verdict(neg)[1].startswith('no gap to recover')


def test_verdicts_on_clear_cases():
  r = [0.20, 0.21, 0.19, 0.20]
  f = [0.40, 0.41, 0.39, 0.42]
  most = gap.gap_stats(r, [0.38, 0.39, 0.38, 0.40], f)
  assert gap.verdict(most)[0] == gap.SUPPORTED and most.low > 0.5
  none = gap.gap_stats(r, [0.21, 0.20, 0.20, 0.22], f)
  assert gap.verdict(none)[0] == gap.NOT_SUPPORTED and none.high < 0.5
  half = gap.gap_stats(r, [0.25, 0.40, 0.28, 0.36], f)
  label, reason = gap.verdict(half)
  assert label == gap.INCONCLUSIVE and 'contains the threshold' in reason
  # A seed with no gap of its own does not blow the statistic up (the old per-seed ratio did).
  one_flat = gap.gap_stats([0.2, 0.2, 0.2], [0.35, 0.2, 0.34], [0.4, 0.2, 0.41])
  assert math.isfinite(one_flat.fraction) and 0 < one_flat.fraction < 1
  assert gap.verdict(gap.gap_stats([0.2], [0.3], [0.4]))[0] == gap.INCONCLUSIVE  # one seed
  with pytest.raises(ValueError, match='per-seed'):
    gap.gap_stats([0.1, 0.2], [0.1], [0.3, 0.3])


def test_zero_variance_gap_is_a_point_interval():
  s = gap.gap_stats([0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.3, 0.3])
  assert s.fraction == pytest.approx(0.5) and s.low == pytest.approx(0.5)
  assert s.high == pytest.approx(0.5)


def test_the_claims_rule_reads_the_recorded_recalls():
  rule = claims.GapRecovered(0.5)
  assert rule.kind == reproduce.EMPIRICAL
  assert rule.verdict([0.1, 0.2, 0.3]).label == reproduce.INCONCLUSIVE  # nothing recorded
  r, p, f = [0.20, 0.21, 0.19], [0.38, 0.40, 0.37], [0.40, 0.41, 0.39]
  rule.recalls.update(recent=r, persrec=p, full=f)
  s = gap.gap_stats(r, p, f)
  shares = gap.per_seed_shares(s, r, p)
  assert np.mean(shares) == pytest.approx(s.fraction)
  v = rule.verdict(shares)
  assert (v.label, v.reason) == gap.verdict(s, 0.5)
  with pytest.raises(ValueError, match='not the recorded'):
    rule.verdict([0.0, 0.0, 0.0])
  claim = claims.gap_claim('ml100k')  # a valid reproduce.Claim with this rule
  assert claim.rule.describe().startswith('mean gap full - recent significantly > 0')
