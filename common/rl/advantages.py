"""Group advantage estimators for RL with verifiable rewards (the GRPO family).

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

An estimator is an object with the `Estimator` protocol, passed to the RL loop (never chosen there
by name): `advantages(rewards, mask, prompts) -> Advantages` plus JSON-able checkpoint state, and an
optional `group_filter` for DAPO-style dynamic sampling. The stateless estimators here have no
state; a paper's stateful estimator (EBPO's empirical-Bayes prior, projects/ebpo/losses.py)
implements the same protocol in its own package. `ESTIMATORS` maps config names to classes.

Token-level rewards (a reward source's `Rewards.token`) go through the same estimators
(`token_advantages`), as GRPO's process supervision does (Shao et al. 2024, DeepSeekMath §4.1.3):
every reward a group's responses carry (one per token for a dense token-level reward model, one on
the last token for an outcome reward) is normalised by the estimator as one group of rewards, and
token t of a response gets the sum of its normalised rewards at or after t (`returns_to_go`;
`immediate` keeps each token's own, for rewards that already are advantages, such as Q-RM's). An
outcome reward on the last token thus gives every token the sequence path's A_i, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
from typing import Any
from typing import Protocol

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


# ---------------------------------------------------------------------------------------------------
# The estimator protocol and the stateless estimators as objects.


@dataclasses.dataclass
class Advantages:
  """One batch's advantages: `values` [M, G] (what the loss sees), `raw` [M, G] (before any batch
  standardisation: what `zero_signal_frac` measures) and scalar metrics to log."""

  values: np.ndarray
  raw: np.ndarray
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Estimator(Protocol):
  """What the RL loop calls for advantages (see the module docstring)."""

  def advantages(
    self, rewards: np.ndarray, mask: np.ndarray, prompts: Sequence[Any]
  ) -> Advantages: ...

  def group_filter(self, rewards: np.ndarray) -> np.ndarray | None:
    """[M] bool: groups to keep (the loop refills the rest), or None for no dynamic sampling."""
    ...

  def state_dict(self) -> dict[str, Any]: ...

  def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Stateless:
  """An estimator given by a pure function of (rewards, mask); nothing to checkpoint."""

  fn = staticmethod(grpo)

  def advantages(self, rewards, mask, prompts) -> Advantages:
    del prompts
    a = np.asarray(type(self).fn(jnp.asarray(rewards), jnp.asarray(mask)))
    return Advantages(a, a)

  def group_filter(self, rewards: np.ndarray) -> np.ndarray | None:
    del rewards
    return None

  def state_dict(self) -> dict[str, Any]:
    return {}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    del state


class GRPO(Stateless):
  fn = staticmethod(grpo)


class DrGRPO(Stateless):
  fn = staticmethod(dr_grpo)


class RLOO(Stateless):
  fn = staticmethod(rloo)


class DAPO(Stateless):
  """GRPO's advantages with DAPO's dynamic sampling: all-equal groups are dropped and refilled."""

  fn = staticmethod(dapo)

  def group_filter(self, rewards: np.ndarray) -> np.ndarray:
    return np.asarray(dapo_keep(jnp.asarray(rewards)))


ESTIMATORS = {'grpo': GRPO, 'dr_grpo': DrGRPO, 'rloo': RLOO, 'dapo': DAPO}


# ---------------------------------------------------------------------------------------------------
# Token-level rewards through the same estimators.


def returns_to_go(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[R, N] sum over s >= t of values[:, s] (0 where mask is 0): token t is credited with every
  (normalised) reward at or after it, never with an earlier one (REINFORCE's reward-to-go;
  DeepSeekMath §4.1.3's process-supervision advantage)."""
  keep = np.asarray(mask, bool)
  x = np.where(keep, values, 0.0).astype(np.float32)
  return np.where(keep, np.cumsum(x[:, ::-1], axis=1)[:, ::-1], 0.0).astype(np.float32)


def immediate(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[R, N] each token's own normalised reward (0 where mask is 0): for token rewards that already
  are advantages, beta log pi*(a|s) = Q*(s, a) - V*(s) (Q-RM, Eq. 9)."""
  return np.where(np.asarray(mask, bool), values, 0.0).astype(np.float32)


@dataclasses.dataclass
class TokenAdvantages:
  """What `token_advantages` gives the loop: the estimator's output on the groups' rewards
  (`advantages.values` [M, K], K the most rewards a group carries), which of those K slots hold a
  reward of a kept group (`mask` [M, K]), and the per-token advantages [M*G, N] the loss sees."""

  advantages: Advantages
  mask: np.ndarray
  per_token: np.ndarray


def token_advantages(
  estimator: Estimator,
  token_rewards: np.ndarray,
  reward_mask: np.ndarray | None,
  completion_mask: np.ndarray,
  group_mask: np.ndarray,
  prompts: Sequence[Any],
  credit=returns_to_go,
) -> TokenAdvantages:
  """Per-token advantages from per-token rewards through `estimator` (see the module docstring).

  Args:
    token_rewards: [M*G, N] rewards aligned with the completion tokens, prompt-major rows.
    reward_mask: [M*G, N] bool, the tokens that carry a reward (None: every completion token).
    completion_mask: [M*G, N] the loop's completion mask (real generated tokens).
    group_mask: [M, G] bool, responses of kept groups (DAPO's dynamic sampling masks groups).
    prompts: the M prompts (passed through to the estimator).
    credit: (normalised rewards [M*G, N], token mask [M*G, N]) -> per-token advantages.

  Each group's rewards are laid out response by response, token by token, in one row of [M, K]
  (K the largest count), so the estimator runs once per step on one [M, K] array (a stateful
  estimator updates once, as on the sequence path); an outcome reward (one per response) gives
  K = G and exactly the sequence path's [M, G] input.
  """
  m, g = np.shape(group_mask)
  rows, n = np.shape(token_rewards)
  if rows != m * g:
    raise ValueError(f'token rewards have {rows} rows for {m} groups of {g} responses')
  valid = np.asarray(completion_mask) > 0
  carry = valid if reward_mask is None else valid & np.asarray(reward_mask, bool)
  flat = carry.reshape(m, g * n)
  slot = np.cumsum(flat, axis=1) - 1  # where each carried reward goes in its group's row
  k = max(int(flat.sum(axis=1).max(initial=0)), 1)
  gi, ci = np.nonzero(flat)
  values = np.zeros((m, k), np.float32)
  kept = np.zeros((m, k), bool)
  values[gi, slot[gi, ci]] = np.asarray(token_rewards, np.float32).reshape(m, g * n)[gi, ci]
  kept[gi, slot[gi, ci]] = np.asarray(group_mask, bool)[gi, ci // n]
  adv = estimator.advantages(values, kept, prompts)
  normalised = np.zeros((m, g * n), np.float32)
  normalised[gi, ci] = np.asarray(adv.values, np.float32)[gi, slot[gi, ci]]
  tokens = valid & np.repeat(np.asarray(group_mask, bool).reshape(-1), n).reshape(rows, n)
  return TokenAdvantages(adv, kept, credit(normalised.reshape(rows, n), tokens))
