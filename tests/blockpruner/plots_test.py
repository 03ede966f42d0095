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
