"""common.rl.policies: the warm policy is trained once and then read back bitwise from the cache;
the policy factory refuses an unknown model.kind."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import config as config_lib
from common import data
from common import sharding
from common.models import decoder
from common.rl import policies
from common.rl import tasks
from experiments.ebpo.configs import base

TINY = policies.WarmupConfig(
  d_model=16, num_layers=1, num_heads=2, mlp_dim=32, sft_examples=64, steps=3, batch_size=4
)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_warm_policy_is_cached_and_read_back_bitwise(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(data.data_dir()))  # keep the built data sets
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  trained, curve = policies.warm_policy(TINY)
  assert len(curve) == TINY.steps and all(np.isfinite(curve))
  (cached_file,) = (tmp_path / 'rl_warmup').glob('*.npz')
  assert cached_file.stem == policies._fingerprint(TINY)  # noqa: SLF001
  again, curve2 = policies.warm_policy(TINY)
  assert curve2 == curve
  for a, b in zip(_params(trained), _params(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with sharding.unsharded():
    fresh = decoder.Decoder(policies.decoder_config(TINY), rngs=nnx.Rngs(TINY.seed))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_params(fresh), _params(trained), strict=True)
  )  # the SFT steps moved the weights
  # Another config is another cache entry.
  assert policies._fingerprint(TINY) != policies._fingerprint(policies.WarmupConfig())  # noqa: SLF001


def test_unknown_model_kind_is_a_config_error():
  config = base.get_config('smoke,model.kind=other')
  with pytest.raises(config_lib.ConfigError, match="model.kind='other'"):
    policies.create_policy(config, None, sharding.DEFAULT_RULES)


def test_description_exports_the_tiny_policy_with_its_tokenizer():
  config = base.get_config('smoke')
  d = policies.description(config)
  assert d['config'] == policies.decoder_config(policies.WarmupConfig(**config.warmup.to_dict()))
  chars = tasks.CharTokenizer()
  for text in ('36-38=', '(7*8)/2=', '-2'):
    assert d['tokenizer'].encode(text) == chars.encode(text)
    assert d['tokenizer'].decode(chars.encode(text, add_eos=True)) == text
  assert d['tokenizer'].stop_ids == tuple(chars.stop_ids)
  assert d['tokenizer'].pad_id == chars.pad_id
