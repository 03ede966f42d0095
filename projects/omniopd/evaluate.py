"""What OmniOPD's claims measure: held-out accuracy and repetition loops of greedy decoding, and a
finished run's curves with its teacher-call and student-token budgets.

* `heldout`: greedy decoding of every held-out prompt (`common.rl.evaluate.greedy`: the loop's
  sampler at temperature 0):
  'accuracy' (the task's scorer gives full marks), 'repetition_loops' (how many responses ran out
  of tokens while repeating one unit of at most N/3 tokens three times at their end: the
  degenerate loops the paper counts) and 'response_len'. Every arm (OmniOPD, white-box OPD, SFT on
  traces, GRPO) logs these at each evaluation.
* `run_summary`: from metrics.jsonl, the eval curves with the cumulative teacher calls and student
  tokens at each evaluated step (`efficiency` turns them into accuracy gain per call / per token).
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import pathlib

import jax
import numpy as np

from common import metrics
from common import sharding
from common.rl import evaluate as rl_evaluate
from common.rl import rollout


def repetition_loop(tokens: Sequence[int], stopped: bool) -> bool:
  """True when a response ran out of tokens (not `stopped`) ending in a unit of p <= n/3 tokens
  repeated three times."""
  t = [int(x) for x in tokens]
  n = len(t)
  if stopped or n < 3:
    return False
  return any(t[n - 3 * p :] == t[n - p :] * 3 for p in range(1, n // 3 + 1))


def heldout(
  model,
  prompts: Sequence[rollout.Prompt],
  *,
  batch: int,
  sampling: rollout.Sampling,
  rewards: rollout.RewardSource,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
) -> dict[str, float]:
  """{'accuracy', 'repetition_loops', 'response_len'} of greedy decoding on `prompts`."""
  rewards = copy.copy(rewards)  # the run's verifier-failure count is the training rollouts'
  done = rl_evaluate.greedy(
    model, prompts, batch=batch, sampling=sampling, rewards=rewards, mesh=mesh, rules=rules
  )
  loops = 0
  for g in done:
    stopped = len(g.tokens) > 0 and int(g.tokens[-1]) in sampling.stop_tokens
    loops += repetition_loop(g.tokens, stopped)
  return {
    'accuracy': float(np.mean([float(g.reward >= 1.0) for g in done])) if done else 0.0,
    'repetition_loops': float(loops),
    'response_len': float(np.mean([len(g.tokens) for g in done])) if done else 0.0,
  }


def run_summary(workdir: str | pathlib.Path) -> dict:
  """{'eval_steps', 'accuracy', 'repetition_loops', 'teacher_calls', 'student_tokens'} per eval
  (the budgets are cumulative up to that step; 0 at step 0)."""
  rows = metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  train = {r['step']: r for r in rows if r['split'] == 'train'}
  evals = [r for r in rows if r['split'] == 'eval']

  def budget(step, key):
    done = [s for s in train if s <= step]
    return float(train[max(done)].get(key, 0.0)) if done else 0.0

  return {
    'eval_steps': [r['step'] for r in evals],
    'accuracy': [r['accuracy'] for r in evals],
    'repetition_loops': [r['repetition_loops'] for r in evals],
    'teacher_calls': [budget(r['step'], 'teacher_calls') for r in evals],
    'student_tokens': [budget(r['step'], 'student_tokens') for r in evals],
  }


def efficiency(summary: dict) -> dict[str, float]:
  """Final accuracy gain over step 0 per 1000 teacher calls and per 1000 student tokens (nan when
  the arm used none)."""
  gain = summary['accuracy'][-1] - summary['accuracy'][0]
  calls, toks = summary['teacher_calls'][-1], summary['student_tokens'][-1]
  return {
    'gain': gain,
    'gain_per_1k_calls': 1000 * gain / calls if calls else float('nan'),
    'gain_per_1k_tokens': 1000 * gain / toks if toks else float('nan'),
  }
