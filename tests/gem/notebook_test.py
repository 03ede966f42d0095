"""notebooks/gem.py runs end to end on the smoke config (slow: about 2-4 minutes on 2 cores)."""

import pathlib
import re
import shutil

import pytest

from common import testing


@pytest.mark.slow
def test_gem_notebook_runs(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('gem', timeout=900)
  workdir = pathlib.Path(re.search(r'^workdir: (.+)$', stdout, re.M).group(1))
  try:
    assert (workdir / 'results.json').is_file()
    assert re.search(r"^'The data set' -> ", stdout, re.M), stdout
    assert len(re.findall(r'^   [* ] [-0-9.]+ ', stdout, re.M)) == 15
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
