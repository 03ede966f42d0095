"""Device meshes and logical-axis sharding rules.

Models name the axes of their parameters and activations *logically* ('embed', 'heads', 'mlp', ...)
and never mention mesh axes. This module owns the single mapping from logical names to the mesh axes
('data', 'fsdp', 'tensor'), so one model runs data-parallel, FSDP or tensor-parallel by changing the
config alone (the MaxText / flax lm1b scheme).

Two rules are enforced loudly, because silently "resolving" them caused real bugs elsewhere
(MaxText PRs #2369, #4205): a logical name may appear in the rules once, and two dimensions of one
array may not land on the same mesh axis. A mesh axis that does not divide a dimension (9 heads on
tensor=2) replicates that dimension, with a warning logged once per (name, size, axes).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import contextvars
import math
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np

from common import errors

MESH_AXES = ('data', 'fsdp', 'tensor')

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Logical name -> mesh axes. 'batch' spans data and fsdp: FSDP shards parameters over 'fsdp' and the
# batch over both, so every device holds a distinct slice of the global batch.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
  ('batch', ('data', 'fsdp')),
  ('length', None),
  ('embed', 'fsdp'),
  # The residual stream's feature axis: replicated (FSDP shards weights, not activations' features;
  # 'batch' already uses 'fsdp' on activations).
  ('activation_embed', None),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('head_dim', None),
  ('mlp', 'tensor'),
  ('vocab', 'tensor'),
  ('norm', None),
  ('layers', None),
  ('experts', None),
)


class ShardingError(errors.UserError, ValueError):
  """A mesh or a set of logical rules that cannot be used; the message names the problem."""


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def validate_rules(rules: Rules, mesh_axis_names: Sequence[str] = MESH_AXES) -> dict[str, tuple]:
  """Checks `rules` and returns them as {logical name: tuple of mesh axes}.

  Raises ShardingError for a duplicated logical name, an unknown mesh axis, or a rule that names one
  mesh axis twice.
  """
  table: dict[str, tuple[str, ...]] = {}
  for rule in rules:
    if len(rule) != 2:
      raise ShardingError(f'sharding rule {rule!r} is not a (logical_name, mesh_axes) pair')
    name, axes = rule
    axes_t = _as_tuple(axes)
    if name in table:
      raise ShardingError(f'logical axis {name!r} appears twice in the sharding rules')
    unknown = [a for a in axes_t if a not in mesh_axis_names]
    if unknown:
      raise ShardingError(
        f'sharding rule for {name!r} names mesh axes {unknown} not in the mesh {tuple(mesh_axis_names)}'
      )
    if len(set(axes_t)) != len(axes_t):
      raise ShardingError(f'sharding rule for {name!r} names a mesh axis twice: {axes_t}')
    table[name] = axes_t
  return table


# ---------------------------------------------------------------------------------------------------
# Meshes.


def resolve_mesh_shape(mesh_spec: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Fills one -1 entry of [(axis, size), ...] so the product equals `num_devices`."""
  names = [n for n, _ in mesh_spec]
  if len(set(names)) != len(names):
    raise ShardingError(f'mesh axes repeat: {names}')
  sizes = [int(s) for _, s in mesh_spec]
  if sizes.count(-1) > 1:
    raise ShardingError(f'mesh {list(mesh_spec)} has more than one -1 axis')
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f'mesh {list(mesh_spec)} has a non-positive axis size')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ShardingError(
        f'mesh {dict(mesh_spec)} does not divide the {num_devices} devices '
        f'(fixed axes multiply to {known})'
      )
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ShardingError(
      f'mesh {dict(mesh_spec)} has {known} devices but {num_devices} are available'
    )
  return dict(zip(names, sizes, strict=True))


def make_mesh(
  mesh_spec: Sequence[tuple[str, int]] | Any = (('data', -1), ('fsdp', 1), ('tensor', 1)),
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds an Auto-typed mesh (GSPMD propagation) from [(axis, size)], -1 meaning 'the rest'.

  Axes of MESH_AXES missing from the spec are added with size 1 so every rule can resolve.
  """
  spec = [(str(n), int(s)) for n, s in mesh_spec]
  unknown = [n for n, _ in spec if n not in MESH_AXES]
  if unknown:
    raise ShardingError(f'unknown mesh axes {unknown}; use {MESH_AXES}')
  present = {n for n, _ in spec}
  spec += [(n, 1) for n in MESH_AXES if n not in present]
  spec.sort(key=lambda item: MESH_AXES.index(item[0]))
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(spec, len(devices))
  return jax.make_mesh(
    tuple(shape[n] for n in MESH_AXES),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


# ---------------------------------------------------------------------------------------------------
# Logical -> physical.

_warned: set[tuple] = set()


def logical_to_spec(
  names: Sequence[str | None] | None,
  shape: Sequence[int],
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
  rules: Rules = DEFAULT_RULES,
) -> jax.sharding.PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

  Unknown logical names and None replicate. A mesh-axis product that does not divide the dimension
  replicates it (warning once). Two dimensions mapped to one mesh axis raise ShardingError.
  """
  if names is None:
    return jax.sharding.PartitionSpec()
  if len(names) != len(shape):
    raise ShardingError(f'logical axes {tuple(names)} do not match array rank {len(shape)}')
  table = validate_rules(rules, mesh.axis_names)
  mesh_shape = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  spec, used = [], {}
  for dim, name in zip(shape, names, strict=True):
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
    for a in axes:
      if a in used:
        raise ShardingError(
          f'logical axes {used[a]!r} and {name!r} of one array both map to mesh axis {a!r}'
        )
    size = math.prod(mesh_shape[a] for a in axes)
    if axes and dim % size:
      key = (name, dim, axes)
      if key not in _warned:
        _warned.add(key)
        logging.warning(
          'mesh axes %s (size %d) do not divide %r of size %d: replicating that dimension',
          axes,
          size,
          name,
          dim,
        )
      axes = ()
    for a in axes:
      used[a] = name
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def variable_logical_axes(variable: nnx.Variable) -> tuple | None:
  """The logical axis names an nnx variable was annotated with (nnx.with_partitioning)."""
  meta = variable.get_metadata()
  return meta.get('out_sharding') or meta.get('sharding_names') or meta.get('sharding')


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for an (abstract) nnx state, from each variable's logical annotations.

  Leaves without annotations (step counters, unannotated biases) are replicated. The result has the
  same structure as `state` (each Variable's value replaced by its NamedSharding), which is what
  jit's out_shardings and an abstract restore target need.
  """

  def one(leaf):
    value = leaf.get_value() if _is_variable(leaf) else leaf
    shape = getattr(value, 'shape', ())
    names = variable_logical_axes(leaf) if _is_variable(leaf) else None
    if names is not None and len(names) != len(shape):
      names = None  # e.g. optimizer scalars that inherited a parameter's metadata
    named = jax.sharding.NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
    return leaf.replace(named) if _is_variable(leaf) else named

  return jax.tree.map(one, state, is_leaf=_is_variable)


def describe(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> str:
  """One line per variable: path, shape, logical axes and physical PartitionSpec (for logs)."""
  lines = []
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
  for path, leaf in flat:
    value = leaf.get_value() if _is_variable(leaf) else leaf
    shape = tuple(getattr(value, 'shape', ()))
    names = variable_logical_axes(leaf) if _is_variable(leaf) else None
    if names is not None and len(names) != len(shape):
      names = None
    spec = logical_to_spec(names, shape, mesh, rules)
    lines.append(f'{jax.tree_util.keystr(path):60s} {shape!s:22s} {names!s:28s} {spec}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------
# Activations.

_active_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar(
  'active_rules', default=DEFAULT_RULES
)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Makes `rules` the ones `with_logical_constraint` uses (during tracing)."""
  validate_rules(rules)
  token = _active_rules.set(tuple((n, a) for n, a in rules))
  try:
    yield
  finally:
    _active_rules.reset(token)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside a (non-trivial) mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  spec = logical_to_spec(names, x.shape, mesh, _active_rules.get())
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1, rules: Rules = DEFAULT_RULES):
  """Sharding of a global batch: leading dimension over the 'batch' rule, the rest replicated."""
  axes = validate_rules(rules, mesh.axis_names).get('batch', ())
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split (the global batch must be a multiple)."""
  axes = validate_rules(rules, mesh.axis_names).get('batch', ())
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  return math.prod(shape[a] for a in axes)


def to_global(local_batch: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Assembles each process's slice of the batch into global arrays sharded on the mesh."""

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

  return jax.tree.map(one, local_batch)


def global_rows(batch: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Global arrays, rows sharded like `batch_sharding`, from a batch every process holds WHOLE.

  The RL loop's path: every host computes the same rollout rows (their order carries meaning:
  prompt-major groups), so each device's shard is cut from the full host array by its global
  index, whatever the process layout. (`to_global` is the path for iterators that already hand
  each process its own slice.)
  """

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(
      x.shape, batch_sharding(mesh, x.ndim, rules), lambda index: x[index]
    )

  return jax.tree.map(one, batch)


def gather_rows(tree: Any) -> Any:
  """The whole of each (possibly multi-process sharded) array on every host, as numpy."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def unsharded():
  """Context for building logically annotated nnx modules with no mesh (flax's eager sharding
  would otherwise ask for one): reference models in tests, host-side copies, abstract shapes."""
  return nnx.use_eager_sharding(False)


def rules_of(config: Any) -> Rules:
  """The validated logical-axis rules of a config (`config.sharding.rules`), as tuples. Runs read
  them from `train_loop.Run.rules`; this is for code that has a config but no run (re-evaluating a
  finished workdir)."""
  rules = tuple(tuple(r) for r in config.sharding.rules)
  validate_rules(rules)
  return rules
