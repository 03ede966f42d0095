"""A KV cache under a memory budget: per-slot metadata, budgets, and the press step (score, keep the
top entries, merge, compact) with static shapes.

The shapes of NVIDIA kvpress (a press scores the cached tokens, the library keeps the best), made
jit-able: a press gives scores [B, K, S] (K kv heads, S slots) or [B, 1, S] (head-independent); the
step keeps, per layer, row (and head, with `Budget.per_head`) the `keep` held entries ranked first
and writes them, plus any merged prototypes, to the front of the same static buffer in position
order, with a validity mask. Nothing in the cache changes shape, so one compiled step serves a
whole stream and the memory is constant in its length (StreamMem, arXiv 2508.15717,
step 7; "step N" is the method step as numbered in shared/docs/papers/core.md §5(a)).

Ranking. Held entries are ordered by (pinned first, score descending, position ascending, kind),
which is a function of the entries alone: permuting the slots permutes nothing in the result (the
output is written in position order). Pinned entries (system/text prefix) are always kept;
transient entries (the proxy-query tokens, "not stored", step 6) are readable by the press's
attention but never kept.

Positions. Every entry keeps the RoPE position it was computed at (keys are cached rotated; the
slot's stored position is what causality reads), so kept tokens are not re-indexed (step 8).
With `per_head`, each kv head keeps its own entries, so one slot holds different tokens in
different heads; `SlotInfo.position` has them per head and the cache's per-slot position is their
maximum, which leaves every later query's causal mask unchanged (all kept entries precede it). A
sliding-window layer would measure its window from that maximum; use per_head=False there.

Budget. `Budget(tokens=M)` holds at most M // L entries per layer (M split evenly over L layers,
prototypes and pinned entries included: sum_i ||K'_i||_0 <= M), `Budget(layer_tokens=m)` m per
layer, `Budget(compression_ratio=r)` keeps floor(n (1 - r)) of the n held entries (kvpress's
ratio). With per_head the count is per kv head.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from common import sharding
from common.kv_press import frames
from common.sampling import kv_cache

# SlotInfo.kind
TOKEN = 0  # an entry the model computed
PROTOTYPE = 1  # a merged frame prototype (frames.prototypes)
TRANSIENT = 2  # readable by the press's attention, never kept (proxy-query tokens)

INFO_AXES = ('batch', 'kv_heads', 'cache_length')


class BudgetError(errors.UserError, ValueError):
  """A budget that cannot be met: too small for the layers, or for the pinned entries."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """How many entries each layer keeps, given as exactly one of:

  tokens: M over all layers; each layer keeps M // L (the paper's sum_i ||K'_i||_0 <= M).
  layer_tokens: m in every layer (M = m * L).
  compression_ratio: the fraction of each layer's held entries to evict (kvpress's ratio).

  per_head: each kv head selects its own entries (kvpress's default) instead of one selection per
  layer shared by its heads (the paper's: scores averaged over heads); counts are then per head.
  Keep one setting for the life of a memory (a shared step reads the cache's per-slot positions).
  """

  tokens: int | None = None
  layer_tokens: int | None = None
  compression_ratio: float | None = None
  per_head: bool = False

  def __post_init__(self):
    given = [
      n for n in ('tokens', 'layer_tokens', 'compression_ratio') if getattr(self, n) is not None
    ]
    if len(given) != 1:
      raise BudgetError(
        'give a budget as exactly one of tokens=, layer_tokens= or compression_ratio= '
        f'(got {given})'
      )
    for name in ('tokens', 'layer_tokens'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise BudgetError(f'budget {name} must be a positive int, got {value!r}')
    if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
      raise BudgetError(f'compression_ratio must be in [0, 1), got {self.compression_ratio}')

  def layer_capacity(self, num_layers: int) -> int | None:
    """Entries per layer (static), or None for a ratio budget."""
    if self.layer_tokens is not None:
      return self.layer_tokens
    if self.tokens is None:
      return None
    cap = self.tokens // num_layers
    if cap < 1:
      raise BudgetError(
        f'a budget of {self.tokens} tokens over {num_layers} layers leaves none per layer'
      )
    return cap

  def check_pinned(self, num_layers: int, num_pinned: int) -> None:
    """Raises BudgetError if `num_pinned` pinned entries (a static system prefix) cannot fit."""
    cap = self.layer_capacity(num_layers)
    if cap is not None and num_pinned > cap:
      raise BudgetError(
        f'{num_pinned} pinned entries do not fit a budget of {cap} entries per layer; raise the '
        'budget or pin fewer tokens'
      )


# ---------------------------------------------------------------------------------------------------
# Per-slot metadata.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotInfo:
  """What a press knows about each slot of one layer, per kv head ([B, K, S] each).

  position: the entry's RoPE position (equal over heads unless a per-head press ran).
  frame: its frame id (>= 0), or frames.TEXT.
  kind: TOKEN, PROTOTYPE or TRANSIENT.
  pinned: never evicted.
  fresh: appended since the last press (the "new clip" that merging groups into frames).
  accumulated: attention received so far, summed over the queries shown to the press (H2O).
  """

  position: jax.Array
  frame: jax.Array
  kind: jax.Array
  pinned: jax.Array
  fresh: jax.Array
  accumulated: jax.Array


def _constrain_info(info: SlotInfo) -> SlotInfo:
  return jax.tree.map(lambda x: sharding.with_logical_constraint(x, INFO_AXES), info)


def _info_from_layer(layer: kv_cache.LayerKV, pinned: bool) -> SlotInfo:
  b, k, s, _ = layer.v.shape
  shape = (b, k, s)
  return SlotInfo(
    position=jnp.broadcast_to(layer.positions[:, None], shape).astype(jnp.int32),
    frame=jnp.full(shape, frames.TEXT, jnp.int32),
    kind=jnp.full(shape, TOKEN, jnp.int32),
    pinned=jnp.broadcast_to(layer.valid[:, None], shape) & pinned,
    fresh=jnp.zeros(shape, bool),
    accumulated=jnp.zeros(shape, jnp.float32),
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Memory:
  """A `kv_cache.KVCache` with one `SlotInfo` per layer: what a press step reads and writes.

  The decoder fills the cache as usual (`model(tokens, cache=memory.cache)`); `record` then labels
  the entries it appended. Every append must be recorded, so that the metadata covers every slot.
  """

  cache: kv_cache.KVCache
  info: tuple[SlotInfo, ...]

  @classmethod
  def init(cls, cache: kv_cache.KVCache, *, pinned: bool = False) -> Memory:
    """Wraps a cache; the entries it already holds become text tokens (pinned if `pinned`: e.g. a
    prefilled system prompt)."""
    info = tuple(_constrain_info(_info_from_layer(layer, pinned)) for layer in cache.layers)
    return cls(cache=cache, info=info)

  def record(
    self,
    cache: kv_cache.KVCache,
    frame: jax.Array | None = None,
    *,
    pinned: jax.Array | bool = False,
    transient: bool = False,
    num_tokens: int | None = None,
  ) -> Memory:
    """The memory after the decoder appended T tokens to `self.cache`, giving `cache`.

    frame [B, T] int: each token's frame id (frames.TEXT for text); None: all text, T from
    num_tokens. pinned: bool or [B, T]. transient: the tokens are proxy queries (dropped by the
    next press). Positions are read from the cache; the tokens are marked fresh.
    """
    b = self.cache.batch
    if frame is None:
      if num_tokens is None:
        raise ValueError('record: give frame [B, T] or num_tokens')
      frame = jnp.full((b, num_tokens), frames.TEXT, jnp.int32)
    frame = jnp.asarray(frame, jnp.int32)
    t = frame.shape[1]
    pinned = jnp.broadcast_to(jnp.asarray(pinned, bool), (b, t))
    start = jnp.asarray(self.cache.length, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    infos = []
    for layer, info in zip(cache.layers, self.info, strict=True):
      kh = info.position.shape[1]
      pos = jax.lax.dynamic_slice_in_dim(layer.positions, start, t, axis=1)

      def put(dst, src, kh=kh):
        src = jnp.broadcast_to(jnp.asarray(src)[:, None], (b, kh, t)).astype(dst.dtype)
        return jax.lax.dynamic_update_slice(dst, src, (zero, zero, start))

      new = SlotInfo(
        position=put(info.position, pos),
        frame=put(info.frame, frame),
        kind=put(info.kind, jnp.full((b, t), TRANSIENT if transient else TOKEN)),
        pinned=put(info.pinned, pinned),
        fresh=put(info.fresh, jnp.ones((b, t), bool)),
        accumulated=put(info.accumulated, jnp.zeros((b, t))),
      )
      infos.append(_constrain_info(new))
    return Memory(cache=cache, info=tuple(infos))


# ---------------------------------------------------------------------------------------------------
# Queries: what attention-scoring presses read.


@dataclasses.dataclass(frozen=True)
class Queries:
  """One layer's query vectors for scoring: q [B, Q, H, D] RoPE-rotated at positions [B, Q] (the
  model's layout, before attention), valid [B, Q]; scale and softcap as the layer's attention uses
  them (`create` reads them from a decoder config)."""

  q: jax.Array
  positions: jax.Array
  valid: jax.Array
  scale: float
  softcap: float | None = None

  @classmethod
  def create(
    cls,
    q: jax.Array,
    positions: jax.Array,
    *,
    valid: jax.Array | None = None,
    cfg: Any = None,
    scale: float | None = None,
    softcap: float | None = None,
  ) -> Queries:
    """Queries with the attention scale of a `decoder.DecoderConfig` (or an explicit one)."""
    if scale is None:
      scale = (cfg.query_pre_attn_scalar or cfg.head_dim) if cfg is not None else q.shape[-1]
      scale = float(scale) ** -0.5
    if softcap is None and cfg is not None:
      softcap = cfg.attn_logit_softcap
    if valid is None:
      valid = jnp.ones(positions.shape, bool)
    return cls(
      q=q, positions=jnp.asarray(positions, jnp.int32), valid=valid, scale=scale, softcap=softcap
    )


jax.tree_util.register_dataclass(
  Queries, data_fields=['q', 'positions', 'valid'], meta_fields=['scale', 'softcap']
)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the press step tells a press about one layer (built during tracing; not a pytree).

  layer: the layer index. per_head: the selection is per kv head. held [B, K, S]: entries that may
  be kept (valid, not transient). keep [B, K] int32: how many of them this step keeps (pinned
  included, prototypes excluded; None in `Press.prepare`). key: a PRNG key for this layer or None.
  """

  layer: int
  per_head: bool
  held: jax.Array
  keep: jax.Array | None
  key: jax.Array | None


# ---------------------------------------------------------------------------------------------------
# Selection.


def rank(
  scores: jax.Array, held: jax.Array, pinned: jax.Array, position: jax.Array, kind: jax.Array
) -> jax.Array:
  """int32 [..., S]: each slot's place when held entries are ordered by (pinned first, score
  descending, position ascending, kind ascending); slots that are not held come after them all.

  The order depends only on each entry's own values, never on its slot, so it is invariant to how
  the cache stores its entries (ties need equal score, position and kind, i.e. duplicates).
  """
  s = jnp.where(
    pinned,
    jnp.inf,
    jnp.nan_to_num(scores.astype(jnp.float32), nan=-jnp.inf, posinf=jnp.inf, neginf=-jnp.inf),
  )
  s = jnp.where(held, s, -jnp.inf)
  slot = jnp.broadcast_to(jnp.arange(s.shape[-1], dtype=jnp.int32), s.shape)
  keys = ((~held).astype(jnp.int32), -s, position.astype(jnp.int32), kind.astype(jnp.int32), slot)
  order = jax.lax.sort(keys, dimension=s.ndim - 1, num_keys=4)[-1]
  ranks = jnp.zeros_like(slot)
  return jnp.put_along_axis(ranks, order, slot, axis=-1, inplace=False)


def top_k(
  scores: jax.Array,
  held: jax.Array,
  pinned: jax.Array,
  position: jax.Array,
  kind: jax.Array,
  keep: jax.Array,
) -> jax.Array:
  """bool [..., S]: the `keep` [...] held entries ranked first by `rank` (all pinned ones first)."""
  return held & (rank(scores, held, pinned, position, kind) < keep[..., None])


# ---------------------------------------------------------------------------------------------------
# The press step.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PressStats:
  """Per layer and row [L, B] (per-head counts agree): entries held before the step (transient
  ones excluded), kept after it (prototypes included), prototypes merged, pinned entries, and
  whether the pinned entries overflowed the budget (then the earliest `keep` of them were kept)."""

  held: jax.Array
  kept: jax.Array
  merged: jax.Array
  pinned: jax.Array
  pinned_overflow: jax.Array

  def check(self) -> None:
    """Raises BudgetError if any layer's pinned entries overflowed its budget (host-side)."""
    over = np.asarray(self.pinned_overflow)
    if over.any():
      layer, row = (int(i[0]) for i in np.nonzero(over))
      raise BudgetError(
        f'the budget is smaller than the pinned entries: layer {layer}, row {row} holds '
        f'{int(np.asarray(self.pinned)[layer, row])} pinned entries; raise the budget or pin fewer'
      )


def _heads(x: jax.Array, per_head: bool) -> jax.Array:
  """Metadata for the selection: every head's (per_head) or head 0's (equal over heads)."""
  return x if per_head else x[:, :1]


def _gather(x: jax.Array, order: jax.Array) -> jax.Array:
  """x [B, K, N, ...] at order [B, K or 1, S] along the slot axis."""
  order = jnp.broadcast_to(order, (*x.shape[:2], order.shape[-1]))
  idx = order.reshape(*order.shape, *([1] * (x.ndim - 3)))
  return jnp.take_along_axis(x, idx, axis=2)


def _press_layer(press, layer, info, queries, cap, budget, key, index):
  """One layer's press step: (new LayerKV, new SlotInfo, per-row stats)."""
  b, kh, s, _ = layer.v.shape
  per_head = budget.per_head
  valid = jnp.broadcast_to(layer.valid[:, None], (b, kh, s))
  if not per_head:  # the cache's positions are the truth when heads agree
    info = dataclasses.replace(
      info, position=jnp.broadcast_to(layer.positions[:, None], valid.shape)
    )
  held = valid & (info.kind != TRANSIENT)
  held_before = held.sum(-1, dtype=jnp.int32)
  ctx = Context(layer=index, per_head=per_head, held=held, keep=None, key=key)
  layer, info = press.prepare(layer, info, queries, ctx)
  valid = jnp.broadcast_to(layer.valid[:, None], (b, kh, s))
  held = valid & (info.kind != TRANSIENT)
  pinned = held & info.pinned
  n_held = held.sum(-1, dtype=jnp.int32)
  n_pinned = pinned.sum(-1, dtype=jnp.int32)
  if cap is not None:
    capacity = jnp.full_like(n_held, cap)
  else:
    capacity = jnp.floor(n_held * jnp.float32(1.0 - budget.compression_ratio)).astype(jnp.int32)
  prune = n_held > capacity
  merge = press.merge
  if merge is not None:
    groups, base = frames.new_frames(
      info.frame, held & info.fresh & (info.kind == TOKEN) & ~info.pinned, merge.max_frames
    )
    has_frame = jnp.any(groups, axis=-2)  # [B, K, F]
    room = jnp.maximum(capacity - n_pinned, 0)
    reserve = jnp.where(prune, jnp.minimum(has_frame.sum(-1, dtype=jnp.int32), room), 0)
  else:
    reserve = jnp.zeros_like(n_held)
  keep = jnp.minimum(capacity - reserve, n_held)
  ctx = dataclasses.replace(ctx, held=held, keep=keep)
  scores = press.score(layer, info, queries, ctx)
  if scores.ndim != 3 or scores.shape[1] not in (1, kh) or scores.shape[::2] != (b, s):
    raise ValueError(f'{type(press).__name__}.score gave shape {scores.shape}, not [B, K|1, S]')
  scores = scores.astype(jnp.float32)
  if per_head:
    scores = jnp.broadcast_to(scores, valid.shape)
  elif scores.shape[1] > 1:
    scores = press.reduce_heads(scores)
  sel = lambda x: _heads(x, per_head)  # noqa: E731
  kept = top_k(scores, sel(held), sel(pinned), sel(info.position), sel(info.kind), sel(keep))
  kept = jnp.broadcast_to(kept, valid.shape)

  # Candidates for the output: the kept entries, then (merging) one prototype per new frame.
  k_all, v_all = layer.k, layer.v
  fields = dataclasses.replace(info, fresh=jnp.zeros_like(info.fresh))
  keep_all = kept
  merged = jnp.zeros_like(n_held)
  if merge is not None:
    weights = frames.merge_weights(jnp.broadcast_to(scores, valid.shape), groups, kept, merge)
    kb, vb, pos, exists = frames.prototypes(layer.k, layer.v, info.position, weights, groups)
    chosen = exists & (jnp.cumsum(exists, axis=-1) <= reserve[..., None])  # frame order
    merged = chosen.sum(-1, dtype=jnp.int32)
    f = merge.max_frames
    proto = SlotInfo(
      position=pos,
      frame=base[..., None] + jnp.arange(f, dtype=jnp.int32),
      kind=jnp.full(pos.shape, PROTOTYPE, jnp.int32),
      pinned=jnp.zeros(pos.shape, bool),
      fresh=jnp.zeros(pos.shape, bool),
      accumulated=jnp.zeros(pos.shape, jnp.float32),
    )
    k_all = jnp.concatenate([k_all, kb], axis=2)
    v_all = jnp.concatenate([v_all, vb], axis=2)
    fields = jax.tree.map(lambda a, p: jnp.concatenate([a, p], axis=-1), fields, proto)
    keep_all = jnp.concatenate([kept, chosen], axis=-1)

  # Compact: the chosen entries to the front of the S slots, in (position, kind) order.
  n = keep_all.shape[-1]
  slot = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), keep_all.shape)
  keys = ((~keep_all).astype(jnp.int32), fields.position, fields.kind, slot)
  keys = tuple(sel(x) for x in keys)
  order = jax.lax.sort(keys, dimension=2, num_keys=3)[-1][..., :s]
  count = keep_all.sum(-1, dtype=jnp.int32)  # [B, K]
  out_valid = jnp.arange(s) < count[..., None]
  k_out = jnp.where(out_valid[..., None], _gather(k_all, order), 0).astype(layer.k.dtype)
  v_out = jnp.where(out_valid[..., None], _gather(v_all, order), 0).astype(layer.v.dtype)
  defaults = SlotInfo(
    position=0, frame=frames.TEXT, kind=TOKEN, pinned=False, fresh=False, accumulated=0.0
  )
  new_info = jax.tree.map(
    lambda x, d: jnp.where(out_valid, _gather(x, order), jnp.asarray(d, x.dtype)), fields, defaults
  )
  new_layer = kv_cache.LayerKV(
    kt=sharding.with_logical_constraint(jnp.swapaxes(k_out, -1, -2), kv_cache.KT_AXES),
    v=sharding.with_logical_constraint(v_out, kv_cache.KV_AXES),
    positions=sharding.with_logical_constraint(
      jnp.max(new_info.position, axis=1), kv_cache.SLOT_AXES
    ),
    valid=sharding.with_logical_constraint(out_valid[:, 0], kv_cache.SLOT_AXES),
  )
  stats = (
    held_before[:, 0],
    count[:, 0],
    merged[:, 0],
    n_pinned[:, 0],
    (n_pinned > capacity)[:, 0],
  )
  return new_layer, _constrain_info(new_info), stats


def apply_press(
  memory: Memory,
  press: Any,
  budget: Budget,
  queries: Sequence[Queries | None] | None = None,
  *,
  key: jax.Array | int | None = None,
) -> tuple[Memory, PressStats]:
  """Applies `press` to every layer of `memory` under `budget`: one press step.

  Args:
    memory: the memory after the new entries were appended and recorded.
    press: a `common.kv_press.presses.Press` (static: hashable, so it can be a jit static arg).
    budget: a `Budget` (static).
    queries: one `Queries` per layer for presses that score with attention (`press.needs_queries`).
    key: a PRNG key (or int seed) for random presses; fold the step in for a fresh draw per step.

  Returns:
    (memory, stats): each layer holds at most its budget, kept entries first in position order,
    `cache.length` at the longest layer (appends continue there), `next_position` unchanged.
    Called outside jit, a pinned overflow raises BudgetError (`PressStats.check`); under jit it is
    reported in the stats and the earliest pinned entries are kept.
  """
  cache = memory.cache
  num_layers = cache.num_layers
  cap = budget.layer_capacity(num_layers)
  if press.needs_queries and (
    queries is None or len(queries) != num_layers or any(q is None for q in queries)
  ):
    raise ValueError(
      f'{type(press).__name__} scores with attention: pass queries, one Queries per layer '
      f'({num_layers})'
    )
  if queries is None:
    queries = (None,) * num_layers
  if isinstance(key, int):
    key = jax.random.key(key)
  layers, infos, stats = [], [], []
  for i in range(num_layers):
    layer_key = None if key is None else jax.random.fold_in(key, i)
    out = _press_layer(
      press, cache.layers[i], memory.info[i], queries[i], cap, budget, layer_key, i
    )
    layers.append(out[0])
    infos.append(out[1])
    stats.append(out[2])
  stats = PressStats(*(jnp.stack(x) for x in zip(*stats, strict=True)))
  length = jnp.max(stats.kept).astype(jnp.int32)
  new_cache = dataclasses.replace(cache, layers=tuple(layers), length=length)
  if not isinstance(stats.pinned_overflow, jax.core.Tracer):
    stats.check()
  return Memory(cache=new_cache, info=tuple(infos)), stats


def capacity_needed(budget: Budget, num_layers: int, new_tokens: int) -> int:
  """Slots a cache needs to hold a full memory plus one step's appended tokens (static)."""
  cap = budget.layer_capacity(num_layers)
  if cap is None:
    raise BudgetError('a ratio budget has no fixed capacity; size the cache to the stream')
  return cap + new_tokens
