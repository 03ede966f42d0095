"""notebooks/ead.py runs end to end on the smoke config (slow: the first run on a machine also
trains the cached warm-up policy)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_ead_notebook_runs(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('ead', timeout=900)
  assert re.search(r'^smoke tau at t = 0\.\.5: 1\.200 0\.804 0\.252 0\.100', stdout, re.M), stdout
  assert re.search(r'^TIS weights <= C: True$', stdout, re.M), stdout
  assert re.search(r'^reward mean [0-9.]+; tokens per position ', stdout, re.M), stdout
