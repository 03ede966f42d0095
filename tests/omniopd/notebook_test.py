"""notebooks/omniopd.py runs end to end on the smoke config (slow: the first run on a machine also
trains the cached warm-up policy)."""

import re

import pytest

from common import testing


@pytest.mark.slow
def test_omniopd_notebook_runs(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('omniopd', timeout=900)
  assert re.search(r"^teacher calls: \{'teacher_calls': 8,", stdout, re.M), stdout
  assert re.search(r'audit t=\d', stdout), stdout
  assert re.search(r'^held-out accuracy [0-9.]+ -> [0-9.]+; teacher calls 320;', stdout, re.M), (
    stdout
  )
