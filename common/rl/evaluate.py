"""Evaluation for RL with verifiable rewards: greedy pass@1 on held-out prompts (overall and per
cluster), and the per-prompt pass rates of the difficulty curriculum."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax
import numpy as np

from common import sharding
from common import train_loop
from common.rl import rollout as rollout_lib


def _chunks(prompts: Sequence[rollout_lib.Prompt], size: int):
  """Fixed-size chunks (the last padded with copies of its last prompt: one compiled shape)."""
  for start in range(0, len(prompts), size):
    chunk = list(prompts[start : start + size])
    real = len(chunk)
    yield chunk + [chunk[-1]] * (size - real), real


def greedy_pass_at_1(
  model: nnx.Module,
  prompts: Sequence[rollout_lib.Prompt],
  *,
  batch: int,
  sampling: rollout_lib.Sampling,
  rewards: rollout_lib.RewardSource,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> dict[str, float]:
  """Greedy pass@1 (reward >= 1) overall and per cluster, in chunks of `batch` prompts."""
  correct: list[float] = []
  for chunk, real in _chunks(prompts, batch):
    ro = rollout_lib.rollout(
      model,
      chunk,
      jax.random.key(0),
      sampling=sampling,
      rewards=rewards,
      num_samples=1,
      mesh=mesh,
      rules=rules,
      temperature=0.0,
    )
    correct.extend((ro.rewards[:real, 0] >= 1.0).astype(float).tolist())
  out = {'pass_at_1': float(np.mean(correct)) if correct else 0.0}
  by: dict[str, list[float]] = {}
  for p, c in zip(prompts, correct, strict=True):
    by.setdefault(p.cluster, []).append(c)
  if len(by) > 1:
    out.update({f'pass_at_1/{k}': float(np.mean(v)) for k, v in sorted(by.items())})
  return out


def pass_rates(
  model: nnx.Module,
  prompts: Sequence[rollout_lib.Prompt],
  k: int,
  *,
  batch: int,
  sampling: rollout_lib.Sampling,
  rewards: rollout_lib.RewardSource,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  seed: int,
) -> dict[int, float]:
  """{uid: mean of (reward >= 1) over k samples}: the difficulty curriculum's order."""
  out: dict[int, float] = {}
  for chunk, real in _chunks(prompts, max(1, batch // max(k, 1))):
    ro = rollout_lib.rollout(
      model,
      chunk,
      train_loop.step_key(seed, 0, 'pass_rates'),
      sampling=sampling,
      rewards=rewards,
      num_samples=k,
      mesh=mesh,
      rules=rules,
    )
    for p, r in zip(chunk[:real], ro.rewards[:real], strict=True):
      out[p.uid] = float(np.mean(r >= 1.0))
  return out
