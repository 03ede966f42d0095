"""Group advantage estimators for RL with verifiable rewards (GRPO family and EBPO).

Rewards arrive as `[num_groups, G]` arrays: row m holds the rewards of the G responses sampled for
prompt m. An optional boolean `mask` of the same shape marks valid responses (variable G per prompt,
or DAPO's dropped groups); masked entries get advantage 0.

Stateless estimators (small pure jnp functions, jit/vmap-able):
  grpo        (r - mean_group) / (std_group(ddof=1) + eps)          Shao et al. 2024
  dr_grpo     r - mean_group                                         Liu et al. 2025
  rloo        r - mean of the other G-1 rewards                      Ahmadian et al. 2024
  dapo        GRPO's advantages; `dapo_keep` marks the groups DAPO's dynamic sampling keeps
              (not all-equal), the loop refills the batch with them; DAPO's clip-higher and
              token-level loss are loss settings (common.rl.loss).

EBPO (Han et al. 2026, arXiv 2602.05165) shrinks each group's baseline toward a global prior:
  W_r (every reward) and W_mu (every group mean) are Welford accumulators over the whole history,
  merged per batch with Chan et al.'s parallel update BEFORE the advantages are computed (the
  current batch is part of the prior); mu_glob = mean(W_r), sigma^2 = Var(W_r), tau^2 = Var(W_mu);
  S = (sigma^2/G) / (sigma^2/G + tau^2); V = (1-S) mu_group + S mu_glob; A_raw = r - V; then
  batch standardisation A = (A_raw - mean(A_raw)) / (std(A_raw) + eps) over all valid responses.
  Cold start [R]: while either accumulator holds fewer than 2 values (its variance is undefined)
  or sigma^2/G + tau^2 == 0, S = 0 (the group-mean baseline). tau^2 == 0 < sigma^2 gives S = 1.
  Modes: 'cumulative' (the paper), 'cluster' (one pair of accumulators per cluster id: the
  -topic / -diff variants without the 1/n lag), 'ewm' (exponentially weighted, the history's
  weight halving every `half_life` batches) [R: the paper offers only the cumulative form].
  The accumulators are host-side float64 (numpy / Python floats; no global x64) and serialise to
  JSON for the checkpoint's `extra` state (`EBPOState.to_json` / `from_json`).
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
import numpy as np

EPS = 1e-6


def _mask_of(rewards: jax.Array, mask: jax.Array | None) -> jax.Array:
  return jnp.ones(rewards.shape, bool) if mask is None else mask.astype(bool)


def group_mean(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """[M] mean of each group's valid rewards (0 for an empty group)."""
  m = _mask_of(rewards, mask)
  n = m.sum(-1)
  return jnp.where(m, rewards, 0.0).sum(-1) / jnp.maximum(n, 1)


def group_std(rewards: jax.Array, mask: jax.Array | None = None, ddof: int = 1) -> jax.Array:
  """[M] standard deviation of each group's valid rewards (0 where it is undefined)."""
  m = _mask_of(rewards, mask)
  n = m.sum(-1)
  mu = group_mean(rewards, m)
  ss = jnp.where(m, (rewards - mu[:, None]) ** 2, 0.0).sum(-1)
  return jnp.sqrt(jnp.where(n > ddof, ss / jnp.maximum(n - ddof, 1), 0.0))


def grpo(rewards: jax.Array, mask: jax.Array | None = None, eps: float = EPS) -> jax.Array:
  """GRPO: (r - mean_group) / (std_group + eps), std with ddof=1. All-equal groups give exactly 0."""
  m = _mask_of(rewards, mask)
  mu = group_mean(rewards, m)[:, None]
  sd = group_std(rewards, m)[:, None]
  return jnp.where(m, (rewards - mu) / (sd + eps), 0.0)


def dr_grpo(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Dr. GRPO: r - mean_group (no per-group std; its length normalisation lives in the loss)."""
  m = _mask_of(rewards, mask)
  return jnp.where(m, rewards - group_mean(rewards, m)[:, None], 0.0)


def rloo(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """RLOO: r_i - mean_{j != i} r_j; 0 for a group with a single valid response."""
  m = _mask_of(rewards, mask)
  n = m.sum(-1, keepdims=True)
  total = jnp.where(m, rewards, 0.0).sum(-1, keepdims=True)
  loo = (total - rewards) / jnp.maximum(n - 1, 1)
  return jnp.where(m & (n > 1), rewards - loo, 0.0)


def dapo_keep(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """[M] bool: groups DAPO's dynamic sampling keeps (valid rewards not all equal)."""
  m = _mask_of(rewards, mask)
  big = jnp.finfo(rewards.dtype).max
  hi = jnp.where(m, rewards, -big).max(-1)
  lo = jnp.where(m, rewards, big).min(-1)
  return (m.sum(-1) > 1) & (hi > lo)


def dapo(rewards: jax.Array, mask: jax.Array | None = None, eps: float = EPS) -> jax.Array:
  """DAPO: GRPO advantages on the groups `dapo_keep` keeps, 0 on the dropped ones."""
  m = _mask_of(rewards, mask) & dapo_keep(rewards, mask)[:, None]
  return grpo(rewards, m, eps)


def zero_signal_fraction(advantages: jax.Array, mask: jax.Array | None = None, tol: float = 1e-8):
  """Fraction of groups whose valid advantages are all |A| <= tol (no policy-gradient signal)."""
  m = _mask_of(advantages, mask)
  dead = jnp.all(jnp.where(m, jnp.abs(advantages) <= tol, True), axis=-1)
  return dead.mean()


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
  m = _mask_of(rewards, mask)
  s = jnp.broadcast_to(jnp.asarray(shrinkage, rewards.dtype), rewards.shape[:1])[:, None]
  g = jnp.broadcast_to(jnp.asarray(mu_glob, rewards.dtype), rewards.shape[:1])[:, None]
  baseline = (1.0 - s) * group_mean(rewards, m)[:, None] + s * g
  raw = jnp.where(m, rewards - baseline, 0.0)
  if not standardize:
    return raw, raw
  n = jnp.maximum(m.sum(), 1)
  mu_b = raw.sum() / n
  sd_b = jnp.sqrt(jnp.where(m, (raw - mu_b) ** 2, 0.0).sum() / n)
  return jnp.where(m, (raw - mu_b) / (sd_b + eps), 0.0), raw


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


MODES = ('cumulative', 'cluster', 'ewm')


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


ESTIMATORS = ('grpo', 'dr_grpo', 'rloo', 'dapo', 'ebpo')
STATELESS = {'grpo': grpo, 'dr_grpo': dr_grpo, 'rloo': rloo, 'dapo': dapo}
