"""common.preference.reference: log-probs computed once, keyed by data and weights, atomic."""

import os
import pathlib
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from common.preference import reference
from common.preference import scoring

REPO = pathlib.Path(__file__).resolve().parents[3]
CFG = decoder.DecoderConfig(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)


def _model(seed=0):
  with sharding.unsharded():
    return decoder.Decoder(CFG, rngs=nnx.Rngs(seed))


def _pairs(seed=0, n=5):
  rng = np.random.default_rng(seed)

  def draw(lo, hi):
    return [list(rng.integers(1, 64, rng.integers(lo, hi))) for _ in range(n)]

  return scoring.pad_pairs(draw(1, 6), draw(1, 5), draw(1, 5), prompt_len=6, response_len=5)


class _Counter:
  """Wraps compute_reference_logps, counting calls (a miss computes, a hit does not)."""

  def __init__(self, monkeypatch):
    self.calls = 0
    real = reference.compute_reference_logps

    def counted(*args, **kwargs):
      self.calls += 1
      return real(*args, **kwargs)

    monkeypatch.setattr(reference, 'compute_reference_logps', counted)


def test_reference_logps_equal_direct_scoring(tmp_path):
  model, pairs = _model(), _pairs()
  ref = reference.reference_logps(model, pairs, batch_size=2, directory=tmp_path)  # 2 + 2 + 1
  assert not ref.hit and set(ref.arrays) == set(reference.REF_KEYS)
  chosen, rejected = scoring.score_pairs(model, scoring.pair_batch(pairs))
  np.testing.assert_allclose(ref.arrays['ref_chosen_logps'], chosen.sum, rtol=1e-5)
  np.testing.assert_allclose(ref.arrays['ref_rejected_logps'], rejected.sum, rtol=1e-5)
  np.testing.assert_allclose(ref.arrays['ref_chosen_logps_mean'], chosen.mean, rtol=1e-5)
  np.testing.assert_allclose(ref.arrays['ref_rejected_logps_mean'], rejected.mean, rtol=1e-5)
  assert all(v.dtype == np.float32 and v.shape == (5,) for v in ref.arrays.values())
  merged = reference.with_reference(pairs, ref)
  assert set(merged) == set(scoring.PAIR_KEYS) | set(reference.REF_KEYS)


def test_hit_reuses_and_changes_recompute(tmp_path, monkeypatch):
  counter = _Counter(monkeypatch)
  model, pairs = _model(), _pairs()
  first = reference.reference_logps(model, pairs, batch_size=4, directory=tmp_path)
  again = reference.reference_logps(model, pairs, batch_size=4, directory=tmp_path)
  assert (first.hit, again.hit, counter.calls) == (False, True, 1)
  assert again.path == first.path
  for k in reference.REF_KEYS:
    np.testing.assert_array_equal(again.arrays[k], first.arrays[k])

  # Other data (one token of one rejected response): a miss, and only that pair's values move.
  edited = {k: v.copy() for k, v in pairs.items()}
  edited['rejected'][3, 0] = (edited['rejected'][3, 0] + 1) % 64
  data = reference.reference_logps(model, edited, batch_size=4, directory=tmp_path)
  assert not data.hit and counter.calls == 2 and data.path != first.path
  moved = data.arrays['ref_rejected_logps'] != first.arrays['ref_rejected_logps']
  np.testing.assert_array_equal(moved, [False, False, False, True, False])

  # Other reference weights (one entry of one matrix): a miss with other values.
  other = _model()
  k = other.layers[1].mlp.up_proj.kernel
  k[...] = k[...].at[0, 0].add(0.5)
  weights = reference.reference_logps(other, pairs, batch_size=4, directory=tmp_path)
  assert not weights.hit and counter.calls == 3 and weights.path != first.path
  assert not np.allclose(weights.arrays['ref_chosen_logps'], first.arrays['ref_chosen_logps'])

  # Back to the original data and weights: its file is still there.
  assert reference.reference_logps(model, pairs, batch_size=4, directory=tmp_path).hit
  assert counter.calls == 3
  # The key also covers the caller's extra string.
  assert not reference.reference_logps(
    model, pairs, batch_size=4, directory=tmp_path, extra='v2'
  ).hit


def test_damaged_or_foreign_files_are_recomputed_never_served(tmp_path, monkeypatch):
  counter = _Counter(monkeypatch)
  model, pairs = _model(), _pairs()
  good = reference.reference_logps(model, pairs, batch_size=8, directory=tmp_path)
  # Truncated bytes: unreadable, recomputed, rewritten.
  data = good.path.read_bytes()
  good.path.write_bytes(data[: len(data) // 2])
  fixed = reference.reference_logps(model, pairs, batch_size=8, directory=tmp_path)
  assert not fixed.hit and counter.calls == 2
  np.testing.assert_array_equal(fixed.arrays['ref_chosen_logps'], good.arrays['ref_chosen_logps'])
  assert reference.reference_logps(model, pairs, batch_size=8, directory=tmp_path).hit
  # Another entry's file under this entry's name: its stored key differs, so it is not served.
  other = reference.reference_logps(_model(seed=1), pairs, batch_size=8, directory=tmp_path)
  good.path.write_bytes(other.path.read_bytes())
  again = reference.reference_logps(model, pairs, batch_size=8, directory=tmp_path)
  assert not again.hit
  np.testing.assert_array_equal(again.arrays['ref_chosen_logps'], good.arrays['ref_chosen_logps'])


def test_cached_validates_loaded_arrays(tmp_path):
  compute = lambda: {'x': np.arange(3)}  # noqa: E731
  assert not reference.cached('v', {'k': '1'}, compute, directory=tmp_path).hit
  assert reference.cached('v', {'k': '1'}, compute, directory=tmp_path).hit
  rejected = reference.cached(
    'v', {'k': '1'}, lambda: {'x': np.arange(4)}, directory=tmp_path, validate=lambda a: False
  )
  assert not rejected.hit and rejected.arrays['x'].shape == (4,)


_KILLED_WRITER = textwrap.dedent(
  """
  import os, signal, sys
  import numpy as np
  from common.preference import reference

  def dying_savez(f, **arrays):
    f.write(b'PK\\x03\\x04 half of a zip file')
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write

  np.savez = dying_savez
  reference.cached('victim', {'data': 'abc'}, lambda: {'x': np.arange(5.0)}, directory=sys.argv[1])
  """
)


def test_a_writer_killed_mid_write_leaves_nothing_that_is_read(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}
  proc = subprocess.run(
    [sys.executable, '-c', _KILLED_WRITER, str(tmp_path)], env=env, cwd=REPO, timeout=120
  )
  assert proc.returncode == -9
  names = sorted(p.name for p in tmp_path.iterdir())
  assert len(names) == 1 and names[0].startswith('.victim-') and '.tmp' in names[0], names
  got = reference.cached(
    'victim', {'data': 'abc'}, lambda: {'x': np.arange(5.0)}, directory=tmp_path
  )
  assert not got.hit
  np.testing.assert_array_equal(got.arrays['x'], np.arange(5.0))
  assert reference.cached('victim', {'data': 'abc'}, lambda: {}, directory=tmp_path).hit


def test_fingerprint_sees_every_byte_and_path():
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': {'c': np.ones(2, np.int32)}}
  fp = reference.fingerprint(tree)
  assert fp == reference.fingerprint(jax.tree.map(np.copy, tree))
  assert fp == reference.fingerprint(jax.tree.map(jax.numpy.asarray, tree))
  flipped = jax.tree.map(np.copy, tree)
  flipped['a'].view(np.uint32)[1, 2] ^= 1  # one bit of one float
  assert reference.fingerprint(flipped) != fp
  assert reference.fingerprint({'a': tree['a'], 'd': tree['b']}) != fp  # renamed subtree
  assert reference.fingerprint({**tree, 'a': tree['a'].reshape(3, 2)}) != fp  # same bytes
  assert reference.fingerprint({**tree, 'a': tree['a'].astype(np.int32)}) != fp


def test_sharded_scoring_matches_one_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  model, pairs = _model(), _pairs(n=6)
  one = reference.compute_reference_logps(model, pairs, batch_size=4)
  mesh = sharding.make_mesh([('data', 8)])
  eight = reference.compute_reference_logps(model, pairs, batch_size=4, mesh=mesh)
  for k in reference.REF_KEYS:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-5)
