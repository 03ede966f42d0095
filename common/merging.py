"""Parameter-space merging of models fine-tuned from one base: task arithmetic, TIES, DARE, SCE.

Every method works on task vectors (Ilharco et al. 2023), delta_i = theta_i - theta_base, tensor
by tensor, and returns theta_base + (merged delta) in the base's pytree type and dtypes:

  merged = merging.task_arithmetic(base, [m1, m2], scale=1.0)     # base + scale * sum_i delta_i
  merged = merging.ties(base, [m1, m2], density=0.2)              # trim, elect sign, disjoint mean
  merged = merging.dare(base, [m1, m2], drop_rate=0.9, key=key)   # drop, rescale, add
  merged = merging.sce(base, [m1, m2], density=0.1)               # FuseChat's select/calc/erase

`base` and the models are pytrees of the same structure: nested dicts of arrays or nnx.State
(`nnx.state(model, nnx.Param)`), numpy or JAX. Non-float leaves (counters, integer buffers) keep
the base's value. Each per-tensor rule is a jitted function of the stacked deltas [n, ...]
(compiled once per tensor shape), computed in float32 and cast back to the base's dtype; merging
runs once, so nothing here is on a training step's path.

Adapters: a LoRA-fine-tuned model is merged through its folded weights. `merged_params(model)`
returns an adapted model's parameters in the plain model's layout with each adapter's delta
already added to its base kernel (`common.adapters`' merge, without touching the model), so
fine-tuned adapters and full fine-tunes merge alike.

Density and ties follow mergekit (Goddard et al. 2024) where the papers leave a choice: TIES trims
per tensor (the paper trims the flattened model), keeping k = floor(density * size) entries, ties
in magnitude broken by position; the elected sign of a zero sum is +1.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
from typing import Any
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from common.adapters import core as adapters_core


class MergeError(errors.UserError, ValueError):
  """Models that cannot be merged (different structures or shapes) or an invalid setting."""


# ---------------------------------------------------------------------------------------------------
# Per-tensor rules on stacked deltas [n, ...] (float32).


def _topk_mask(score: jax.Array, k) -> jax.Array:
  """Boolean mask of the k largest entries of `score` (any shape; ties go to the earlier
  position, so the result is deterministic). k may be traced."""
  flat = score.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) < k)
  return keep.reshape(score.shape)


def trim(delta: jax.Array, density: float) -> jax.Array:
  """TIES step 1 (Yadav et al. 2023, Alg. 1 "trim"): keep the floor(density * size) entries of
  largest magnitude of one delta, zero the rest. density >= 1 keeps everything."""
  if density >= 1.0:
    return delta
  k = int(density * delta.size)
  return jnp.where(_topk_mask(jnp.abs(delta), k), delta, 0.0)


def sign_agreement(deltas: jax.Array) -> jax.Array:
  """TIES step 2, "elect" (Alg. 1): the sign of the summed deltas (the sign with the larger total
  mass; +1 where the sum is 0), and whether each delta [n, ...] has that sign. A zero entry has
  sign 0 and never agrees, so it stays out of the disjoint mean."""
  elected = jnp.where(jnp.sum(deltas, axis=0) >= 0, 1.0, -1.0)
  return jnp.sign(deltas) == elected


@functools.partial(jax.jit, static_argnames=('density',))
def ties_delta(deltas: jax.Array, weights: jax.Array, *, density: float) -> jax.Array:
  """TIES-merging (Yadav et al. 2023, Alg. 1): trim each delta to `density`, elect the sign by
  mass, and average each entry over the models that agree with it (the disjoint mean). `weights`
  [n] scale the trimmed deltas before the election and weight the mean (all ones: the paper)."""
  trimmed = jax.vmap(lambda d: trim(d, density))(deltas)
  w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
  weighted = trimmed * w
  agree = sign_agreement(weighted)
  total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
  count = jnp.sum(jnp.where(agree, w, 0.0), axis=0)
  return total / jnp.where(count == 0, 1.0, count)


@functools.partial(jax.jit, static_argnames=('drop_rate',))
def dare_deltas(deltas: jax.Array, key: jax.Array, *, drop_rate: float) -> jax.Array:
  """DARE (Yu et al. 2024, "drop and rescale"): drop each entry of each delta with probability
  p and scale the survivors by 1 / (1 - p), so the expected delta is unchanged. p = 0 is the
  identity."""
  if drop_rate == 0.0:
    return deltas

  # Model i's mask comes from fold_in(key, i): it does not depend on how many models are merged.
  def draw(i, d):
    return jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - drop_rate, d.shape)

  keep = jax.vmap(draw)(jnp.arange(deltas.shape[0]), deltas)
  return jnp.where(keep, deltas / (1.0 - drop_rate), 0.0)


def sce_select(deltas: jax.Array, density: float) -> jax.Array:
  """SCE "select" (FuseChat, Wan et al. 2024, arXiv 2408.07990): the positions [...] whose
  deltas vary most across the models, the top floor(density * #nonzero-variance) by variance.
  density >= 1 selects every position."""
  if density >= 1.0:
    return jnp.ones(deltas.shape[1:], bool)
  var = jnp.var(deltas, axis=0)
  k = jnp.floor(density * jnp.count_nonzero(var)).astype(jnp.int32)
  return _topk_mask(var, k)


def _energy_weights(deltas: jax.Array, select: jax.Array) -> jax.Array:
  selected = jnp.where(select, deltas, 0.0)
  energy = jnp.mean(jnp.square(selected).reshape(deltas.shape[0], -1), axis=1)
  total = jnp.sum(energy)
  uniform = jnp.full_like(energy, 1.0 / deltas.shape[0])
  return jnp.where(total > 0, energy / jnp.where(total > 0, total, 1.0), uniform)


def sce_weights(deltas: jax.Array, density: float) -> jax.Array:
  """SCE "calculate": each model's weight [n] is the mean squared delta over the selected
  positions, normalised to sum to 1 (uniform when every selected delta is 0)."""
  return _energy_weights(deltas, sce_select(deltas, density))


def sce_erase(deltas: jax.Array) -> jax.Array:
  """SCE "erase": keep [n, ...] the entries whose sign matches the majority sign by mass (the sign
  of the summed deltas); all-positive deltas keep everything."""
  return sign_agreement(deltas)


@functools.partial(jax.jit, static_argnames=('density', 'mask_deltas'))
def sce_delta(deltas: jax.Array, *, density: float, mask_deltas: bool = False) -> jax.Array:
  """SCE merging of one tensor: sum_i w_i m_i delta_i / sum_i w_i m_i with w = sce_weights and
  m = sce_erase (0/0 -> 0).

  As FuseChat's released code (FuseAI/FuseChat mergekit `sce_merging.py`) does, selection only
  shapes the weights, and erasing and mixing use the whole deltas, so identical deltas merge to
  that delta at any density. `mask_deltas=True` follows arcee-ai mergekit's `sce` instead, which
  also zeroes the unselected positions before erasing and mixing.
  """
  select = sce_select(deltas, density)
  if mask_deltas:
    deltas = jnp.where(select, deltas, 0.0)
  w = _energy_weights(deltas, select).reshape((-1,) + (1,) * (deltas.ndim - 1))
  wm = jnp.where(sce_erase(deltas), w, 0.0)
  den = jnp.sum(wm, axis=0)
  return jnp.sum(wm * deltas, axis=0) / jnp.where(den == 0, 1.0, den)


# ---------------------------------------------------------------------------------------------------
# Pytrees.


def _path_str(path) -> str:
  """'layers/0/mlp/up_proj/kernel' for a dict or nnx.State leaf path (Variable .value dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == 'value':
      continue
    parts.append(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))))
  return '/'.join(parts)


def _is_float(x) -> bool:
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  return jnp.issubdtype(dtype, jnp.floating)


def _merge(
  base: Any,
  models: Sequence[Any],
  rule: Callable[[str, jax.Array], jax.Array],
  *,
  scale: float = 1.0,
  add_base: bool = True,
) -> Any:
  """base + scale * rule(path, stacked deltas [n, ...]) for every float leaf, in base's types
  (without the base if not add_base)."""
  if not models:
    raise MergeError('merging needs at least one model')
  leaves, treedef = jax.tree_util.tree_flatten_with_path(base)
  others = []
  for i, m in enumerate(models):
    m_leaves, m_def = jax.tree_util.tree_flatten_with_path(m)
    if m_def != treedef:
      ours = {_path_str(p) for p, _ in leaves}
      theirs = {_path_str(p) for p, _ in m_leaves}
      diff = sorted(ours ^ theirs)[:3] or ['(same paths, different containers)']
      raise MergeError(f'model {i} has another structure than the base: {diff}')
    others.append([x for _, x in m_leaves])
  out = []
  for j, (path, b) in enumerate(leaves):
    if not _is_float(b):
      out.append(b)
      continue
    b32 = jnp.asarray(b, jnp.float32)
    stacked = []
    for i, m in enumerate(others):
      if jnp.shape(m[j]) != jnp.shape(b):
        raise MergeError(
          f'{_path_str(path)}: model {i} has shape {jnp.shape(m[j])}, the base {jnp.shape(b)}'
        )
      stacked.append(jnp.asarray(m[j], jnp.float32) - b32)
    delta = rule(_path_str(path), jnp.stack(stacked))
    merged = ((b32 if add_base else 0.0) + scale * delta).astype(jnp.asarray(b).dtype)
    out.append(np.asarray(merged) if isinstance(b, np.ndarray) else merged)
  return jax.tree_util.tree_unflatten(treedef, out)


def _weights(weights: Sequence[float] | None, n: int) -> jax.Array:
  if weights is None:
    return jnp.ones((n,), jnp.float32)
  if len(weights) != n:
    raise MergeError(f'{len(weights)} weights for {n} models')
  return jnp.asarray(weights, jnp.float32)


def _check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
  lo_ok = value > 0 if low_open else value >= 0
  hi_ok = value < 1 if high_open else value <= 1
  if not (lo_ok and hi_ok):
    interval = f'{"(" if low_open else "["}0, 1{")" if high_open else "]"}'
    raise MergeError(f'{name} must lie in {interval}; got {value}')


def task_vectors(base: Any, models: Sequence[Any]) -> list[Any]:
  """[theta_i - theta_base] per model (float leaves; others are the base's), in base's types."""
  return [_merge(base, [m], lambda _, d: d[0], add_base=False) for m in models]


def task_arithmetic(
  base: Any, models: Sequence[Any], *, scale: float = 1.0, weights: Sequence[float] | None = None
) -> Any:
  """Task arithmetic (Ilharco et al. 2023, "adding task vectors"): theta_base + scale *
  sum_i w_i delta_i. One model with scale 1 gives that model back."""
  w = _weights(weights, len(models))
  rule = lambda _, d: jnp.tensordot(w, d, axes=1)  # noqa: E731
  return _merge(base, models, rule, scale=scale)


def ties(
  base: Any,
  models: Sequence[Any],
  *,
  density: float,
  scale: float = 1.0,
  weights: Sequence[float] | None = None,
) -> Any:
  """TIES-merging (Yadav et al. 2023): theta_base + scale * ties_delta per tensor (trim to
  `density`, elect sign, disjoint mean)."""
  _check_fraction('density', density, low_open=True, high_open=False)
  w = _weights(weights, len(models))
  return _merge(base, models, lambda _, d: ties_delta(d, w, density=density), scale=scale)


def leaf_key(key: jax.Array, path: str) -> jax.Array:
  """The DARE key of one tensor: `key` folded with a hash of its path, so a tensor's drop mask
  depends only on the key and its own name (not on which other tensors are merged with it)."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def dare(
  base: Any,
  models: Sequence[Any],
  *,
  drop_rate: float,
  key: jax.Array,
  scale: float = 1.0,
  weights: Sequence[float] | None = None,
) -> Any:
  """DARE (Yu et al. 2024) followed by task arithmetic: theta_base + scale * sum_i w_i
  DARE(delta_i), each delta's entries dropped with probability `drop_rate` and the rest scaled
  by 1 / (1 - drop_rate). Deterministic given `key` (per tensor `leaf_key`, per model fold_in)."""
  _check_fraction('drop_rate', drop_rate, low_open=False, high_open=True)
  w = _weights(weights, len(models))

  def rule(path, d):
    return jnp.tensordot(w, dare_deltas(d, leaf_key(key, path), drop_rate=drop_rate), axes=1)

  return _merge(base, models, rule, scale=scale)


def sce(
  base: Any,
  models: Sequence[Any],
  *,
  density: float = 1.0,
  scale: float = 1.0,
  mask_deltas: bool = False,
) -> Any:
  """SCE merging (FuseChat, Wan et al. 2024, arXiv 2408.07990): per tensor, select the
  positions of largest variance across the deltas (top `density`), calculate per-model weights
  from the selected squared deltas, erase the entries against the majority sign, and mix
  (`sce_delta`)."""
  _check_fraction('density', density, low_open=True, high_open=False)
  rule = lambda _, d: sce_delta(d, density=density, mask_deltas=mask_deltas)  # noqa: E731
  return _merge(base, models, rule, scale=scale)


# ---------------------------------------------------------------------------------------------------
# Adapted models.


def _child(tree: dict, part: str):
  if part in tree:
    return part
  if part.isdigit() and int(part) in tree:
    return int(part)
  raise MergeError(f'no {part!r} among {sorted(map(str, tree))[:6]}')


def merged_params(model: nnx.Module) -> dict:
  """A model's parameters as a pure nested dict in the plain (un-adapted) model's layout, each
  mergeable adapter's delta folded into its base kernel (W0 + delta_kernel, as
  `common.adapters.core.merge` would do, but without modifying the model).

  A model without adapters gives `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; an adapted
  one gives the same layout, so task vectors of adapter fine-tunes line up with the base model's
  parameters. Token-dependent adapters (mixtures) cannot be folded: AdapterError.
  """
  layers = adapters_core.adapted(model)
  kinds = nnx.Any(nnx.Param, adapters_core.Frozen) if layers else nnx.Param
  pure = nnx.to_pure_dict(nnx.state(model, kinds))
  for path, layer in layers.items():
    parts = path.split('/')
    parent = pure
    for p in parts[:-1]:
      parent = parent[_child(parent, p)]
    slot = _child(parent, parts[-1])
    node = dict(parent[slot]['base'])
    if not layer.merged:
      delta = layer.adapter.delta_kernel()  # raises AdapterError for token-dependent adapters
      node['kernel'] = node['kernel'] + delta.astype(node['kernel'].dtype)
    parent[slot] = node
  return pure
