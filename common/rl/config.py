"""The config blocks the RL papers share (EBPO, EAD, Q-RM, OmniOPD): the warmed-up tiny policy and
its task set, the loop's settings at smoke scale, the optimizer, and the SmolLM2-135M-Instruct
variant. A paper's configs/base.py builds its config from these and adds its own blocks; every
value here is one all four used before they shared it (every named config's to_dict() was
checked unchanged, values and key order, when they moved here).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from common.rl import loop
from common.rl import policies


def tiny_policy(c: ml_collections.ConfigDict, *, max_eval: int = -1) -> None:
  """c.model (the shared tiny character policy), c.warmup (its SFT warm-up: the defaults of
  common.rl.policies.WarmupConfig; unused for pretrained models) and c.data (the shared smoke task
  set, common.rl.tasks; max_eval held-out prompts, -1: all)."""
  c.model = ml_collections.ConfigDict(dict(kind='tiny', name=''))
  c.warmup = ml_collections.ConfigDict(dataclasses.asdict(policies.WarmupConfig()))
  c.data = ml_collections.ConfigDict(
    dict(task_set='smoke', seed=0, max_train=-1, max_eval=max_eval)
  )


def rl(**overrides) -> ml_collections.ConfigDict:
  """common.rl.loop.rl_config() at the smoke scale: G = 4 responses for each of 16 prompts per
  step, prompts of 12 tokens, up to 6 new tokens at temperature 1, KL 0.001 (the papers' beta),
  evaluation in batches of 128; then `overrides`."""
  c = loop.rl_config()
  c.update(
    dict(
      estimator='grpo',
      group_size=4,
      prompts_per_step=16,
      prompt_len=12,
      max_new_tokens=6,
      temperature=1.0,
      kl_coef=0.001,
      eval_batch=128,
    )
  )
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise ValueError(f'rl: unknown keys {unknown}; known: {sorted(c.keys())}')
  c.update(overrides)
  return c


def optimizer(lr: float) -> ml_collections.ConfigDict:
  """AdamW (common.optim) at `lr`: betas (0.9, 0.99), no weight decay, gradients clipped to 1."""
  return ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.99, weight_decay=0.0, clip_norm=1.0))


# Adam's step size for RL from a warmed (SFT'd) SmolLM2 start at 8 prompts x G = 4 per step: fixed
# T = 1 GRPO over 40 steps loses 0.12 of held-out greedy pass@1 at 1e-5 (the released-model
# configs' rate), barely moves at 1e-6, gains pass@1 at T = 1 at 3e-6 (projects/ead/README.md).
WARMED_START_LR = 3e-6


def smollm2(
  c: ml_collections.ConfigDict,
  *,
  max_new_tokens: int,
  task_set: str = 'smollm2',
  log_every: int = 5,
  warmup_steps: int = 0,
  lr: float = 1e-5,
  **rl_overrides,
) -> None:
  """The SmolLM2-135M-Instruct variant (python -m common.assets fetch smollm2): its task set in
  the chat template with 100 held-out questions, G = 4, 8 prompts per step left-padded to 96
  tokens, `max_new_tokens`, evaluation in batches of 50 (then `rl_overrides`), Adam at `lr`, 40
  steps evaluated every 20, checkpoints every 10. c.warmup becomes the pretrained model's SFT
  warm-up (common.rl.policies.PretrainedWarmup) with `warmup_steps` (0: the released model); a
  warmed start wants lr=WARMED_START_LR."""
  c.model.update(kind='pretrained', name='smollm2')
  c.warmup = ml_collections.ConfigDict(
    dataclasses.asdict(policies.PretrainedWarmup(steps=warmup_steps))
  )
  c.data.update(task_set=task_set, max_eval=100)
  c.rl.update(
    dict(
      group_size=4,
      prompts_per_step=8,
      prompt_len=96,
      max_new_tokens=max_new_tokens,
      eval_batch=50,
      **rl_overrides,
    )
  )
  c.optimizer.update(lr=lr)
  c.train.update(num_steps=40, log_every=log_every, eval_every=20)
  c.checkpoint.every_steps = 10
