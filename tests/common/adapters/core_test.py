"""common.adapters: selection, zero-init identity, merge, frozen base, adapter checkpoints, sharding."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import sharding
from common import testing
from common import train_loop
from common.adapters import core
from common.adapters import lora
from common.models import decoder

CFG = decoder.DecoderConfig(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
MLP = r'layers/\d+/mlp/(gate|up|down)_proj'
RULES = sharding.DEFAULT_RULES


def _base(seed=0):
  return decoder.Decoder(CFG, rngs=nnx.Rngs(seed))


def _adapted(seed=0, rank=4, pattern=MLP):
  model = _base(seed)
  core.adapt(model, pattern, lora.factory(rank=rank, rngs=nnx.Rngs(seed + 100)))
  return model


def _randomize_b(model, seed=1):
  for i, layer in enumerate(core.adapted(model).values()):
    b = layer.adapter.b
    b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), b[...].shape)


def _tokens(seed=0, shape=(2, 12)):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def test_selection_regex_glob_exclude_and_errors():
  with nnx.use_eager_sharding(False):
    model = _base()
  assert core.select(model, MLP) == [
    f'layers/{i}/mlp/{p}_proj' for i in range(2) for p in ('down', 'gate', 'up')
  ]
  assert core.select(model, 'glob:layers/*/attn/q_proj') == [
    'layers/0/attn/q_proj',
    'layers/1/attn/q_proj',
  ]
  assert core.select(model, MLP, exclude=r'.*/down_proj') == [
    'layers/0/mlp/gate_proj',
    'layers/0/mlp/up_proj',
    'layers/1/mlp/gate_proj',
    'layers/1/mlp/up_proj',
  ]
  with pytest.raises(core.AdapterError, match='matches no linear layer.*layers/0/attn'):
    core.select(model, r'layers/\d+/ffn/.*')
  with pytest.raises(core.AdapterError, match='not a valid regex'):
    core.select(model, 'layers/(')


def test_module_at_and_resolve_find_the_selected_layers():
  with nnx.use_eager_sharding(False):
    model = _base()
  for path in core.select(model, MLP):
    parent, key = core.resolve(model, path)
    assert core.child(parent, key) is core.module_at(model, path)
  assert core.module_at(model, 'layers/1/mlp/up_proj') is model.layers[1].mlp.up_proj
  parent, key = core.resolve(model, 'layers/0')
  assert key == 0 and core.child(parent, key) is model.layers[0]


def test_adapt_freezes_everything_but_the_adapters():
  with nnx.use_eager_sharding(False):
    model = _adapted(rank=4)
  params = nnx.state(model, nnx.Param)
  assert all(
    isinstance(v, core.AdapterParam)
    for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  )
  # 6 wrapped layers: gate/up 32 -> 64, down 64 -> 32, each rank 4 * (in + out).
  assert core.count_trainable(model) == 6 * 4 * (32 + 64)
  n_frozen = train_loop.count_params(nnx.state(model, core.Frozen))
  with nnx.use_eager_sharding(False):
    n_base = train_loop.count_params(nnx.state(_base(), nnx.Param))
  assert n_frozen == n_base
  # The factors carry the kernel's logical axes on the side they share with it.
  up = core.adapted(model)['layers/0/mlp/up_proj'].adapter
  assert sharding.variable_logical_axes(up.a) == ('embed', None)
  assert sharding.variable_logical_axes(up.b) == (None, 'mlp')


def test_zero_init_leaves_logits_unchanged_and_b_matters():
  tokens = _tokens()
  with nnx.use_eager_sharding(False):
    base_logits = _base()(tokens)
    model = _adapted()
  np.testing.assert_array_equal(model(tokens), base_logits)
  _randomize_b(model)
  assert np.abs(model(tokens) - base_logits).max() > 1e-3


def test_merge_equals_unmerged_and_unmerge_restores():
  tokens = _tokens(1)
  with nnx.use_eager_sharding(False):
    model = _adapted()
  _randomize_b(model)
  kernel0 = np.asarray(core.adapted(model)['layers/1/mlp/down_proj'].base.kernel[...])
  unmerged = model(tokens)
  assert core.merge(model) == 6
  merged = model(tokens)
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  assert core.unmerge(model) == 6
  np.testing.assert_allclose(
    core.adapted(model)['layers/1/mlp/down_proj'].base.kernel[...], kernel0, atol=1e-6
  )
  np.testing.assert_allclose(model(tokens), unmerged, rtol=1e-5, atol=1e-5)


def _loss(model, batch, key):
  del key
  logits = model(batch['inputs'])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], axis=-1)
  return jnp.mean(nll), {}


def _create():
  return train_loop.TrainState(_adapted(), optax.adam(1e-2))


def _batch(i):
  t = _tokens(i, (8, 13))
  return {'inputs': t[:, :-1], 'targets': t[:, 1:]}


def _train(mesh, steps):
  spec = train_loop.abstract_state(_create, mesh, RULES)
  state = train_loop.init_state(_create, mesh, RULES).state
  step = train_loop.make_train_step(spec.graphdef, _loss, spec.shardings)
  losses = []
  with jax.set_mesh(mesh), sharding.axis_rules(RULES):
    for i in range(steps):
      # One fixed batch: the loss on it must fall step after step.
      state, m = step(state, sharding.to_global(_batch(0), mesh, RULES), jax.random.key(i))
      losses.append(float(m['loss']))
  return spec, state, losses


@pytest.fixture(scope='module')
def mesh8():
  return sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])


def test_train_step_updates_only_adapters(mesh8):
  spec, state, losses = _train(mesh8, 3)
  init = train_loop.init_state(_create, mesh8, RULES).state
  frozen0 = nnx.state(train_loop.model_of(spec.graphdef, init), core.Frozen)
  frozen = nnx.state(train_loop.model_of(spec.graphdef, state), core.Frozen)
  testing.assert_trees_equal(frozen, frozen0)
  adapters0 = core.adapter_state(train_loop.model_of(spec.graphdef, init))
  adapters = core.adapter_state(train_loop.model_of(spec.graphdef, state))
  moved = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(adapters0), strict=True)
  ]
  assert all(moved)
  # The optimizer holds moments for the adapters only.
  mu = state['optimizer']['opt_state'][0]['mu']
  assert train_loop.count_params(mu) == core.count_trainable(adapters)
  assert losses[-1] < losses[0]


def test_sharded_training_equals_one_device(mesh8):
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  spec8, state8, losses8 = _train(mesh8, 3)
  _, state1, losses1 = _train(mesh1, 3)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  a8 = core.adapter_state(train_loop.model_of(spec8.graphdef, state8))
  a1 = core.adapter_state(train_loop.model_of(spec8.graphdef, state1))
  testing.assert_trees_close(a8, a1, rtol=1e-4, atol=1e-6)
  up_a = state8['model']['layers'][0]['mlp']['up_proj']['adapter']['a'].get_value()
  assert up_a.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)


def test_adapter_only_checkpoint_round_trip(tmp_path):
  tokens = _tokens(2)
  with nnx.use_eager_sharding(False):
    trained = _adapted(seed=0)
    _randomize_b(trained, seed=7)
    expected = trained(tokens)
    core.save_adapters(tmp_path / 'adapters', trained, step=5)
    # Same base, adapters initialised from another seed: loading must restore the trained ones.
    fresh = _base(0)
    core.adapt(fresh, MLP, lora.factory(rank=4, rngs=nnx.Rngs(999)))
  assert not np.allclose(fresh(tokens), expected)
  assert core.load_adapters(tmp_path / 'adapters', fresh) == 5
  np.testing.assert_array_equal(fresh(tokens), expected)
  # The checkpoint holds the adapters only (a few KB, not the base model).
  size = sum(p.stat().st_size for p in (tmp_path / 'adapters').rglob('*') if p.is_file())
  assert size < 200_000
  with nnx.use_eager_sharding(False):
    other = _base(0)
    core.adapt(other, MLP, lora.factory(rank=8, rngs=nnx.Rngs(0)))
  with pytest.raises(core.AdapterError, match='does not fit'):
    core.load_adapters(tmp_path / 'adapters', other)
