"""HSTU, SASRec and PerSRec (personalised tokens) for long-history next-item recommendation.

One module, `SeqRec`, covers every model the paper compares, chosen by `ModelConfig`:

  * base models: HSTU (Zhai et al. 2024, arXiv 2402.17152; pointwise SiLU attention with relative
    position and time biases) or SASRec (Kang & McAuley 2018; softmax attention, pre-LN);
  * full history (`old_len=P, token_mode='none'`): one causal pass over the last P + R items;
  * recent only (`old_len=0`): the last R items;
  * PerSRec (`token_mode='learned'`): k learnable tokens inserted between the old and the recent
    items, sequence = [old_1..old_P, u_1..u_k, rec_1..rec_R], with the segment-blocking mask, so the
    recent items see old history only through the tokens (PerSRec §3; spec §6(a));
  * several segments (`num_segments=m`): [seg_1, tok_1, ..., seg_m, tok_m, recent]; every item
    segment is blocked from all earlier item segments, token group j sees its own segment and the
    earlier token groups (public code's `insert_method`);
  * ablations: `token_mode='mean_pool'` (the token is the mean of the segment's item embeddings and
    attends to no item: a fixed summary instead of a learnt compression), `blocking=False` (tokens
    present but not a bottleneck), `token_mode='per_user'` (shared tokens plus a per-user learnt
    offset; unknown users get the shared tokens).

Serving (PerSRec §3.3; public code `compress_pretrain` + `predict2`): `compress` runs
[old items, tokens] once per user and keeps only the tokens' per-layer K/V (`Cache`); `serve` then
runs only the R recent items against that cache. Attention masks are computed from per-slot metadata
(absolute position, kind, segment, validity), stored in the cache with the K/V, so the cached pass
applies exactly the single pass's mask. HSTU's attention is SiLU(QK^T + rab) / n; the public code
divides by n = the number of query rows, which differs between the single pass (P+k+R) and the
cached pass (R). Here n is the fixed constant `ModelConfig.length` (P+k+R) in both paths, which
makes cached == uncached exactly (up to float summation order; spec §6(d).2).

Conventions (monorepo-wide for recommenders): item ids are 1..num_items, 0 is padding; an id outside
[0, num_items] is treated as padding (masked, never an out-of-range gather). Histories are
left-padded: the recent part holds the last min(n, R) items, the old part the min(n - R, P) items
before them, so a user with fewer than P + R items has padding at the start of each part and a user
with no items has every item slot masked. Parameters are float32 with logical sharding names;
attention logits, softmax and outputs used for scores are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import sharding

ITEM = 0
TOKEN = 1
BACKBONES = ('hstu', 'sasrec')
TOKEN_MODES = ('none', 'learned', 'per_user', 'mean_pool')
# Large but finite: exp() of it is exactly 0 in float32, and a fully masked row stays finite.
MASKED_LOGIT = -1e30
_INIT_STD = 0.02
# HSTU's time bucketisation: floor(log(max(|dt|, 1)) / 0.301), i.e. roughly log2 of the gap.
_TIME_BUCKET_DIVISOR = 0.301
_BTD = ('batch', 'length', 'activation_embed')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of a SeqRec model (see the module docstring for the variants)."""

  num_items: int
  backbone: str = 'hstu'
  d_model: int = 32
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 64  # SASRec feed-forward width (HSTU has no FFN)
  dropout: float = 0.0
  old_len: int = 0  # P: old items (0 = recent-only model)
  recent_len: int = 64  # R: recent items
  token_mode: str = 'none'
  num_segments: int = 1  # old history split into this many equal segments, each with its tokens
  tokens_per_segment: int = 4  # k per segment; k_total = num_segments * tokens_per_segment
  blocking: bool = True  # segment blocking (False: the 'tokens without blocking' ablation)
  num_users: int = 0  # size of the per-user offset table (token_mode='per_user')
  rel_pos_bias: bool = True  # HSTU relative position bias
  time_bias: bool = True  # HSTU relative time bias
  num_time_buckets: int = 64
  learn_temperature: bool = True  # learnable logit scale clamped to [0, log 100]; else fixed
  temperature: float = 0.05  # initial (learnable) or fixed temperature; logit scale = 1 / t
  dtype: str = 'float32'

  def __post_init__(self):
    if self.backbone not in BACKBONES:
      raise ValueError(f'unknown backbone {self.backbone!r}; use one of {BACKBONES}')
    if self.token_mode not in TOKEN_MODES:
      raise ValueError(f'unknown token_mode {self.token_mode!r}; use one of {TOKEN_MODES}')
    if self.num_items < 1 or self.recent_len < 1 or self.old_len < 0:
      raise ValueError(
        f'need num_items >= 1, recent_len >= 1, old_len >= 0; got {self.num_items}, '
        f'{self.recent_len}, {self.old_len}'
      )
    if self.token_mode != 'none':
      if self.old_len == 0:
        raise ValueError(f"token_mode={self.token_mode!r} needs old items (old_len > 0)")
      if self.num_segments < 1 or self.old_len % self.num_segments:
        raise ValueError(
          f'old_len {self.old_len} is not divisible into {self.num_segments} segments'
        )
      if self.tokens_per_segment < 1:
        raise ValueError('tokens_per_segment must be >= 1')
    if self.token_mode == 'per_user' and self.num_users < 1:
      raise ValueError("token_mode='per_user' needs num_users >= 1")
    jnp.dtype(self.dtype)

  @property
  def num_tokens(self) -> int:
    return 0 if self.token_mode == 'none' else self.num_segments * self.tokens_per_segment

  @property
  def window(self) -> int:
    """History items the model reads: P + R."""
    return self.old_len + self.recent_len

  @property
  def length(self) -> int:
    """Slots in the single pass: P + k + R. Also HSTU's fixed attention normaliser."""
    return self.old_len + self.num_tokens + self.recent_len

  @property
  def prefix_len(self) -> int:
    """Slots that `compress` runs: P + k."""
    return self.old_len + self.num_tokens

  @property
  def vocab_size(self) -> int:
    """Item table rows: padding + items, rounded up to a multiple of 128 (for tensor sharding)."""
    return -(-(self.num_items + 1) // 128) * 128

  @property
  def cacheable(self) -> bool:
    """True when recent items see old history only through the tokens (the cached path is exact)."""
    return self.num_tokens > 0 and self.blocking

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------
# Layout and masks.


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static slot layout of the single pass (numpy, length T = P + k + R).

  kind: ITEM or TOKEN. segment: item segment index (old segments 0..m-1, recent m; 0 everywhere
  without tokens); token group j carries j, the segment it summarises. source: index into the
  P + R history window for item slots, -1 for tokens. token: index into the k tokens, -1 for items.
  """

  kind: np.ndarray
  segment: np.ndarray
  source: np.ndarray
  token: np.ndarray

  @property
  def item_slots(self) -> np.ndarray:
    """Slot index of each history-window position 0..P+R-1 (item slots in window order)."""
    return np.flatnonzero(self.kind == ITEM)

  @property
  def token_slots(self) -> np.ndarray:
    return np.flatnonzero(self.kind == TOKEN)


@functools.lru_cache(maxsize=64)
def _layout(old_len, recent_len, num_tokens, num_segments, tokens_per_segment) -> Layout:
  kind, seg, src, tok = [], [], [], []
  if num_tokens == 0:
    n = old_len + recent_len
    kind, seg, src, tok = [ITEM] * n, [0] * n, list(range(n)), [-1] * n
  else:
    size = old_len // num_segments
    for j in range(num_segments):
      kind += [ITEM] * size + [TOKEN] * tokens_per_segment
      seg += [j] * (size + tokens_per_segment)
      src += list(range(j * size, (j + 1) * size)) + [-1] * tokens_per_segment
      tok += [-1] * size + list(range(j * tokens_per_segment, (j + 1) * tokens_per_segment))
    kind += [ITEM] * recent_len
    seg += [num_segments] * recent_len
    src += list(range(old_len, old_len + recent_len))
    tok += [-1] * recent_len
  arrays = [np.asarray(a, np.int32) for a in (kind, seg, src, tok)]
  for a in arrays:
    a.setflags(write=False)
  return Layout(*arrays)


def layout(cfg: ModelConfig) -> Layout:
  return _layout(
    cfg.old_len, cfg.recent_len, cfg.num_tokens, cfg.num_segments, cfg.tokens_per_segment
  )


@struct.dataclass
class Meta:
  """Per-slot metadata [B, T] that attention masks and biases are computed from.

  pos: absolute position in the single pass (also the position-embedding index); kind, segment: as
  in Layout; valid: a real item or a token (padding and unknown ids are invalid); ts: the item's
  timestamp (0 for tokens, which get their own time-bias bucket).
  """

  pos: jax.Array
  kind: jax.Array
  segment: jax.Array
  valid: jax.Array
  ts: jax.Array

  def slice(self, start: int, stop: int) -> Meta:
    return jax.tree.map(lambda a: a[:, start:stop], self)

  @staticmethod
  def concat(a: Meta, b: Meta) -> Meta:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def attention_mask(
  q: Meta,
  k: Meta,
  *,
  blocking: bool,
  tokens_see_items: bool = True,
  hide_tokens_from_segment: int | None = None,
) -> jax.Array:
  """Boolean [B, 1, Tq, Tk]: may query slot i attend to key slot j? (PerSRec §3, spec §6(a)).

  Causal by absolute position; padding keys and padding query rows are masked. With `blocking`, an
  item key is hidden from every query of a later segment: recent items (segment m) see no old item,
  token group j sees only segment j's items, and all tokens stay visible (causally). Without
  `tokens_see_items` (the mean-pool ablation) token rows see no item at all.
  `hide_tokens_from_segment=s` additionally hides every token from segment s's rows (a test hook:
  then segment s is cut off from the old history entirely).
  """
  causal = k.pos[:, None, :] <= q.pos[:, :, None]
  mask = causal & k.valid[:, None, :] & q.valid[:, :, None]
  k_item = (k.kind == ITEM)[:, None, :]
  if blocking:
    mask &= ~(k_item & (k.segment[:, None, :] < q.segment[:, :, None]))
  if not tokens_see_items:
    mask &= ~(k_item & (q.kind == TOKEN)[:, :, None])
  if hide_tokens_from_segment is not None:
    q_in = (q.segment == hide_tokens_from_segment) & (q.kind == ITEM)
    mask &= ~(q_in[:, :, None] & (k.kind == TOKEN)[:, None, :])
  return mask[:, None]


def relative_indices(q: Meta, k: Meta, num_time_buckets: int) -> tuple[jax.Array, jax.Array]:
  """Indices into the HSTU bias tables: distance q.pos - k.pos [Tq, Tk] and time bucket [B, Tq, Tk].

  The time bucket is floor(log(max(|ts_q - ts_k|, 1)) / 0.301) clipped to [0, num_buckets - 1]
  (HSTU's bucketisation, with the query's own timestamp rather than the next item's, which is
  unknown at serving); any pair with a token gets the extra bucket `num_buckets`.
  """
  # Positions depend only on the layout (never on the user), so the distance table is [Tq, Tk]:
  # computing it once per batch row would multiply the bias gather and its gradient by B.
  dist = jnp.maximum(q.pos[0][:, None] - k.pos[0][None, :], 0)
  dt = jnp.abs(q.ts[:, :, None].astype(jnp.float32) - k.ts[:, None, :].astype(jnp.float32))
  bucket = jnp.floor(jnp.log(jnp.maximum(dt, 1.0)) / _TIME_BUCKET_DIVISOR).astype(jnp.int32)
  bucket = jnp.clip(bucket, 0, num_time_buckets - 1)
  either_token = (q.kind == TOKEN)[:, :, None] | (k.kind == TOKEN)[:, None, :]
  return dist, jnp.where(either_token, num_time_buckets, bucket)


def slot_meta(cfg: ModelConfig, items: jax.Array, timestamps: jax.Array | None = None) -> Meta:
  """Slot metadata [B, T] of the single pass for a history window `items` [B, P + R]."""
  lay = layout(cfg)
  items = sanitize_ids(items, cfg.num_items)
  b = items.shape[0]
  ts = jnp.zeros_like(items) if timestamps is None else jnp.asarray(timestamps, jnp.int32)
  is_item = jnp.asarray(lay.kind == ITEM)
  src = np.maximum(lay.source, 0)
  pos = jnp.arange(cfg.length, dtype=jnp.int32)
  return Meta(
    pos=jnp.broadcast_to(pos, (b, cfg.length)),
    kind=jnp.broadcast_to(jnp.asarray(lay.kind), (b, cfg.length)),
    segment=jnp.broadcast_to(jnp.asarray(lay.segment), (b, cfg.length)),
    valid=~is_item[None] | (jnp.where(is_item, items[:, src], 0) > 0),
    ts=jnp.where(is_item, ts[:, src], 0),
  )


def sanitize_ids(ids: jax.Array, num_items: int) -> jax.Array:
  """Item ids outside [0, num_items] become padding (0): masked, never gathered out of range."""
  ids = jnp.asarray(ids)
  return jnp.where((ids >= 0) & (ids <= num_items), ids, 0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------
# Layers.


def _param(init, names, shape, rngs) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32))


def _dense(d_in, d_out, names, rngs, *, dtype, bias=True, init=None) -> nnx.Linear:
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nnx.with_partitioning(init or nnx.initializers.normal(_INIT_STD), names),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[1:]),
    rngs=rngs,
  )


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without learnt scale/offset in float32 (HSTU's F.layer_norm with no weight)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@struct.dataclass
class AttnInputs:
  """What every layer needs about the (query, key) slots, computed once per pass."""

  mask: jax.Array  # [B, 1, Tq, Tk] bool
  dist: jax.Array | None  # [Tq, Tk] int32 (HSTU position bias)
  bucket: jax.Array | None  # [B, Tq, Tk] int32


class HSTULayer(nnx.Module):
  """One HSTU block (HSTU eqs. 1-3):

    U, V, Q, K = split(SiLU(f1(LN(X))))
    A = SiLU(Q K^T + rab^{p,t}) / n  (times the mask; no softmax)
    Y = X + f2(Dropout(U * LN(A V)))

  with n the fixed normaliser (`norm`), rab^p a learnt scalar per clipped distance and rab^t a
  learnt scalar per log time bucket, shared by the heads (as in the original).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg = cfg
    self.uvqk = _dense(d, 4 * h * dh, ('embed', 'mlp'), rngs, dtype=cfg.compute_dtype, bias=False)
    self.out = _dense(
      h * dh,
      d,
      ('mlp', 'embed'),
      rngs,
      dtype=cfg.compute_dtype,
      init=nnx.initializers.xavier_uniform(),
    )
    normal = nnx.initializers.normal(_INIT_STD)
    self.pos_bias = nnx.data(
      _param(normal, (None,), (cfg.length,), rngs) if cfg.rel_pos_bias else None
    )
    self.time_bias = nnx.data(
      _param(normal, (None,), (cfg.num_time_buckets + 1,), rngs) if cfg.time_bias else None
    )
    self.norm = float(cfg.length)

  def project(self, x: jax.Array):
    """(u, q, k, v), each [B, T, H, dh]."""
    b, t, _ = x.shape
    h, dh = self.cfg.num_heads, self.cfg.head_dim
    uvqk = jax.nn.silu(self.uvqk(_layer_norm(x)))
    u, v, q, k = jnp.split(uvqk.reshape(b, t, 4, h, dh), 4, axis=2)
    return u[:, :, 0], q[:, :, 0], k[:, :, 0], v[:, :, 0]

  def __call__(self, x, attn: AttnInputs, *, past_kv=None, patch=None, key=None):
    b, t, _ = x.shape
    u, q, k, v = self.project(x)
    if patch is not None:  # replace some slots' K/V (intervention hook; see SeqRec.__call__)
      where, pk, pv = patch
      k = jnp.where(where[:, :, None, None], pk.astype(k.dtype), k)
      v = jnp.where(where[:, :, None, None], pv.astype(v.dtype), v)
    new_kv = (k, v)
    if past_kv is not None:
      k = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if self.pos_bias is not None:
      logits = logits + self.pos_bias[...][attn.dist][None, None]
    if self.time_bias is not None:
      logits = logits + self.time_bias[...][attn.bucket][:, None]
    a = jnp.where(attn.mask, jax.nn.silu(logits), 0.0) / self.norm
    o = jnp.einsum('bhqk,bkhd->bqhd', a, v.astype(jnp.float32)).reshape(b, t, -1)
    y = u.reshape(b, t, -1).astype(jnp.float32) * _layer_norm(o)
    y = _dropout(y.astype(x.dtype), self.cfg.dropout, key)
    return x + self.out(y).astype(x.dtype), new_kv


class SASRecLayer(nnx.Module):
  """One SASRec block, pre-LN: X += Dropout(MHA(LN1(X))); X += Dropout(FFN(LN2(X))).

  Softmax attention over the masked keys with 1/sqrt(dh) scaling (Kang & McAuley 2018, eq. 2-4);
  rows with no allowed key (padding) output zeros.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, dh, dt = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.compute_dtype
    self.cfg = cfg
    self.ln1 = nnx.LayerNorm(
      d,
      dtype=jnp.float32,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ('norm',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('norm',)),
      rngs=rngs,
    )
    self.ln2 = nnx.LayerNorm(
      d,
      dtype=jnp.float32,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ('norm',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('norm',)),
      rngs=rngs,
    )
    self.q = _dense(d, h * dh, ('embed', 'heads'), rngs, dtype=dt)
    self.k = _dense(d, h * dh, ('embed', 'heads'), rngs, dtype=dt)
    self.v = _dense(d, h * dh, ('embed', 'heads'), rngs, dtype=dt)
    self.o = _dense(h * dh, d, ('heads', 'embed'), rngs, dtype=dt)
    self.ff1 = _dense(d, cfg.mlp_dim, ('embed', 'mlp'), rngs, dtype=dt)
    self.ff2 = _dense(cfg.mlp_dim, d, ('mlp', 'embed'), rngs, dtype=dt)

  def project(self, x: jax.Array):
    b, t, _ = x.shape
    h, dh = self.cfg.num_heads, self.cfg.head_dim
    n = self.ln1(x).astype(x.dtype)
    return (self.q(n).reshape(b, t, h, dh), self.k(n).reshape(b, t, h, dh), self.v(n))

  def __call__(self, x, attn: AttnInputs, *, past_kv=None, patch=None, key=None):
    b, t, _ = x.shape
    h, dh = self.cfg.num_heads, self.cfg.head_dim
    q, k, v = self.project(x)
    v = v.reshape(b, t, h, dh)
    if patch is not None:
      where, pk, pv = patch
      k = jnp.where(where[:, :, None, None], pk.astype(k.dtype), k)
      v = jnp.where(where[:, :, None, None], pv.astype(v.dtype), v)
    new_kv = (k, v)
    if past_kv is not None:
      k = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(attn.mask, logits / math.sqrt(dh), MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1) * jnp.any(attn.mask, axis=-1, keepdims=True)
    o = jnp.einsum('bhqk,bkhd->bqhd', probs, v.astype(jnp.float32)).reshape(b, t, h * dh)
    keys = None if key is None else jax.random.split(key, 2)
    x = x + _dropout(self.o(o.astype(x.dtype)), self.cfg.dropout, None if key is None else keys[0])
    f = self.ff2(jax.nn.gelu(self.ff1(self.ln2(x).astype(x.dtype))))
    return x + _dropout(f, self.cfg.dropout, None if key is None else keys[1]), new_kv


# ---------------------------------------------------------------------------------------------------
# The model.


@struct.dataclass
class Cache:
  """Per-user K/V of the k tokens after compressing the old history (PerSRec §3.3).

  k, v: [num_layers, B, k, H, dh]; meta: the tokens' slot metadata [B, k] (absolute positions P..,
  segments), so the cached pass applies exactly the single pass's mask and biases.
  """

  k: jax.Array
  v: jax.Array
  meta: Meta


class SeqRec(nnx.Module):
  """Embeddings + HSTU/SASRec layers (+ PerSRec tokens); outputs one vector per slot.

  Parameters (logical sharding):
    item_embedding.embedding [vocab_size, d] ('vocab', 'embed'); also the output item table (tied)
    position_embedding.embedding [P+k+R, d] (None, 'embed')
    tokens [k, d] (None, 'embed')                           learned / per_user
    user_offsets [num_users + 1, k, d] (None, None, 'embed')  per_user (row 0: unknown user, zero)
    layers[i]                                               HSTULayer / SASRecLayer
    final_norm (SASRec)                                     ('norm',)
    log_scale [] ()                                         InfoNCE logit scale (learnable)
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = nnx.initializers.normal(_INIT_STD)
    self.item_embedding = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=nnx.with_partitioning(normal, ('vocab', 'embed')),
      rngs=rngs,
    )
    self.position_embedding = nnx.Embed(
      cfg.length,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=nnx.with_partitioning(normal, (None, 'embed')),
      rngs=rngs,
    )
    # Shared by every user (public code): personal only through their K/V over the old items.
    # Initialised at the item embeddings' scale, not the public code's randn (std 1): a large token
    # input dominates its residual stream, so the old-history summary the token's rows add stays
    # a small perturbation and its K/V barely differ between users (seen here: PerSRec stuck at
    # the recent-only recall on the synthetic data with std 1).
    self.tokens = nnx.data(
      _param(normal, (None, 'embed'), (cfg.num_tokens, cfg.d_model), rngs)
      if cfg.token_mode in ('learned', 'per_user')
      else None
    )
    self.user_offsets = nnx.data(
      _param(
        nnx.initializers.zeros,
        (None, None, 'embed'),
        (cfg.num_users + 1, cfg.num_tokens, cfg.d_model),
        rngs,
      )
      if cfg.token_mode == 'per_user'
      else None
    )
    layer_cls = HSTULayer if cfg.backbone == 'hstu' else SASRecLayer
    self.layers = nnx.List([layer_cls(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.data(
      nnx.LayerNorm(
        cfg.d_model,
        dtype=jnp.float32,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ('norm',)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('norm',)),
        rngs=rngs,
      )
      if cfg.backbone == 'sasrec'
      else None
    )
    init_scale = jnp.asarray(math.log(1.0 / cfg.temperature), jnp.float32)
    self.log_scale = nnx.data(nnx.Param(init_scale) if cfg.learn_temperature else None)

  # -- pieces ---------------------------------------------------------------------------------------

  @property
  def layout(self) -> Layout:
    return layout(self.cfg)

  def logit_scale(self) -> jax.Array:
    """exp(s), s clamped to [0, log 100] (CLIP/HLLM) when learnable; 1/temperature when fixed."""
    if self.log_scale is None:
      return jnp.asarray(1.0 / self.cfg.temperature, jnp.float32)
    return jnp.exp(jnp.clip(self.log_scale[...], 0.0, math.log(100.0)))

  def item_table(self) -> jax.Array:
    """L2-normalised item vectors [vocab_size, d] in float32 (scores are cosines, spec §6(a))."""
    e = self.item_embedding.embedding[...].astype(jnp.float32)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def valid_items(self) -> jax.Array:
    """[vocab_size] bool: real items (not padding 0, not the rows padded up to vocab_size)."""
    ids = jnp.arange(self.cfg.vocab_size)
    return (ids >= 1) & (ids <= self.cfg.num_items)

  def _token_inputs(self, items: jax.Array, user: jax.Array | None) -> jax.Array:
    """The k token inputs [B, k, d] for this batch (items: the sanitised history window)."""
    cfg, b = self.cfg, items.shape[0]
    if cfg.token_mode == 'mean_pool':
      size = cfg.old_len // cfg.num_segments
      old = items[:, : cfg.old_len].reshape(b, cfg.num_segments, size)
      emb = self.item_embedding(old).astype(jnp.float32) * (old > 0)[..., None]
      count = jnp.maximum((old > 0).sum(-1, keepdims=True), 1)
      means = emb.sum(2) / count  # [B, m, d]; an empty segment gives zeros
      return jnp.repeat(means, cfg.tokens_per_segment, axis=1).astype(cfg.compute_dtype)
    tok = jnp.broadcast_to(self.tokens[...], (b, cfg.num_tokens, cfg.d_model))
    if cfg.token_mode == 'per_user':
      u = jnp.zeros((b,), jnp.int32) if user is None else jnp.asarray(user, jnp.int32)
      known = (u >= 1) & (u <= cfg.num_users)
      tok = tok + jnp.where(known[:, None, None], self.user_offsets[...][jnp.where(known, u, 0)], 0)
    return tok.astype(cfg.compute_dtype)

  def embed(
    self, items: jax.Array, timestamps: jax.Array | None = None, user: jax.Array | None = None
  ) -> tuple[jax.Array, Meta]:
    """Slot inputs [B, T, d] and metadata for the history window `items` [B, P + R]."""
    cfg, lay = self.cfg, self.layout
    if items.shape[1] != cfg.window:
      raise ValueError(f'history window has {items.shape[1]} items, the model reads {cfg.window}')
    items = sanitize_ids(items, cfg.num_items)
    ts = jnp.zeros_like(items) if timestamps is None else jnp.asarray(timestamps, jnp.int32)
    is_item = jnp.asarray(lay.kind == ITEM)
    src = np.maximum(lay.source, 0)
    slot_items = jnp.where(is_item, items[:, src], 0)
    x = self.item_embedding(slot_items) * (slot_items > 0)[..., None].astype(cfg.compute_dtype)
    if cfg.num_tokens:
      tok = self._token_inputs(items, user)[:, np.maximum(lay.token, 0)]
      x = jnp.where(is_item[None, :, None], x, tok)
    x = x + self.position_embedding(jnp.arange(cfg.length, dtype=jnp.int32))[None]
    return sharding.with_logical_constraint(x, _BTD), slot_meta(cfg, items, ts)

  def encode(
    self,
    x: jax.Array,
    meta: Meta,
    *,
    cache: Cache | None = None,
    patch: tuple[jax.Array, Cache] | None = None,
    key: jax.Array | None = None,
    hide_tokens_from_segment: int | None = None,
  ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Runs the layers over slots `x` (optionally after a cache); returns outputs and new K/V."""
    cfg = self.cfg
    k_meta = meta if cache is None else Meta.concat(cache.meta, meta)
    mask = attention_mask(
      meta,
      k_meta,
      blocking=cfg.blocking and cfg.num_tokens > 0,
      tokens_see_items=cfg.token_mode != 'mean_pool',
      hide_tokens_from_segment=hide_tokens_from_segment,
    )
    dist = bucket = None
    if cfg.backbone == 'hstu' and (cfg.rel_pos_bias or cfg.time_bias):
      dist, bucket = relative_indices(meta, k_meta, cfg.num_time_buckets)
    attn = AttnInputs(mask=mask, dist=dist, bucket=bucket)
    if key is not None:
      x = _dropout(x, cfg.dropout, jax.random.fold_in(key, 1 << 20))
    kvs = []
    for i, layer in enumerate(self.layers):
      past = None if cache is None else (cache.k[i], cache.v[i])
      layer_patch = None if patch is None else (patch[0], patch[1].k[i], patch[1].v[i])
      layer_key = None if key is None else jax.random.fold_in(key, i)
      x, kv = layer(x, attn, past_kv=past, patch=layer_patch, key=layer_key)
      x = sharding.with_logical_constraint(x, _BTD)
      kvs.append(kv)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return x.astype(jnp.float32), kvs

  # -- entry points -------------------------------------------------------------------------------

  def __call__(
    self,
    items: jax.Array,
    timestamps: jax.Array | None = None,
    user: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    patch: tuple[jax.Array, Cache] | None = None,
    hide_tokens_from_segment: int | None = None,
  ) -> jax.Array:
    """The single pass: outputs [B, T, d] (float32) for every slot of the layout.

    patch=(where [B, T] bool, cache-like K/V [L, B, T, H, dh]) replaces the K/V of the slots where
    `where` is True in every layer (used to show that old items reach recent rows only through the
    tokens' K/V); key enables dropout.
    """
    x, meta = self.embed(items, timestamps, user)
    out, _ = self.encode(
      x, meta, key=key, patch=patch, hide_tokens_from_segment=hide_tokens_from_segment
    )
    return out

  def item_outputs(self, outputs: jax.Array) -> jax.Array:
    """Outputs at the item slots, in history-window order [B, P + R, d] (token slots dropped)."""
    return outputs[:, self.layout.item_slots]

  def user_vectors(self, items, timestamps=None, user=None) -> jax.Array:
    """Single-pass user representation: the output at the last slot [B, d]."""
    return self(items, timestamps, user)[:, -1]

  def kv(self, items, timestamps=None, user=None) -> Cache:
    """Every slot's per-layer K/V of the single pass, as a Cache [L, B, T, ...] (for `patch`)."""
    x, meta = self.embed(items, timestamps, user)
    _, kvs = self.encode(x, meta)
    return Cache(k=jnp.stack([k for k, _ in kvs]), v=jnp.stack([v for _, v in kvs]), meta=meta)

  def compress(
    self,
    old_items: jax.Array,
    old_timestamps: jax.Array | None = None,
    user: jax.Array | None = None,
    *,
    segmentwise: bool = False,
  ) -> Cache:
    """Runs [old items, tokens] once and keeps only the tokens' per-layer K/V (PerSRec §3.3).

    Single pass: O((P + k)^2 d) once per user refresh. `segmentwise=True` runs segment by segment,
    each [segment j, token group j] against the K/V of the earlier token groups; this is exact
    because, under segment blocking, nothing after segment j reads its items except token group j,
    and costs O(P * (P/m + k) d): linear in P for fixed-size segments.
    """
    cfg = self.cfg
    if not cfg.cacheable:
      raise ValueError('the cached path needs tokens with segment blocking (cfg.cacheable)')
    b = old_items.shape[0]
    zeros = jnp.zeros((b, cfg.recent_len), jnp.int32)
    items = jnp.concatenate([jnp.asarray(old_items, jnp.int32), zeros], axis=1)
    ts = None
    if old_timestamps is not None:
      ts = jnp.concatenate([jnp.asarray(old_timestamps, jnp.int32), zeros], axis=1)
    x, meta = self.embed(items, ts, user)
    tok = self.layout.token_slots
    if not segmentwise:
      p = cfg.prefix_len
      _, kvs = self.encode(x[:, :p], meta.slice(0, p))
      return Cache(
        k=jnp.stack([k[:, tok] for k, _ in kvs]),
        v=jnp.stack([v[:, tok] for _, v in kvs]),
        meta=jax.tree.map(lambda a: a[:, tok], meta),
      )
    group = cfg.old_len // cfg.num_segments + cfg.tokens_per_segment
    kt = cfg.tokens_per_segment
    cache = None
    for j in range(cfg.num_segments):
      lo, hi = j * group, (j + 1) * group
      _, kvs = self.encode(x[:, lo:hi], meta.slice(lo, hi), cache=cache)
      new = Cache(
        k=jnp.stack([k[:, -kt:] for k, _ in kvs]),
        v=jnp.stack([v[:, -kt:] for _, v in kvs]),
        meta=meta.slice(hi - kt, hi),
      )
      cache = new if cache is None else _concat_caches(cache, new)
    return cache

  def serve(
    self, cache: Cache, recent_items: jax.Array, recent_timestamps: jax.Array | None = None
  ) -> jax.Array:
    """The cached pass: only the R recent items against the tokens' K/V; user vectors [B, d].

    Recent slots keep their single-pass positions (P + k ...), so position embeddings and biases
    are unchanged (spec §6(d).7); the cost is O(R (R + k) d), independent of P.
    """
    cfg = self.cfg
    if not cfg.cacheable:
      raise ValueError('the cached path needs tokens with segment blocking (cfg.cacheable)')
    b = recent_items.shape[0]
    zeros = jnp.zeros((b, cfg.old_len), jnp.int32)
    items = jnp.concatenate([zeros, jnp.asarray(recent_items, jnp.int32)], axis=1)
    ts = None
    if recent_timestamps is not None:
      ts = jnp.concatenate([zeros, jnp.asarray(recent_timestamps, jnp.int32)], axis=1)
    x, meta = self.embed(items, ts, None)  # token inputs are unused: only recent slots run
    p = cfg.prefix_len
    out, _ = self.encode(x[:, p:], meta.slice(p, cfg.length), cache=cache)
    return out[:, -1]


def _concat_caches(a: Cache, b: Cache) -> Cache:
  return Cache(
    k=jnp.concatenate([a.k, b.k], axis=2),
    v=jnp.concatenate([a.v, b.v], axis=2),
    meta=Meta.concat(a.meta, b.meta),
  )


def split_window(items: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(old [B, P], recent [B, R]) parts of a history window [B, P + R]."""
  return items[:, : cfg.old_len], items[:, cfg.old_len :]


# ---------------------------------------------------------------------------------------------------
# Construction.


def model_config(config: ml_collections.ConfigDict, d: Any) -> ModelConfig:
  """The model's shapes: config.model plus the data's catalogue and user counts (`d`: an
  input_pipeline.Data, whose num_items and num_users are read)."""
  try:
    return ModelConfig.from_dict(
      {
        **config.model.to_dict(),
        'num_items': d.num_items,
        'num_users': d.num_users,
        'dtype': config.dtype,
      }
    )
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f'config.model: {e}') from e


def build(cfg: ModelConfig, seed: int = 0, *, item_scale: float = 1.0) -> SeqRec:
  """A SeqRec initialised in one jit call without a mesh (eager nnx init costs a compile per op),
  for checks and benchmarks outside a training run.

  `item_scale` multiplies the item embeddings: the init's 0.02 standard deviation gives outputs
  near zero, and 25 makes them of order 1, so a numerical difference is measured at a meaningful
  scale (the cached == single pass check).
  """

  def create():
    with sharding.unsharded():
      return SeqRec(cfg, rngs=nnx.Rngs(seed))

  with sharding.unsharded():
    graphdef = nnx.split(nnx.eval_shape(create))[0]
  m = nnx.merge(graphdef, jax.jit(lambda: nnx.split(create())[1])())
  if item_scale != 1.0:
    m.item_embedding.embedding[...] = m.item_embedding.embedding[...] * item_scale
  return m


# ---------------------------------------------------------------------------------------------------
# Cost model (spec §6(d).5).


def flops_per_pass(cfg: ModelConfig, num_queries: int, num_keys: int) -> float:
  """Dense forward FLOPs of the layers for `num_queries` slots attending `num_keys` keys.

  Counts the matmuls as implemented (2 FLOPs per multiply-add; masked entries are computed too):
  projections per query slot, plus Q K^T and A V per (query, key) pair per head.
  """
  d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
  if cfg.backbone == 'hstu':
    proj = 2 * d * 4 * h * dh + 2 * h * dh * d
  else:
    proj = 2 * d * 3 * h * dh + 2 * h * dh * d + 2 * 2 * d * cfg.mlp_dim
  attn = 2 * 2 * h * dh * num_keys
  return float(cfg.num_layers * num_queries * (proj + attn))


def serving_flops(cfg: ModelConfig) -> dict[str, float]:
  """Per-request and per-refresh FLOPs of this model's serving path (plus catalogue scoring).

  request: a full or recent-only model runs its whole window; a cacheable PerSRec model runs R
  queries against k + R keys. compress: the single-pass [old, tokens] run (0 without a cache);
  compress_segmentwise: the same done segment by segment.
  """
  score = 2.0 * cfg.d_model * cfg.num_items
  if not cfg.cacheable:
    t = cfg.length
    return {'request': flops_per_pass(cfg, t, t) + score, 'compress': 0.0}
  r, k = cfg.recent_len, cfg.num_tokens
  p = cfg.prefix_len
  size = cfg.old_len // cfg.num_segments + cfg.tokens_per_segment
  seg = sum(
    flops_per_pass(cfg, size, size + j * cfg.tokens_per_segment) for j in range(cfg.num_segments)
  )
  return {
    'request': flops_per_pass(cfg, r, r + k) + score,
    'compress': flops_per_pass(cfg, p, p),
    'compress_segmentwise': seg,
  }
