"""notebooks/blockpruner.py runs end to end on the smoke config (slow: the first run on a machine
also pretrains the cached smoke LM)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_blockpruner_notebook_runs(monkeypatch):
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('blockpruner', timeout=900)
  assert re.search(r'^BlockPruner removed: (m[hl][ap]\d ?){6}$', stdout, re.M), stdout
  assert re.search(r'max \|logit difference\| [0-9.]+e-0[5-9]$', stdout, re.M), stdout
