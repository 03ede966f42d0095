"""common.rl.evaluate: greedy decoding per prompt (reward and completion, in order, the padded last
chunk dropped), pass@1 read from it, and a run's curves from metrics.jsonl."""

import json
import math

import numpy as np

from common import sharding
from common.rl import evaluate
from common.rl import rollout
from tests.common.rl import toy


def _kw():
  return dict(
    sampling=rollout.Sampling(
      prompt_len=4, max_new_tokens=3, temperature=1.0, stop_tokens=(toy.EOS,)
    ),
    rewards=rollout.VerifierRewards(toy.verifier),
    mesh=toy.one_device_mesh(),
    rules=sharding.DEFAULT_RULES,
  )


def test_greedy_gives_each_prompts_reward_and_completion_and_pass_at_1_reads_them():
  model, prompts = toy.model(seed=3), toy.prompts(7)
  done = evaluate.greedy(model, prompts, batch=4, **_kw())  # chunks of 4: the last one padded
  assert len(done) == len(prompts)
  for p, g in zip(prompts, done, strict=True):
    assert 1 <= len(g.tokens) <= 3
    assert toy.EOS not in g.tokens[:-1].tolist()  # decoding stops at the first EOS
    assert g.reward == toy.verifier(p, g.tokens)
  out = evaluate.greedy_pass_at_1(model, prompts, batch=4, **_kw())
  correct = [float(g.reward >= 1.0) for g in done]
  assert out['pass_at_1'] == np.mean(correct)
  for cluster in ('c0', 'c1'):
    mine = [c for p, c in zip(prompts, correct, strict=True) if p.cluster == cluster]
    assert out[f'pass_at_1/{cluster}'] == np.mean(mine)


def test_run_summary_reads_the_train_keys_asked_for_and_every_eval_key(tmp_path):
  rows = [
    {'step': 1, 'split': 'train', 'reward_mean': 0.5, 'pass_at_1': 0.25, 'time': 1.0},
    {'step': 2, 'split': 'eval', 'pass_at_1': 0.3, 'time': 2.0},
    {'step': 2, 'split': 'train', 'reward_mean': 0.75, 'pass_at_1': 0.5, 'time': 3.0},
    {'step': 4, 'split': 'eval', 'pass_at_1': 0.4, 'extra': 7.0, 'time': 4.0},
  ]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  s = evaluate.run_summary(tmp_path, {'reward': 'reward_mean', 'pass_rate': 'pass_at_1'})
  assert list(s) == ['train_steps', 'reward', 'pass_rate', 'eval_steps', 'eval']
  assert s['train_steps'] == [1, 2] and s['reward'] == [0.5, 0.75] and s['pass_rate'] == [0.25, 0.5]
  assert s['eval_steps'] == [2, 4] and s['eval']['pass_at_1'] == [0.3, 0.4]
  assert math.isnan(s['eval']['extra'][0]) and s['eval']['extra'][1] == 7.0
