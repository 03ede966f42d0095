"""EBPO's baseline-MSE theorem in simulation: shrinking the group mean toward the global mean helps.

Prompts have latent success probabilities theta_q ~ Beta(a, b); each gets G Bernoulli(theta_q)
rewards. Baselines for theta_q:
  group mean      mu_q = mean of the G rewards                     (GRPO / Dr.GRPO / RLOO-style)
  EBPO (oracle)   (1-S) mu_q + S E[theta], S from the true within-prompt variance
                  sigma_w^2 = E[theta (1-theta)] and between-prompt variance tau^2 = Var(theta):
                  S = (sigma_w^2/G) / (sigma_w^2/G + tau^2); theory: MSE = (1-S) sigma_w^2 / G
                  against the group mean's sigma_w^2 / G (exact for this linear shrinkage).
  EBPO (plug-in)  what the algorithm computes: prompts streamed in batches of M through
                  projects.ebpo.losses.EBPOEstimator (Welford over all rewards and all group means,
                  updated before use), measured after a burn-in.
MSE is against theta_q. The paper's theorem is for a Gaussian prior; the Beta prior with Bernoulli
rewards is the RLVR case.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from projects.ebpo import losses


@dataclasses.dataclass(frozen=True)
class MSEResult:
  group_size: int
  mse_group_mean: float
  mse_oracle: float
  mse_plugin: float
  theory_ratio: float  # 1 - S_oracle
  shrinkage_oracle: float
  shrinkage_plugin: float  # the plug-in S at the end of the stream

  @property
  def ratio_oracle(self) -> float:
    return self.mse_oracle / self.mse_group_mean

  @property
  def ratio_plugin(self) -> float:
    return self.mse_plugin / self.mse_group_mean


def baseline_mse(
  group_size: int,
  *,
  num_prompts: int = 100_000,
  batch_prompts: int = 64,
  burn_in_batches: int = 20,
  alpha: float = 0.7,
  beta: float = 1.3,
  seed: int = 0,
) -> MSEResult:
  """MSEs of the three baselines over `num_prompts` prompts (plug-in: after the burn-in)."""
  rng = np.random.default_rng([seed, group_size])
  theta = rng.beta(alpha, beta, size=num_prompts)
  rewards = (rng.random((num_prompts, group_size)) < theta[:, None]).astype(np.float64)
  mu_q = rewards.mean(1)
  mean_theta = alpha / (alpha + beta)
  tau2 = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
  sigma_w2 = mean_theta - (tau2 + mean_theta**2)  # E[theta (1 - theta)]
  s_oracle = losses.shrinkage(sigma_w2, tau2, group_size)
  v_oracle = (1 - s_oracle) * mu_q + s_oracle * mean_theta

  est = losses.EBPOEstimator(standardize=False)
  v_plugin = np.full(num_prompts, np.nan)
  for start in range(0, num_prompts, batch_prompts):
    sl = slice(start, start + batch_prompts)
    stats = est.update(rewards[sl])
    v_plugin[sl] = (1 - stats.shrinkage) * mu_q[sl] + stats.shrinkage * stats.mu_glob
  keep = np.arange(num_prompts) >= burn_in_batches * batch_prompts
  err = lambda v: float(np.mean((v[keep] - theta[keep]) ** 2))  # noqa: E731
  return MSEResult(
    group_size=group_size,
    mse_group_mean=err(mu_q),
    mse_oracle=err(v_oracle),
    mse_plugin=err(v_plugin),
    theory_ratio=1.0 - s_oracle,
    shrinkage_oracle=s_oracle,
    shrinkage_plugin=float(stats.shrinkage[-1]),
  )
