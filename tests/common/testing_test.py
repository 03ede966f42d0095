"""Tests for common.testing: tree comparisons, fake devices and subprocess XLA flags."""

import os

from flax import nnx
import numpy as np
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


def test_set_fake_cpu_devices_keeps_existing_flags(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
  testing.set_fake_cpu_devices(4)
  assert os.environ['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'
  testing.set_fake_cpu_devices(8)  # already set: left alone
  assert os.environ['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'


def test_subprocess_xla_flags_keep_other_flags_and_set_the_device_count(monkeypatch):
  monkeypatch.setenv(
    'XLA_FLAGS', '--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar=2'
  )
  assert testing.xla_flags_with_devices(2) == (
    '--xla_foo=1 --xla_bar=2 --xla_force_host_platform_device_count=2'
  )
  monkeypatch.delenv('XLA_FLAGS')
  assert testing.xla_flags_with_devices(1) == '--xla_force_host_platform_device_count=1'
