"""KV-cache compression policies ("presses") on one footing, for `memory.apply_press`.

A press is a frozen (hashable) dataclass with up to four hooks, all on one layer and static shapes:
  score(layer, info, queries, ctx) -> [B, K, S] or [B, 1, S]  importance; higher is kept first
  reduce_heads(scores [B, K, S]) -> [B, 1, S]  how a shared (not per-head) selection pools heads
  prepare(layer, info, queries, ctx) -> (layer, info)        state updates before scoring (H2O's
                                                             accumulation, per-frame pooling)
  merge -> frames.Merge | None                                frame-wise merging after pruning
`memory.apply_press` forces pinned entries, keeps the top `ctx.keep` held entries, adds
prototypes and compacts. Scores of +inf mark entries a press's definition always keeps (sinks,
windows); ties are broken by position (earliest first), so a forced set larger than the budget
keeps its earliest.

Presses and where they come from:
  StreamMem     proxy-query attention over all held entries, old memory and new clip jointly, mean
                (or max) over proxy rows and heads; then frame-wise weighted merging (arXiv
                2508.15717, steps 4-5 as numbered in shared/docs/papers/core.md §5(a)). The
                proxy tokens are appended as transient entries.
  Oracle        the same scoring fed the true question's queries: the query-aware upper bound.
                Both take `span` (not in the paper, for text): scores averaged over neighbouring
                entries in position order (SnapKV's pooling), so a salient token keeps its
                neighbours (a planted fact's value after its key; README of projects/streammem).
  FIFO          the most recent entries.
  StreamingLLM  `sinks` earliest entries + the most recent (Xiao et al. 2023, attention sinks).
  H2O           heavy hitters by accumulated attention + a recent window (Zhang et al. 2023).
  SnapKV        attention of an observation window of queries, pooled over neighbouring positions;
                the window itself is kept (Li et al. 2024; kvpress's defaults: kernel 5).
  TOVA          attention of the last query, averaged over heads; that token is kept (Oren et al.).
  KeyNorm       low key norm = important (Devoto et al. 2024, "L2 norm-based").
  Uniform       entries spread evenly in time (position) over what is held.
  Random        a uniform random priority per entry.
  FramePool     each new frame average-pooled to `tokens_per_frame` entries, then FIFO.

Attention-scoring presses read `memory.Queries` (RoPE-rotated query vectors of one layer); softmax
and scores are f32.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from common.kv_press import frames
from common.kv_press import memory
from common.models import decoder
from common.sampling import kv_cache

_BIG = jnp.iinfo(jnp.int32).max
_REDUCTIONS = ('mean', 'max')


def _sel(x: jax.Array, ctx: memory.Context) -> jax.Array:
  """x [B, K, ...] for a per-head selection, else head 0 (metadata is equal over heads)."""
  return x if ctx.per_head else x[:, :1]


def _inverse(order: jax.Array, values: jax.Array) -> jax.Array:
  """out[..., order[..., i]] = values[..., i] (scatter a sorted array back to slot order)."""
  return jnp.put_along_axis(jnp.zeros_like(values), order, values, axis=-1, inplace=False)


def rank_by_position(position: jax.Array, mask: jax.Array, *, latest_first: bool) -> jax.Array:
  """int32 [..., S]: each masked slot's place among the masked slots by position (0 = earliest, or
  latest with latest_first); unmasked slots rank after them."""
  slot = jnp.broadcast_to(jnp.arange(position.shape[-1], dtype=jnp.int32), position.shape)
  pos = -position if latest_first else position
  order = jax.lax.sort(((~mask).astype(jnp.int32), pos, slot), dimension=-1, num_keys=2)[-1]
  return _inverse(order, slot)


def rank_within_groups(group: jax.Array, position: jax.Array, mask: jax.Array) -> jax.Array:
  """int32 [..., S]: each masked slot's place among the masked slots of its group, by position
  (unmasked slots get a meaningless value)."""
  s = position.shape[-1]
  slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), position.shape)
  g = jnp.where(mask, group, _BIG)
  sorted_g, _, order = jax.lax.sort((g, position, slot), dimension=-1, num_keys=2)
  start = jnp.concatenate(
    [jnp.ones_like(sorted_g[..., :1], bool), sorted_g[..., 1:] != sorted_g[..., :-1]], axis=-1
  )
  first = jax.lax.cummax(jnp.where(start, slot, 0), axis=position.ndim - 1)
  return _inverse(order, slot - first)


def pool_by_position(
  scores: jax.Array, mask: jax.Array, position: jax.Array, kernel_size: int
) -> jax.Array:
  """f32 [..., S]: each masked entry's score averaged with its neighbours in position order (the
  masked entries laid out in a line, kernel_size of them centred on it, zero padding at the ends:
  kvpress's avg_pool1d); the result is in slot order, and unmasked slots are meaningless. With
  kernel_size 1 the masked scores are returned unchanged."""
  if kernel_size == 1:
    return scores
  slot = jnp.broadcast_to(jnp.arange(position.shape[-1], dtype=jnp.int32), position.shape)
  order = jax.lax.sort(((~mask).astype(jnp.int32), position, slot), dimension=-1, num_keys=2)[-1]
  line = jnp.take_along_axis(jnp.where(mask, scores, 0.0), order, axis=-1)
  half = kernel_size // 2
  window = (1,) * (line.ndim - 1) + (kernel_size,)
  padding = ((0, 0),) * (line.ndim - 1) + ((half, half),)
  pooled = jax.lax.reduce_window(line, 0.0, jax.lax.add, window, (1,) * line.ndim, padding) / float(
    kernel_size
  )
  return _inverse(order, pooled)


def attention(
  k: jax.Array, key_position: jax.Array, key_mask: jax.Array, queries: memory.Queries
) -> jax.Array:
  """f32 [B, K, G, Q, S]: softmax attention of each query over the slots it may read.

  k [B, K, S, D] cached (rotated) keys (`LayerKV.k`), key_position/key_mask [B, K, S]. A query at
  position p reads a slot iff key_mask and position <= p (the decoder's causal rule); invalid query
  rows and rows with nothing to read are zero. Query head h uses kv head h // G (the decoder's GQA
  order).
  """
  b, kh, _, d = k.shape
  _, nq, h, _ = queries.q.shape
  q = queries.q.reshape(b, nq, kh, h // kh, d).astype(jnp.float32)
  logits = jnp.einsum('bqkgd,bksd->bkgqs', q, k.astype(jnp.float32)) * queries.scale
  if queries.softcap is not None:
    logits = queries.softcap * jnp.tanh(logits / queries.softcap)
  mask = key_mask[:, :, None, None, :] & (
    key_position[:, :, None, None, :] <= queries.positions[:, None, None, :, None]
  )
  mask = mask & queries.valid[:, None, None, :, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, decoder.MASKED_LOGIT), axis=-1)
  return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def _reduce(x: jax.Array, how: str, axis: int, keepdims: bool = False) -> jax.Array:
  return (jnp.mean if how == 'mean' else jnp.max)(x, axis=axis, keepdims=keepdims)


def _rows(probs: jax.Array, queries: memory.Queries, how: str) -> jax.Array:
  """[B, K, G, Q, S] -> [B, K, G, S]: mean over the valid query rows, or max."""
  if how == 'max':
    return probs.max(axis=3)
  n = jnp.maximum(queries.valid.sum(-1), 1).astype(jnp.float32)
  return probs.sum(axis=3) / n[:, None, None, None]


def _readable(layer: kv_cache.LayerKV, info: memory.SlotInfo) -> jax.Array:
  """[B, K, S]: every slot the model's own attention reads (pinned and transient ones included)."""
  return jnp.broadcast_to(layer.valid[:, None], info.position.shape)


def _free(info: memory.SlotInfo, ctx: memory.Context) -> tuple[jax.Array, jax.Array]:
  """(held entries that are not pinned, how many of them the step keeps), per selection head."""
  free = _sel(ctx.held & ~info.pinned, ctx)
  n_pinned = _sel((ctx.held & info.pinned).sum(-1, dtype=jnp.int32), ctx)
  return free, jnp.maximum(_sel(ctx.keep, ctx) - n_pinned, 0)


@dataclasses.dataclass(frozen=True)
class Press(abc.ABC):
  """Base press: no preparation, no merging, heads pooled by their mean; a press says how it
  scores the held entries (`score`: the higher, the more it is kept)."""

  needs_queries: ClassVar[bool] = False

  @property
  def merge(self) -> frames.Merge | None:
    return None

  def prepare(self, layer, info, queries, ctx):
    del queries, ctx
    return layer, info

  @abc.abstractmethod
  def score(self, layer, info, queries, ctx) -> jax.Array:
    """Per-entry keep scores of one layer."""

  def reduce_heads(self, scores: jax.Array) -> jax.Array:
    return jnp.mean(scores, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# Query-agnostic, position-based.


@dataclasses.dataclass(frozen=True)
class FIFO(Press):
  """Keeps the most recent entries (and the pinned ones)."""

  def score(self, layer, info, queries, ctx):
    return _sel(info.position, ctx).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Press):
  """Attention sinks + recent window: the `sinks` earliest held entries, then the most recent."""

  sinks: int = 4

  def score(self, layer, info, queries, ctx):
    pos = _sel(info.position, ctx)
    first = rank_by_position(pos, _sel(ctx.held, ctx), latest_first=False) < self.sinks
    return jnp.where(first, jnp.inf, pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Uniform(Press):
  """Entries spread evenly over time: the held span [first, last position] is cut into as many
  equal bins as there are entries to keep, each bin's earliest entry is kept first, then the
  second of each bin, and so on. Applied clip after clip, the memory stays spread over the whole
  stream (a rank-uniform subsample would thin old content geometrically)."""

  def score(self, layer, info, queries, ctx):
    free, n = _free(info, ctx)
    pos = _sel(info.position, ctx)
    lo = jnp.min(jnp.where(free, pos, _BIG), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(free, pos, -1), axis=-1, keepdims=True)
    span = jnp.maximum(hi - lo + 1, 1).astype(jnp.float32)
    bins = jnp.floor((pos - lo).astype(jnp.float32) * (n[..., None] / span)).astype(jnp.int32)
    bins = jnp.clip(bins, 0, jnp.maximum(n[..., None] - 1, 0))
    within = rank_within_groups(bins, pos, free)
    score = jnp.where(within == 0, 2.0, 1.0 / (1.0 + within.astype(jnp.float32)))
    return jnp.where(free, score, 0.0)


@dataclasses.dataclass(frozen=True)
class Random(Press):
  """A uniform random priority per entry, drawn from (key, layer, row, head, position): the same
  entry gets the same draw wherever it is stored. Pass a key per step
  (`memory.apply_press(key=...)`)."""

  def score(self, layer, info, queries, ctx):
    if ctx.key is None:
      raise ValueError('Random press: pass key= to memory.apply_press')
    pos = _sel(info.position, ctx)
    b, kh, s = pos.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], pos.shape)
    heads = jnp.broadcast_to(jnp.arange(kh)[None, :, None], pos.shape)

    def draw(r, h, p):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(ctx.key, r), h), p)
      return jax.random.uniform(key)

    flat = jax.vmap(draw)(rows.ravel(), heads.ravel(), pos.ravel())
    return flat.reshape(b, kh, s)


@dataclasses.dataclass(frozen=True)
class KeyNorm(Press):
  """A low L2 key norm marks an important entry; RoPE rotation leaves the norm unchanged."""

  def score(self, layer, info, queries, ctx):
    return -jnp.linalg.norm(layer.k.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class FramePool(Press):
  """Per-frame average pooling: each new frame's tokens (in position order) are cut into
  `tokens_per_frame` contiguous groups, each replaced by the mean of its keys and values at the
  group's latest position; then the oldest entries go first (FIFO) to meet the budget. Frames with
  fewer tokens keep them unchanged; new frames past `max_frames` per step are not pooled."""

  tokens_per_frame: int = 1
  max_frames: int = 8

  def __post_init__(self):
    if self.tokens_per_frame < 1:
      raise ValueError(f'tokens_per_frame must be >= 1, got {self.tokens_per_frame}')

  def prepare(self, layer, info, queries, ctx):
    t, f = self.tokens_per_frame, self.max_frames
    new = ctx.held & info.fresh & (info.kind == memory.TOKEN) & ~info.pinned
    groups, _ = frames.new_frames(info.frame, new, f)  # [B, K, S, F]
    member = jnp.any(groups, -1)
    local = jnp.argmax(groups, -1).astype(jnp.int32)
    size = jnp.take_along_axis(groups.sum(-2, dtype=jnp.int32), local, axis=-1)  # frame's tokens
    i = rank_within_groups(local, info.position, member)
    pooled = size > t
    g = jnp.where(pooled, (i * t) // jnp.maximum(size, 1), i)
    prev = jnp.where(pooled, ((i - 1) * t) // jnp.maximum(size, 1), i - 1)
    leader = member & ((i == 0) | (g != prev))
    pool = jnp.where(member, local * t + jnp.minimum(g, t - 1), 0)
    onehot = (member[..., None] & (pool[..., None] == jnp.arange(f * t))).astype(jnp.float32)
    count = jnp.maximum(onehot.sum(-2), 1.0)[..., None]  # [B, K, F*t, 1]

    def mean(x):
      m = jnp.einsum('bksp,bksd->bkpd', onehot, x.astype(jnp.float32)) / count
      m = jnp.take_along_axis(m, pool[..., None], axis=2)
      return jnp.where(leader[..., None], m.astype(x.dtype), x)

    top = jnp.max(jnp.where(onehot > 0, info.position[..., None], -1), axis=-2)  # [B, K, F*t]
    position = jnp.where(leader, jnp.take_along_axis(top, pool, axis=-1), info.position)
    dropped = (member & ~leader)[:, 0]  # fresh slots are the same in every head
    layer = kv_cache.LayerKV.from_keys(
      k=mean(layer.k),
      v=mean(layer.v),
      positions=jnp.where(leader[:, 0], position[:, 0], layer.positions),
      valid=layer.valid & ~dropped,
    )
    return layer, dataclasses.replace(info, position=position)

  def score(self, layer, info, queries, ctx):
    return _sel(info.position, ctx).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Attention-scoring presses.


@dataclasses.dataclass(frozen=True)
class _AttentionScore(Press):
  """Attention of the given queries over the held entries, reduced over query rows and heads."""

  needs_queries: ClassVar[bool] = True
  rows: str = 'mean'
  heads: str = 'mean'
  # 'candidates': softmax over the evictable entries only (the paper's A = softmax(Q K_vis^T));
  # 'all': over everything the query reads, as the model's own attention.
  softmax_over: str = 'candidates'
  # Span scoring (not in the paper; for text): each evictable entry's score averaged with its
  # span - 1 nearest evictable neighbours in position order (pool_by_position, as SnapKV's kernel),
  # so that a salient token keeps the tokens around it (a fact's value next to its key). 1: off.
  span: int = 1

  def __post_init__(self):
    for name in ('rows', 'heads'):
      if getattr(self, name) not in _REDUCTIONS:
        raise ValueError(f'{name}={getattr(self, name)!r} not in {_REDUCTIONS}')
    if self.softmax_over not in ('candidates', 'all'):
      raise ValueError(f"softmax_over={self.softmax_over!r} not in ('candidates', 'all')")
    if self.span < 1 or self.span % 2 == 0:
      raise ValueError(f'span must be odd and positive, got {self.span}')

  def score(self, layer, info, queries, ctx):
    candidates = ctx.held & ~info.pinned
    domain = candidates if self.softmax_over == 'candidates' else _readable(layer, info)
    probs = attention(layer.k, info.position, domain, queries)
    scores = _reduce(_rows(probs, queries, self.rows), self.heads, axis=2)  # [B, K, S]
    return pool_by_position(scores, candidates, info.position, self.span)

  def reduce_heads(self, scores):
    return _reduce(scores, self.heads, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class StreamMem(_AttentionScore):
  """StreamMem (arXiv 2508.15717, steps 4-5): scores s_j = mean over proxy rows and heads of
  A = softmax(Q_proxy K^T / sqrt(d)) over every held entry, old memory and new clip jointly (so
  salient old content survives), max over rows/heads as an option; keep the top M/L per layer;
  then, prune first, merge: one prototype per new frame (frames.Merge), which counts toward the
  budget and is re-scored like any entry later. Merging runs only on steps that prune, so a
  budget larger than the stream changes nothing. Feed it the queries of the proxy tokens (the
  chat template's `<|im_end|><|im_start|>assistant\\n`), appended as transient entries."""

  merging: bool = True
  max_frames: int = 8
  merge_source: str = 'kept'
  merge_weighting: str = 'scores'

  def __post_init__(self):
    super().__post_init__()
    frames.Merge(self.max_frames, self.merge_source, self.merge_weighting)  # validates

  @property
  def merge(self) -> frames.Merge | None:
    if not self.merging:
      return None
    return frames.Merge(self.max_frames, self.merge_source, self.merge_weighting)


@dataclasses.dataclass(frozen=True)
class Oracle(_AttentionScore):
  """The query-aware upper bound: StreamMem's scoring (no merging) fed the true question's queries
  at every step, which a query-agnostic memory cannot know."""


@dataclasses.dataclass(frozen=True)
class H2O(Press):
  """Heavy hitters + recent window: every step adds the attention each entry receives from the
  given queries (summed over rows, averaged over the kv head's query heads) to its accumulated
  score; the `recent_fraction` of the free budget (after pinned entries) goes to the most recent
  entries, the rest to the highest accumulated scores (averaged over heads unless per-head). The
  H2O paper splits the budget in half."""

  needs_queries: ClassVar[bool] = True
  recent_fraction: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.recent_fraction <= 1.0:
      raise ValueError(f'recent_fraction must be in [0, 1], got {self.recent_fraction}')

  def prepare(self, layer, info, queries, ctx):
    probs = attention(layer.k, info.position, _readable(layer, info), queries)
    received = probs.sum(axis=3).mean(axis=2)  # [B, K, S]
    return layer, dataclasses.replace(info, accumulated=info.accumulated + received)

  def score(self, layer, info, queries, ctx):
    acc = info.accumulated if ctx.per_head else info.accumulated.mean(axis=1, keepdims=True)
    free, n = _free(info, ctx)
    recent = jnp.floor(n.astype(jnp.float32) * self.recent_fraction).astype(jnp.int32)
    latest = rank_by_position(_sel(info.position, ctx), free, latest_first=True)
    return jnp.where(free & (latest < recent[..., None]), jnp.inf, acc)


@dataclasses.dataclass(frozen=True)
class SnapKV(Press):
  """The attention an observation window of queries (the caller's last tokens) gives each entry,
  averaged over the window and the kv head's query heads, then average-pooled over neighbouring
  entries in position order (kernel_size, zero padding, as kvpress's avg_pool1d); the window's own
  entries (positions >= the first query's) are kept."""

  needs_queries: ClassVar[bool] = True
  kernel_size: int = 5

  def __post_init__(self):
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f'kernel_size must be odd and positive, got {self.kernel_size}')

  def score(self, layer, info, queries, ctx):
    probs = attention(layer.k, info.position, _readable(layer, info), queries)
    scores = _rows(probs, queries, 'mean').mean(axis=2)  # [B, K, S]
    start = jnp.min(jnp.where(queries.valid, queries.positions, _BIG), axis=-1)
    window = ctx.held & (info.position >= start[:, None, None])
    scores = _sel(scores if ctx.per_head else scores.mean(1, keepdims=True), ctx)
    pool = _sel(ctx.held & ~window, ctx)
    scores = pool_by_position(scores, pool, _sel(info.position, ctx), self.kernel_size)
    return jnp.where(_sel(window, ctx), jnp.inf, scores)


@dataclasses.dataclass(frozen=True)
class TOVA(Press):
  """The attention of the last query (the latest valid row) averaged over all heads; the last
  token's own entry is kept (as kvpress does)."""

  needs_queries: ClassVar[bool] = True

  def score(self, layer, info, queries, ctx):
    probs = attention(layer.k, info.position, _readable(layer, info), queries)
    last = jnp.argmax(jnp.where(queries.valid, queries.positions, -1), axis=-1)  # [B]
    row = jnp.take_along_axis(probs, last[:, None, None, None, None], axis=3)[:, :, :, 0]
    scores = row.mean(axis=(1, 2))[:, None]  # [B, 1, S]
    last_pos = jnp.take_along_axis(queries.positions, last[:, None], axis=1)  # [B, 1]
    mine = _sel(ctx.held & (info.position == last_pos[:, :, None]), ctx)
    return jnp.where(mine, jnp.inf, scores)
