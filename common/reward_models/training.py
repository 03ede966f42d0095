"""Bradley-Terry training of reward heads (InstructGPT Eq. 1): -log sigmoid(r(x, y_w) - r(x, y_l)).

The loss itself is `common.preference.losses.bradley_terry` (weights, margin, TRL's reward
centring and metric names); this module runs the reward model on a `heads.pair_batch` and picks
the reward a head is trained on:
  'sequence'    the sequence head's r(x, y) (last-token or mean pooling);
  'token_mean'  the mean of the token head's rewards over the response (a token-level reward model
                trained from sequence preferences, as llama-rlhf's PairwiseScoreLoss does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from common.preference import losses as pref_losses
from common.reward_models import heads

LEVELS = ('sequence', 'token_mean')


def rewards_of(out: heads.RewardOutput, batch: Mapping[str, Any], level: str) -> jax.Array:
  """The reward [R] of every row at `level` (see the module docstring)."""
  if level == 'sequence':
    return out.rewards
  if level == 'token_mean':
    return heads.token_mean(out.token_rewards, batch['response_mask'])
  raise ValueError(f'level={level!r}; expected one of {LEVELS}')


def bradley_terry_loss(
  model: heads.RewardModel,
  batch: Mapping[str, Any],
  *,
  level: str = 'sequence',
  weights: jax.Array | None = None,
  margin: jax.Array | float = 0.0,
  center_rewards_coefficient: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array], heads.RewardOutput]:
  """(loss, metrics, the model's outputs on every row) for a `heads.pair_batch` batch.

  `weights` [B] are per-pair weights (0 drops a pair; data balancing reweights); metrics are
  bradley_terry's: loss, accuracy, margin, mean_reward (weighted means over the pairs).
  """
  out = model(batch)
  chosen, rejected = heads.split(rewards_of(out, batch, level))
  res = pref_losses.bradley_terry(
    chosen,
    rejected,
    margin=margin,
    center_rewards_coefficient=center_rewards_coefficient,
    mask=weights,
  )
  return res.loss, res.metrics, out
