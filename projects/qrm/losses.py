"""Q-RM's objective, the DPO baseline's, and the token rewards both give the RL loop.

Q-RM loss (arXiv 2505.23363; the authors' QRMLoss in homzer/llama-rlhf src/criterion.py): with
m_w, m_l the masked means of log phi over the chosen / rejected response tokens,

    L = -log sigmoid(beta (m_w - m_l) - gamma),          beta = 0.2, gamma = 2.0 by default,

decreasing in m_w - m_l; padding never enters a mean. DPO (the implicit-reward baseline) is
`common.preference.losses.dpo` on summed log-ratios to the frozen starting policy.

Token rewards for the RL loop (`TokenRewards`, a `common.rl.rollout.RewardSource`):
  'qrm'  r_t = beta log phi(a_t | s_t) from the trained Q-RM network's logits Z;
  'dpo'  r_t = beta (log pi_dpo(a_t | s_t) - log pi_ref(a_t | s_t)), the DPO-implicit reward;
both on every response token (Rewards.token), while Rewards.sequence stays the verifier's outcome,
so pass@1 and the evaluation are measured by the task's scorer whatever the arm trains on. The
loop normalises a group's token rewards with the run's estimator and, by default, gives each token
its own (`common.rl.advantages.immediate`: both rewards already are advantages, Q - V).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common.preference import losses as pref_losses
from common.rl import rollout

RM_LOSSES = ('qrm', 'dpo')
REWARDS = ('orm', 'dpo', 'qrm')


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [..., N] over positions where mask > 0 (a `where`: padding holding -inf or NaN adds
  nothing); 0 for an empty row."""
  keep = jnp.asarray(mask) > 0
  total = jnp.sum(jnp.where(keep, jnp.asarray(x, jnp.float32), 0.0), axis=-1)
  return total / jnp.maximum(keep.sum(-1), 1).astype(jnp.float32)


def qrm_loss(
  logphi_chosen: jax.Array,
  mask_chosen: jax.Array,
  logphi_rejected: jax.Array,
  mask_rejected: jax.Array,
  *,
  beta: float = 0.2,
  gamma: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean over pairs of -log sigmoid(beta (m_w - m_l) - gamma), metrics) for per-token log phi
  [B, N] of the chosen and rejected responses and their masks."""
  m_w = masked_mean(logphi_chosen, mask_chosen)
  m_l = masked_mean(logphi_rejected, mask_rejected)
  logits = beta * (m_w - m_l) - gamma
  losses = -jax.nn.log_sigmoid(logits)
  metrics = {
    'loss': losses.mean(),
    'accuracy': jnp.mean((m_w > m_l).astype(jnp.float32) + 0.5 * (m_w == m_l)),
    'margin': jnp.mean(m_w - m_l),
    'chosen_mean_logphi': m_w.mean(),
    'rejected_mean_logphi': m_l.mean(),
  }
  return losses.mean(), metrics


def rm_config() -> ml_collections.ConfigDict:
  """config.rm: how the token-level reward model (Q-RM or DPO) is trained."""
  return ml_collections.ConfigDict(
    dict(
      steps=200,
      batch_size=32,
      lr=1e-4,
      beta=0.2,  # Q-RM's beta (loss and token rewards)
      gamma=2.0,  # Q-RM's margin
      dpo_beta=0.1,  # DPO's beta (loss and implicit token rewards)
      workdir='',  # '' = <run workdir>/rm_<reward.kind>; share one across arms to train it once
      log_every=25,
    )
  )


def check_rm_config(rm: ml_collections.ConfigDict) -> None:
  if rm.steps < 1 or rm.batch_size < 1 or not rm.lr > 0:
    raise config_lib.ConfigError('rm.steps, rm.batch_size and rm.lr must be positive')
  if not rm.beta > 0 or not rm.dpo_beta > 0 or rm.gamma < 0:
    raise config_lib.ConfigError('rm.beta and rm.dpo_beta must be > 0 and rm.gamma >= 0')


def _pairs_of(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """[B, 2, ...] pair rows -> [2B, ...] with chosen rows first (scoring's layout)."""
  return {k: jnp.concatenate([v[:, 0], v[:, 1]], axis=0) for k, v in batch.items()}


def make_rm_loss_fn(kind: str, rm: ml_collections.ConfigDict):
  """loss_fn(model, batch, key) for train_loop.fit on `input_pipeline.pair_iterator` batches."""
  if kind not in RM_LOSSES:
    raise config_lib.ConfigError(f'reward model {kind!r}; expected one of {RM_LOSSES}')

  def loss_fn(model, batch, key):
    del key
    rows = _pairs_of(batch)
    b = batch['targets'].shape[0]
    logp = rollout.completion_logprobs(model, rows)
    mask = rows['completion_mask']
    if kind == 'qrm':
      return qrm_loss(logp[:b], mask[:b], logp[b:], mask[b:], beta=rm.beta, gamma=rm.gamma)
    keep = mask > 0
    seq = jnp.where(keep, logp, 0.0).sum(-1)
    ref = jnp.where(keep, rows['ref_logp'], 0.0).sum(-1)
    out = pref_losses.dpo(seq[:b], seq[b:], ref[:b], ref[b:], beta=rm.dpo_beta)
    metrics = dict(out.metrics)
    metrics['loss'] = out.loss
    return out.loss, metrics

  return loss_fn


class TokenRewards:
  """A RewardSource: the verifier's outcome as the sequence reward and a token-level reward model's
  per-token rewards (see the module docstring). `scorers` are callables batch -> [R, N] log-probs
  (common.rl.rollout.score bound to a network); reward = scale * (scorers[0] - scorers[1]) or
  scale * scorers[0] with one scorer."""

  def __init__(
    self,
    verifier: rollout.VerifierRewards,
    scorers: Sequence[Any],
    scale: float,
    *,
    prompt_len: int,
    pad_id: int,
  ):
    self.verifier = verifier
    self.scorers = list(scorers)
    self.scale = float(scale)
    self.prompt_len, self.pad_id = prompt_len, pad_id
    self._last: dict[str, float] = {}

  def score(self, prompts, completions, lengths, group_size) -> rollout.Rewards:
    seq = self.verifier.score(prompts, completions, lengths, group_size).sequence
    tokens, mask = rollout.pad_prompts(prompts, self.prompt_len, self.pad_id)
    batch = rollout.build_batch(
      np.repeat(tokens, group_size, axis=0),
      np.repeat(mask, group_size, axis=0),
      np.asarray(completions),
      np.asarray(lengths),
    )
    logp = [np.asarray(s(batch), np.float32) for s in self.scorers]
    raw = logp[0] - logp[1] if len(logp) == 2 else logp[0]
    valid = batch['completion_mask'] > 0
    token = np.where(valid, self.scale * raw, 0.0).astype(np.float32)
    self._last = {'token_reward_mean': float(token[valid].mean()) if valid.any() else 0.0}
    return rollout.Rewards(seq, token, None)

  def state_dict(self) -> dict[str, Any]:
    return self.verifier.state_dict()

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self.verifier.load_state_dict(state)

  def metrics(self) -> dict[str, float]:
    return {**self.verifier.metrics(), **self._last}
