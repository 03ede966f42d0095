"""Q-RM end to end on the shared run skeleton: the reward model trains on the pairs, the RL loop
trains on its token rewards; a reward-model run and an RL run killed and resumed are bitwise the
uninterrupted ones; 8 devices == 1; bad keys stop before the workdir.

That the RL loop with a per-sequence reward broadcast as token rewards equals the sequence loop
bitwise is tested once, for every estimator, in tests/common/rl/token_rewards_test.py."""

import json

import jax
import numpy as np
import pytest

from common import config as config_lib
from common import metrics as metrics_lib
from common import train_loop
from common.rl import loop
from experiments.qrm.configs import base
from projects.qrm import train

# A seconds-long warm-up (the cache entry EAD's tests share), 4 reward-model steps, 3 RL steps.
FAST = (
  'smoke,warmup.steps=30,warmup.sft_examples=256,data.max_eval=8,data.max_train=64,'
  'rl.prompts_per_step=8,rl.eval_batch=8,train.num_steps=3,train.eval_every=3,'
  'train.log_every=1,checkpoint.every_steps=1,pairs.corrupted=48,pairs.policy_prompts=8,'
  'pairs.sample_batch=8,pairs.eval_corrupted=16,pairs.eval_policy_prompts=8,rm.steps=4,'
  'rm.batch_size=8,rm.log_every=1'
)


def _rows(path):
  return [
    {k: v for k, v in r.items() if k not in (*loop.TIMING_KEYS, 'time')}
    for r in metrics_lib.read_jsonl(path / 'metrics.jsonl')
  ]


def _json(path):
  return json.loads((path / 'results.json').read_text())


def test_qrm_arm_trains_and_both_runs_resume_bitwise(tmp_path):
  full = train.train_and_evaluate(base.get_config(FAST), tmp_path / 'full')
  rm = full['rm']
  assert rm['num_pairs'] > 16 and 0 <= rm['localisation/corrupted'] <= 1
  rows = [r for r in _rows(tmp_path / 'full' / 'rl') if r['split'] == 'train']
  assert len(rows) == 3 and all(np.isfinite(r['token_reward_mean']) for r in rows)
  assert all(r['token_reward_mean'] <= 0 for r in rows)  # beta log phi <= 0
  # Kill the reward-model run after step 2, then the RL run after step 2, then finish.
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(
      base.get_config(FAST + ',debug.rm_sigterm_after_step=2'), tmp_path / 'cut'
    )
  assert not (tmp_path / 'cut' / 'rm_qrm' / 'results.json').exists()
  with pytest.raises(train_loop.Preempted):
    train.train_and_evaluate(
      base.get_config(FAST + ',debug.sigterm_after_step=2'), tmp_path / 'cut'
    )
  again = train.train_and_evaluate(base.get_config(FAST), tmp_path / 'cut')
  for sub in ('rm_qrm', 'rl'):
    assert _rows(tmp_path / 'full' / sub) == _rows(tmp_path / 'cut' / sub), sub
    assert _json(tmp_path / 'full' / sub) == _json(tmp_path / 'cut' / sub), sub
  assert again == full
  a = np.load(tmp_path / 'full' / 'rm_qrm' / 'params.npz')
  b = np.load(tmp_path / 'cut' / 'rm_qrm' / 'params.npz')
  assert all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.slow
def test_dpo_and_orm_arms_and_reinforce_run(tmp_path):
  for over in ('reward.kind=dpo', 'reward.kind=orm,algo=reinforce'):
    out = train.train_and_evaluate(base.get_config(f'{FAST},{over}'), tmp_path / over)
    assert out['step'] == 3 and 'pass_at_1' in out['eval']
  assert 'rm' in train.train_and_evaluate(
    base.get_config(f'{FAST},reward.kind=dpo'), tmp_path / 'reward.kind=dpo'
  )


def test_the_dpo_reference_is_the_policys_warmed_start_not_the_released_model(monkeypatch):
  """The RL arm's DPO reference must be the network the DPO reward model was trained against:
  the starting policy, SFT warm-up included (for SmolLM2 not the released weights)."""
  seen = []

  def create_policy(config, mesh, rules):
    seen.append(config.warmup.steps)
    return lambda: 'the warmed start'

  def released(*args, **kwargs):
    raise AssertionError('the released model was loaded')

  monkeypatch.setattr(train.models, 'create_policy', create_policy)
  monkeypatch.setattr(train.loader, 'load_pretrained', released)
  assert train.starting_network(base.get_config('smollm2')) == 'the warmed start'
  assert seen == [40]


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  one = train.train_and_evaluate(base.get_config(FAST), tmp_path / 'one')
  eight = train.train_and_evaluate(
    base.get_config(FAST + ',mesh.data=2,mesh.fsdp=2,mesh.tensor=2'), tmp_path / 'eight'
  )
  for sub, split in (('rm_qrm', 'train'), ('rl', 'train')):
    a = [r for r in _rows(tmp_path / 'one' / sub) if r['split'] == split]
    b = [r for r in _rows(tmp_path / 'eight' / sub) if r['split'] == split]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
      np.testing.assert_allclose(x['loss'], y['loss'], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    one['rm']['pair_accuracy'], eight['rm']['pair_accuracy'], rtol=0, atol=1e-9
  )


def test_bad_keys_stop_before_the_workdir(tmp_path):
  for over, match in (
    ('reward.kind=prm', 'reward.kind'),
    ('algo=grpo', 'algo'),
    ('rm.gamma=-1.0', 'rm.gamma'),
  ):
    with pytest.raises(config_lib.ConfigError, match=match):
      train.train_and_evaluate(base.get_config(f'smoke,{over}'), tmp_path / 'bad')
    assert not (tmp_path / 'bad').exists()
