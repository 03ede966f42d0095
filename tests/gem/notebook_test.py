"""notebooks/gem.py runs end to end on the smoke config (slow: about 2-4 minutes on 2 cores)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gem_notebook_runs():
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
  }
  p = subprocess.run(
    [sys.executable, 'notebooks/gem.py'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  workdir = pathlib.Path(re.search(r'^workdir: (.+)$', p.stdout, re.M).group(1))
  try:
    assert (workdir / 'results.json').is_file()
    assert re.search(r"^'The data set' -> ", p.stdout, re.M), p.stdout
    assert len(re.findall(r'^   [* ] [-0-9.]+ ', p.stdout, re.M)) == 15
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
