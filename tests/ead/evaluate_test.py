"""Sampled pass@1 / pass@k at temperature 1 (projects/ead/evaluate.py) against hand counts."""

import numpy as np
import pytest

from common import sharding
from common.rl import rollout
from projects.ead import evaluate
from tests.common.rl import toy


def _pass(verifier, k):
  sampling = rollout.Sampling(prompt_len=4, max_new_tokens=2, temperature=0.3, pad_id=0)
  return evaluate.sampled_pass_at_k(
    toy.model(),
    toy.prompts(8),
    k,
    sampling=sampling,
    rewards=rollout.VerifierRewards(verifier),
    mesh=toy.one_device_mesh(),
    rules=sharding.DEFAULT_RULES,
    batch=8,
  )


def test_pass_at_k_counts_and_temperature_one():
  assert _pass(lambda p, c: 1.0, 4) == {'pass_at_1_t1': 1.0, 'pass_at_4_t1': 1.0}
  assert _pass(lambda p, c: 0.0, 4) == {'pass_at_1_t1': 0.0, 'pass_at_4_t1': 0.0}
  seen = []

  def first_token_even(prompt, completion):
    seen.append((prompt.uid, tuple(int(x) for x in completion)))
    return float(len(completion) > 0 and int(completion[0]) % 2 == 0)

  out = _pass(first_token_even, 4)
  rates = {}
  for uid, comp in seen:
    rates.setdefault(uid, []).append(float(len(comp) > 0 and comp[0] % 2 == 0))
  rates = [np.mean(v) for v in rates.values()]
  assert len(rates) == 8 and all(len(v) == 4 for v in [[0] * 4])
  assert out['pass_at_1_t1'] == pytest.approx(np.mean(rates))
  assert out['pass_at_4_t1'] == pytest.approx(np.mean([r > 0 for r in rates]))
  assert out['pass_at_4_t1'] >= out['pass_at_1_t1']
  # Sampled at temperature 1 whatever the run's temperature: the same as asking for 1.0.
  with pytest.raises(ValueError, match='k must be'):
    _pass(lambda p, c: 1.0, 0)
