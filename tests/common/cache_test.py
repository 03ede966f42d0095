"""Tests for common.cache: the cache directory, fingerprints and atomic writes."""

import json
import os

import jax
import numpy as np
import pytest

from common import cache


def test_cache_dir_is_outside_the_repo_and_honours_the_env(tmp_path, monkeypatch):
  monkeypatch.setenv('MONOREPO_CACHE_DIR', str(tmp_path / 'cache'))
  path = cache.cache_dir('tiny_lm', 'x')
  assert path == tmp_path / 'cache' / 'tiny_lm' / 'x' and path.is_dir()


def test_cache_dir_defaults_under_xdg_cache_home(tmp_path, monkeypatch):
  monkeypatch.delenv('MONOREPO_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert cache.cache_dir('a') == tmp_path / 'meta-jax-monorepo' / 'a'


def _f(x):
  return x + 1


def _g(x):
  return x + 2


def test_code_fingerprint_hashes_the_source_in_order():
  a = cache.code_fingerprint(_f, _g)
  assert len(a) == 16 and a == cache.code_fingerprint(_f, _g)
  assert a != cache.code_fingerprint(_g, _f)
  assert a != cache.code_fingerprint(_f)
  assert cache.code_fingerprint(cache) != cache.code_fingerprint(_f)  # modules work too


def test_numerics_fingerprint_names_the_device_count_and_flags(monkeypatch):
  # The backend must exist before XLA_FLAGS names a flag XLA does not know: started after, it would
  # abort the process (this test run alone, or first in a worker, crashed pytest).
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1')
  version, backend, count, flags = json.loads(cache.numerics_fingerprint())
  assert backend == 'cpu' and count >= 1 and flags == '--xla_foo=1' and version
  # Without the device count: a sharded run and its 1-device reference share the key, the
  # flags that change code generation still separate it.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_foo=1')
  shared = cache.numerics_fingerprint(devices=False)
  assert json.loads(shared) == [version, backend, '--xla_foo=1']
  monkeypatch.setenv('XLA_FLAGS', '--xla_foo=1 --xla_force_host_platform_device_count=1')
  assert cache.numerics_fingerprint(devices=False) == shared
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  assert cache.numerics_fingerprint(devices=False) != shared


def test_savez_and_write_text_are_atomic(tmp_path):
  path = tmp_path / 'x.npz'
  cache.savez(path, a=np.arange(3), b=np.float32(2.0))
  with np.load(path) as f:
    assert sorted(f.files) == ['a', 'b'] and f['a'].tolist() == [0, 1, 2]
  cache.write_text(tmp_path / 'y.json', '{}')
  assert (tmp_path / 'y.json').read_text() == '{}'
  assert sorted(os.listdir(tmp_path)) == ['x.npz', 'y.json']  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'y.json'
  cache.write_text(path, 'old')
  with pytest.raises(RuntimeError), cache.atomic_path(path) as tmp:
    tmp.write_text('half')
    raise RuntimeError('killed')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['y.json']


def test_load_or_compute_computes_once_then_loads(tmp_path):
  path = tmp_path / 'weights.npz'
  calls = []

  def train():
    calls.append(1)
    return {'w': np.arange(6.0).reshape(2, 3), '__loss_curve__': [3.0, 2.5]}

  first = cache.load_or_compute(path, train)
  second = cache.load_or_compute(path, train)
  assert len(calls) == 1 and path.is_file()
  assert sorted(first) == sorted(second) == ['__loss_curve__', 'w']
  for k in first:
    assert isinstance(second[k], np.ndarray)
    np.testing.assert_array_equal(second[k], first[k])
  assert [p.name for p in tmp_path.iterdir()] == ['weights.npz']  # no temporary left


def test_load_or_compute_saves_nothing_when_compute_fails(tmp_path):
  path = tmp_path / 'weights.npz'

  def broken():
    raise RuntimeError('diverged')

  with pytest.raises(RuntimeError, match='diverged'):
    cache.load_or_compute(path, broken)
  assert list(tmp_path.iterdir()) == []


def _nested():
  return {'embed': np.arange(4.0), 'layers': [{'w': np.ones((2, 3))}, {'w': np.zeros((2, 3))}]}


def test_tree_to_arrays_keys_are_jax_key_strings_and_round_trip_through_an_npz(tmp_path):
  tree = _nested()
  flat = cache.tree_to_arrays(jax.tree.map(jax.numpy.asarray, tree))
  # The exact key strings earlier cache files hold (jax.tree_util.keystr of each path).
  assert sorted(flat) == ["['embed']", "['layers'][0]['w']", "['layers'][1]['w']"]
  assert all(isinstance(v, np.ndarray) for v in flat.values())
  cache.savez(tmp_path / 'p.npz', **flat)
  with np.load(tmp_path / 'p.npz') as f:
    back = cache.arrays_to_tree({k: f[k] for k in f.files}, tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_a_prefix_lets_trees_share_one_file():
  a, b = _nested(), jax.tree.map(lambda x: x + 1, _nested())
  flat = {**cache.tree_to_arrays(a, 'base'), **cache.tree_to_arrays(b, 'expert0')}
  assert "base['layers'][1]['w']" in flat and "expert0['embed']" in flat and len(flat) == 6
  jax.tree.map(np.testing.assert_array_equal, cache.arrays_to_tree(flat, a, 'base'), a)
  jax.tree.map(np.testing.assert_array_equal, cache.arrays_to_tree(flat, a, 'expert0'), b)


def test_arrays_to_tree_applies_leaf_fn_with_the_template_leaf():
  template = {'a': jax.numpy.zeros(2, jax.numpy.bfloat16), 'b': [jax.numpy.zeros(3)]}
  flat = {"['a']": np.ones(2), "['b'][0]": np.arange(3.0)}
  seen = []

  def cast(array, leaf):
    seen.append(leaf.shape)
    return jax.numpy.asarray(array, leaf.dtype)

  out = cache.arrays_to_tree(flat, template, leaf_fn=cast)
  assert sorted(seen) == [(2,), (3,)]
  assert out['a'].dtype == jax.numpy.bfloat16 and out['b'][0].dtype == jax.numpy.float32
  np.testing.assert_array_equal(out['b'][0], np.arange(3.0))


def test_arrays_to_tree_names_the_missing_keys():
  flat = cache.tree_to_arrays(_nested())
  del flat["['layers'][1]['w']"]
  with pytest.raises(
    ValueError, match=r"the arrays lack \[\"\['layers'\]\[1\]\['w'\]\"\] \(1 missing\)"
  ):
    cache.arrays_to_tree(flat, _nested())
  with pytest.raises(ValueError, match=r"params lack \[\"x\['embed'\]\", .*\(3 missing\)"):
    cache.arrays_to_tree(flat, _nested(), 'x', leaf_fn=lambda a, _: 1 / 0, what='params')
