"""notebooks/qrm.py runs end to end on the smoke config (slow: it trains the smoke's reward model,
and the first run on a machine also trains the cached warm-up policy)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_qrm_notebook_runs(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('qrm', timeout=900)
  assert re.search(
    r'^pair_accuracy: 0\.\d{3}  \(starting network read the same way: 0\.\d{3}\)$', stdout, re.M
  ), stdout
  assert re.search(r'^Q-RM rewards, corrupted: ', stdout, re.M), stdout
  assert re.search(
    r'^lowest corrupted-trace reward at the corrupted step: (True|False)$', stdout, re.M
  )
  assert re.search(r'^offset 0: rejected -?[0-9.]+ chosen -?[0-9.]+$', stdout, re.M), stdout
