"""Evaluation for RL with verifiable rewards: greedy decoding of held-out prompts (`greedy`: each
prompt's reward and completion; `greedy_pass_at_1` overall and per cluster), the per-prompt pass
rates of the difficulty curriculum, and a finished run's curves from its metrics.jsonl
(`run_summary`)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import pathlib

from flax import nnx
import jax
import numpy as np

from common import metrics
from common import sharding
from common import train_loop
from common.rl import rollout as rollout_lib


def _chunks(prompts: Sequence[rollout_lib.Prompt], size: int):
  """Fixed-size chunks (the last padded with copies of its last prompt: one compiled shape)."""
  for start in range(0, len(prompts), size):
    chunk = list(prompts[start : start + size])
    real = len(chunk)
    yield chunk + [chunk[-1]] * (size - real), real


@dataclasses.dataclass(frozen=True)
class Greedy:
  """One prompt's greedy response: its sequence reward and its completion tokens (stop included)."""

  reward: float
  tokens: np.ndarray  # int [length]


def greedy(
  model: nnx.Module,
  prompts: Sequence[rollout_lib.Prompt],
  *,
  batch: int,
  sampling: rollout_lib.Sampling,
  rewards: rollout_lib.RewardSource,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> list[Greedy]:
  """Greedy decoding (temperature 0) of every prompt in chunks of `batch` prompts, in order."""
  out: list[Greedy] = []
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
    out.extend(
      Greedy(float(ro.rewards[i, 0]), ro.completion[i, : int(ro.lengths[i])]) for i in range(real)
    )
  return out


def greedy_pass_at_1(
  model: nnx.Module, prompts: Sequence[rollout_lib.Prompt], **kw
) -> dict[str, float]:
  """Greedy pass@1 (reward >= 1) overall and per cluster; `kw`: `greedy`'s keywords (batch,
  sampling, rewards, mesh, rules)."""
  done = greedy(model, prompts, **kw)
  correct = [float(g.reward >= 1.0) for g in done]
  out = {'pass_at_1': float(np.mean(correct)) if correct else 0.0}
  by: dict[str, list[float]] = {}
  for p, c in zip(prompts, correct, strict=True):
    by.setdefault(p.cluster, []).append(c)
  if len(by) > 1:
    out.update({f'pass_at_1/{k}': float(np.mean(v)) for k, v in sorted(by.items())})
  return out


def samples(
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
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """{uid: (sequence rewards [k], response lengths [k])} of k samples per prompt, in chunks of
  about `batch` sequences, every chunk under the same key."""
  out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
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
    lengths = np.asarray(ro.lengths).reshape(len(chunk), -1)
    for p, r, n in zip(chunk[:real], ro.rewards[:real], lengths[:real], strict=True):
      out[p.uid] = (np.asarray(r), n)
  return out


def pass_rates(
  model: nnx.Module,
  prompts: Sequence[rollout_lib.Prompt],
  k: int,
  **kwargs,
) -> dict[int, float]:
  """{uid: mean of (reward >= 1) over k samples}: the difficulty curriculum's order. kwargs: those
  of `samples` (batch, sampling, rewards, mesh, rules, seed)."""
  return {
    uid: float(np.mean(r >= 1.0)) for uid, (r, _) in samples(model, prompts, k, **kwargs).items()
  }


def run_summary(workdir: str | pathlib.Path, train_keys: Mapping[str, str]) -> dict:
  """A finished RL run's curves from its metrics.jsonl: {'train_steps', one list per
  `train_keys` item (name: the train rows' key), 'eval_steps', 'eval': {key: [values]}} (an eval
  row without a key gives NaN)."""
  rows = metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  train = [r for r in rows if r['split'] == 'train']
  evals = [r for r in rows if r['split'] == 'eval']
  keys = sorted({k for r in evals for k in r if k not in ('step', 'split')})
  return {
    'train_steps': [r['step'] for r in train],
    **{name: [r[key] for r in train] for name, key in train_keys.items()},
    'eval_steps': [r['step'] for r in evals],
    'eval': {k: [r.get(k, float('nan')) for r in evals] for k in keys},
  }
