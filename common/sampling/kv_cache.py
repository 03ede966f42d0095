"""A static-shape KV cache whose entries can be read, evicted, compacted and inserted at any slot.

Why this layout: every array has a fixed shape (so one compiled decode step serves every length),
and each slot carries its own RoPE position and validity bit instead of being implied by its index.
That is what lets memory-management papers edit the cache without re-running the model: StreamMem
keeps a fixed per-layer budget by evicting low-attention entries and inserting merged prototypes at
the freed slots with their original positions; System-1/2 appends a coprocessor's KV; GRPO/OmniOPD
fork one prefilled prompt into K continuations (`repeat`).

Per layer l (all layers share S = max_len slots):
  kt         [B, K, D, S]  keys (already RoPE-rotated at their position), compute dtype, slot-minor:
                           one-query decode attention then sums q . k over a major axis, which
                           XLA:CPU vectorises along the slots (1.1-2.9x the same sums over a minor
                           D; `benchmarks/attention.py`). `LayerKV.k` is the [B, K, S, D] view.
  v          [B, K, S, D]  values, compute dtype; kv-head-major so attention reads the cache without
                           a transpose (a [B, S, K, D] layout made XLA copy every layer's cache on
                           every step). `write`/`insert` take token-major [B, T, K, D] keys and
                           values as the model makes them.
  positions  [B, S] int32  the token position each slot was computed at (RoPE, causality, window)
  valid      [B, S] bool   whether attention may read the slot
Shared:
  length         int32 scalar: slots [0, length) have been written; the decoder appends here.
  next_position  [B] int32: the position the decoder gives the next appended token by default.

Attention over the cache (common.models.decoder) lets a query at position p read slot s iff
valid[s] and positions[s] <= p (and p - positions[s] < window on sliding-window layers): causality is
by position, not by slot order, so entries inserted into holes or compacted keep their meaning.

The cache is an immutable pytree: every method returns a new cache, and under jit with the cache
donated the updates happen in place. Arrays carry logical sharding names ('batch', 'cache_length',
'kv_heads', 'head_dim') through `common.sharding`, so a cache built inside a mesh is batch-sharded
like the activations.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from common import sharding

KV_AXES = ('batch', 'kv_heads', 'cache_length', 'head_dim')
KT_AXES = ('batch', 'kv_heads', 'head_dim', 'cache_length')
SLOT_AXES = ('batch', 'cache_length')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
  """One layer's view of the cache (what `KVCache.read` returns); see the module docstring."""

  kt: jax.Array  # [B, K, D, S] keys, slot-minor
  v: jax.Array  # [B, K, S, D]
  positions: jax.Array  # [B, S] int32
  valid: jax.Array  # [B, S] bool

  @property
  def k(self) -> jax.Array:
    """The keys as [B, K, S, D] (a transpose of the stored `kt`: for reading, not the decode loop)."""
    return jnp.swapaxes(self.kt, -1, -2)

  @classmethod
  def from_keys(cls, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array) -> LayerKV:
    """A layer from keys in [B, K, S, D] order (as `k` gives them), e.g. after editing them."""
    return cls(kt=jnp.swapaxes(k, -1, -2), v=v, positions=positions, valid=valid)


def _head_major(x: jax.Array, dtype) -> jax.Array:
  """[B, T, K, D] (the model's layout) -> [B, K, T, D] (the cached values'), in the cache dtype."""
  return jnp.swapaxes(x, 1, 2).astype(dtype)


def _constrain(layer: LayerKV) -> LayerKV:
  return LayerKV(
    kt=sharding.with_logical_constraint(layer.kt, KT_AXES),
    v=sharding.with_logical_constraint(layer.v, KV_AXES),
    positions=sharding.with_logical_constraint(layer.positions, SLOT_AXES),
    valid=sharding.with_logical_constraint(layer.valid, SLOT_AXES),
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer keys/values with per-slot positions and validity; see the module docstring."""

  layers: tuple[LayerKV, ...]
  length: jax.Array  # int32 scalar
  next_position: jax.Array  # [B] int32

  # -------------------------------------------------------------------------------------------------
  # Construction and shape.

  @classmethod
  def init(cls, cfg: Any, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for a `common.models.decoder.DecoderConfig` (dtype: the compute dtype)."""
    dtype = jnp.dtype(dtype if dtype is not None else cfg.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    kt_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)

    def layer():
      return _constrain(
        LayerKV(
          kt=jnp.zeros(kt_shape, dtype),
          v=jnp.zeros(shape, dtype),
          positions=jnp.zeros((batch, max_len), jnp.int32),
          valid=jnp.zeros((batch, max_len), bool),
        )
      )

    # One layer per attention block the model has (a structurally pruned decoder has fewer).
    num_layers = getattr(cfg, 'num_cache_layers', cfg.num_layers)
    return cls(
      layers=tuple(layer() for _ in range(num_layers)),
      length=jnp.zeros((), jnp.int32),
      next_position=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def batch(self) -> int:
    return self.layers[0].v.shape[0]

  @property
  def max_len(self) -> int:
    """S, the number of slots per row and layer (static)."""
    return self.layers[0].v.shape[2]

  def num_valid(self) -> jax.Array:
    """int32 [L, B]: readable entries per layer and row (what a memory budget counts)."""
    return jnp.stack([layer.valid.sum(-1, dtype=jnp.int32) for layer in self.layers])

  # -------------------------------------------------------------------------------------------------
  # Reading and writing.

  def read(self, layer: int) -> LayerKV:
    return self.layers[layer]

  def _replace_layer(self, layer: int, new: LayerKV) -> KVCache:
    layers = self.layers[:layer] + (_constrain(new),) + self.layers[layer + 1 :]
    return dataclasses.replace(self, layers=layers)

  def write(
    self,
    layer: int,
    start: jax.Array | int,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    valid: jax.Array | None = None,
  ) -> KVCache:
    """Writes T contiguous slots [start, start + T) of every row (the decoder's append).

    k, v [B, T, K, D] (cast to the cache dtype), positions [B, T], valid [B, T] (default all True:
    padding tokens of a ragged prompt are written as invalid). Does not move `length`; the caller
    (`Decoder`) calls `advance` once after all layers. `start + T` must not exceed `max_len`
    (dynamic_update_slice would clamp the start and overwrite the last slots).
    """
    cur = self.layers[layer]
    if valid is None:
      valid = jnp.ones(positions.shape, bool)
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    upd = jax.lax.dynamic_update_slice
    new = LayerKV(
      kt=upd(
        cur.kt, jnp.transpose(k, (0, 2, 3, 1)).astype(cur.kt.dtype), (zero, zero, zero, start)
      ),
      v=upd(cur.v, _head_major(v, cur.v.dtype), (zero, zero, start, zero)),
      positions=upd(cur.positions, positions.astype(jnp.int32), (zero, start)),
      valid=upd(cur.valid, valid.astype(bool), (zero, start)),
    )
    return self._replace_layer(layer, new)

  def advance(self, num_slots: int, next_position: jax.Array) -> KVCache:
    """Moves the append pointer past `num_slots` written slots and sets each row's next position."""
    return dataclasses.replace(
      self,
      length=self.length + num_slots,
      next_position=jnp.asarray(next_position, jnp.int32),
    )

  def insert(
    self,
    layer: int,
    slots: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    valid: jax.Array | None = None,
  ) -> KVCache:
    """Writes entries at arbitrary per-row slots of one layer (e.g. StreamMem's merged prototypes).

    slots [B, T] int (distinct within a row; a slot >= max_len is dropped, which is how to skip an
    entry), k, v [B, T, K, D] already RoPE-rotated at `positions` [B, T]; valid [B, T] default True.
    `length` grows to cover the highest slot written, so later appends never overwrite it.
    """
    cur = self.layers[layer]
    s = self.max_len
    slots = jnp.asarray(slots, jnp.int32)
    if valid is None:
      valid = jnp.ones(slots.shape, bool)
    rows = jnp.arange(slots.shape[0])[:, None]
    # Negative indices would wrap around (numpy semantics); send them out of range to be dropped.
    slots = jnp.where(slots < 0, s, slots)

    def put(dst, src):
      return dst.at[rows, slots].set(src.astype(dst.dtype), mode='drop')

    def put_kv(dst, src):  # [B, K, S, D] <- [B, T, K, D] at (row, slot)
      return jnp.swapaxes(put(jnp.swapaxes(dst, 1, 2), src), 1, 2)

    def put_kt(dst, src):  # [B, K, D, S] <- [B, T, K, D] at (row, slot)
      return jnp.transpose(put(jnp.transpose(dst, (0, 3, 1, 2)), src), (0, 2, 3, 1))

    new = LayerKV(
      kt=put_kt(cur.kt, k),
      v=put_kv(cur.v, v),
      positions=put(cur.positions, positions),
      valid=put(cur.valid, valid),
    )
    high = jnp.max(jnp.where(slots < s, slots + 1, 0))
    out = self._replace_layer(layer, new)
    return dataclasses.replace(out, length=jnp.maximum(self.length, high))

  def evict(self, mask: jax.Array | Sequence[jax.Array]) -> KVCache:
    """Marks entries unreadable: mask True = evict; [B, S] for every layer, or [L, B, S] per layer.

    The data stays in place (a later `insert` or `compact` reuses the slots); `length` is unchanged,
    so appends still go after the highest slot ever written.
    """
    if isinstance(mask, (list, tuple)):
      masks = list(mask)
    else:
      mask = jnp.asarray(mask)
      masks = [mask] * self.num_layers if mask.ndim == 2 else list(mask)
    if len(masks) != self.num_layers:
      raise ValueError(f'evict: got {len(masks)} layer masks for {self.num_layers} layers')
    layers = tuple(
      _constrain(dataclasses.replace(layer, valid=layer.valid & ~jnp.asarray(m, bool)))
      for layer, m in zip(self.layers, masks, strict=True)
    )
    return dataclasses.replace(self, layers=layers)

  def compact(self) -> KVCache:
    """Moves each row's valid entries to the front (stable: slot order kept); frees the tail.

    `length` becomes the largest valid count over layers and rows, so appends continue right after
    the surviving entries. Freed slots are zeroed (k, v, positions) and invalid.
    """
    layers = []
    for layer in self.layers:
      order = jnp.argsort(~layer.valid, axis=-1, stable=True)  # valid slots first
      valid = jnp.take_along_axis(layer.valid, order, axis=1)
      keep = valid[:, None, :, None]

      def take_kv(x, order=order, keep=keep):
        return jnp.where(keep, jnp.take_along_axis(x, order[:, None, :, None], axis=2), 0)

      def take_kt(x, order=order, valid=valid):
        return jnp.where(
          valid[:, None, None], jnp.take_along_axis(x, order[:, None, None], axis=3), 0
        )

      layers.append(
        _constrain(
          LayerKV(
            kt=take_kt(layer.kt),
            v=take_kv(layer.v),
            positions=jnp.where(valid, jnp.take_along_axis(layer.positions, order, axis=1), 0),
            valid=valid,
          )
        )
      )
    out = dataclasses.replace(self, layers=tuple(layers))
    return dataclasses.replace(out, length=jnp.max(out.num_valid()).astype(jnp.int32))

  def free_slots(self, layer: int, n: int) -> jax.Array:
    """int32 [B, n]: the first n unreadable slots of each row of `layer`, in slot order.

    Meant for `insert` (fill evicted holes before growing). If a row has fewer than n free slots,
    the surplus indices are max_len, which `insert` drops.
    """
    valid = self.layers[layer].valid
    order = jnp.argsort(valid, axis=-1, stable=True)[:, :n]  # invalid slots first
    is_free = ~jnp.take_along_axis(valid, order, axis=-1)
    return jnp.where(is_free, order, self.max_len).astype(jnp.int32)

  def grow(self, extra: int) -> KVCache:
    """`extra` more slots per row after the last, empty and unreadable: room to continue a cache
    that is full (e.g. to fork a finished rollout at one of its tokens). `length` is unchanged."""
    if extra < 0:
      raise ValueError(f'grow: extra must be >= 0, got {extra}')
    if extra == 0:
      return self

    def pad(x, axis):
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, extra)
      return jnp.pad(x, widths)

    layers = tuple(
      _constrain(
        LayerKV(
          kt=pad(layer.kt, 3),
          v=pad(layer.v, 2),
          positions=pad(layer.positions, 1),
          valid=pad(layer.valid, 1),
        )
      )
      for layer in self.layers
    )
    return dataclasses.replace(self, layers=layers)

  # -------------------------------------------------------------------------------------------------
  # Rows.

  def repeat(self, n: int) -> KVCache:
    """Forks every row n times (row b becomes rows b*n .. b*n + n-1): prefill once, sample n."""
    if n == 1:
      return self
    rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    layers = tuple(_constrain(jax.tree.map(rep, layer)) for layer in self.layers)
    return KVCache(layers=layers, length=self.length, next_position=rep(self.next_position))

  def take_rows(self, rows: jax.Array) -> KVCache:
    """The cache of the given rows (e.g. the surviving prompts of a batch)."""
    rows = jnp.asarray(rows, jnp.int32)
    pick = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    layers = tuple(_constrain(jax.tree.map(pick, layer)) for layer in self.layers)
    return KVCache(layers=layers, length=self.length, next_position=pick(self.next_position))
