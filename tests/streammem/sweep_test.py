"""The stream-length / budget sweep behind experiments/streammem/plots.py: every method at every
length and budget, per seed; full KV is its own reference (dloglik 0) and a budget above the stream
reproduces it; the figure draws from the sweep's output."""

from __future__ import annotations

import numpy as np

from experiments.streammem import plots
from experiments.streammem.configs import base
from projects.streammem import evaluate
from tests.streammem import util


def test_sweep_covers_every_cell_and_a_large_budget_matches_full_kv():
  config = base.get_config('smoke')
  config.stream.update(clip_len=8, frame_tokens=4)
  config.eval.methods = ('fifo',)
  data = evaluate.sweep(
    util.streamer(),
    lambda length, seed: util.episodes(2, length, seed=seed),
    config,
    lengths=[16, 24],
    budgets=[4, 64],
    length_budget=4,
    budget_length=24,
    seeds=[0, 1],
  )
  assert set(data['length']) == set(data['budget']) == {'full', 'fifo'}
  assert set(data['length']['fifo']) == {'16', '24'}
  assert set(data['budget']['fifo']) == set(data['budget']['full']) == {'4', '64'}
  for axis in ('length', 'budget'):
    for cells in data[axis].values():
      for cell in cells.values():
        assert all(len(v) == 2 for v in cell.values())  # one value per seed
        assert all(0.0 <= x <= 1.0 for x in cell['em'])
  assert all(x == 0.0 for c in data['length']['full'].values() for x in c['dloglik'])
  # 64 entries per layer hold the whole 24-token stream: nothing evicted, the answers of full KV
  # (up to the summation order of a larger cache, ~1e-7).
  np.testing.assert_allclose(data['budget']['fifo']['64']['dloglik'], 0.0, atol=1e-5)
  fig = plots.figure(data, 'test', 4, 24)
  assert len(fig.axes) == 4


def test_sweeps_of_separate_seeds_merge_into_the_sweep_of_both():
  """What the video sweep does with one trained model per seed: merged per-seed records equal
  one sweep over the same seeds (here one model, so the merge must reproduce it exactly)."""
  config = base.get_config('smoke')
  config.stream.update(clip_len=8, frame_tokens=4)
  config.eval.methods = ('streammem', 'fifo')
  streamer = util.streamer()

  def run(seeds):
    return evaluate.sweep(
      streamer,
      lambda length, seed: util.episodes(2, length, seed=seed),
      config,
      lengths=[16, 24],
      budgets=[4, 8],
      length_budget=4,
      budget_length=24,
      seeds=seeds,
    )

  assert evaluate.merge_sweeps([run([0]), run([1])]) == run([0, 1])
