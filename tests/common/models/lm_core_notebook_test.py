"""notebooks/lm_core.py runs end to end on the real SmolLM2 weights (real_model: it needs the asset).

tests/notebooks_test.py checks the pairing and stripped outputs of every notebook; this runs the
script the way a user would (one device, a fresh process) and checks what each section prints.
"""

import pathlib
import re
import shutil

import pytest

from common import assets
from common import testing


@pytest.mark.real_model
def test_lm_core_notebook_runs_on_smollm2(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  if not assets.is_fetched('smollm2'):
    pytest.skip('smollm2 is not fetched: python -m common.assets fetch smollm2')
  stdout = testing.run_notebook_script('lm_core', timeout=900)
  out = stdout
  assert re.search(r'^assistant: .*Paris', out, re.M), out
  plot = pathlib.Path(re.search(r'^plot: (.+)$', out, re.M).group(1))
  try:
    assert plot.is_file()
  finally:
    shutil.rmtree(plot.parent, ignore_errors=True)
  # The entropy table: one row per generated token, entropies >= 0 and log p <= 0.
  rows = re.findall(r"^\s+'.*' +(-?\d+\.\d+) +(-?\d+\.\d+)$", out, re.M)
  assert len(rows) >= 3, out
  assert all(float(h) >= 0 and float(lp) <= 0 for h, lp in rows)
  assert len(re.findall(r'^\[\d\] ', out, re.M)) == 4, out
