"""notebooks/ebpo.py runs end to end on the smoke config, with 2 RL steps per estimator (slow: the
first run on a machine also trains the cached warm-up policy)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_ebpo_notebook_runs(monkeypatch):
  monkeypatch.setenv('EBPO_NOTEBOOK_STEPS', '2')
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('ebpo', timeout=900)
  assert re.search(r'^reward mean [0-9.]+; shrinkage S = [0-9.]+$', stdout, re.M), stdout
  assert re.search(r'^groups with zero EBPO signal: 0\.00$', stdout, re.M), stdout
  for estimator in ('grpo', 'ebpo'):
    assert re.search(rf'^{estimator} held-out greedy pass@1 after 2 steps: ', stdout, re.M), stdout
