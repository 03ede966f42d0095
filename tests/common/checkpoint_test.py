"""Tests for common.checkpoint: sharded round trips (same and other mesh), async saves, retention,
float64 extras, the data iterator position, fallback past a corrupt checkpoint, and partial restores.
"""

import logging
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import checkpoint
from common import data
from common import sharding
from common import testing
from common import train_loop

INIT = nnx.initializers
RULES = sharding.DEFAULT_RULES


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(
      8,
      16,
      kernel_init=nnx.with_partitioning(INIT.lecun_normal(), ('embed', 'mlp')),
      bias_init=nnx.with_partitioning(INIT.normal(0.1), ('mlp',)),
      rngs=rngs,
    )
    self.down = nnx.Linear(
      16,
      8,
      kernel_init=nnx.with_partitioning(INIT.lecun_normal(), ('mlp', 'embed')),
      use_bias=False,
      rngs=rngs,
    )

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def _create():
  return train_loop.TrainState(_MLP(nnx.Rngs(0)), optax.adamw(1e-2))


def _loss(model, batch, key):
  del key
  return jnp.mean((model(batch['x']) - batch['y']) ** 2), {}


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])


@pytest.fixture(scope='module')
def spec(mesh):
  return train_loop.abstract_state(_create, mesh, RULES)


@pytest.fixture(scope='module')
def trained(mesh, spec):
  """A sharded TrainState after two Adam steps (so mu, nu and the counters are non-trivial)."""
  state = train_loop.init_state(_create, mesh, RULES).state
  step = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  rng = np.random.default_rng(0)
  batch = {
    'x': rng.normal(size=(8, 8)).astype(np.float32),
    'y': rng.normal(size=(8, 8)).astype(np.float32),
  }
  with jax.set_mesh(mesh):
    batch = sharding.to_global(batch, mesh)
    for i in range(2):
      state, _ = step(state, batch, train_loop.step_key(0, i, 'train'))
  return state


def _other_state(state, delta):
  """Same structure and shardings, different values (jit keeps the input shardings)."""
  return jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.asarray(delta, x.dtype), s))(state)


def _assert_shardings_match(restored, target):
  for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
    assert r.sharding.is_equivalent_to(t.sharding, r.ndim), (r.sharding, t.sharding)
    assert r.sharding.mesh == t.sharding.mesh


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  assert files
  for p in files:
    if how == 'delete':
      p.unlink()
    else:
      p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


# ---------------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_on_the_same_mesh_is_bitwise(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, trained, meta={'note': 'hi'})
    assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec.state)
  assert r.step == 2
  assert r.meta == {'step': 2, 'note': 'hi'}
  assert r.extra is None
  assert jax.tree.structure(r.state) == jax.tree.structure(trained)
  testing.assert_trees_equal(r.state, trained)
  _assert_shardings_match(r.state, spec.state)
  assert int(r.state['optimizer']['step'].get_value()) == 2


def test_restore_onto_another_mesh(tmp_path, trained):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, trained)
  mesh2 = sharding.make_mesh([('data', 1), ('fsdp', 4), ('tensor', 2)])
  spec2 = train_loop.abstract_state(_create, mesh2, RULES)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec2.state)
  testing.assert_trees_equal(r.state, trained)
  _assert_shardings_match(r.state, spec2.state)
  kernel = r.state['model']['up']['kernel'].get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert kernel.addressable_shards[0].data.shape == (2, 8)  # 8 / fsdp=4, 16 / tensor=2


def test_restore_onto_one_device(tmp_path, trained):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained)
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  spec1 = train_loop.abstract_state(_create, mesh1, RULES)
  r = checkpoint.restore_from(tmp_path, spec1.state)
  testing.assert_trees_equal(r.state, trained)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(r.state))


def test_abstract_like_carries_shardings(trained, spec):
  abstract = checkpoint.abstract_like(trained)
  _assert_shardings_match(abstract, spec.state)
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  rep = jax.sharding.NamedSharding(mesh1, jax.sharding.PartitionSpec())
  moved = checkpoint.abstract_like(trained, jax.tree.map(lambda _: rep, trained))
  assert all(x.sharding == rep for x in jax.tree.leaves(moved))
  assert [x.shape for x in jax.tree.leaves(moved)] == [x.shape for x in jax.tree.leaves(trained)]


# ---------------------------------------------------------------------------------------------------
# Saving.


def test_async_save_then_wait(tmp_path, trained, spec):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=True)
  ckpt.save(1, trained)
  ckpt.save(2, _other_state(trained, 1.0))
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']  # no temporary directories
  r = ckpt.restore(spec.state)
  ckpt.close()
  assert r.step == 2
  testing.assert_trees_equal(r.state, _other_state(trained, 1.0))


def test_keep_n_most_recent(tmp_path, trained):
  with checkpoint.Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, trained)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '4']


def test_saving_an_existing_step_replaces_it(tmp_path, trained, spec):
  other = _other_state(trained, 1.0)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, trained)
    ckpt.save(5, other)
    r = ckpt.restore(spec.state)
    assert ckpt.all_steps() == [5]
  testing.assert_trees_equal(r.state, other)


def test_should_save():
  ckpt = checkpoint.Checkpointer.__new__(checkpoint.Checkpointer)
  ckpt.every_steps = 5
  assert [s for s in range(1, 16) if ckpt.should_save(s)] == [5, 10, 15]
  ckpt.every_steps = 0
  assert not any(ckpt.should_save(s) for s in range(1, 16))


def test_extra_float64_round_trips_exactly(tmp_path, trained, spec):
  extra = {
    'sum': 0.1 + 0.2,
    'third': 1 / 3,
    'big': 1e300,
    'tiny': 5e-324,
    'neg': -2.5e-17,
    'count': 12345678901234,
    'history': [1 / 7, 2 / 7, np.float64(3 / 7).item()],
    'nested': {'mean': np.float64(np.pi).item(), 'name': 'ebpo'},
  }
  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(3, trained, extra=extra)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec.state)
  assert r.extra == extra
  assert r.extra['sum'] == 0.30000000000000004 and r.extra['third'].hex() == (1 / 3).hex()


def test_data_iterator_resumes_at_the_next_batch(tmp_path, trained, spec):
  def make():
    return data.batch_iterator(
      data.MarkovLanguage(16, 8, seed=1, num_examples=40), global_batch_size=4, shuffle_seed=3
    )

  it = make()
  for _ in range(3):
    next(it)
  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(3, trained, data_iter=it)
  expected = [next(it)['tokens'] for _ in range(2)]

  fresh = make()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec.state, data_iter=fresh)
  assert r.step == 3
  got = [next(fresh)['tokens'] for _ in range(2)]
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_array_equal(got[1], expected[1])
  assert not np.array_equal(next(make())['tokens'], expected[0])


def test_restoring_a_data_iterator_that_was_not_saved_raises(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained)
    it = data.batch_iterator(data.MarkovLanguage(16, 8), global_batch_size=4)
    with pytest.raises(checkpoint.CheckpointError, match='no data iterator state'):
      ckpt.restore(spec.state, data_iter=it)


# ---------------------------------------------------------------------------------------------------
# Failures.


@pytest.mark.parametrize('how', ['truncate', 'delete'])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, trained, spec, caplog, how):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained, extra={'at': 1})
    ckpt.save(2, _other_state(trained, 1.0), extra={'at': 2})
  _corrupt(tmp_path / '2', how)
  with checkpoint.Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
    r = ckpt.restore(spec.state)
  assert r.step == 1 and r.extra == {'at': 1}
  testing.assert_trees_equal(r.state, trained)
  text = '\n'.join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)
  assert 'checkpoint step 2' in text and 'unreadable' in text
  assert 'restored the older checkpoint step 1' in text


def test_fallback_restores_data_position_of_the_same_step(tmp_path, trained, spec):
  def make():
    return data.batch_iterator(
      data.MarkovLanguage(16, 8, num_examples=64), global_batch_size=2, prefetch=0
    )

  it = make()
  next(it)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained, data_iter=it)
    expected = next(it)['tokens']  # what step 1 reads next
    next(it)
    ckpt.save(2, _other_state(trained, 1.0), data_iter=it)
  _corrupt(tmp_path / '2', 'truncate')
  fresh = make()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec.state, data_iter=fresh)
  assert r.step == 1
  np.testing.assert_array_equal(next(fresh)['tokens'], expected)


def test_corrupt_data_state_also_falls_back(tmp_path, trained, spec):
  it = data.batch_iterator(data.MarkovLanguage(16, 8, num_examples=64), global_batch_size=2)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained, data_iter=it)
    ckpt.save(2, trained, data_iter=it)
  (data_file,) = (tmp_path / '2' / 'data').glob('process_0-of-1.json')
  data_file.write_text(data_file.read_text()[:5])
  fresh = data.batch_iterator(data.MarkovLanguage(16, 8, num_examples=64), global_batch_size=2)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore(spec.state, data_iter=fresh).step == 1


def test_redone_step_replaces_an_unreadable_checkpoint(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained)
    ckpt.save(2, trained)
  _corrupt(tmp_path / '2', 'truncate')
  redone = _other_state(trained, 1.0)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.restore(spec.state).step == 1
    ckpt.save(2, redone)  # the resumed run reaches step 2 again
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(spec.state)
  assert r.step == 2
  testing.assert_trees_equal(r.state, redone)


def test_all_checkpoints_corrupt_raises(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained)
    ckpt.save(2, trained)
  _corrupt(tmp_path / '1', 'truncate')
  _corrupt(tmp_path / '2', 'truncate')
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r'no readable checkpoint.*step 2.*step 1'):
      ckpt.restore(spec.state)
    with pytest.raises(checkpoint.CheckpointError, match='no readable checkpoint'):
      ckpt.restore(spec.state, step=2)


def test_no_checkpoint_raises(tmp_path, spec):
  with checkpoint.Checkpointer(tmp_path / 'empty') as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
      ckpt.restore(spec.state)


def test_checkpoint_error_is_a_user_error():
  from common import errors

  assert issubclass(checkpoint.CheckpointError, errors.UserError)


# ---------------------------------------------------------------------------------------------------
# Other runs' checkpoints.


def test_restore_from_accepts_workdir_checkpoints_dir_or_step_dir(tmp_path, trained, spec):
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    ckpt.save(1, trained)
    ckpt.save(2, _other_state(trained, 1.0))
  assert checkpoint.latest_checkpoint_dir(tmp_path / 'run') == ckpt_dir
  assert checkpoint.latest_checkpoint_dir(ckpt_dir) == ckpt_dir
  assert checkpoint.restore_from(tmp_path / 'run', spec.state).step == 2
  assert checkpoint.restore_from(ckpt_dir, spec.state).step == 2
  r = checkpoint.restore_from(ckpt_dir / '1', spec.state)
  assert r.step == 1
  testing.assert_trees_equal(r.state, trained)


def test_restore_from_missing_path_raises(tmp_path, spec):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    checkpoint.restore_from(tmp_path / 'nowhere', spec.state)


def test_restore_params_reads_the_model_subtree_only(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(1, _other_state(trained, 1.0))
    ckpt.save(2, trained)
  params = checkpoint.restore_params(tmp_path, spec.state['model'])
  assert jax.tree.structure(params) == jax.tree.structure(spec.state['model'])
  testing.assert_trees_equal(params, trained['model'])
  _assert_shardings_match(params, spec.state['model'])


def test_restore_params_onto_another_mesh(tmp_path, trained):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, trained)
  mesh2 = sharding.make_mesh([('data', 1), ('fsdp', 4), ('tensor', 2)])
  spec2 = train_loop.abstract_state(_create, mesh2, RULES)
  params = checkpoint.restore_params(tmp_path, spec2.state['model'])
  testing.assert_trees_equal(params, trained['model'])
  _assert_shardings_match(params, spec2.state['model'])


def test_restore_params_accepts_a_step_dir(tmp_path, trained, spec):
  with checkpoint.Checkpointer(tmp_path / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(1, trained)
    ckpt.save(2, _other_state(trained, 1.0))
  params = checkpoint.restore_params(tmp_path / 'checkpoints' / '1', spec.state['model'])
  testing.assert_trees_equal(params, trained['model'])


def test_restore_params_errors(tmp_path, spec):
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    checkpoint.restore_params(tmp_path / 'nowhere', spec.state['model'])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint'):
    checkpoint.restore_params(tmp_path / 'empty', spec.state['model'])


# ---------------------------------------------------------------------------------------------------
# Integrity: fingerprints at save, verified at restore.


def _big_state(delta=0.0):
  """Large enough that Orbax stores the array in a data file (small arrays sit inline in OCDBT's
  checksummed index nodes, where a flipped bit is already a read error)."""
  return {'w': jnp.arange(200_000, dtype=jnp.float32) / 7 + delta, 'n': jnp.arange(3)}


def _flip_a_bit_in_the_largest_file(step_dir: pathlib.Path) -> None:
  big = max(
    (p for p in (step_dir / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size
  )
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x04
  big.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_state_falls_back_with_a_warning(tmp_path, caplog, monkeypatch):
  s1, s2 = _big_state(), _big_state(1.0)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, s1)
    ckpt.save(2, s2)
  _flip_a_bit_in_the_largest_file(tmp_path / '2')
  abstract = checkpoint.abstract_like(s1)
  with checkpoint.Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
    r = ckpt.restore(abstract)
  assert r.step == 1
  testing.assert_trees_equal(r.state, s1)
  text = '\n'.join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING)
  assert "checkpoint step 2" in text and "is corrupt (step 2: state leaf ['w']" in text
  # Without the check the damaged step restores silently with other values (the defect fixed).
  monkeypatch.setattr(checkpoint, '_verify', lambda *a: None)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(abstract)
  assert r.step == 2 and not np.array_equal(np.asarray(r.state['w']), np.asarray(s2['w']))


def test_changed_algorithm_state_falls_back(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _big_state(), extra={'mean': 0.25})
    ckpt.save(2, _big_state(), extra={'mean': 0.5})
  (extra_file,) = [
    p for p in (tmp_path / '2' / 'extra').iterdir() if p.name != 'commit_success.txt'
  ]
  extra_file.write_text(extra_file.read_text().replace('0.5', '0.7'))  # still valid JSON
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    r = ckpt.restore(checkpoint.abstract_like(_big_state()))
  assert r.step == 1 and r.extra == {'mean': 0.25}


def test_fingerprints_detect_every_single_bit_flip_and_ignore_the_mesh(trained):
  x = np.asarray([1.5, -2.0, 3.25], np.float32)
  base = checkpoint.fingerprints({'x': x})["['x']"]
  for i in range(x.size):
    for bit in range(32):
      y = x.view(np.uint32).copy()
      y[i] ^= np.uint32(1 << bit)
      assert checkpoint.fingerprints({'x': y.view(np.float32)})["['x']"] != base, (i, bit)
  on_one_device = jax.device_put(jax.device_get(trained), jax.devices()[0])
  assert checkpoint.fingerprints(trained) == checkpoint.fingerprints(on_one_device)


def test_restore_params_refuses_corrupt_model_parameters(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, {'model': _big_state()})
  _flip_a_bit_in_the_largest_file(tmp_path / '1')
  with pytest.raises(checkpoint.CheckpointError, match='corrupt'):
    checkpoint.restore_params(tmp_path, checkpoint.abstract_like(_big_state()))


def test_keep_zero_is_refused(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='checkpoint.keep=0'):
    checkpoint.Checkpointer(tmp_path, keep=0)


@pytest.fixture
def tiny_disk(tmp_path):
  """A 256 KiB tmpfs (needs mount rights: root in this project's sandbox and CI)."""
  import subprocess  # noqa: PLC0415

  mnt = tmp_path / 'disk'
  mnt.mkdir()
  p = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(mnt)], check=False)
  if p.returncode:
    pytest.skip('cannot mount a tmpfs here')
  yield mnt
  subprocess.run(['umount', '-l', str(mnt)], check=False)


@pytest.mark.parametrize('async_save', [False, True])
def test_disk_full_is_one_error_and_leaves_no_partial_step(tiny_disk, async_save):
  state = {'w': jnp.asarray(np.random.default_rng(0).normal(size=200_000), jnp.float32)}
  ckpt = checkpoint.Checkpointer(tiny_disk / 'ckpt', async_save=async_save)
  with pytest.raises(checkpoint.CheckpointError, match='cannot save .* no space left on device'):
    ckpt.save(1, state)
    ckpt.wait()
  ckpt.close()
  assert not list((tiny_disk / 'ckpt').glob('*tmp*'))
