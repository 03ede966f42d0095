"""Tests for common.sharding: rule validation, meshes, logical -> physical specs, batches.

Runs on the 8 fake CPU devices of tests/conftest.py; the (2, 2, 2) mesh puts every mesh axis above
size 1, so a rule that silently dropped an axis would show up as a wrong PartitionSpec.
"""

import logging

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding

P = jax.sharding.PartitionSpec
INIT = nnx.initializers


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])


class _Annotated(nnx.Module):
  """Kernels annotated with logical names, one unannotated parameter, one non-dividing dim."""

  def __init__(self, rngs):
    self.up = nnx.Linear(
      8,
      16,
      kernel_init=nnx.with_partitioning(INIT.lecun_normal(), ('embed', 'mlp')),
      bias_init=nnx.with_partitioning(INIT.zeros_init(), ('mlp',)),
      rngs=rngs,
    )
    self.down = nnx.Linear(
      16,
      8,
      kernel_init=nnx.with_partitioning(INIT.lecun_normal(), ('mlp', 'embed')),
      use_bias=False,
      rngs=rngs,
    )
    # 3 heads do not divide tensor=2: replicated.
    self.heads = nnx.Param(
      nnx.with_partitioning(INIT.ones_init(), ('embed', 'heads'))(rngs.params(), (8, 3))
    )
    self.scale = nnx.Param(jnp.ones((8,)))


def _abstract_state():
  def split():
    with nnx.use_eager_sharding(False):
      return nnx.state(_Annotated(nnx.Rngs(0)))

  return jax.eval_shape(split)


# ---------------------------------------------------------------------------------------------------
# Rules.


def test_validate_rules_returns_tuples():
  table = sharding.validate_rules([('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('x', None)])
  assert table == {'batch': ('data', 'fsdp'), 'embed': ('fsdp',), 'x': ()}


def test_default_rules_are_valid():
  table = sharding.validate_rules(sharding.DEFAULT_RULES)
  assert len(table) == len(sharding.DEFAULT_RULES)


def test_validate_rules_rejects_duplicate_logical_name():
  with pytest.raises(sharding.ShardingError, match="'embed' appears twice"):
    sharding.validate_rules([('embed', 'fsdp'), ('mlp', 'tensor'), ('embed', 'tensor')])


def test_validate_rules_rejects_unknown_mesh_axis():
  with pytest.raises(sharding.ShardingError, match=r"'mlp'.*\['model'\]"):
    sharding.validate_rules([('mlp', 'model')])


def test_validate_rules_rejects_axis_named_twice():
  with pytest.raises(sharding.ShardingError, match='names a mesh axis twice'):
    sharding.validate_rules([('batch', ('data', 'data'))])


def test_validate_rules_rejects_malformed_rule():
  with pytest.raises(sharding.ShardingError, match='not a'):
    sharding.validate_rules([('batch', 'data', 'fsdp')])


def test_sharding_error_is_a_user_error():
  from common import errors

  assert issubclass(sharding.ShardingError, errors.UserError)


# ---------------------------------------------------------------------------------------------------
# Meshes.


def test_make_mesh_fills_minus_one_and_adds_missing_axes():
  mesh = sharding.make_mesh([('data', -1)])
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}


def test_make_mesh_orders_axes_canonically():
  mesh = sharding.make_mesh([('tensor', 2), ('data', -1), ('fsdp', 2)])
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert tuple(mesh.axis_sizes) == (2, 2, 2)
  assert mesh.devices.shape == (2, 2, 2)


def test_make_mesh_axis_types_are_auto():
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 3


def test_make_mesh_uses_the_given_devices():
  mesh = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  assert mesh.size == 1
  assert list(mesh.devices.flat) == jax.devices()[:1]


@pytest.mark.parametrize(
  'spec, match',
  [
    ([('data', 3)], 'has 3 devices but 8'),
    ([('data', 3), ('fsdp', -1)], 'does not divide the 8 devices'),
    ([('data', 2), ('fsdp', 2)], 'has 4 devices but 8'),
    ([('data', -1), ('fsdp', -1)], 'more than one -1'),
    ([('data', 0), ('fsdp', -1)], 'non-positive'),
    ([('model', 8)], 'unknown mesh axes'),
    ([('data', 2), ('data', 4)], 'repeat'),
  ],
)
def test_make_mesh_rejects_bad_specs_with_one_line(spec, match):
  with pytest.raises(sharding.ShardingError, match=match) as info:
    sharding.make_mesh(spec)
  assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Logical -> physical.


def test_logical_to_spec_maps_names(mesh):
  spec = sharding.logical_to_spec(('batch', 'length', 'mlp'), (8, 5, 4), mesh)
  assert spec == P(('data', 'fsdp'), None, 'tensor')
  assert sharding.logical_to_spec(None, (8, 4), mesh) == P()
  assert sharding.logical_to_spec(('unknown_name', None), (8, 4), mesh) == P(None, None)


def test_logical_to_spec_works_on_abstract_mesh():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  assert sharding.logical_to_spec(('embed', 'mlp'), (4, 4), mesh) == P('fsdp', 'tensor')


def test_logical_to_spec_drops_size_one_axes():
  mesh = sharding.make_mesh([('data', 8)])
  # batch -> (data, fsdp) with fsdp=1: only 'data' remains; 'embed' -> fsdp (size 1) replicates.
  assert sharding.logical_to_spec(('batch', 'embed'), (8, 4), mesh) == P('data', None)


def test_logical_to_spec_rejects_two_dims_on_one_mesh_axis(mesh):
  with pytest.raises(sharding.ShardingError, match="both map to mesh axis 'fsdp'"):
    sharding.logical_to_spec(('batch', 'embed'), (8, 8), mesh)
  with pytest.raises(sharding.ShardingError, match="'mlp' and 'heads'"):
    sharding.logical_to_spec(('mlp', 'heads'), (4, 4), mesh)


def test_logical_to_spec_rejects_rank_mismatch(mesh):
  with pytest.raises(sharding.ShardingError, match='rank 2'):
    sharding.logical_to_spec(('embed',), (4, 4), mesh)


def test_logical_to_spec_validates_rules(mesh):
  with pytest.raises(sharding.ShardingError, match='appears twice'):
    sharding.logical_to_spec(('x',), (4,), mesh, rules=[('x', 'data'), ('x', 'fsdp')])


def test_non_dividing_axis_replicates_and_warns_once(mesh, caplog):
  rules = [('sharding_test_heads', 'tensor'), ('sharding_test_batch', ('data', 'fsdp'))]
  with caplog.at_level(logging.WARNING):
    spec = sharding.logical_to_spec(
      ('sharding_test_heads', 'sharding_test_batch'), (9, 6), mesh, rules
    )
  assert spec == P(None, None)  # 9 % 2 and 6 % 4 are both non-zero
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("'sharding_test_heads' of size 9" in w for w in warnings), warnings
  assert any("'sharding_test_batch' of size 6" in w for w in warnings), warnings
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = sharding.logical_to_spec(('sharding_test_heads', None), (9, 6), mesh, rules)
  assert again == P(None, None)
  assert not [r for r in caplog.records if 'sharding_test_heads' in r.getMessage()]


def test_non_dividing_axis_frees_the_mesh_axis_for_other_dims(mesh):
  # 'heads' cannot use tensor (3 % 2), so 'mlp' may: no conflict is raised.
  spec = sharding.logical_to_spec(('heads', 'mlp'), (3, 4), mesh)
  assert spec == P(None, 'tensor')


def test_state_shardings_follow_annotations(mesh):
  state = _abstract_state()
  shardings = sharding.state_shardings(state, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  specs = jax.tree.map(lambda s: s.spec, shardings)
  assert specs['up']['kernel'].get_value() == P('fsdp', 'tensor')
  assert specs['up']['bias'].get_value() == P('tensor')
  assert specs['down']['kernel'].get_value() == P('tensor', 'fsdp')
  assert specs['heads'].get_value() == P('fsdp', None)
  assert specs['scale'].get_value() == P()
  for s in jax.tree.leaves(shardings):
    assert isinstance(s, jax.sharding.NamedSharding)
    assert s.mesh == mesh


def test_state_shardings_can_place_a_concrete_state(mesh):
  with nnx.use_eager_sharding(False):
    state = nnx.state(_Annotated(nnx.Rngs(0)))
  shardings = sharding.state_shardings(state, mesh)
  placed = jax.device_put(state, shardings)
  kernel = placed['up']['kernel'].get_value()
  assert kernel.sharding.spec == P('fsdp', 'tensor')
  assert kernel.addressable_shards[0].data.shape == (4, 8)
  np.testing.assert_array_equal(kernel, state['up']['kernel'].get_value())


def test_describe_lists_every_param(mesh):
  state = _abstract_state()
  text = sharding.describe(state, mesh)
  lines = text.splitlines()
  paths = jax.tree_util.tree_flatten_with_path(state)[0]
  assert len(lines) == len(paths) == 5
  for name in (
    "['up']['kernel']",
    "['up']['bias']",
    "['down']['kernel']",
    "['heads']",
    "['scale']",
  ):
    (line,) = [ln for ln in lines if ln.startswith(name + ' ')]
    assert line
  (up_line,) = [ln for ln in lines if ln.startswith("['up']['kernel']")]
  assert "('embed', 'mlp')" in up_line and "P('fsdp', 'tensor')" in up_line
  assert '(8, 16)' in up_line


# ---------------------------------------------------------------------------------------------------
# Activations.


def test_with_logical_constraint_is_a_no_op_without_mesh():
  x = jnp.ones((8, 4))
  assert sharding.with_logical_constraint(x, ('batch', None)) is x


def test_with_logical_constraint_is_a_no_op_on_one_device_mesh():
  mesh1 = sharding.make_mesh([('data', -1)], devices=jax.devices()[:1])
  x = jnp.ones((8, 4))
  with jax.set_mesh(mesh1):
    assert sharding.with_logical_constraint(x, ('batch', None)) is x


def test_with_logical_constraint_constrains_under_mesh(mesh):
  @jax.jit
  def f(x):
    return sharding.with_logical_constraint(x * 2.0, ('batch', 'mlp'))

  x = np.arange(32, dtype=np.float32).reshape(8, 4)
  with jax.set_mesh(mesh):
    y = f(x)
    with sharding.axis_rules([('batch', 'tensor'), ('mlp', None)]):
      z = jax.jit(lambda x: sharding.with_logical_constraint(x + 1.0, ('batch', 'mlp')))(x)
  named = jax.sharding.NamedSharding
  assert y.sharding.is_equivalent_to(named(mesh, P(('data', 'fsdp'), 'tensor')), 2)
  np.testing.assert_array_equal(y, 2 * x)
  assert z.sharding.is_equivalent_to(named(mesh, P('tensor', None)), 2)
  assert not z.sharding.is_equivalent_to(y.sharding, 2)
  np.testing.assert_array_equal(z, x + 1)


def test_axis_rules_validates_and_restores():
  with pytest.raises(sharding.ShardingError), sharding.axis_rules([('a', 'data'), ('a', 'fsdp')]):
    pass
  with sharding.axis_rules([('batch', 'tensor')]):
    assert sharding._active_rules.get() == (('batch', 'tensor'),)
  assert sharding._active_rules.get() == sharding.DEFAULT_RULES


# ---------------------------------------------------------------------------------------------------
# Batches.


def test_batch_sharding_and_divisor(mesh):
  assert sharding.batch_divisor(mesh) == 4
  assert sharding.batch_sharding(mesh, ndim=3).spec == P(('data', 'fsdp'), None, None)
  assert sharding.batch_divisor(mesh, rules=[('batch', 'data')]) == 2
  assert sharding.batch_sharding(mesh, 2, rules=[('batch', 'data')]).spec == P('data', None)
  assert sharding.batch_divisor(mesh, rules=[]) == 1
  assert sharding.batch_sharding(mesh, 1, rules=[]).spec == P(None)


def test_to_global_places_the_right_rows_on_each_device(mesh):
  x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  y = np.arange(8, dtype=np.float32)
  out = sharding.to_global({'x': x, 'y': y}, mesh)
  assert out['x'].shape == (8, 3)
  assert out['x'].sharding.spec == P(('data', 'fsdp'), None)
  np.testing.assert_array_equal(out['x'], x)
  np.testing.assert_array_equal(out['y'], y)
  # Device at mesh position (d, f, t) holds rows [(2d + f) * 2, (2d + f) * 2 + 2), for every t.
  where = {dev: idx for idx, dev in np.ndenumerate(mesh.devices)}
  shards = out['x'].addressable_shards
  assert len(shards) == 8
  for shard in shards:
    d, f, _ = where[shard.device]
    first = (2 * d + f) * 2
    np.testing.assert_array_equal(shard.data, x[first : first + 2])
