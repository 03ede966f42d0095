"""End-to-end PerSRec runs as a user launches them (`python -m experiments.persrec.main`):
outputs, SIGKILL + resume (bitwise), 8 sharded devices == 1 device, arms as ordinary keys."""

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


def run(workdir, *overrides: str, devices: int = 1, check=True, extra=()):
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
    *extra,
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
  from projects.persrec import arms  # noqa: PLC0415

  assert 'unknown arm' in arms.check('bogus', base.get_config('arm=bogus').model)
  assert arms.check('recent', base.get_config('smoke').model) is not None
  assert arms.check('persrec', base.get_config('smoke').model) is None


def test_arm_is_an_ordinary_key_its_model_keys_follow_it():
  """Setting config.arm after loading (as --config.arm does) gives the config the file's arg
  gives, for every arm and every config file; an explicit derived key keeps its value."""
  import copy  # noqa: PLC0415

  from common import config as config_lib  # noqa: PLC0415
  from projects.persrec import arms  # noqa: PLC0415

  for spec in (
    'base.py:smoke',
    'base.py',
    'ml100k.py:smoke',
    'ml100k.py:sasrec',
    'synthetic_long.py',
  ):
    path, _, variant = f'experiments/persrec/configs/{spec}'.partition(':')
    for arm in arms.ARMS:
      loaded = config_lib.load(f'{path}:{variant}')
      loaded.arm = arm
      expected = config_lib.load(f'{path}:{",".join(x for x in (variant, f"arm={arm}") if x)}')
      assert config_lib.to_dict(loaded) == config_lib.to_dict(expected), (spec, arm)
      assert arms.check(arm, loaded.model) is None, (spec, arm)
  c = base.get_config('smoke')
  c.model.old_len = 8  # explicit: kept whatever the arm
  c.arm = 'full'
  assert (c.model.old_len, c.model.token_mode) == (8, 'none')
  c.arm = 'recent'
  assert c.model.old_len == 8 and 'model.old_len = 0' in arms.check('recent', c.model)
  c = copy.deepcopy(base.get_config('smoke'))  # ml_collections copies configs: the link survives
  c.arm = 'recent'
  assert (c.model.old_len, c.model.token_mode) == (0, 'none')


def test_a_broken_arm_override_is_refused(tmp_path):
  from common import config as config_lib  # noqa: PLC0415
  from projects.persrec import train  # noqa: PLC0415

  config = base.get_config('smoke,model.old_len=0')  # arm=persrec without old items
  with pytest.raises(config_lib.ConfigError, match="arm='persrec' needs model.old_len > 0"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()
  config = base.get_config('smoke,arm=bogus')
  with pytest.raises(config_lib.ConfigError, match='unknown arm'):
    train.train_and_evaluate(config, str(tmp_path))


def test_arm_override_on_the_command_line(tmp_path):
  """--config.arm=recent (an ordinary key) is the run `:arm=recent` gives, bitwise; a derived key
  set against the arm is refused in one line that names it."""
  a, b = tmp_path / 'flag', tmp_path / 'arg'
  run(a, extra=['--config.arm=recent'])
  run(b, 'arm=recent')
  assert json.loads((a / 'config.json').read_text()) == json.loads((b / 'config.json').read_text())
  assert json.loads((a / 'config.json').read_text())['model']['old_len'] == 0
  assert rows(a, 'train') == rows(b, 'train') and results(a) == results(b)
  p = run(tmp_path / 'bad', extra=['--config.arm=recent', '--config.model.old_len=8'], check=False)
  last = p.stderr.strip().splitlines()[-1]
  assert p.returncode == 2 and last.startswith('error: config conflict:'), p.stderr[-2000:]
  assert "arm='recent' needs model.old_len = 0" in last and 'model.old_len=8' in last
  assert not (tmp_path / 'bad').exists()
