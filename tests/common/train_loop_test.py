"""Tests for the pieces of common.train_loop (fit/launch are tested end to end elsewhere): keys,
sharded state creation, the jitted step (sharded == unsharded, donation), workdir checks, resume order.
"""

import json
import os
import signal
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from common import checkpoint
from common import config as config_lib
from common import data
from common import sharding
from common import testing
from common import train_loop

INIT = nnx.initializers
P = jax.sharding.PartitionSpec
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
      4,
      kernel_init=nnx.with_partitioning(INIT.lecun_normal(), ('mlp', None)),
      use_bias=False,
      rngs=rngs,
    )
    self.scale = nnx.Param(jnp.ones((4,)))  # unannotated: replicated

  def __call__(self, x):
    h = sharding.with_logical_constraint(jax.nn.gelu(self.up(x)), ('batch', 'mlp'))
    return self.down(h) * self.scale[...]


def _create():
  return train_loop.TrainState(_MLP(nnx.Rngs(0)), optax.adamw(3e-2, weight_decay=0.1))


def _loss(model, batch, key):
  # The key perturbs the targets, so a step that drew the wrong key would not match.
  y = batch['y'] + 0.1 * jax.random.normal(key, batch['y'].shape)
  err = (model(batch['x']) - y) ** 2
  return jnp.mean(err), {'max_err': jnp.max(err)}


def _batch(i):
  rng = np.random.default_rng(i)
  x = rng.normal(size=(8, 8)).astype(np.float32)
  return {'x': x, 'y': np.tanh(x[:, :4] * 2).astype(np.float32)}


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])


@pytest.fixture(scope='module')
def spec(mesh):
  return train_loop.abstract_state(_create, mesh, RULES)


def _train(mesh, steps, seed=0):
  """(losses, metrics, final state) of `steps` jitted steps on `mesh`."""
  spec = train_loop.abstract_state(_create, mesh, RULES)
  state = train_loop.init_state(_create, mesh, RULES).state
  step = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  losses, all_metrics = [], []
  with jax.set_mesh(mesh):
    for i in range(1, steps + 1):
      batch = sharding.to_global(_batch(i), mesh)
      state, m = step(state, batch, train_loop.step_key(seed, i, 'train'))
      losses.append(float(m['loss']))
      all_metrics.append(jax.device_get(m))
  return losses, all_metrics, state


@pytest.fixture(scope='module')
def trained(mesh):
  return _train(mesh, 2)[2]


def _opt_count(state):
  return int(state['optimizer']['opt_state'][0]['count'].get_value())


# ---------------------------------------------------------------------------------------------------
# Keys.


def _bits(key):
  return np.asarray(jax.random.key_data(key)).tolist()


def test_step_key_is_reproducible_and_differs_by_step_seed_and_purpose():
  k = train_loop.step_key(0, 5, 'train')
  assert _bits(k) == _bits(train_loop.step_key(0, 5, 'train'))
  others = [
    train_loop.step_key(0, 6, 'train'),
    train_loop.step_key(0, 5, 'eval'),
    train_loop.step_key(0, 5, 'dropout'),
    train_loop.step_key(1, 5, 'train'),
    train_loop.step_key(0, 0, 'train'),
  ]
  all_bits = [_bits(k)] + [_bits(o) for o in others]
  assert len({tuple(b) for b in all_bits}) == len(all_bits)
  # Pins the derivation (fold_in of the step, then of the purpose's crc32, not Python's per-process
  # str hash): changing it would make runs resumed from older checkpoints draw other numbers.
  manual = jax.random.fold_in(
    jax.random.fold_in(jax.random.key(0), 5), zlib.crc32(b'train') & 0x7FFFFFFF
  )
  assert _bits(k) == _bits(manual)


def test_step_key_draws_differ():
  a = jax.random.uniform(train_loop.step_key(0, 1, 'train'), (4,))
  b = jax.random.uniform(train_loop.step_key(0, 2, 'train'), (4,))
  assert not np.allclose(a, b)


# ---------------------------------------------------------------------------------------------------
# State creation.


def test_abstract_state_allocates_nothing_and_has_shardings(spec, mesh):
  leaves = jax.tree.leaves(spec.state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert jax.tree.structure(spec.shardings) == jax.tree.structure(spec.state)
  for x, s in zip(leaves, jax.tree.leaves(spec.shardings), strict=True):
    assert x.sharding == s and s.mesh == mesh
  assert isinstance(spec.graphdef, nnx.GraphDef)


def test_init_state_puts_params_in_the_annotated_layout(mesh):
  created = train_loop.init_state(_create, mesh, RULES)
  st = created.state
  up = st['model']['up']['kernel'].get_value()
  assert up.sharding.spec == P('fsdp', 'tensor')
  assert up.addressable_shards[0].data.shape == (4, 8)
  assert st['model']['up']['bias'].get_value().sharding.spec == P('tensor')
  assert st['model']['down']['kernel'].get_value().sharding.spec == P('tensor', None)
  assert st['model']['scale'].get_value().sharding.spec == P()
  # Adam's moments follow their parameters; counters are replicated.
  mu = st['optimizer']['opt_state'][0]['mu']
  assert mu['up']['kernel'].get_value().sharding.spec == P('fsdp', 'tensor')
  assert st['optimizer']['opt_state'][0]['count'].get_value().sharding.spec == P()
  for x, s in zip(jax.tree.leaves(st), jax.tree.leaves(created.shardings), strict=True):
    assert x.sharding == s


def test_init_state_values_equal_unsharded_creation(mesh):
  sharded = train_loop.init_state(_create, mesh, RULES).state
  with nnx.use_eager_sharding(False):
    plain = nnx.state(_create())
  # Same random streams (threefry is partitionable); jit may fuse the init scaling differently.
  testing.assert_trees_close(sharded, plain, rtol=1e-6, atol=1e-9)


def test_model_of_and_count_params(trained, spec):
  model = train_loop.model_of(spec.graphdef, trained)
  assert isinstance(model, _MLP)
  np.testing.assert_array_equal(
    model.up.kernel.get_value(), trained['model']['up']['kernel'].get_value()
  )
  n_model = 8 * 16 + 16 + 16 * 4 + 4
  assert train_loop.count_params(nnx.state(model, nnx.Param)) == n_model
  assert train_loop.count_params(trained['model']) == n_model


# ---------------------------------------------------------------------------------------------------
# The step.


def test_sharded_step_matches_one_device(mesh):
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  assert mesh1.size == 1
  losses8, metrics8, state8 = _train(mesh, 3)
  losses1, metrics1, state1 = _train(mesh1, 3)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for m8, m1 in zip(metrics8, metrics1, strict=True):
    assert set(m8) == {'loss', 'grad_norm', 'max_err'}
    np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-5)
  testing.assert_trees_close(state8['model'], state1['model'], rtol=1e-4, atol=1e-7)
  # The steps did something: params moved and the optimizer counted 3 steps.
  init = train_loop.init_state(_create, mesh, RULES).state
  assert not np.allclose(
    state8['model']['up']['kernel'].get_value(), init['model']['up']['kernel'].get_value()
  )
  assert _opt_count(state8) == _opt_count(state1) == 3
  # The state keeps its sharded layout across steps.
  assert state8['model']['up']['kernel'].get_value().sharding.spec == P('fsdp', 'tensor')


def test_step_matches_a_direct_optax_computation(mesh, spec):
  """Metrics are loss_fn's plus the global gradient norm; params get one optax.adamw update."""
  with nnx.use_eager_sharding(False):
    graphdef, plain = nnx.split(_create())
  batch = jax.tree.map(jnp.asarray, _batch(1))
  key = train_loop.step_key(0, 1, 'train')

  @jax.jit
  def reference(plain):
    model = nnx.merge(graphdef, plain).model
    (loss, aux), grads = nnx.value_and_grad(lambda m: _loss(m, batch, key), has_aux=True)(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = nnx.to_pure_dict(grads)
    tx = optax.adamw(3e-2, weight_decay=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return loss, aux, norm, optax.apply_updates(params, updates)

  expected_loss, aux, grad_norm, expected_params = reference(plain)
  state = train_loop.init_state(_create, mesh, RULES).state
  step = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  with jax.set_mesh(mesh):
    new, m = step(state, sharding.to_global(_batch(1), mesh), key)
  np.testing.assert_allclose(m['loss'], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(m['max_err'], aux['max_err'], rtol=1e-5)
  np.testing.assert_allclose(m['grad_norm'], grad_norm, rtol=1e-5)
  assert float(grad_norm) > 0
  testing.assert_trees_close(nnx.to_pure_dict(new['model']), expected_params, rtol=1e-5, atol=1e-7)


def test_train_step_donates_the_old_state(mesh, spec):
  state = train_loop.init_state(_create, mesh, RULES).state
  step = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  with jax.set_mesh(mesh):
    new, _ = step(state, sharding.to_global(_batch(1), mesh), train_loop.step_key(0, 1, 'train'))
  old_leaves = jax.tree.leaves(state)
  assert all(x.is_deleted() for x in old_leaves)
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))
  with pytest.raises(RuntimeError, match='deleted'):
    np.asarray(state['model']['up']['kernel'].get_value())


# ---------------------------------------------------------------------------------------------------
# Workdir.


def _config(**model):
  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict({'d_model': 8, 'layers': 2, **model})
  return config_lib.finalize(c, {})


def _fake_checkpoint(workdir, state):
  with checkpoint.Checkpointer(workdir / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(1, state)


def test_prepare_workdir_writes_config_json(tmp_path):
  c = _config()
  workdir = train_loop.prepare_workdir(c, tmp_path / 'a' / 'b')
  assert workdir == tmp_path / 'a' / 'b'
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved == config_lib.to_dict(c)
  assert saved['model'] == {'d_model': 8, 'layers': 2}


def test_prepare_workdir_refuses_a_different_config_over_a_checkpoint(tmp_path, trained):
  train_loop.prepare_workdir(_config(), tmp_path)
  _fake_checkpoint(tmp_path, trained)
  with pytest.raises(config_lib.ConfigError, match=r'model\.d_model \(8 -> 16\)') as info:
    train_loop.prepare_workdir(_config(d_model=16), tmp_path)
  assert 'model.layers' not in str(info.value)
  with pytest.raises(config_lib.ConfigError, match=r"model\.extra \('<absent>' -> 1\)"):
    train_loop.prepare_workdir(_config(extra=1), tmp_path)
  # The saved config was not overwritten by the refused ones.
  assert json.loads((tmp_path / 'config.json').read_text())['model']['d_model'] == 8


def test_prepare_workdir_allows_resume_mutable_changes(tmp_path, trained):
  train_loop.prepare_workdir(_config(), tmp_path)
  _fake_checkpoint(tmp_path, trained)
  c = _config()
  c.train.num_steps = 1234
  c.checkpoint.keep = 1
  c.mesh.fsdp = 2
  train_loop.prepare_workdir(c, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 1234


def test_prepare_workdir_without_checkpoint_accepts_a_new_config(tmp_path):
  train_loop.prepare_workdir(_config(), tmp_path)
  (tmp_path / 'checkpoints').mkdir()  # an empty checkpoint dir holds nothing to protect
  train_loop.prepare_workdir(_config(d_model=32), tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['d_model'] == 32


# ---------------------------------------------------------------------------------------------------
# Resume order: workdir > resume_from > init_from > scratch.


def _resume_config(resume_from='', init_from=''):
  c = config_lib.base_config()
  c.checkpoint.resume_from = str(resume_from)
  c.checkpoint.init_from = str(init_from)
  return config_lib.finalize(c, {})


def _shifted(state, delta):
  return jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.asarray(delta, x.dtype), s))(state)


def _save(directory, step, state, **kw):
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(step, state, **kw)


class _Init:
  def __init__(self, mesh):
    self.mesh, self.calls = mesh, 0

  def __call__(self):
    self.calls += 1
    return train_loop.init_state(_create, self.mesh, RULES).state


def test_workdir_checkpoint_wins_over_resume_from_and_init_from(tmp_path, mesh, spec, trained):
  _save(tmp_path / 'work' / 'checkpoints', 3, trained, extra={'who': 'workdir'})
  _save(tmp_path / 'other', 7, _shifted(trained, 1.0), extra={'who': 'other'})
  init = _Init(mesh)
  c = _resume_config(resume_from=tmp_path / 'other', init_from=tmp_path / 'other')
  with checkpoint.Checkpointer(tmp_path / 'work' / 'checkpoints') as ckpt:
    step, state, extra, _ = train_loop.restore_or_init(c, ckpt, spec, init)
  assert (step, extra, init.calls) == (3, {'who': 'workdir'}, 0)
  testing.assert_trees_equal(state, trained)


def test_resume_from_restores_full_state_and_data(tmp_path, mesh, spec, trained):
  def make_iter():
    return data.batch_iterator(data.MarkovLanguage(8, 4, num_examples=32), global_batch_size=2)

  it = make_iter()
  next(it)
  next(it)
  _save(tmp_path / 'other' / 'checkpoints', 7, trained, data_iter=it, extra={'who': 'other'})
  expected = next(it)['tokens']
  init = _Init(mesh)
  fresh = make_iter()
  with checkpoint.Checkpointer(tmp_path / 'work') as ckpt:
    step, state, extra, _ = train_loop.restore_or_init(
      _resume_config(resume_from=tmp_path / 'other'), ckpt, spec, init, data_iter=fresh
    )
  assert (step, extra, init.calls) == (7, {'who': 'other'}, 0)
  testing.assert_trees_equal(state, trained)
  assert _opt_count(state) == 2
  np.testing.assert_array_equal(next(fresh)['tokens'], expected)


def test_missing_resume_from_raises(tmp_path, mesh, spec):
  init = _Init(mesh)
  with checkpoint.Checkpointer(tmp_path / 'work') as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
      train_loop.restore_or_init(_resume_config(resume_from=tmp_path / 'nope'), ckpt, spec, init)
    with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
      train_loop.restore_or_init(_resume_config(init_from=tmp_path / 'nope'), ckpt, spec, init)


def test_init_from_loads_only_model_params(tmp_path, mesh, spec, trained):
  assert _opt_count(trained) == 2
  _save(tmp_path / 'pretrained' / 'checkpoints', 9, trained)
  init = _Init(mesh)
  with checkpoint.Checkpointer(tmp_path / 'work') as ckpt:
    step, state, extra, _ = train_loop.restore_or_init(
      _resume_config(init_from=tmp_path / 'pretrained'), ckpt, spec, init
    )
  assert (step, extra, init.calls) == (0, None, 1)
  testing.assert_trees_equal(state['model'], trained['model'])
  fresh = train_loop.init_state(_create, mesh, RULES).state
  testing.assert_trees_equal(state['optimizer'], fresh['optimizer'])  # count 0, zero moments
  assert _opt_count(state) == 0
  assert jax.tree.structure(state) == jax.tree.structure(spec.state)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(spec.shardings), strict=True):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  # The combined state is a valid input to the jitted step.
  step_fn = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  with jax.set_mesh(mesh):
    new, _ = step_fn(state, sharding.to_global(_batch(1), mesh), train_loop.step_key(0, 1, 'train'))
  assert _opt_count(new) == 1


def test_scratch_when_nothing_to_restore(tmp_path, mesh, spec):
  init = _Init(mesh)
  with checkpoint.Checkpointer(tmp_path / 'work') as ckpt:
    step, state, extra, _ = train_loop.restore_or_init(_resume_config(), ckpt, spec, init)
  assert (step, extra, init.calls) == (0, None, 1)
  assert _opt_count(state) == 0


# ---------------------------------------------------------------------------------------------------
# Signals.


def test_stop_signals_set_the_flag_and_restore_the_handlers():
  before = {sig: signal.getsignal(sig) for sig in train_loop.StopSignals.SIGNALS}
  for sig in train_loop.StopSignals.SIGNALS:
    stop = train_loop.StopSignals()
    with stop.installed() as f:
      assert f is stop and stop.received is None
      os.kill(os.getpid(), sig)
      assert stop.received == sig
    assert {s: signal.getsignal(s) for s in train_loop.StopSignals.SIGNALS} == before


def test_a_second_ctrl_c_interrupts_at_once():
  stop = train_loop.StopSignals()
  with stop.installed():
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
