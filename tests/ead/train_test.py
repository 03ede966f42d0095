"""EAD end to end on the shared loop: the smoke config (with a seconds-long warm-up) trains with
the annealed schedule and TIS, logs sampled pass@k, and a killed-and-resumed run is bitwise the
uninterrupted one; TIS plugs into EBPO's estimator (projects/ebpo) as into the shared ones."""

import dataclasses
import json

import numpy as np
import pytest

from common import config as config_lib
from common import metrics as metrics_lib
from common.rl import loop
from common.sampling import schedules
from experiments.ead.configs import base
from projects.ead import evaluate
from projects.ead import train
from projects.ebpo import losses as ebpo_losses
from tests.common.rl import toy

# A warm-up of seconds (its own cache entry), 3 RL steps, 4 eval prompts, 2 samples for pass@k.
FAST = (
  'smoke,warmup.steps=30,warmup.sft_examples=256,data.max_eval=8,data.max_train=64,'
  'rl.prompts_per_step=8,rl.eval_batch=8,eval.samples=2,train.num_steps=3,train.eval_every=3,'
  'train.log_every=1,checkpoint.every_steps=1'
)


def _rows(workdir):
  return [
    {k: v for k, v in r.items() if k not in loop.TIMING_KEYS}
    for r in metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  ]


def test_smoke_trains_with_ead_and_resumes_bitwise(tmp_path):
  cfg = base.get_config(FAST)
  full = train.train_and_evaluate(cfg, tmp_path / 'full')
  rows = [r for r in _rows(tmp_path / 'full') if r['split'] == 'train']
  assert len(rows) == 3 and all(0 < r['tis_weight_mean'] <= 2.0 for r in rows)
  assert set(full['eval']) >= {'pass_at_1', 'pass_at_1_t1', 'pass_at_2_t1'}
  summary = evaluate.run_summary(tmp_path / 'full')
  assert summary['eval_steps'] == [0, 3] and len(summary['reward']) == 3
  # Killed after step 2 (between the step-2 checkpoint and step 3), then the same command again.
  cut = base.get_config(FAST + ',debug.sigterm_after_step=2')
  from common import train_loop  # noqa: PLC0415

  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(cut, tmp_path / 'cut')
  again = train.train_and_evaluate(cfg, tmp_path / 'cut')
  assert again == full
  assert _rows(tmp_path / 'full') == _rows(tmp_path / 'cut')
  assert json.loads((tmp_path / 'full' / 'results.json').read_text()) == json.loads(
    (tmp_path / 'cut' / 'results.json').read_text()
  )


def test_bad_ead_keys_stop_before_the_workdir(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='ead.mode'):
    train.train_and_evaluate(base.get_config('smoke,ead.mode=warm'), tmp_path / 'bad')
  assert not (tmp_path / 'bad').exists()


def test_tis_plugs_into_ebpos_estimator(tmp_path):
  cfg = toy.config()
  with cfg.unlocked():
    cfg.train.update(num_steps=2, eval_every=0)
  est = ebpo_losses.EBPO.from_config(ebpo_losses.ebpo_config())
  sched = lambda s: schedules.ead(1.2, 0.3, decay=schedules.ead_decay(s, 2.0), warmup_tokens=1)  # noqa: E731
  setup = dataclasses.replace(toy.setup(), estimator=est, temperature_schedule=sched, tis_cap=2.0)
  toy.train(cfg, tmp_path, setup)
  rows = [r for r in _rows(tmp_path) if r['split'] == 'train']
  assert len(rows) == 2
  for r in rows:
    assert 0 < r['tis_weight_mean'] <= 2.0 and r['tis_weight_mean'] != 1.0
    assert np.isfinite(r['loss']) and r['grad_norm'] > 0
