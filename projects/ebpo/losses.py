"""EBPO's objective (Han et al. 2026, arXiv 2602.05165): advantages against an empirical-Bayes
shrinkage baseline, as an estimator object for the shared RL loop (common.rl.loop).

Rewards arrive as `[num_groups, G]` arrays (row m: the G responses to prompt m) with a boolean mask
of valid responses. W_r (every reward) and W_mu (every group mean) are Welford accumulators over the
whole history, merged per batch with Chan et al.'s parallel update BEFORE the advantages are
computed (the current batch is part of the prior); mu_glob = mean(W_r), sigma^2 = Var(W_r),
tau^2 = Var(W_mu); S = (sigma^2/G) / (sigma^2/G + tau^2); V = (1-S) mu_group + S mu_glob;
A_raw = r - V; then batch standardisation A = (A_raw - mean(A_raw)) / (std(A_raw) + eps) over all
valid responses (exactly 0 when every valid A_raw is equal, as GRPO gives an all-equal group).
Cold start [R]: while either accumulator holds fewer than 2 values (its variance is undefined) or
sigma^2/G + tau^2 == 0, S = 0 (the group-mean baseline). tau^2 == 0 < sigma^2 gives S = 1.
Modes: 'cumulative' (the paper), 'cluster' (one pair of accumulators per cluster id: the -topic /
-diff variants without the 1/n lag), 'ewm' (exponentially weighted, the history's weight halving
every `half_life` batches) [R: the paper offers only the cumulative form]. The accumulators are
host-side float64 (numpy / Python floats; no global x64) and checkpoint as JSON
(`EBPOState.to_json` / `from_json`) through the estimator's state_dict.

The loop's policy loss itself is the shared clipped token-level surrogate (common.rl.loss); what
EBPO changes is the advantage each response gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common.rl import advantages as adv_lib

EPS = adv_lib.EPS
MODES = ('cumulative', 'cluster', 'ewm')


def ebpo_config() -> ml_collections.ConfigDict:
  """EBPO's knobs (config.ebpo), used when rl.estimator == 'ebpo'."""
  return ml_collections.ConfigDict(
    dict(mode='cumulative', half_life=50.0, ddof=1, standardize=True)
  )


def ebpo_advantages(
  rewards: jax.Array,
  mu_glob: jax.Array,
  shrinkage: jax.Array,
  mask: jax.Array | None = None,
  *,
  standardize: bool = True,
  eps: float = EPS,
) -> tuple[jax.Array, jax.Array]:
  """(A, A_raw): EBPO's advantages given per-group prior mean and shrinkage S (both [M] or scalar).

  V = (1-S) mu_group + S mu_glob; A_raw = r - V; A = batch-standardised A_raw over valid entries
  (or A_raw when `standardize` is False). Pure; the statistics come from `EBPOEstimator`.
  """
  m = jnp.ones(rewards.shape, bool) if mask is None else mask.astype(bool)
  s = jnp.broadcast_to(jnp.asarray(shrinkage, rewards.dtype), rewards.shape[:1])[:, None]
  g = jnp.broadcast_to(jnp.asarray(mu_glob, rewards.dtype), rewards.shape[:1])[:, None]
  baseline = (1.0 - s) * adv_lib.group_mean(rewards, m)[:, None] + s * g
  raw = jnp.where(m, rewards - baseline, 0.0)
  if not standardize:
    return raw, raw
  n = jnp.maximum(m.sum(), 1)
  mu_b = raw.sum() / n
  sd_b = jnp.sqrt(jnp.where(m, (raw - mu_b) ** 2, 0.0).sum() / n)
  # A batch whose valid raw advantages are all equal (every response failed, or every one passed,
  # with one prior for all groups) carries no ranking: 0, as GRPO gives an all-equal group. The
  # formula would not: float32 rounding leaves mean(raw) a few ulps from raw, and dividing that by
  # sd_b + eps (sd_b ~ 1e-8) gave up to 0.26 instead of 0.
  big = jnp.finfo(raw.dtype).max
  all_equal = jnp.where(m, raw, -big).max() == jnp.where(m, raw, big).min()
  standardized = jnp.where(all_equal, 0.0, (raw - mu_b) / (sd_b + eps))
  return jnp.where(m, standardized, 0.0), raw


# ---------------------------------------------------------------------------------------------------
# Host-side float64 running statistics.


@dataclasses.dataclass
class Welford:
  """Running (weight, mean, M2) in float64; `merge` is Chan et al.'s parallel update.

  `count` is a float so the exponentially weighted mode can decay it; in the cumulative mode it is
  the exact number of values seen.
  """

  count: float = 0.0
  mean: float = 0.0
  m2: float = 0.0

  def merge(self, values: Any) -> Welford:
    """Folds a batch of values in (in place; returns self)."""
    x = np.asarray(values, np.float64).reshape(-1)
    if x.size == 0:
      return self
    n_b = float(x.size)
    mean_b = float(x.mean())
    m2_b = float(((x - mean_b) ** 2).sum())
    return self.merge_stats(n_b, mean_b, m2_b)

  def merge_stats(self, n_b: float, mean_b: float, m2_b: float) -> Welford:
    n_a = self.count
    n = n_a + n_b
    if n <= 0:
      return self
    delta = mean_b - self.mean
    self.mean = self.mean + delta * n_b / n
    self.m2 = self.m2 + m2_b + delta * delta * n_a * n_b / n
    self.count = n
    return self

  def decay(self, factor: float) -> Welford:
    """Scales the history's weight by `factor` (mean unchanged): the exponential forgetting step."""
    self.count *= factor
    self.m2 *= factor
    return self

  def variance(self, ddof: int = 1) -> float:
    """M2 / (count - ddof); 0.0 while count <= ddof (undefined)."""
    return self.m2 / (self.count - ddof) if self.count > ddof else 0.0

  def defined(self, ddof: int = 1) -> bool:
    return self.count > ddof

  def to_dict(self) -> dict[str, float]:
    return {'count': self.count, 'mean': self.mean, 'm2': self.m2}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Welford:
    return cls(float(d['count']), float(d['mean']), float(d['m2']))


@dataclasses.dataclass
class EBPOState:
  """EBPO's algorithm state: (W_r, W_mu) per key ('' for the cumulative / ewm modes)."""

  rewards: dict[str, Welford] = dataclasses.field(default_factory=dict)
  means: dict[str, Welford] = dataclasses.field(default_factory=dict)
  num_updates: int = 0

  def pair(self, key: str) -> tuple[Welford, Welford]:
    if key not in self.rewards:
      self.rewards[key] = Welford()
      self.means[key] = Welford()
    return self.rewards[key], self.means[key]

  def to_json(self) -> str:
    return json.dumps(
      {
        'rewards': {k: w.to_dict() for k, w in sorted(self.rewards.items())},
        'means': {k: w.to_dict() for k, w in sorted(self.means.items())},
        'num_updates': self.num_updates,
      }
    )

  @classmethod
  def from_json(cls, text: str | Mapping[str, Any]) -> EBPOState:
    d = json.loads(text) if isinstance(text, str) else text
    return cls(
      {k: Welford.from_dict(v) for k, v in d['rewards'].items()},
      {k: Welford.from_dict(v) for k, v in d['means'].items()},
      int(d['num_updates']),
    )


@dataclasses.dataclass(frozen=True)
class EBPOStats:
  """Per-group statistics of one EBPO step (float64 numpy arrays of shape [M])."""

  mu_glob: np.ndarray
  sigma2: np.ndarray
  tau2: np.ndarray
  shrinkage: np.ndarray
  group_size: np.ndarray


class EBPOEstimator:
  """EBPO's stateful part: updates the accumulators with a batch and returns per-group S, mu_glob.

  mode: 'cumulative' | 'cluster' | 'ewm'; ddof: the variance convention (1, sample, by default
  [R]); half_life: batches for the 'ewm' mode's weight to halve.
  """

  def __init__(
    self,
    mode: str = 'cumulative',
    *,
    ddof: int = 1,
    half_life: float = 50.0,
    standardize: bool = True,
    eps: float = EPS,
    state: EBPOState | None = None,
  ):
    if mode not in MODES:
      raise ValueError(f'unknown EBPO mode {mode!r}; expected one of {MODES}')
    if mode == 'ewm' and not half_life > 0:
      raise ValueError(f'EBPO ewm mode needs half_life > 0, got {half_life}')
    self.mode = mode
    self.ddof = int(ddof)
    self.half_life = float(half_life)
    self.standardize = standardize
    self.eps = eps
    self.state = state if state is not None else EBPOState()

  def update(
    self,
    rewards: Any,
    mask: Any | None = None,
    clusters: Sequence[Any] | None = None,
  ) -> EBPOStats:
    """Folds the batch into the accumulators, then returns each group's prior and shrinkage."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
      raise ValueError(f'rewards must be [num_groups, G], got shape {r.shape}')
    m = np.ones(r.shape, bool) if mask is None else np.asarray(mask, bool)
    num_groups = r.shape[0]
    if self.mode == 'cluster':
      if clusters is None or len(clusters) != num_groups:
        raise ValueError('EBPO cluster mode needs one cluster id per group')
      keys = [str(c) for c in clusters]
    else:
      keys = [''] * num_groups
    sizes = m.sum(-1).astype(np.float64)
    means = np.where(sizes > 0, np.where(m, r, 0.0).sum(-1) / np.maximum(sizes, 1), 0.0)
    if self.mode == 'ewm':
      factor = 0.5 ** (1.0 / self.half_life)
      w_r, w_mu = self.state.pair('')
      w_r.decay(factor)
      w_mu.decay(factor)
    for key in dict.fromkeys(keys):  # first-seen order: deterministic
      rows = [i for i, k in enumerate(keys) if k == key]
      w_r, w_mu = self.state.pair(key)
      w_r.merge(r[rows][m[rows]])
      w_mu.merge(means[rows][sizes[rows] > 0])
    self.state.num_updates += 1
    mu_glob, sigma2, tau2, shrink = (np.zeros(num_groups) for _ in range(4))
    for i, key in enumerate(keys):
      w_r, w_mu = self.state.pair(key)
      mu_glob[i] = w_r.mean
      sigma2[i] = w_r.variance(self.ddof)
      tau2[i] = w_mu.variance(self.ddof)
      shrink[i] = shrinkage(
        sigma2[i], tau2[i], sizes[i], w_r.defined(self.ddof) and w_mu.defined(self.ddof)
      )
    return EBPOStats(mu_glob, sigma2, tau2, shrink, sizes)

  def advantages(
    self,
    rewards: Any,
    mask: Any | None = None,
    clusters: Sequence[Any] | None = None,
  ) -> tuple[np.ndarray, np.ndarray, EBPOStats]:
    """(A, A_raw, stats) for one batch, updating the state first (the paper's order)."""
    stats = self.update(rewards, mask, clusters)
    r = jnp.asarray(np.asarray(rewards, np.float32))
    adv, raw = ebpo_advantages(
      r,
      jnp.asarray(stats.mu_glob, jnp.float32),
      jnp.asarray(stats.shrinkage, jnp.float32),
      None if mask is None else jnp.asarray(mask, bool),
      standardize=self.standardize,
      eps=self.eps,
    )
    return np.asarray(adv), np.asarray(raw), stats


def shrinkage(sigma2: float, tau2: float, group_size: float, defined: bool = True) -> float:
  """S = (sigma^2/G) / (sigma^2/G + tau^2) in [0, 1]; 0 at cold start or when both are 0."""
  if not defined or group_size <= 0:
    return 0.0
  within = sigma2 / group_size
  total = within + tau2
  if not total > 0 or not math.isfinite(total):
    return 0.0
  return float(min(max(within / total, 0.0), 1.0))


class EBPO:
  """EBPO as the RL loop's estimator (common.rl.advantages.Estimator)."""

  def __init__(self, core: EBPOEstimator):
    self.core = core

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> EBPO:
    return cls(EBPOEstimator(c.mode, ddof=c.ddof, half_life=c.half_life, standardize=c.standardize))

  def advantages(self, rewards, mask, prompts) -> adv_lib.Advantages:
    a, raw, stats = self.core.advantages(rewards, mask, [p.cluster for p in prompts])
    metrics = {
      'ebpo_shrinkage': float(np.mean(stats.shrinkage)),
      'ebpo_mu_glob': float(np.mean(stats.mu_glob)),
      'ebpo_sigma2': float(np.mean(stats.sigma2)),
      'ebpo_tau2': float(np.mean(stats.tau2)),
    }
    return adv_lib.Advantages(np.asarray(a), np.asarray(raw), metrics)

  def group_filter(self, rewards: np.ndarray) -> None:
    del rewards

  def state_dict(self) -> dict[str, Any]:
    return {'ebpo': self.core.state.to_json()}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    if 'ebpo' in state:
      self.core.state = EBPOState.from_json(state['ebpo'])
