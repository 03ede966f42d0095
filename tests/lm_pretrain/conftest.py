"""Fixtures shared by the lm_pretrain tests."""

import pytest


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
  """A temporary MONOREPO_CACHE_DIR / MONOREPO_DATA_DIR: nothing touches the shared cache."""
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.setenv('MONOREPO_DATA_DIR', str(tmp_path / 'tfds'))
  return tmp_path
