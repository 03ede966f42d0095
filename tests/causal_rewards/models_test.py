"""Causal Rewards' reward models: what `model.trainable` leaves trainable, LoRA starting at the base
model's rewards, and config checks."""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np
import pytest

from common import config as config_lib
from common.preference import scoring
from common.reward_models import heads
from experiments.causal_rewards.configs import base
from projects.causal_rewards import models

TINY = 'smoke,model.warmup_steps=0,model.d_model=16,model.num_layers=1,model.mlp_dim=32'


def _count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_trainable_head_lora_and_all():
  full = models.build(base.get_config(TINY))
  head = models.build(base.get_config(TINY + ',model.trainable=head'))
  lora = models.build(base.get_config(TINY + ',model.trainable=lora,model.lora_rank=2'))
  assert _count(head) == 16 + 1
  assert 17 < _count(lora) < _count(full)
  pairs = scoring.pad_pairs([[3, 4]], [[5, 6, 2]], [[7, 2]])
  b = heads.pair_batch(pairs)
  np.testing.assert_allclose(
    heads.apply(lora, b).rewards, heads.apply(full, b).rewards, rtol=1e-6, atol=1e-7
  )


def test_bad_model_keys_are_config_errors():
  for bad in ('model.trainable=some', 'model.pool=max'):
    with pytest.raises(config_lib.ConfigError):
      models.check_config(base.get_config(f'{TINY},{bad}'))


def test_a_penalty_on_frozen_features_is_refused():
  from projects.causal_rewards import train  # noqa: PLC0415

  with pytest.raises(config_lib.ConfigError, match='no gradient'):
    train.check_config(base.get_config(f'{TINY},model.trainable=head,crm.lam=1.0'))
  train.check_config(base.get_config(f'{TINY},model.trainable=head,crm.lam=0.0'))
  train.check_config(base.get_config('smollm2,crm.lam=1.0'))  # penalises the reward
