"""What EBPO's claims measure, besides the RL loop's held-out greedy pass@1 (common.rl.evaluate):

* `all_fail_signal`: the paper's non-vanishing-signal theorem on a real policy. On groups where
  every response fails, GRPO's advantages and its policy gradient (KL coefficient 0, every loss
  aggregation) are exactly 0, while EBPO's raw advantages (before batch standardisation) equal
  -S mu_glob < 0 and give a nonzero gradient.
* `baseline_mse`: the paper's MSE theorem in simulation. Prompts have latent success
  probabilities theta_q ~ Beta(a, b); each gets G Bernoulli(theta_q) rewards. Baselines for
  theta_q:
    group mean      mu_q = mean of the G rewards                    (GRPO / Dr.GRPO / RLOO-style)
    EBPO (oracle)   (1-S) mu_q + S E[theta], S from the true within-prompt variance
                    sigma_w^2 = E[theta (1-theta)] and between-prompt variance tau^2 = Var(theta):
                    S = (sigma_w^2/G) / (sigma_w^2/G + tau^2); theory: MSE = (1-S) sigma_w^2 / G
                    against the group mean's sigma_w^2 / G (exact for this linear shrinkage).
    EBPO (plug-in)  what the algorithm computes: prompts streamed in batches of M through
                    projects.ebpo.losses.EBPOEstimator (Welford over all rewards and all group
                    means, updated before use), measured after a burn-in.
  MSE is against theta_q. The paper's theorem is for a Gaussian prior; the Beta prior with
  Bernoulli rewards is the RLVR case.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.rl import advantages as adv_lib
from common.rl import loss as loss_lib
from common.rl import rollout
from projects.ebpo import losses

# ---------------------------------------------------------------------------------------------------
# All-fail groups: GRPO's signal vanishes, EBPO's does not.


@functools.partial(nnx.jit, static_argnames='agg')
def grad_max(model, batch, advantages, agg):
  """max |d loss / d theta| over all parameters of the clipped surrogate with KL coefficient 0
  (jit-ed: eager dispatch is slow on busy CPUs)."""

  def f(m):
    logp = rollout.completion_logprobs(m, batch)
    return loss_lib.policy_loss(
      logp,
      jax.lax.stop_gradient(logp),
      jnp.asarray(advantages, jnp.float32),
      batch['completion_mask'],
      kl_coef=0.0,
      agg=agg,
    )[0]

  grads = nnx.grad(f)(model)
  return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))


def all_fail_signal(model: nnx.Module, *, trials: int = 3, seed: int = 0) -> dict[str, float]:
  """On `trials` random batches (6 groups of G=4, 12 prompt and 4 completion tokens drawn from
  ids 3-20, half the groups failing completely): GRPO's max |A| and max |grad| from the all-fail
  groups (per loss aggregation), and for EBPO 1 if its raw advantage is not -S mu_glob < 0 or its
  gradient vanished (else 0). Every value is 0 when the theorem holds."""
  values = {}
  rng = np.random.default_rng(seed)
  g, m, p, n = 4, 6, 12, 4
  for trial in range(trials):
    prompt = rng.integers(3, 21, size=(m * g, p)).astype(np.int32)
    prompt[:, 0] = 1
    completion = rng.integers(3, 21, size=(m * g, n)).astype(np.int32)
    lengths = rng.integers(1, n + 1, size=m * g)
    batch = jax.device_put(
      rollout.build_batch(prompt, np.ones_like(prompt, bool), completion, lengths)
    )
    rewards = (rng.random((m, g)) < 0.5).astype(np.float32)
    rewards[: m // 2] = 0.0  # half the groups fail completely
    fail = np.zeros((m, g), bool)
    fail[: m // 2] = True
    a_grpo = np.asarray(adv_lib.grpo(jnp.asarray(rewards)))
    only_fail = np.where(fail, a_grpo, 0.0).reshape(-1)
    values[f'trial {trial}: GRPO max|A| on all-fail groups'] = float(np.abs(a_grpo[fail]).max())
    for agg in loss_lib.AGGREGATIONS:
      key = f'trial {trial}: GRPO max|grad| from all-fail groups ({agg})'
      values[key] = float(grad_max(model, batch, only_fail, agg))
    est = losses.EBPOEstimator(standardize=False)
    _, raw, stats = est.advantages(rewards)
    expected = -stats.shrinkage[: m // 2, None] * stats.mu_glob[: m // 2, None]
    ok = np.allclose(raw[fail].reshape(m // 2, g), expected, rtol=1e-5) and np.all(raw[fail] < 0)
    ebpo_grad = float(grad_max(model, batch, np.where(fail, raw, 0.0).reshape(-1), 'token-mean'))
    values[f'trial {trial}: EBPO signal vanished (1) or not (0)'] = float(
      not (ok and ebpo_grad > 1e-8)
    )
  return values


# ---------------------------------------------------------------------------------------------------
# Baseline MSE in simulation.


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
