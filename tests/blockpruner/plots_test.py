"""projects.blockpruner.plots: the removal-order grid and a figure from a run's metrics rows."""

import json

import numpy as np

from projects.blockpruner import plots


def test_order_grid_and_figure(tmp_path):
  rows = [
    {'split': 'eval', 'step': 0, 'removed_params': 0.0, 'rdocs/perplexity': 3.0, 'mc/mean': 0.5},
    {'split': 'train', 'step': 1, 'removed': 'mha2', 'removed_params': 10.0},
    {'split': 'eval', 'step': 1, 'removed_params': 10.0, 'rdocs/perplexity': 3.5},
    {'split': 'train', 'step': 2, 'removed': 'mha0+mlp0', 'removed_params': 40.0},
  ]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  order = plots.removal_order(tmp_path)
  assert order == [(2, 'mha'), (0, 'mha'), (0, 'mlp')]
  grid = plots.order_grid(order, 3)
  np.testing.assert_array_equal(grid[0], [2, np.nan, 1])
  np.testing.assert_array_equal(grid[1], [3, np.nan, np.nan])
  fig = plots.figure({'a': tmp_path}, 3, 'a', 'title')
  fig.savefig(tmp_path / 'f.png')
  assert (tmp_path / 'f.png').stat().st_size > 1000


def test_compare_pairs_each_baseline_point_with_the_first_block_point_at_or_above_it(tmp_path):
  from experiments.blockpruner import compare  # noqa: PLC0415

  def write(name, points):
    d = tmp_path / name
    d.mkdir()
    rows = [
      {'split': 'eval', 'step': s, 'removed_params': p, 'rdocs/perplexity': v, 'mc/mean': m}
      for s, (p, v, m) in enumerate(points)
    ]
    (d / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    return d

  blocks = write('bp', [(0.0, 10.0, 0.6), (1e6, 11.0, 0.6), (3e6, 12.0, 0.5)])
  layers = write('lp', [(0.0, 10.0, 0.6), (2e6, 15.0, 0.4)])
  out = compare.table(blocks, {'lp': layers}, ['rdocs/perplexity', 'mc/mean'])
  # The 2M layer point is paired with the 3M block point (the first that removes at least 2M).
  # Interpolated at 2M, halfway between 11 (1M) and 12 (3M) in log.
  assert f'| lp | rdocs/perplexity | 2.00 | 15 | 12 | 3.00 | {np.sqrt(11 * 12):.4g} |' in out
  assert f'mean log(BlockPruner / baseline) {np.log(12 / 15):+.4f}' in out
  assert f'(interpolated: {np.log(np.sqrt(11 * 12) / 15):+.4f}' in out
  assert 'mean BlockPruner - baseline +0.1000 over 1 pairs (interpolated: +0.1500 over 1)' in out


def test_step_cost_measures_the_smoke_model():
  from experiments.blockpruner import step_cost  # noqa: PLC0415

  m = step_cost.measure(
    'smoke',
    'model.d_model=16,model.num_layers=3,model.num_heads=2,model.num_kv_heads=1,model.head_dim=8,'
    'model.mlp_dim=32,model.steps=30,calib.num_samples=8,calib.batch_size=8,calib.seq_len=32,'
    'train.num_steps=2',
  )
  assert m['num_layers'] == 3 and m['candidates'] == 6 + 5
  assert m['forward_cpu_s'] > 0 and m['candidate_cpu_s'] > 0
