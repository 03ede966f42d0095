"""End-to-end Causal Rewards runs as a user launches them (`python -m experiments.causal_rewards.main`):
outputs, SIGKILL + resume bitwise, and (in-process) 8 sharded devices == 1 device for the CRM
training step."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from common import metrics
from common import optim
from common import sharding
from common import testing
from common import train_loop
from experiments.causal_rewards.configs import base
from projects.causal_rewards import input_pipeline
from projects.causal_rewards import losses
from projects.causal_rewards import models

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = 'experiments/causal_rewards/configs/base.py'
# A tiny model, 12 steps, per-step metrics, checkpoints every 4 steps, two evaluations; CRM on.
SMALL = (
  'smoke',
  'model.warmup_steps=0',
  'model.d_model=32',
  'model.num_layers=1',
  'model.mlp_dim=64',
  'data.batch_size=8',
  'data.eval_batch=32',
  'data.num_test=16',
  'crm.lam=1.0',
)
RUN = (*SMALL, 'train.num_steps=12', 'train.log_every=1', 'train.eval_every=6')
RUN += ('checkpoint.every_steps=4',)


def run(workdir, *overrides: str, check=True):
  arg = ','.join(RUN + tuple(overrides))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': testing.xla_flags_with_devices(1)}
  cmd = [sys.executable, '-m', 'experiments.causal_rewards.main', f'--config={CONFIG}:{arg}']
  cmd.append(f'--workdir={workdir}')
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def rows(workdir, split):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [r for r in metrics.read_jsonl(path) if r['split'] == split]


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
  for k in ('acc_decorrelated', 'acc_clean', 'cue_pref', 'bon_cue_wins', 'lp_acc_decorrelated'):
    assert 0.0 <= res['eval'][k] <= 1.0
  assert -1.0 <= res['eval']['spearman'] <= 1.0
  assert [r['step'] for r in rows(reference, 'eval')] == [6, 12]
  train = rows(reference, 'train')
  assert all(r['mmd'] >= 0 for r in train) and all('bt_loss' in r for r in train)


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
  p = run(tmp_path, 'debug.kill_after_step=7', check=False)
  assert p.returncode == -signal.SIGKILL
  run(tmp_path)  # resumes from step 4, redoing 5-7
  assert rows(tmp_path, 'train') == rows(reference, 'train')
  assert results(tmp_path)['eval'] == results(reference)['eval']


def _steps(mesh, config, batches):
  rules = tuple(tuple(r) for r in config.sharding.rules)
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    spec = train_loop.init_state(
      lambda: train_loop.TrainState(models.build(config), tx), mesh, rules
    )
    step = train_loop.make_train_step(spec.graphdef, losses.make_loss_fn(config, 2), spec.shardings)
    state, out = spec.state, []
    for i, b in enumerate(batches):
      state, m = step(state, sharding.to_global(b, mesh, rules), train_loop.step_key(0, i, 'train'))
      out.append((float(m['loss']), float(m['mmd'])))
    params = jax.device_get(nnx.state(train_loop.model_of(spec.graphdef, state), nnx.Param))
  return out, params


def test_sharded_crm_steps_match_one_device():
  assert jax.device_count() == 8
  config = base.get_config(','.join(SMALL))
  d = input_pipeline.make_data(config)
  it = input_pipeline.train_iterator(config, d)
  batches = [next(it) for _ in range(3)]
  one = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
  eight = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  l1, p1 = _steps(one, config, batches)
  l8, p8 = _steps(eight, config, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  flat8 = jax.tree_util.tree_flatten_with_path(p8)[0]
  for (path, a), b in zip(flat8, jax.tree.leaves(p1), strict=True):
    name = jax.tree_util.keystr(path)
    if name.startswith("['head']['bias']"):
      # Bradley-Terry ignores a shared shift and phi does not depend on the bias: its gradient is
      # 0 up to rounding, which Adam normalises into steps of order lr; compare at that scale.
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3 * config.optimizer.lr)
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)
