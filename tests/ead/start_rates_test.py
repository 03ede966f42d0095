"""experiments/ead/start_rates.py: the initial policy's held-out pass rates per temperature."""

import json
import os
import pathlib
import subprocess
import sys

from common import testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
# One device, as the RL smoke runs and the other tests' launches use (the warm policy's cache key).
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': testing.xla_flags_with_devices(1)}


def _start_rates(tmp_path, *flags: str) -> list[dict]:
  """Runs start_rates on the smoke config with `flags`; its --out rows."""
  out = tmp_path / 'start.json'
  cmd = [
    sys.executable,
    '-m',
    'experiments.ead.start_rates',
    '--config=experiments/ead/configs/base.py:smoke',
    *flags,
    f'--out={out}',
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(out.read_text())['results']


def test_start_rates_on_the_smoke_policy(tmp_path):
  rows = _start_rates(tmp_path, '--temperatures=0.6,0.6,1.0', '--samples=2')
  assert [r['temperature'] for r in rows] == [0.6, 0.6, 1.0]
  for r in rows:
    assert r['split'] == 'test' and r['prompts'] == 234 and r['samples'] == 2
    assert 0.0 <= r['pass_at_1'] <= r['pass_at_2'] <= 1.0
  same = ('pass_at_1', 'pass_at_2')
  assert [rows[0][k] for k in same] == [rows[1][k] for k in same]  # the same keys every time
  assert 0.0 < rows[2]['pass_at_1'] < 1.0  # the warmed-up smoke policy solves some, not all


def test_start_rates_on_train_prompts(tmp_path):
  (row,) = _start_rates(tmp_path, '--temperatures=1.0', '--samples=2', '--split=train')
  assert row['split'] == 'train' and row['prompts'] == 234  # as many as the held-out set
  assert 0.0 < row['pass_at_1'] < 1.0
