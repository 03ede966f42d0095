"""projects.ebpo.simulate: the MSE theorem holds in simulation (oracle = 1-S; plug-in < 1)."""

import pytest

from projects.ebpo import simulate


@pytest.mark.parametrize('g', [2, 8])
def test_oracle_shrinkage_matches_theory_and_plugin_beats_the_group_mean(g):
  r = simulate.baseline_mse(g, num_prompts=40_000, seed=3)
  # Monte-Carlo error of an MSE ratio over 40k prompts is about 1%.
  assert r.ratio_oracle == pytest.approx(r.theory_ratio, abs=0.03)
  assert r.ratio_plugin < 1.0
  assert 0 < r.shrinkage_plugin < 1 and 0 < r.shrinkage_oracle < 1
  # Larger groups need less shrinkage.
  assert simulate.baseline_mse(16, num_prompts=5_000).shrinkage_oracle < r.shrinkage_oracle
