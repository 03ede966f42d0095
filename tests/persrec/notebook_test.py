"""notebooks/persrec.py runs end to end on the ml100k smoke config (needs the fetched ml100k
asset; slow: it trains for about a minute and builds the TFDS data set on a fresh machine)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from common import assets

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
  not assets.is_fetched('ml100k'), reason='run: python -m common.assets fetch ml100k'
)
def test_persrec_notebook_runs_on_the_smoke_config():
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  }
  p = subprocess.run(
    [sys.executable, 'notebooks/persrec.py'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert len(re.findall(r'^ ?\d+\. .+\(cosine ', p.stdout, re.M)) == 10, p.stdout
  assert 'same top-10: True' in p.stdout
