"""How much of the recent-only -> full-history gap PerSRec recovers, with a defined verdict.

The claim (spec §6(c)): PerSRec(P old -> k tokens, R recent) ~ Full(P + R) >> Recent(R). Per seed
i we have three recalls r_i (recent-only), p_i (PerSRec) and f_i (full history), trained on the
same data with the same seed. The fraction of the gap recovered is

    theta = mean_i(p_i - r_i) / mean_i(f_i - r_i)        (ratio of the seed means)

not the mean of per-seed ratios: a seed whose own gap f_i - r_i is ~0 makes its ratio explode
(or 0/0), although it carries as much evidence as any other seed. theta is only meaningful when
the gap itself is there, so the verdict first asks whether the mean gap b = mean(f - r) is
significantly positive (95% Student-t interval of the paired differences above 0); if not, there
is no gap to recover and the verdict is "inconclusive" with that reason, whatever theta is.

When it is, the 95% interval of theta is Fieller's (1954) for a ratio of two correlated means,
a = mean(p - r) and b, with their sample covariance from the same seeds:

    {theta : (a - theta b)^2 <= t^2 (V_aa - 2 theta V_ab + theta^2 V_bb)},  V = cov / n,

which is a bounded interval exactly when b^2 > t^2 V_bb, i.e. when the gap is significantly
non-zero at the same level: the two steps of the verdict are one consistent test. The claim
"PerSRec recovers most of the gap" (theta > threshold, 0.5) is supported when the whole interval
lies above the threshold, not supported when it lies below, inconclusive otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import numpy as np
from scipy import stats

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = 'supported', 'not supported', 'inconclusive'


@dataclasses.dataclass(frozen=True)
class GapStats:
  n: int  # seeds
  gained: float  # a = mean(persrec - recent)
  gap: float  # b = mean(full - recent)
  gap_half: float  # half-width of the 95% t interval of b (nan for n < 2)
  fraction: float  # a / b (nan when b == 0)
  low: float  # Fieller 95% interval of a / b (nan when unbounded: no significant gap)
  high: float

  @property
  def gap_significant(self) -> bool:
    return self.n >= 2 and self.gap - self.gap_half > 0


def t975(df: int) -> float:
  return float(stats.t.ppf(0.975, df))


def fieller(a: float, b: float, v_aa: float, v_ab: float, v_bb: float, t: float):
  """The Fieller interval (lo, hi) of a / b, or None when it is unbounded (b not significant)."""
  quad = b * b - t * t * v_bb
  if not quad > 0:
    return None
  mid = a * b - t * t * v_ab
  disc = max(mid * mid - quad * (a * a - t * t * v_aa), 0.0)  # >= 0 up to rounding (V is PSD)
  root = math.sqrt(disc)
  return (mid - root) / quad, (mid + root) / quad


def gap_stats(recent: Sequence[float], persrec: Sequence[float], full: Sequence[float]) -> GapStats:
  """The statistics above from paired per-seed values (one entry per seed in each list)."""
  r, p, f = (np.asarray(x, np.float64) for x in (recent, persrec, full))
  if not r.shape == p.shape == f.shape or r.ndim != 1 or r.size == 0:
    raise ValueError(f'need equal, non-empty per-seed lists, got {r.shape}, {p.shape}, {f.shape}')
  n = r.size
  da, db = p - r, f - r
  a, b = float(da.mean()), float(db.mean())
  fraction = a / b if b != 0 else math.nan
  if n < 2:
    return GapStats(n, a, b, math.nan, fraction, math.nan, math.nan)
  cov = np.cov(np.stack([da, db]), ddof=1) / n
  t = t975(n - 1)
  interval = fieller(a, b, float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1]), t)
  lo, hi = interval if interval is not None else (math.nan, math.nan)
  return GapStats(n, a, b, t * math.sqrt(float(cov[1, 1])), fraction, lo, hi)


def verdict(s: GapStats, threshold: float = 0.5) -> tuple[str, str]:
  """(label, one-line reason) for the claim "fraction recovered > threshold"."""
  gap = f'full - recent = {s.gap:.4g} ± {s.gap_half:.2g}'
  if s.n < 2:
    return INCONCLUSIVE, f'{s.n} seed(s): no interval'
  if not all(math.isfinite(x) for x in (s.gained, s.gap, s.gap_half)):
    return INCONCLUSIVE, 'non-finite recalls'
  if not s.gap_significant:
    return INCONCLUSIVE, f'no gap to recover: {gap} (95% t interval not above 0)'
  interval = f'fraction {s.fraction:.3g}, Fieller 95% [{s.low:.3g}, {s.high:.3g}] vs {threshold:g}'
  if s.low > threshold:
    return SUPPORTED, f'{interval}; {gap}'
  if s.high < threshold:
    return NOT_SUPPORTED, f'{interval}; {gap}'
  return INCONCLUSIVE, f'{interval}: interval contains the threshold; {gap}'


def per_seed_shares(s: GapStats, recent, persrec) -> list[float]:
  """(p_i - r_i) / b per seed: their mean is the fraction, their spread the numerator's.

  What the claims table shows per seed (the denominator is the seed-mean gap, so one seed with no
  gap of its own does not blow up); nan when the mean gap is exactly 0.
  """
  if s.gap == 0:
    return [math.nan] * s.n
  return [(float(p) - float(r)) / s.gap for r, p in zip(recent, persrec, strict=True)]
