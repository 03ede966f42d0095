"""Causal Rewards' objective (Wang et al. 2025, arXiv 2501.09620): Bradley-Terry plus an MMD penalty
that makes the reward model's representation counterfactually invariant to a spurious variable Z.

  L = L_BT + lambda * sum_m MMD^2(phi | Z in bin m, phi)                  (unconditional CRM)
  L = L_BT + lambda * sum_l sum_m MMD^2(phi | Z in bin m, L = l; phi | L = l)   (conditional CRM)

L_BT = -log sigmoid(r(x, y_w) - r(x, y_l)) (common.reward_models.training), phi the representation
the reward head reads (`crm.representation='features'`, the paper's choice) or the reward itself
('reward'), Z discretised into M bins (a binary cue is its own 2 bins; length uses quantile bins;
projects/causal_rewards/input_pipeline.py), and L the preference label of each response (1 chosen,
0 rejected): conditional CRM matches distributions within each label, the stronger constraint the
paper uses against sycophancy. Every bin is compared with the pooled sample of its group, as the
spec states; for a binary Z this is a fixed multiple of the bin-vs-bin MMD of Veitch et al. (2021).

MMD with a Gaussian (RBF) kernel k(a, b) = exp(-|a - b|^2 / (2 sigma^2)) (Gretton et al. 2012):
  biased     MMD^2_b = mean_{i,j} k(x_i, x_j) + mean_{i,j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)
             (= |mu_x - mu_y|^2 in the RKHS, so >= 0; Gretton Eq. 5)
  unbiased   MMD^2_u: the same with the i = j terms left out of the within-sample means (Eq. 3);
             unbiased, so it can be negative and averages 0 when both samples share a distribution.
Bandwidth: `bandwidth > 0` fixes sigma; `bandwidth = 0` takes the median heuristic on the pooled
sample, 2 sigma^2 = median of the pairwise squared distances (Gretton et al. 2012, §8), under
stop_gradient (the paper does not state its rule; [unverified]). Samples are selected by weights
over one shared set of rows, so every bin of a batch uses one kernel matrix and shapes stay static
under jit; a bin with fewer than 2 rows contributes 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from common.reward_models import heads
from common.reward_models import training

MODES = ('unconditional', 'conditional')
REPRESENTATIONS = ('features', 'reward')


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """|x_i - y_j|^2 [n, m] in float32 for x [n, d], y [m, d], clipped at 0 (rounding)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  d2 = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(d2, 0.0)


def median_bandwidth(d2: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """sigma of the median heuristic: 2 sigma^2 = median of the off-diagonal squared distances among
  rows with weight > 0 (d2 square [n, n]); 1 when there are none or they are all 0."""
  n = d2.shape[0]
  keep = ~jnp.eye(n, dtype=bool)
  if weights is not None:
    w = weights > 0
    keep = keep & w[:, None] & w[None, :]
  med = jnp.nanmedian(jnp.where(keep, d2, jnp.nan))
  med = jnp.where(jnp.isfinite(med) & (med > 0), med, 2.0)
  return jax.lax.stop_gradient(jnp.sqrt(0.5 * med))


def _sigma(d2: jax.Array, bandwidth, weights) -> jax.Array:
  """sigma = bandwidth when > 0, else the median heuristic (works on traced bandwidths too)."""
  if isinstance(bandwidth, (int, float)):
    return jnp.float32(bandwidth) if bandwidth > 0 else median_bandwidth(d2, weights)
  bandwidth = jnp.asarray(bandwidth, jnp.float32)
  return jnp.where(bandwidth > 0, bandwidth, median_bandwidth(d2, weights))


def rbf(d2: jax.Array, sigma: jax.Array | float) -> jax.Array:
  """exp(-d2 / (2 sigma^2))."""
  return jnp.exp(-d2 / (2.0 * jnp.square(sigma)))


def weighted_mmd2(k: jax.Array, wx: jax.Array, wy: jax.Array, *, unbiased: bool) -> jax.Array:
  """MMD^2 between the samples that weights wx, wy [n] pick from the rows of kernel matrix k [n, n]
  (0/1 weights select; other non-negative weights weight). 0 when either sample has < 2 rows."""
  wx, wy = jnp.asarray(wx, jnp.float32), jnp.asarray(wy, jnp.float32)
  sx, sy = wx.sum(), wy.sum()
  xx, yy, xy = wx @ k @ wx, wy @ k @ wy, wx @ k @ wy
  if unbiased:
    diag = jnp.diagonal(k)
    xx_n, yy_n = sx * sx - jnp.sum(wx * wx), sy * sy - jnp.sum(wy * wy)
    xx = (xx - jnp.sum(wx * wx * diag)) / jnp.where(xx_n > 0, xx_n, 1.0)
    yy = (yy - jnp.sum(wy * wy * diag)) / jnp.where(yy_n > 0, yy_n, 1.0)
  else:
    xx = xx / jnp.where(sx > 0, sx * sx, 1.0)
    yy = yy / jnp.where(sy > 0, sy * sy, 1.0)
  xy = xy / jnp.where(sx * sy > 0, sx * sy, 1.0)
  ok = (jnp.sum(wx > 0) >= 2) & (jnp.sum(wy > 0) >= 2)
  return jnp.where(ok, xx + yy - 2.0 * xy, 0.0)


def mmd2(
  x: jax.Array, y: jax.Array, *, bandwidth: float = 0.0, unbiased: bool = False
) -> jax.Array:
  """MMD^2 between samples x [n, d] and y [m, d] (RBF kernel; bandwidth 0: median heuristic on
  the pooled sample)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  x, y = (x[:, None] if x.ndim == 1 else x), (y[:, None] if y.ndim == 1 else y)
  z = jnp.concatenate([x, y], axis=0)
  d2 = squared_distances(z, z)
  sigma = _sigma(d2, bandwidth, None)
  n = x.shape[0]
  wx = (jnp.arange(z.shape[0]) < n).astype(jnp.float32)
  return weighted_mmd2(rbf(d2, sigma), wx, 1.0 - wx, unbiased=unbiased)


def crm_penalty(
  phi: jax.Array,
  z: jax.Array,
  labels: jax.Array,
  *,
  num_bins: int,
  conditional: bool,
  bandwidth: float = 0.0,
  unbiased: bool = False,
  weights: jax.Array | None = None,
) -> jax.Array:
  """sum over (label groups) and bins m of MMD^2(phi | Z = m [, L = l]; phi [| L = l]).

  phi [R, d] (or [R], a reward), z [R] int bin ids in [0, num_bins), labels [R] (1 chosen, 0
  rejected; ignored unless conditional), weights [R] >= 0 (rows with 0 take no part).
  """
  phi = jnp.asarray(phi, jnp.float32)
  phi = phi[:, None] if phi.ndim == 1 else phi
  rows = phi.shape[0]
  w = jnp.ones((rows,), jnp.float32) if weights is None else (weights > 0).astype(jnp.float32)
  d2 = squared_distances(phi, phi)
  sigma = _sigma(d2, bandwidth, w)
  k = rbf(d2, sigma)
  groups = [w] if not conditional else [w * (labels == v) for v in (1, 0)]
  total = jnp.zeros((), jnp.float32)
  for g in groups:
    for m in range(num_bins):
      total = total + weighted_mmd2(k, g * (z == m), g, unbiased=unbiased)
  return total


def crm_config() -> ml_collections.ConfigDict:
  """config.crm: lam = 0 is the vanilla Bradley-Terry reward model."""
  return ml_collections.ConfigDict(
    dict(
      lam=0.0,
      mode='conditional',  # unconditional | conditional
      representation='features',  # features (phi, the paper's) | reward
      bandwidth=0.0,  # RBF sigma; 0: median heuristic on the batch
      unbiased=False,  # MMD^2_u instead of MMD^2_b
    )
  )


def check_config(crm: ml_collections.ConfigDict) -> None:
  from common import config as config_lib  # noqa: PLC0415

  if crm.mode not in MODES:
    raise config_lib.ConfigError(f'crm.mode={crm.mode!r}; expected one of {MODES}')
  if crm.representation not in REPRESENTATIONS:
    raise config_lib.ConfigError(
      f'crm.representation={crm.representation!r}; expected one of {REPRESENTATIONS}'
    )
  if crm.lam < 0 or crm.bandwidth < 0:
    raise config_lib.ConfigError(
      f'crm.lam={crm.lam} and crm.bandwidth={crm.bandwidth} must be >= 0'
    )


def rows_of(batch: Mapping[str, Any]) -> dict[str, Any]:
  """[B, 2, ...] pair examples (input_pipeline) -> [2B, ...] rows: chosen [0, B), rejected [B, 2B)."""
  return {k: jnp.concatenate([v[:, 0], v[:, 1]], axis=0) for k, v in batch.items() if v.ndim >= 2}


def make_loss_fn(config: ml_collections.ConfigDict, num_bins: int):
  """fit's loss_fn(model, batch, key): BT (pair weights: data balancing) + lam * CRM penalty.

  The penalty is computed (and logged as `mmd`) for every method, vanilla included, so a
  vanilla run measures the dependence it leaves; lam = 0 adds nothing to the loss or its gradient.
  """
  crm = config.crm
  conditional = crm.mode == 'conditional'

  def loss_fn(model, batch, key):
    del key
    rows = rows_of(batch)
    weights = batch['weight']
    bt, metrics, out = training.bradley_terry_loss(model, rows, weights=weights)
    phi = out.features if crm.representation == 'features' else out.rewards
    n = weights.shape[0]
    labels = (jnp.arange(2 * n) < n).astype(jnp.int32)
    penalty = crm_penalty(
      phi,
      rows['z'],
      labels,
      num_bins=num_bins,
      conditional=conditional,
      bandwidth=crm.bandwidth,
      unbiased=crm.unbiased,
      weights=jnp.concatenate([weights, weights]),
    )
    loss = bt if crm.lam == 0 else bt + crm.lam * penalty
    metrics = {**metrics, 'bt_loss': metrics['loss'], 'mmd': jax.lax.stop_gradient(penalty)}
    metrics['loss'] = jax.lax.stop_gradient(loss)
    return loss, metrics

  return loss_fn


def pair_rewards(out: heads.RewardOutput) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) sequence rewards of a model output on `rows_of` rows."""
  return heads.split(out.rewards)
