"""Tests for common.testing: tree comparisons and the cached `tiny_lm` fixture model."""

import importlib.util
import math
import os
import time

from flax import nnx
import numpy as np
import optax
import pytest

from common import testing


def _tree(x=2.0):
  return {'a': np.float32(1.0), 'b': {'c': [np.array([1.0, x], np.float32), np.zeros(2)]}}


def test_assert_trees_close_passes_within_tolerance():
  testing.assert_trees_close(_tree(2.0), _tree(2.0 + 1e-7), rtol=1e-6)
  testing.assert_trees_close(_tree(2.0), _tree(2.1), rtol=0.0, atol=0.2)


def test_assert_trees_close_names_the_differing_path():
  with pytest.raises(AssertionError, match=r"\['b'\]\['c'\]\[0\]") as info:
    testing.assert_trees_close(_tree(2.0), _tree(2.5))
  assert "['a']" not in str(info.value)


def test_assert_trees_close_rejects_different_structures():
  with pytest.raises(AssertionError, match='tree structures differ'):
    testing.assert_trees_close({'a': 1.0}, {'b': 1.0})
  with pytest.raises(AssertionError, match='tree structures differ'):
    testing.assert_trees_close([1.0, 2.0], [1.0, 2.0, 3.0])


def test_assert_trees_close_on_nnx_state_names_the_variable():
  with nnx.use_eager_sharding(False):
    a = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    b = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
  testing.assert_trees_close(a, a)
  with pytest.raises(AssertionError, match=r"\['kernel'\]"):
    testing.assert_trees_close(a, b)


def test_assert_trees_equal_is_bitwise():
  one = np.float32(1.0)
  testing.assert_trees_equal({'x': one}, {'x': np.float32(1.0)})
  with pytest.raises(AssertionError, match=r"\['x'\]"):
    testing.assert_trees_equal({'x': one}, {'x': np.nextafter(one, np.float32(2.0))})


def test_cache_dir_is_outside_the_repo_and_honours_the_env(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  path = testing.cache_dir('tiny_lm', 'x')
  assert path == tmp_path / 'cache' / 'tiny_lm' / 'x' and path.is_dir()


def test_set_fake_cpu_devices_keeps_existing_flags(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
  testing.set_fake_cpu_devices(4)
  assert os.environ['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'
  testing.set_fake_cpu_devices(8)  # already set: left alone
  assert os.environ['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'


# ---------------------------------------------------------------------------------------------------
# tiny_lm (needs common.models.decoder).

_HAVE_DECODER = importlib.util.find_spec('common.models.decoder') is not None


@pytest.mark.slow  # the first call trains: ~165 s measured on the loaded 2-core machine
@pytest.mark.skipif(not _HAVE_DECODER, reason='common.models.decoder is not available yet')
def test_tiny_lm_has_learnt_and_is_cached():
  from common import losses

  first = testing.tiny_lm()
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
  second = testing.tiny_lm()
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


@pytest.mark.skipif(not _HAVE_DECODER, reason='common.models.decoder is not available yet')
def test_tiny_lm_cache_is_keyed_by_config_and_skips_training(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  first = testing.tiny_lm(**_MICRO)
  files = sorted((tmp_path / 'tiny_lm').glob('*.npz'))
  assert len(files) == 1
  assert not list((tmp_path / 'tiny_lm').glob('*.tmp*'))

  def no_training(*args, **kwargs):
    raise AssertionError('retrained')

  # (Patching testing._train_tiny_lm itself would change the code fingerprint in the cache key.)
  monkeypatch.setattr(optax, 'adamw', no_training)
  again = testing.tiny_lm(**_MICRO)
  assert again.loss_curve == first.loss_curve
  testing.assert_trees_equal(nnx.state(again.model, nnx.Param), nnx.state(first.model, nnx.Param))
  # Not the freshly initialised weights: the cache holds the trained ones.
  with nnx.use_eager_sharding(False):
    from common.models import decoder

    untrained = decoder.Decoder(testing.decoder_config(first.config), rngs=nnx.Rngs(0))
  with pytest.raises(AssertionError):
    testing.assert_trees_equal(nnx.state(untrained, nnx.Param), nnx.state(first.model, nnx.Param))

  # Another config is another cache entry, which needs training.
  with pytest.raises(AssertionError, match='retrained'):
    testing.tiny_lm(**{**_MICRO, 'steps': 33})
  assert sorted((tmp_path / 'tiny_lm').glob('*.npz')) == files


@pytest.mark.skipif(not _HAVE_DECODER, reason='common.models.decoder is not available yet')
def test_tiny_lm_accepts_few_steps(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path))
  lm = testing.tiny_lm(**{**_MICRO, 'steps': 5})
  assert len(lm.loss_curve) == 5


def test_subprocess_xla_flags_keep_other_flags_and_set_the_device_count(monkeypatch):
  monkeypatch.setenv(
    'XLA_FLAGS', '--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar=2'
  )
  assert testing.xla_flags_with_devices(2) == (
    '--xla_foo=1 --xla_bar=2 --xla_force_host_platform_device_count=2'
  )
  monkeypatch.delenv('XLA_FLAGS')
  assert testing.xla_flags_with_devices(1) == '--xla_force_host_platform_device_count=1'
