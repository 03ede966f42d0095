"""notebooks/persrec.py runs end to end on the ml100k smoke config (needs the fetched ml100k
asset; slow: it trains for about a minute and builds the TFDS data set on a fresh machine)."""

from __future__ import annotations

import re

import pytest

from common import assets
from common import testing


@pytest.mark.slow
@pytest.mark.skipif(
  not assets.is_fetched('ml100k'), reason='run: python -m common.assets fetch ml100k'
)
def test_persrec_notebook_runs_on_the_smoke_config(monkeypatch):
  # The repository importable, so the notebook's setup cell installs nothing.
  monkeypatch.setenv('PYTHONPATH', str(testing.REPO_ROOT))
  stdout = testing.run_notebook_script('persrec', timeout=900)
  assert len(re.findall(r'^ ?\d+\. .+\(cosine ', stdout, re.M)) == 10, stdout
  assert 'same top-10: True' in stdout
