"""projects.ebpo.models: the warm policy is trained once and then read back bitwise from the cache;
the policy factory refuses an unknown model.kind."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import config as config_lib
from common import data
from common import sharding
from common.models import decoder
from experiments.ebpo.configs import base
from projects.ebpo import input_pipeline
from projects.ebpo import models

TINY = models.WarmupConfig(
  d_model=16, num_layers=1, num_heads=2, mlp_dim=32, sft_examples=64, steps=3, batch_size=4
)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_warm_policy_is_cached_and_read_back_bitwise(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(data.data_dir()))  # keep the built data sets
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  trained, curve = models.warm_policy(TINY)
  assert len(curve) == TINY.steps and all(np.isfinite(curve))
  (cached_file,) = (tmp_path / 'ebpo_warmup').glob('*.npz')
  assert cached_file.stem == models._fingerprint(TINY)  # noqa: SLF001
  again, curve2 = models.warm_policy(TINY)
  assert curve2 == curve
  for a, b in zip(_params(trained), _params(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with sharding.unsharded():
    fresh = decoder.Decoder(models.decoder_config(TINY), rngs=nnx.Rngs(TINY.seed))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(_params(fresh), _params(trained), strict=True)
  )  # the SFT steps moved the weights
  # Another config is another cache entry.
  assert models._fingerprint(TINY) != models._fingerprint(models.WarmupConfig())  # noqa: SLF001


def test_unknown_model_kind_is_a_config_error():
  config = base.get_config('smoke,model.kind=other')
  with pytest.raises(config_lib.ConfigError, match="model.kind='other'"):
    models.create_policy(config, None, sharding.DEFAULT_RULES)


def test_description_exports_the_tiny_policy_with_its_tokenizer():
  config = base.get_config('smoke')
  d = models.description(config)
  assert d['config'] == models.decoder_config(models.WarmupConfig(**config.warmup.to_dict()))
  chars = input_pipeline.CharTokenizer()
  for text in ('36-38=', '(7*8)/2=', '-2'):
    assert d['tokenizer'].encode(text) == chars.encode(text)
    assert d['tokenizer'].decode(chars.encode(text, add_eos=True)) == text
  assert d['tokenizer'].stop_ids == tuple(chars.stop_ids)
  assert d['tokenizer'].pad_id == chars.pad_id
