"""Frame-level operations of StreamMem (arXiv 2508.15717): input-frame filtering and frame-wise
weighted KV merging, as pure static-shape functions. "Step N" is the method step as numbered in
shared/docs/papers/core.md §5(a) (the paper has no public code; [R] marks our reading).

Input-frame filtering (the paper's step 1) runs before the encoder: a frame whose pooled features
have cosine similarity > delta (0.95) to the last kept frame is dropped, and (optionally) averaged
into that kept frame. The paper compares consecutive frames; comparing with the last *kept* frame
[R] means a slow drift cannot pass unnoticed one small step at a time.

Frame-wise merging (step 5) summarises each new frame in one prototype entry,
    K_bar_f = sum_j alpha_j K_{f,j},   V_bar_f = sum_j alpha_j V_{f,j},   alpha = s_j / sum_j s_j,
with s the press's importance scores (non-negative attention) over the frame's tokens, or uniform
weights (the paper's "average merge" ablation, 66.3 vs 66.9 weighted). Which of the frame's tokens
enter the sum is `Merge.source` [R]: 'kept' (the tokens that survived this step's pruning: "prune
first, then merge"), 'all' (every token of the frame) or 'evicted' (the pruned ones, D2O-style).
A frame with no token in the chosen set merges all of its tokens, so every frame that loses tokens
still leaves one trace. Keys are stored RoPE-rotated, so a prototype mixes rotations; it is given
the frame's latest position, which keeps it visible to every later query (causality is by stored
position, `common.models.decoder.cache_attention_mask`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Frame ids: tokens of frame f carry f >= 0; text and other frameless tokens carry TEXT.
TEXT = -1
_SOURCES = ('kept', 'all', 'evicted')
_WEIGHTINGS = ('scores', 'uniform')


@dataclasses.dataclass(frozen=True)
class Merge:
  """How a press merges new frames into prototypes (StreamMem step 5).

  max_frames: the most frames one press step merges (static; size it to a clip's frame count).
    New frames are grouped by id from the smallest new id up; frames past max_frames are not merged.
  source: which of a frame's tokens form its prototype: 'kept', 'all' or 'evicted' (see module doc).
  weighting: 'scores' (alpha proportional to the importance scores) or 'uniform' (plain average).
  """

  max_frames: int = 8
  source: str = 'kept'
  weighting: str = 'scores'

  def __post_init__(self):
    if self.max_frames < 1:
      raise ValueError(f'Merge.max_frames must be >= 1, got {self.max_frames}')
    if self.source not in _SOURCES:
      raise ValueError(f'Merge.source {self.source!r} not in {_SOURCES}')
    if self.weighting not in _WEIGHTINGS:
      raise ValueError(f'Merge.weighting {self.weighting!r} not in {_WEIGHTINGS}')


# ---------------------------------------------------------------------------------------------------
# Input-frame filtering.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrameFilter:
  """What `filter_frames` returns.

  keep [B, F] bool: frames to encode.
  features [B, F, D]: a kept frame's features averaged with the dropped frames that matched it in
    this call (unchanged when average=False); dropped frames' rows are their input features.
  last [B, D], has_last [B] bool: the reference for the next call (the last kept frame's input
    features), so filtering carries across clips.
  """

  keep: jax.Array
  features: jax.Array
  last: jax.Array
  has_last: jax.Array


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Cosine similarity over the last axis, in [-1, 1]; two zero vectors count as identical (1) and
  a zero vector against a non-zero one as unrelated (0), so blank frames filter like any other."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  na = jnp.linalg.norm(a, axis=-1)
  nb = jnp.linalg.norm(b, axis=-1)
  dot = jnp.sum(a * b, axis=-1)
  sim = jnp.clip(dot / jnp.maximum(na * nb, eps), -1.0, 1.0)
  a0, b0 = na <= eps, nb <= eps
  return jnp.where(a0 & b0, 1.0, jnp.where(a0 | b0, 0.0, sim))


def filter_frames(
  features: jax.Array,
  last: jax.Array | None = None,
  has_last: jax.Array | None = None,
  *,
  valid: jax.Array | None = None,
  threshold: float = 0.95,
  average: bool = True,
) -> FrameFilter:
  """StreamMem's input-frame filtering (step 1): drop a frame whose cosine similarity to the last
  kept frame exceeds `threshold` (the paper's delta = 0.95).

  Args:
    features: [B, F, D] one feature vector per frame (pooled patch embeddings or pixels).
    last, has_last: the previous call's `FrameFilter.last` / `.has_last` (None: no earlier frame).
    valid: [B, F] bool, False for padding frames (a stream shorter than a clip): never kept and
      never a reference.
    threshold: drop iff similarity > threshold; a threshold >= 1 keeps every frame.
    average: average each kept frame with the frames dropped against it in this call (the paper's
      "merge the redundant frames by averaging"). The reference stays the kept frame's own
      features, so a run of identical frames all match it exactly.
  """
  b, f, d = features.shape
  if last is None:
    last = jnp.zeros((b, d), features.dtype)
    has_last = jnp.zeros((b,), bool)
  elif has_last is None:
    has_last = jnp.ones((b,), bool)
  valid = jnp.ones((b, f), bool) if valid is None else valid.astype(bool)

  def step(carry, inputs):
    ref, has, leader = carry
    x, ok, idx = inputs
    drop = has & (cosine_similarity(x, ref) > threshold)
    keep = ok & ~drop
    ref = jnp.where(keep[:, None], x.astype(ref.dtype), ref)
    leader = jnp.where(keep, idx, leader)
    # A dropped frame joins the last kept frame of this call (-1: kept in an earlier call).
    joins = jnp.where(ok & drop, leader, -1)
    return (ref, has | keep, leader), (keep, joins)

  xs = (jnp.swapaxes(features, 0, 1), valid.T, jnp.arange(f))
  init = (last.astype(features.dtype), has_last.astype(bool), jnp.full((b,), -1, jnp.int32))
  (last, has_last, _), (keep, joins) = jax.lax.scan(step, init, xs)
  keep, joins = keep.T, joins.T  # [B, F]
  out = features
  if average:
    frames = jnp.arange(f)
    member = (joins[:, :, None] == frames) | (keep[:, :, None] & (frames == frames[:, None]))
    member = member.astype(jnp.float32)  # [B, source frame, kept frame]
    total = jnp.einsum('bsg,bsd->bgd', member, features.astype(jnp.float32))
    mean = total / jnp.maximum(member.sum(1), 1.0)[..., None]
    out = jnp.where(keep[..., None], mean.astype(features.dtype), features)
  return FrameFilter(keep=keep, features=out, last=last, has_last=has_last)


# ---------------------------------------------------------------------------------------------------
# Frame-wise merging.


def new_frames(frame: jax.Array, fresh: jax.Array, max_frames: int) -> tuple[jax.Array, jax.Array]:
  """Groups the tokens of this step's new frames.

  frame [..., S] int frame ids, fresh [..., S] bool (held tokens appended since the last press).
  Returns (groups [..., S, F] bool: token s belongs to new frame f, base [...] int32: the frame id
  of group 0). Group f is frame id base + f; ids past base + max_frames - 1 are left out.
  """
  fresh = fresh & (frame >= 0)
  base = jnp.min(jnp.where(fresh, frame, jnp.iinfo(jnp.int32).max), axis=-1)
  local = frame - base[..., None]
  groups = fresh[..., None] & (local[..., None] == jnp.arange(max_frames))
  return groups, jnp.where(jnp.any(fresh, -1), base, 0).astype(jnp.int32)


def merge_weights(scores: jax.Array, groups: jax.Array, kept: jax.Array, merge: Merge) -> jax.Array:
  """alpha [..., S, F]: each non-empty column sums to 1 over the frame's source tokens (eq. above).

  scores [..., S] (clipped at 0: attention is non-negative, the clip guards other scorers),
  groups [..., S, F] from `new_frames`, kept [..., S] this step's pruning decision. Where the
  source set is empty, or its scores sum to 0, the column falls back to the uniform average of the
  frame's tokens, so no weight is NaN.
  """
  if merge.source == 'kept':
    source = groups & kept[..., None]
  elif merge.source == 'evicted':
    source = groups & ~kept[..., None]
  else:
    source = groups
  source = jnp.where(jnp.any(source, axis=-2, keepdims=True), source, groups)
  if merge.weighting == 'uniform':
    raw = source.astype(jnp.float32)
  else:
    raw = jnp.where(source, jnp.maximum(scores.astype(jnp.float32), 0.0)[..., None], 0.0)
  total = raw.sum(-2, keepdims=True)
  uniform = source / jnp.maximum(source.sum(-2, keepdims=True), 1).astype(jnp.float32)
  return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), uniform)


def prototypes(
  k: jax.Array, v: jax.Array, position: jax.Array, weights: jax.Array, groups: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One prototype per new frame: (k_bar, v_bar [B, K, F, D], position [B, K, F], exists [B, K, F]).

  k, v [B, K, S, D] (RoPE-rotated keys: `LayerKV.k`, the view of the cached `kt`); position
  [B, K, S]; weights, groups [B, K, S, F]. Sums are in f32 and cast back to the cache dtype; rounding to a dtype in which the
  frame's extremes are representable keeps the result inside them, so a prototype stays a convex
  combination per coordinate.
  """
  kb = jnp.einsum('bksf,bksd->bkfd', weights, k.astype(jnp.float32)).astype(k.dtype)
  vb = jnp.einsum('bksf,bksd->bkfd', weights, v.astype(jnp.float32)).astype(v.dtype)
  pos = jnp.max(jnp.where(groups, position[..., None], -1), axis=-2)
  exists = jnp.any(groups, axis=-2)
  return kb, vb, jnp.where(exists, pos, 0).astype(jnp.int32), exists
