"""End-to-end PerSRec runs as a user launches them (`python -m experiments.persrec.main`):
outputs, SIGKILL + resume (bitwise), 8 sharded devices == 1 device, arm validation."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from common import metrics
from common import testing
from experiments.persrec.configs import base

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = 'experiments/persrec/configs/base.py'
# 12 steps, per-step metrics, checkpoints every 4 steps, two evaluations.
SMOKE = (
  'smoke',
  'train.num_steps=12',
  'train.log_every=1',
  'train.eval_every=6',
  'checkpoint.every_steps=4',
)


def run(workdir, *overrides: str, devices: int = 1, check=True):
  arg = ','.join(SMOKE + tuple(overrides))
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': testing.xla_flags_with_devices(devices),
  }
  cmd = [
    sys.executable,
    '-m',
    'experiments.persrec.main',
    f'--config={CONFIG}:{arg}',
    f'--workdir={workdir}',
  ]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def rows(workdir, split):
  return [
    r for r in metrics.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl') if r['split'] == split
  ]


def results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  run(workdir)
  return workdir


def test_run_writes_results_with_all_metrics(reference):
  res = results(reference)
  assert res['step'] == 12
  for split in ('val', 'test'):
    for k in ('recall_5', 'recall_10', 'recall_50', 'ndcg_10', 'ndcg_50', 'mrr'):
      assert 0.0 <= res['eval'][f'{split}/{k}'] <= 1.0
  assert res['eval']['serving_max_abs_diff'] < 1e-5  # the cached path == the single pass
  assert res['serving_flops']['request'] < res['serving_flops']['compress']
  assert [r['step'] for r in rows(reference, 'eval')] == [6, 12]
  assert sorted(int(p.name) for p in (reference / 'checkpoints').iterdir())[-1] == 12


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  p = run(tmp_path, 'debug.kill_after_step=7', check=False)
  assert p.returncode == -signal.SIGKILL
  run(tmp_path)  # resumes from step 4, redoing 5-7
  assert rows(tmp_path, 'train') == rows(reference, 'train')
  assert results(tmp_path)['eval'] == results(reference)['eval']


@pytest.mark.slow
def test_eight_sharded_devices_match_one(reference, tmp_path):
  """The whole run on 8 fake devices (2x2x2); the default suite checks the step in-process
  (sharding_test.py)."""
  run(tmp_path, 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2', devices=8)
  a = [r['loss'] for r in rows(tmp_path, 'train')]
  b = [r['loss'] for r in rows(reference, 'train')]
  np.testing.assert_allclose(a[:5], b[:5], rtol=1e-5)
  np.testing.assert_allclose(a[-1], b[-1], rtol=1e-3)
  ea, eb = results(tmp_path)['eval'], results(reference)['eval']
  np.testing.assert_allclose(ea['val/mrr'], eb['val/mrr'], rtol=2e-2, atol=2e-3)


def test_arm_and_config_checks():
  c = base.get_config('smoke,arm=recent')
  assert c.model.old_len == 0 and c.model.token_mode == 'none' and c.arm == 'recent'
  c = base.get_config('arm=multiseg')
  assert c.model.num_segments == 4 and c.model.old_len % 4 == 0
  with pytest.raises(ValueError, match='unknown arm'):
    base.get_config('arm=bogus')
  from projects.persrec import arms  # noqa: PLC0415

  assert arms.check('recent', base.get_config('smoke').model) is not None
  assert arms.check('persrec', base.get_config('smoke').model) is None


def test_a_broken_arm_override_is_refused(tmp_path):
  from common import config as config_lib  # noqa: PLC0415
  from projects.persrec import train  # noqa: PLC0415

  config = base.get_config('smoke,model.old_len=0')  # arm=persrec without old items
  with pytest.raises(config_lib.ConfigError, match="arm='persrec'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()
