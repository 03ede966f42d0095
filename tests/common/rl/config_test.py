"""The RL papers' shared config blocks (common/rl/config.py): what each block sets, and that the four
papers' configs take them from there."""

import dataclasses
import importlib

from ml_collections import config_dict
import pytest

from common import config as config_lib
from common.rl import config as rl_config
from common.rl import loop
from common.rl import policies

PAPERS = ('ebpo', 'ead', 'qrm', 'omniopd')


def test_rl_is_the_loop_config_at_smoke_scale_and_refuses_unknown_keys():
  c = rl_config.rl(max_new_tokens=4, eval_batch=200)
  assert set(c.keys()) == set(loop.rl_config().keys())
  assert (c.group_size, c.prompts_per_step, c.prompt_len, c.temperature) == (4, 16, 12, 1.0)
  assert (c.estimator, c.max_new_tokens, c.eval_batch, c.kl_coef) == ('grpo', 4, 200, 0.001)
  with pytest.raises(ValueError, match='max_new_token'):
    rl_config.rl(max_new_token=4)


def test_tiny_policy_is_the_warmup_dataclass_and_smollm2_sets_the_pretrained_variant():
  c = config_dict.ConfigDict()
  rl_config.tiny_policy(c, max_eval=256)
  assert policies.WarmupConfig(**c.warmup.to_dict()) == policies.WarmupConfig()
  assert c.model.to_dict() == {'kind': 'tiny', 'name': ''}
  assert c.data.to_dict() == {'task_set': 'smoke', 'seed': 0, 'max_train': -1, 'max_eval': 256}
  c = config_lib.base_config()
  rl_config.tiny_policy(c)
  c.rl = rl_config.rl()
  c.optimizer = rl_config.optimizer(lr=1e-4)
  rl_config.smollm2(c, max_new_tokens=96, task_set='smollm2_easy', temperature=0.6)
  assert (c.model.kind, c.model.name, c.data.task_set, c.data.max_eval) == (
    'pretrained',
    'smollm2',
    'smollm2_easy',
    100,
  )
  assert (c.rl.prompts_per_step, c.rl.prompt_len, c.rl.max_new_tokens) == (8, 96, 96)
  assert (c.rl.temperature, c.rl.eval_batch, c.optimizer.lr) == (0.6, 50, 1e-5)
  assert (c.train.num_steps, c.train.eval_every, c.checkpoint.every_steps) == (40, 20, 10)
  assert policies.PretrainedWarmup(**c.warmup.to_dict()) == policies.PretrainedWarmup(steps=0)
  rl_config.smollm2(c, max_new_tokens=96, warmup_steps=40, lr=3e-6)
  assert (c.warmup.steps, c.optimizer.lr) == (40, 3e-6)


@pytest.mark.parametrize('paper', PAPERS)
def test_the_rl_papers_build_their_configs_from_the_shared_blocks(paper):
  base = importlib.import_module(f'experiments.{paper}.configs.base')
  for variant, warmup in (('smoke', policies.WarmupConfig), ('smollm2', policies.PretrainedWarmup)):
    c = base.get_config(variant)
    assert set(c.warmup.keys()) == set(dataclasses.asdict(warmup()).keys())
    assert set(c.rl.keys()) == set(loop.rl_config().keys())
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.clip_norm) == (0.9, 0.99, 1.0)
  assert (c.model.name, c.rl.prompt_len, c.rl.eval_batch) == ('smollm2', 96, 50)
