"""What EAD's claims measure on a policy and on a run.

* `sampled_pass_at_k`: held-out pass@1 and pass@k from k samples per prompt at temperature 1 (the
  target policy, the same for every arm whatever temperature it trained with): pass@1 is the mean
  per-prompt success rate (the unbiased estimate from k samples), pass@k the fraction of prompts
  with at least one success among the k. The loop logs them at every evaluation, beside its greedy
  pass@1 (`RLSetup.extra_eval`).
* `run_summary`: a finished run's curves from metrics.jsonl: reward per sample (the training
  rollouts' mean reward, under each arm's own behaviour temperatures), policy entropy (per
  response token at temperature 1), and the eval metrics per step.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import pathlib

import jax
import numpy as np

from common import sharding
from common.rl import evaluate as evaluate_lib
from common.rl import rollout


def sampled_pass_at_k(
  model,
  prompts: Sequence[rollout.Prompt],
  k: int,
  *,
  sampling: rollout.Sampling,
  rewards: rollout.RewardSource,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  batch: int,
  seed: int = 0,
) -> dict[str, float]:
  """{'pass_at_1_t1', 'pass_at_{k}_t1'} over `prompts`, k samples each at temperature 1, rolled
  out `batch` prompts (batch * k rows) at a time."""
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  rates = evaluate_lib.pass_rates(
    model,
    prompts,
    k,
    batch=batch * k,  # `batch` prompts per rollout (divisible by the mesh's batch ways)
    sampling=_at_temperature_one(sampling),
    rewards=copy.copy(rewards),  # the run's failure counts are the training rollouts'
    mesh=mesh,
    rules=rules,
    seed=seed,
  )
  r = np.asarray([rates[p.uid] for p in prompts])
  return {'pass_at_1_t1': float(r.mean()), f'pass_at_{k}_t1': float((r > 0).mean())}


def _at_temperature_one(sampling: rollout.Sampling) -> rollout.Sampling:
  return rollout.Sampling(
    prompt_len=sampling.prompt_len,
    max_new_tokens=sampling.max_new_tokens,
    temperature=1.0,
    stop_tokens=sampling.stop_tokens,
    pad_id=sampling.pad_id,
  )


def run_summary(workdir: str | pathlib.Path) -> dict:
  """{'train_steps', 'reward', 'entropy', 'eval_steps', 'eval': {key: [values]}}."""
  return evaluate_lib.run_summary(workdir, {'reward': 'reward_mean', 'entropy': 'entropy'})
