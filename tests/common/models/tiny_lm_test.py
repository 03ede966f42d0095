"""Tests for common.models.tiny_lm: the cached small decoder that has learnt."""

import math
import time

from flax import nnx
import numpy as np
import optax
import pytest

from common import losses
from common import testing
from common.models import decoder
from common.models import tiny_lm


@pytest.mark.slow  # the first call trains: ~165 s measured on the loaded 2-core machine
def test_tiny_lm_has_learnt_and_is_cached():
  first = tiny_lm.tiny_lm()
  cfg = first.config
  lang = first.language
  assert lang.vocab_size == cfg.vocab_size and lang.seq_len == cfg.seq_len
  assert len(first.loss_curve) == cfg.steps
  assert first.loss_curve[-1] < first.loss_curve[0]

  # Held-out examples: far beyond the steps * batch_size indices seen in training.
  start = 10**9
  tokens = np.stack([lang[start + i]['tokens'] for i in range(32)])
  loss_fn = nnx.jit(lambda m, t: losses.next_token_loss(m, t)[0])
  loss = float(loss_fn(first.model, tokens))
  optimal = lang.optimal_loss()
  assert math.isfinite(loss)
  # For the default language (vocab 64) the unigram entropy is ~4.13 nats and the entropy given the
  # previous token alone ~3.60 (measured on 3000 held-out sequences), so a loss below
  # log(vocab) - 0.75 ~ 3.41 needs the second-order context; the optimum is ~0.88.
  assert loss < math.log(cfg.vocab_size) - 0.75, (loss, optimal)
  assert loss > optimal - 0.05, (loss, optimal)

  t0 = time.perf_counter()
  second = tiny_lm.tiny_lm()
  elapsed = time.perf_counter() - t0
  assert elapsed < 20, elapsed  # served from the cache, not retrained (~tens of seconds)
  assert second.loss_curve == first.loss_curve
  testing.assert_trees_equal(nnx.state(second.model, nnx.Param), nnx.state(first.model, nnx.Param))
  assert float(loss_fn(second.model, tokens)) == loss
  # The model is a fresh object each call: callers may modify it without touching the cache.
  assert second.model is not first.model


_MICRO = dict(
  vocab_size=16,
  seq_len=8,
  d_model=16,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  mlp_dim=32,
  steps=32,
  batch_size=4,
)


def test_tiny_lm_cache_is_keyed_by_config_and_skips_training(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  first = tiny_lm.tiny_lm(**_MICRO)
  files = sorted((tmp_path / 'tiny_lm').glob('*.npz'))
  assert len(files) == 1
  assert not [p for p in (tmp_path / 'tiny_lm').iterdir() if 'tmp' in p.name]

  def no_training(*args, **kwargs):
    raise AssertionError('retrained')

  # (Patching tiny_lm._train_tiny_lm itself would change the code fingerprint in the cache key.)
  monkeypatch.setattr(optax, 'adamw', no_training)
  again = tiny_lm.tiny_lm(**_MICRO)
  assert again.loss_curve == first.loss_curve
  testing.assert_trees_equal(nnx.state(again.model, nnx.Param), nnx.state(first.model, nnx.Param))
  # Not the freshly initialised weights: the cache holds the trained ones.
  with nnx.use_eager_sharding(False):
    untrained = decoder.Decoder(tiny_lm.decoder_config(first.config), rngs=nnx.Rngs(0))
  with pytest.raises(AssertionError):
    testing.assert_trees_equal(nnx.state(untrained, nnx.Param), nnx.state(first.model, nnx.Param))

  # Another config is another cache entry, which needs training.
  with pytest.raises(AssertionError, match='retrained'):
    tiny_lm.tiny_lm(**{**_MICRO, 'steps': 33})
  assert sorted((tmp_path / 'tiny_lm').glob('*.npz')) == files


def test_tiny_lm_accepts_few_steps(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  lm = tiny_lm.tiny_lm(**{**_MICRO, 'steps': 5})
  assert len(lm.loss_curve) == 5
