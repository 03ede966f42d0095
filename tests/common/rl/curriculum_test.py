"""Curriculum samplers: deterministic by step, epochs cover the pool, cluster runs, easy-to-hard."""

import numpy as np
import pytest

from common.rl import curriculum


def _pool(n=30):
  return [curriculum.Prompt(uid=i, tokens=(1, i), cluster=f'k{i % 3}') for i in range(n)]


def test_shuffled_epochs_are_permutations_and_batches_depend_only_on_step():
  s = curriculum.Shuffled(_pool(), batch_size=6, seed=1)
  epoch = [p.uid for step in range(1, 6) for p in s.batch(step)]
  assert sorted(epoch) == list(range(30))
  again = curriculum.Shuffled(_pool(), batch_size=6, seed=1)
  assert [p.uid for p in again.batch(4)] == [p.uid for p in s.batch(4)]
  assert [p.uid for p in s.batch(6)] != [p.uid for p in s.batch(1)]  # the next epoch reshuffles
  assert [p.uid for p in s.refill(3, 1)] == [p.uid for p in again.refill(3, 1)]


def test_clustered_keeps_each_cluster_contiguous():
  s = curriculum.Clustered(_pool(), batch_size=5, seed=2)
  order = [s.at(i).cluster for i in range(30)]
  runs = [c for i, c in enumerate(order) if i == 0 or c != order[i - 1]]
  assert len(runs) == 3 and sorted(runs) == ['k0', 'k1', 'k2']
  assert sorted(s.at(i).uid for i in range(30)) == list(range(30))


def test_difficulty_orders_easy_to_hard_and_caches_pass_rates(tmp_path):
  rates = {i: (i % 7) / 7 for i in range(30)}
  s = curriculum.make_sampler('difficulty', _pool(), 10, pass_rates=rates)
  seen = [rates[s.at(i).uid] for i in range(30)]
  assert seen == sorted(seen, reverse=True)
  assert [p.uid for p in s.batch(1)] == [p.uid for p in s.batch(4)]  # same order every epoch
  calls = []

  def compute():
    calls.append(1)
    return rates

  path = tmp_path / 'rates.json'
  assert curriculum.cached_pass_rates(path, 'fp', compute) == rates
  assert curriculum.cached_pass_rates(path, 'fp', compute) == rates
  assert len(calls) == 1
  curriculum.cached_pass_rates(path, 'other', compute)
  assert len(calls) == 2
  with pytest.raises(ValueError, match='no pass rate'):
    curriculum.Difficulty(_pool(), 5, {0: 1.0})
  with pytest.raises(ValueError, match='unknown curriculum'):
    curriculum.make_sampler('nope', _pool(), 5)
  assert np.isclose(seen[0], 6 / 7)


def test_clustered_blocks_rotate_through_the_clusters():
  s = curriculum.Clustered(_pool(), batch_size=2, seed=3, block_batches=2)  # runs of 4 prompts
  order = [s.at(i).cluster for i in range(30)]
  assert sorted(s.at(i).uid for i in range(30)) == list(range(30))
  runs = []
  for c in order:
    if not runs or runs[-1][0] != c:
      runs.append([c, 0])
    runs[-1][1] += 1
  assert all(n % 4 == 0 or n % 4 == 2 for _, n in runs)  # 10 per cluster = 4 + 4 + 2
  assert {c for c, _ in runs[:3]} == {'k0', 'k1', 'k2'}  # every cluster in the first round
  with pytest.raises(ValueError, match='block_batches'):
    curriculum.Clustered(_pool(), 2, block_batches=-1)
