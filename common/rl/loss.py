"""Token-level clipped policy-gradient surrogate with a k3 KL penalty to a frozen reference.

For response token t of sequence i with advantage A_i (one per sequence, from common.rl.advantages;
or A_{i,t}, one per token, from a token-level reward source through
common.rl.advantages.token_advantages):

  rho_t   = exp(logp_t - logp_old_t)                          (ratio to the behaviour policy)
  pg_t    = -min(rho_t A_i, clip(rho_t, 1 - clip_low, 1 + clip_high) A_i)
  kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (Schulman's k3 estimator, >= 0)
  loss_t  = pg_t + kl_coef * kl_t

aggregated over valid tokens by `agg`:
  'token-mean'          sum_t loss_t / sum_t 1 over the whole batch (DAPO's token-level loss)
  'sequence-mean'       mean_i of (sum_t loss_t / |o_i|) (GRPO's original per-sequence mean)
  'sequence-sum-norm'   mean_i of (sum_t loss_t / max_len) (Dr. GRPO: no length normalisation)

DAPO's clip-higher is clip_high > clip_low. With kl_coef = 0 and A_i = 0 a sequence contributes
exactly zero loss and zero gradient (the all-fail-group invariant).

Truncated importance sampling (TIS; EAD, arXiv 2510.05251, after Yao et al. 2025), off unless
`tis_weights` is given: when the rollout was sampled from a behaviour policy mu_tau other than the
policy at temperature 1 (EAD's annealed temperatures), each token's policy-gradient term is
weighted by the stop-gradient w_t = min(pi(y_t) / mu_tau(y_t), C) (`tis_weights`, from the
sampler's log-probs of the same token at temperature 1 and under the temperature it used), so
  pg_t = -w_t min(rho_t A, clip(rho_t) A)
whatever estimator produced A (GRPO, Dr.GRPO, RLOO, DAPO, a paper's own). w_t <= C, and w_t = 1
exactly where the two log-probs agree (temperature 1). The KL term is not reweighted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ('token-mean', 'sequence-mean', 'sequence-sum-norm')


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = ref - logp (>= 0)."""
  r = ref_logp - logp
  return jnp.exp(r) - r - 1.0


def tis_weights(target_logp, behaviour_logp, cap: float, mask=None) -> jax.Array:
  """Truncated importance weights min(exp(target - behaviour), cap), [B, T]; 1 outside `mask`.

  target_logp: log pi(y_t) of the policy being trained (temperature 1); behaviour_logp: log
  mu_tau(y_t), the distribution the token was sampled from. Equal log-probs give exactly 1.
  """
  if not cap > 0:
    raise ValueError(f'the TIS cap C must be positive, got {cap}')
  d = jnp.asarray(target_logp, jnp.float32) - jnp.asarray(behaviour_logp, jnp.float32)
  if mask is not None:
    d = jnp.where(jnp.asarray(mask) > 0, d, 0.0)
  return jnp.minimum(jnp.exp(d), jnp.float32(cap))


def aggregate(
  per_token: jax.Array, mask: jax.Array, agg: str, max_len: int | None = None
) -> jax.Array:
  """Reduces [B, T] per-token values over valid tokens (mask) to a scalar by `agg`.

  max_len: sequence-sum-norm's constant denominator, the generation budget (None: T, which is
  the budget unless the batch's padding columns were trimmed: rollout.trim_columns)."""
  m = mask.astype(jnp.float32)
  x = jnp.where(m > 0, per_token, 0.0)
  if agg == 'token-mean':
    return x.sum() / jnp.maximum(m.sum(), 1.0)
  if agg == 'sequence-mean':
    per_seq = x.sum(-1) / jnp.maximum(m.sum(-1), 1.0)
    return per_seq.mean()
  if agg == 'sequence-sum-norm':
    return (x.sum(-1) / (per_token.shape[-1] if max_len is None else max_len)).mean()
  raise ValueError(f'unknown loss aggregation {agg!r}; expected one of {AGGREGATIONS}')


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  ref_logp: jax.Array | None = None,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  kl_coef: float = 0.0,
  agg: str = 'token-mean',
  tis_weights: jax.Array | None = None,
  max_len: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of the clipped surrogate; logp/old_logp/ref_logp/mask [B, T], advantages [B]
  (one per sequence) or [B, T] (one per token); tis_weights [B, T] (see `tis_weights`) or None
  (no importance correction: the code path of a run without TIS is unchanged). With weights, the
  metrics also hold tis_weight_mean. max_len: sequence-sum-norm's denominator (see `aggregate`).

  Metrics (token means over valid tokens): pg_loss, kl, clip_frac (tokens whose clipped branch is
  active), ratio_mean, ratio_max_dev (max |rho - 1|).
  """
  m = mask.astype(jnp.float32)
  valid = m > 0
  a = advantages.astype(jnp.float32)
  a = a if a.ndim == 2 else a[:, None]
  ratio = jnp.exp(jnp.where(valid, logp - old_logp, 0.0))
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = jnp.minimum(ratio * a, clipped * a)
  pg = -surrogate
  if tis_weights is not None:
    pg = pg * jax.lax.stop_gradient(tis_weights.astype(jnp.float32))
  per_token = pg
  if ref_logp is not None and kl_coef:
    kl = k3_kl(logp, jnp.where(valid, ref_logp, logp))
    per_token = per_token + kl_coef * kl
  elif ref_logp is not None:
    kl = jax.lax.stop_gradient(k3_kl(logp, jnp.where(valid, ref_logp, logp)))
  else:
    kl = jnp.zeros_like(logp)
  loss = aggregate(per_token, m, agg, max_len)
  n = jnp.maximum(m.sum(), 1.0)
  tok_mean = lambda x: jnp.where(valid, x, 0.0).sum() / n  # noqa: E731
  is_clipped = valid & (ratio * a != surrogate)
  metrics = {
    'pg_loss': aggregate(pg, m, agg, max_len),
    'kl': tok_mean(jax.lax.stop_gradient(kl)),
    'clip_frac': tok_mean(is_clipped.astype(jnp.float32)),
    'ratio_mean': tok_mean(jax.lax.stop_gradient(ratio)),
    'ratio_max_dev': jnp.max(jnp.where(valid, jnp.abs(jax.lax.stop_gradient(ratio) - 1.0), 0.0)),
  }
  if tis_weights is not None:
    metrics['tis_weight_mean'] = tok_mean(jax.lax.stop_gradient(tis_weights.astype(jnp.float32)))
  return loss, metrics
