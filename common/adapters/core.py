"""Adapters on the linear layers of any nnx model: selection by path, freezing, merging, saving.

Every parameter-efficient fine-tuning method here (LoRA below, MixLoRA / HydraLoRA / S'MoRE in
projects/smore, and the adapters of SPRec, FusionRoute, ...) adds a learnt correction to a frozen
linear layer, y = W0 x + delta(x). This module owns the part they share:

  paths = core.adapt(model, r'layers/\\d+/mlp/(gate|up|down)_proj', lora.factory(rank=8, rngs=rngs))
  # every matching nnx.Linear is now an AdaptedLinear(base, adapter); all other nnx.Param of the
  # model became `Frozen`, so TrainState / nnx.Optimizer(wrt=nnx.Param) / nnx.grad see only the
  # adapters' `AdapterParam`s (a subclass of nnx.Param) and the base gets no gradient at all.
  core.save_adapters(dir, model)          # a small checkpoint with the adapter parameters only
  core.load_adapters(dir, other_model)    # onto a base model adapted the same way
  core.merge(model); core.unmerge(model)  # fold mergeable adapters into the base kernels

Paths are the '/'-joined attribute path of a module from the model root (`layers/3/mlp/up_proj`
for common/models/decoder.py). A pattern is a regular expression that must match the whole path,
or a shell glob when prefixed with 'glob:' ('glob:layers/*/attn/q_proj'). A pattern that matches no
linear layer is an `AdapterError` naming some paths that exist, raised when the model is built.

Adapters read per-forward context (which tokens are real, a PRNG key for noisy gates, train or
eval) from `context(...)`, a context manager the loss function enters around the model call, so
the model's own call signature needs no adapter knobs. Auxiliary losses (MoE load balance) are
written into `AuxLoss` variables during the forward and summed by `aux_loss(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import contextvars
import dataclasses
import fnmatch
import math
import os
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from common import checkpoint as ckpt_lib
from common import errors


class AdapterError(errors.UserError, ValueError):
  """An adapter request that cannot be honoured (no layer matches, a budget that cannot be met)."""


class AdapterParam(nnx.Param):
  """A trainable adapter weight. A subclass of nnx.Param, so the standard train loop trains it."""


class Frozen(nnx.Variable):
  """A base-model weight held fixed during adapter training (not an nnx.Param: no grad, no Adam)."""


class AuxLoss(nnx.Variable):
  """A scalar auxiliary loss an adapter writes during its forward (e.g. MoE load balance)."""


# ---------------------------------------------------------------------------------------------------
# Per-forward context.


@dataclasses.dataclass(frozen=True)
class Context:
  token_mask: jax.Array | None = None  # bool [B, T]: real tokens (auxiliary losses skip the rest)
  key: jax.Array | None = None  # PRNG key for stochastic adapters (noisy gates); None = no noise
  train: bool = False
  record: dict | None = None  # when a dict, adapters store diagnostics (routing) under their path


_CONTEXT: contextvars.ContextVar[Context] = contextvars.ContextVar('adapter_context', default=None)


@contextlib.contextmanager
def context(
  *,
  token_mask: jax.Array | None = None,
  key: jax.Array | None = None,
  train: bool = False,
  record: dict | None = None,
) -> Iterator[Context]:
  """Makes (token_mask, key, train) visible to every adapter called inside (during tracing).

  `record`, a dict, asks adapters to store diagnostics (e.g. routing decisions) under their path;
  use it on eager (un-jitted) calls, where the stored values are concrete arrays.
  """
  ctx = Context(token_mask, key, train, record)
  token = _CONTEXT.set(ctx)
  try:
    yield ctx
  finally:
    _CONTEXT.reset(token)


def current() -> Context:
  """The active context, or the default (all tokens real, no key, eval) outside `context`."""
  return _CONTEXT.get() or Context()


# ---------------------------------------------------------------------------------------------------
# Adapter interface and the wrapper.


class Adapter(nnx.Module):
  """Base class: maps x [..., d_in] to the correction delta [..., d_out] added to W0 x.

  Subclasses set `d_in`, `d_out` and `name` (the wrapped layer's path; used to derive per-adapter
  random streams) and implement `__call__`. Token-independent adapters (LoRA) also implement
  `delta_kernel()` (the [d_in, d_out] matrix that `merge` adds to the base kernel).
  """

  d_in: int
  d_out: int
  name: str = ''
  mergeable: bool = False

  def delta_kernel(self) -> jax.Array:
    raise AdapterError(f'{type(self).__name__} depends on the token and cannot be merged')


class AdaptedLinear(nnx.Module):
  """y = base(x) + adapter(x); once merged, the base kernel already holds the adapter's delta."""

  def __init__(self, base: nnx.Linear, adapter: Adapter):
    self.base = base
    self.adapter = adapter
    self.merged = False

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    if self.merged:
      return y
    return y + self.adapter(x).astype(y.dtype)


# ---------------------------------------------------------------------------------------------------
# Selecting and wrapping linear layers.


def _path_str(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def linear_paths(model: nnx.Module) -> list[str]:
  """Paths of every plain nnx.Linear in the model (not those already wrapped)."""
  out = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Linear) and (not path or path[-1] != 'base'):
      out.append(_path_str(path))
  return out


def matches(path: str, pattern: str) -> bool:
  """Whole-path regex match, or shell glob when the pattern starts with 'glob:'."""
  if pattern.startswith('glob:'):
    return fnmatch.fnmatchcase(path, pattern[len('glob:') :])
  return re.fullmatch(pattern, path) is not None


def select(model: nnx.Module, pattern: str, exclude: str | None = None) -> list[str]:
  """Linear-layer paths matching `pattern` and not `exclude`; no match is an AdapterError."""
  try:
    if not pattern.startswith('glob:'):
      re.compile(pattern)
  except re.error as e:
    raise AdapterError(f'adapter pattern {pattern!r} is not a valid regex: {e}') from e
  every = linear_paths(model)
  chosen = [p for p in every if matches(p, pattern) and not (exclude and matches(p, exclude))]
  if not chosen:
    shown = ', '.join(every[:6]) + (' ...' if len(every) > 6 else '')
    raise AdapterError(
      f'adapter pattern {pattern!r}{f" (exclude {exclude!r})" if exclude else ""} matches no '
      f'linear layer; the model has {len(every)}: {shown}'
    )
  return chosen


def resolve(model: nnx.Module, path: str) -> tuple[Any, str | int]:
  """(parent module, key) of the module at a '/'-joined path ('layers/3/mlp/up_proj' ->
  (model.layers[3].mlp, 'up_proj')); numeric parts index lists. `wrap` swaps a layer through the
  parent, since a module cannot replace itself in the graph."""
  parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split('/')]
  parent = model
  for p in parts[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  return parent, parts[-1]


def set_child(parent: Any, key: str | int, value: Any) -> None:
  """parent[key] = value for list indices, setattr(parent, key, value) for attribute names."""
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def child(parent: Any, key: str | int) -> Any:
  """parent[key] for list indices, getattr(parent, key) for attribute names."""
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def module_at(model: nnx.Module, path: str) -> Any:
  """The module at a '/'-joined path of `model` (e.g. a path returned by `select`)."""
  return child(*resolve(model, path))


def wrap(
  model: nnx.Module,
  pattern: str,
  make_adapter: Callable[[str, nnx.Linear], Adapter],
  *,
  exclude: str | None = None,
) -> list[str]:
  """Replaces each selected nnx.Linear with AdaptedLinear(linear, make_adapter(path, linear))."""
  paths = select(model, pattern, exclude)
  for path in paths:
    parent, key = resolve(model, path)
    linear = child(parent, key)
    adapter = make_adapter(path, linear)
    adapter.name = path
    set_child(parent, key, AdaptedLinear(linear, adapter))
  return paths


def freeze_base(model: nnx.Module) -> int:
  """Turns every nnx.Param that is not an AdapterParam into Frozen (keeping its metadata).

  Returns the number of frozen scalars. Sharding annotations survive, so frozen weights are placed
  exactly as before; only their variable type (and hence every nnx.Param filter) changes.
  """
  frozen = 0
  for _, module in nnx.iter_modules(model):
    for name, value in list(vars(module).items()):
      if isinstance(value, nnx.Param) and not isinstance(value, AdapterParam):
        setattr(module, name, Frozen(value.get_value(), **value.get_metadata()))
        frozen += math.prod(value.get_value().shape)
  return frozen


def adapt(
  model: nnx.Module,
  pattern: str,
  make_adapter: Callable[[str, nnx.Linear], Adapter],
  *,
  exclude: str | None = None,
) -> list[str]:
  """`wrap` then `freeze_base`: the model's only trainable parameters are now the adapters'."""
  paths = wrap(model, pattern, make_adapter, exclude=exclude)
  freeze_base(model)
  return paths


def adapted(model: nnx.Module) -> dict[str, AdaptedLinear]:
  """{path: AdaptedLinear} for every wrapped layer, in model order."""
  return {_path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, AdaptedLinear)}


def count_trainable(model_or_state: Any) -> int:
  """Scalars in the AdapterParams of a model (or of an abstract/concrete state)."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, AdapterParam)
  leaves = jax.tree.leaves(model_or_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  total = 0
  for leaf in leaves:
    if isinstance(leaf, nnx.Variable) and not isinstance(leaf, AdapterParam):
      continue
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    total += math.prod(value.shape)
  return total


def aux_loss(model: nnx.Module) -> jax.Array:
  """Sum of every AuxLoss the adapters wrote in the last forward (0.0 if there are none)."""
  leaves = jax.tree.leaves(nnx.state(model, AuxLoss))
  return sum((jnp.asarray(x, jnp.float32) for x in leaves), jnp.zeros((), jnp.float32))


# ---------------------------------------------------------------------------------------------------
# Merging (serving without the adapter's extra matmuls).


def merge(model: nnx.Module) -> int:
  """Adds each mergeable adapter's delta to its base kernel; returns how many were merged.

  A token-dependent adapter (a mixture) cannot be merged and raises AdapterError.
  """
  done = 0
  for path, layer in adapted(model).items():
    if layer.merged:
      continue
    if not layer.adapter.mergeable:
      raise AdapterError(f'adapter at {path} ({type(layer.adapter).__name__}) cannot be merged')
    k = layer.base.kernel
    k[...] = k[...] + layer.adapter.delta_kernel().astype(k[...].dtype)
    layer.merged = True
    done += 1
  return done


def unmerge(model: nnx.Module) -> int:
  """Subtracts the deltas `merge` added (equal to the original kernels up to float rounding)."""
  done = 0
  for layer in adapted(model).values():
    if not layer.merged:
      continue
    k = layer.base.kernel
    k[...] = k[...] - layer.adapter.delta_kernel().astype(k[...].dtype)
    layer.merged = False
    done += 1
  return done


# ---------------------------------------------------------------------------------------------------
# Adapter-only checkpoints.


def adapter_state(model: nnx.Module) -> nnx.State:
  """The AdapterParams of the model (what an adapter-only checkpoint holds)."""
  return nnx.state(model, AdapterParam)


def save_adapters(directory: str | os.PathLike, model: nnx.Module, step: int = 0) -> None:
  """Writes the adapter parameters alone (synchronously) as step `step` under `directory`."""
  state = adapter_state(model)
  with ckpt_lib.Checkpointer(directory, async_save=False, every_steps=0, keep=1) as ckpt:
    ckpt.save(
      step,
      state,
      meta={'adapters': sorted(adapted(model)), 'scalars': count_trainable(state)},
      wait=True,
    )


def load_adapters(directory: str | os.PathLike, model: nnx.Module) -> int:
  """Loads an adapter-only checkpoint onto `model` (adapted the same way); returns its step.

  The base weights are not touched, so one base model can take several adapter sets in turn.
  """
  target = adapter_state(model)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
    target,
  )
  try:
    restored = ckpt_lib.restore_from(directory, abstract)
  except Exception as e:  # noqa: BLE001 - a shape/structure mismatch surfaces as various errors
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise AdapterError(
      f'adapter checkpoint {directory} does not fit this model\'s adapters: {first}'
    ) from e
  nnx.update(model, restored.state)
  return restored.step
