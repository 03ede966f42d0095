"""End-to-end: `python -m experiments.ebpo.main` smoke runs, SIGKILL + resume replays the run
(EBPO's Welford state included), bad config values fail with one line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from common import metrics
from common import testing
from common.rl import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = 'experiments/ebpo/configs/base.py'
SHORT = (
  'smoke',
  'train.num_steps=6',
  'train.log_every=1',
  'train.eval_every=3',
  'checkpoint.every_steps=2',
  'checkpoint.async_save=False',
  'data.max_eval=32',
  'rl.eval_batch=32',
  'rl.prompts_per_step=8',
)


def run(workdir, *overrides, check=True, timeout=600):
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(1),
  }
  cmd = [
    sys.executable,
    '-m',
    'experiments.ebpo.main',
    f'--config={CONFIG}:{",".join(SHORT + overrides)}',
    f'--workdir={workdir}',
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def lines(workdir):
  rows = metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl')
  return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_kill_and_resume_replays_the_uninterrupted_run(tmp_path):
  run(tmp_path / 'full')
  p = run(tmp_path / 'killed', 'debug.kill_after_step=3', check=False)
  assert p.returncode != 0  # SIGKILLed after step 3 (checkpoint at step 2)
  run(tmp_path / 'killed')
  assert lines(tmp_path / 'full') == lines(tmp_path / 'killed')
  full = json.loads((tmp_path / 'full' / 'results.json').read_text())
  resumed = json.loads((tmp_path / 'killed' / 'results.json').read_text())
  assert full['eval'] == resumed['eval']
  assert {k: v for k, v in full['train'].items() if k not in loop.TIMING_KEYS} == {
    k: v for k, v in resumed['train'].items() if k not in loop.TIMING_KEYS
  }
  assert 'ebpo_shrinkage' in full['train']


def test_bad_estimator_is_one_line_error(tmp_path):
  p = run(tmp_path / 'bad', 'rl.estimator=ppo', check=False, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "rl.estimator='ppo'" in p.stderr.strip().splitlines()[-1]
