"""notebooks/fusechat.py runs end to end on the smoke config (slow: the first run on a machine also
pretrains the three cached smoke members)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_fusechat_notebook_runs(monkeypatch):
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('fusechat', timeout=900)
  assert re.search(r'^coder: \d+ of \d+ pivot tokens aligned one-to-one$', stdout, re.M), stdout
  assert re.search(r'^sce\s+[0-9.]+\s+[0-9.]+', stdout, re.M), stdout
