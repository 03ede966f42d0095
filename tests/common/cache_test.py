"""Tests for common.cache: the cache directory, fingerprints and atomic writes."""

import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from common import cache
from common import losses
from common import sharding
from common import testing
from common.models import decoder

REPO = Path(__file__).resolve().parents[2]


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


# A few steps of a small decoder's next-token training, by nnx.jit and by cache.fixture_step, in a
# process with the XLA flags under test; prints both loss curves and step counts and how far apart
# the final parameters are.
_TRAIN_BOTH = textwrap.dedent(
  """
  import json
  from flax import nnx
  import jax, numpy as np, optax
  from common import cache, losses, sharding
  from common.models import decoder

  def train(jit):
    cfg = decoder.DecoderConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2,
                                num_kv_heads=2, head_dim=8, mlp_dim=32)
    with sharding.unsharded():
      model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
      opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @jit
    def step(model, opt, tokens):
      loss, grads = nnx.value_and_grad(lambda m: losses.next_token_loss(m, tokens)[0])(model)
      opt.update(model, grads)
      return loss

    rng = np.random.default_rng(0)
    curve = [float(step(model, opt, rng.integers(1, 32, (4, 12)).astype(np.int32)))
             for _ in range(4)]
    flat = np.concatenate([np.asarray(v).ravel() for v in
                           jax.tree.leaves(nnx.state(model, nnx.Param))])
    return curve, flat, int(opt.step.value)

  a, b = train(nnx.jit), train(cache.fixture_step)
  print(json.dumps({'curves': [a[0], b[0]], 'steps': [a[2], b[2]],
                    'bitwise': bool(np.array_equal(a[1], b[1])),
                    'max_diff': float(np.abs(a[1] - b[1]).max())}))
  """
)


def _train_both(xla_flags: str) -> dict:
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
    [sys.executable, '-c', _TRAIN_BOTH],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fixture_step_trains_nnx_jits_bits_under_a_runs_flags():
  # A run compiles at XLA's defaults, which are fixture_step's options: a fixture trained by a
  # run is the one nnx.jit trained, so no run's results move with this speed work.
  out = _train_both('')
  assert out['bitwise'] and out['curves'][0] == out['curves'][1], out
  assert out['steps'] == [4, 4]


def test_fixture_step_updates_the_model_and_optimizer_in_place_under_the_suites_flags():
  # Under the suite's optimisation level 0 the two compile differently (observed: final
  # parameters 7e-8 apart, so the options take effect); the same maths within float32 rounding,
  # and both take every step.
  out = _train_both(os.environ.get('XLA_FLAGS', ''))
  assert out['steps'] == [4, 4]
  np.testing.assert_allclose(out['curves'][0], out['curves'][1], rtol=1e-5)
  assert out['max_diff'] < 1e-4, out


def test_fixture_step_matches_an_eager_step_in_process():
  cfg = decoder.DecoderConfig(
    vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32
  )
  with sharding.unsharded():
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  tokens = np.random.default_rng(0).integers(1, 32, (4, 12)).astype(np.int32)

  def loss_of(m):
    return losses.next_token_loss(m, tokens)[0]

  loss_before = float(loss_of(model))
  grads = nnx.grad(loss_of)(model)
  expected = jax.tree.map(lambda p, g: p - 0.1 * np.asarray(g), before, grads.to_pure_dict())

  @cache.fixture_step
  def step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(lambda m: losses.next_token_loss(m, tokens)[0])(model)
    opt.update(model, grads)
    return loss

  loss = step(model, opt, tokens)
  np.testing.assert_allclose(float(loss), loss_before, rtol=1e-5)  # the loss before the update
  after = nnx.state(model, nnx.Param).to_pure_dict()
  testing.assert_trees_close(after, expected, rtol=1e-5, atol=1e-6)
  assert int(opt.step.value) == 1
