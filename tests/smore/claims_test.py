"""experiments.smore.claims: the SmolLM2 (full-suite) runs train without the persistent cache."""

import types

import jax
import pytest

from experiments.smore import claims


@pytest.mark.parametrize(('suite', 'cached'), [('smoke', True), ('full', False)])
def test_persistent_cache_is_off_only_while_a_full_suite_run_trains(
  monkeypatch, tmp_path, suite, cached
):
  seen = []

  def fake_train(config, workdir):
    seen.append((config.model.source, jax.config.jax_enable_compilation_cache, workdir))
    return types.SimpleNamespace(eval={'accuracy': 0.5})

  monkeypatch.setattr(claims.train, 'train_and_evaluate', fake_train)
  before = jax.config.jax_enable_compilation_cache
  assert claims._accuracy(suite, tmp_path, 'smore22', 'adapter.preset=smore22', 0) == 0.5
  assert jax.config.jax_enable_compilation_cache == before
  ((model, enabled, workdir),) = seen
  assert enabled == (cached and before)
  assert workdir == str(tmp_path / 'smore22_seed0')
  assert model == ('smollm2' if suite == 'full' else 'tiny_lm')
