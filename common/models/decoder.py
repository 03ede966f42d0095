"""Decoder-only transformer LM: Llama by default, with switches for the Gemma-3 and Qwen2 families.

One code path serves every family so that real SmolLM2 (llama), Gemma-3-270M (gemma3) and Qwen2.5
(qwen2) weights load into the same modules and every paper's code (LoRA, sampling, embeddings, RL)
sees one model. The parameter paths below are a contract with checkpoint loaders and adapters; they
are plain attribute paths, so `model.layers[3].attn.q_proj` is the module a LoRA wrapper replaces.

  embed.embedding                      [padded_vocab, d]          ('vocab', 'embed')
  layers[i].attn_norm.scale            [d]                        ('norm',)
  layers[i].attn.q_proj.kernel         [d, num_heads*head_dim]    ('embed', 'heads')
  layers[i].attn.{k,v}_proj.kernel     [d, num_kv_heads*head_dim] ('embed', 'kv_heads')
  layers[i].attn.{q,k,v}_proj.bias     (qkv_bias)                 ('heads',) / ('kv_heads',)
  layers[i].attn.{q,k}_norm.scale      [head_dim] (qk_norm)       ('norm',)
  layers[i].attn.o_proj.kernel         [num_heads*head_dim, d]    ('heads', 'embed')
  layers[i].post_attn_norm.scale       (post_norms)               ('norm',)
  layers[i].mlp_norm.scale             [d]                        ('norm',)
  layers[i].mlp.{gate,up}_proj.kernel  [d, mlp_dim]               ('embed', 'mlp')
  layers[i].mlp.down_proj.kernel       [mlp_dim, d]               ('mlp', 'embed')
  layers[i].post_mlp_norm.scale        (post_norms)               ('norm',)
  final_norm.scale                     [d]                        ('norm',)
  lm_head.kernel                       [d, padded_vocab] (untied) ('embed', 'vocab')

Kernels are (in, out), the transpose of HF's nn.Linear weight. HF names: input_layernorm ->
attn_norm; for llama/qwen2 post_attention_layernorm -> mlp_norm, for gemma3 post_attention_layernorm
-> post_attn_norm, pre_feedforward_layernorm -> mlp_norm, post_feedforward_layernorm -> post_mlp_norm.
RoPE is HF's rotate-half form, so llama.cpp's permuted llama Q/K rows must be un-permuted on load.
With norm_plus_one the stored scale w is applied as (1 + w), as in HF Gemma (GGUF stores 1 + w).

Skipping and removing residual blocks (BlockPruner, arXiv 2406.10594, treats each layer as two
residual blocks, MHA and MLP): `model(tokens, block_mask=m)` with m bool [num_layers, 2] ((attn, mlp)
per layer, True = run) skips every False block, i.e. its residual branch adds nothing. A numpy mask
is static (skipped blocks are left out of the traced program); a jax array is data (`lax.cond` per
block, so one compiled program serves every mask of a search and a skipped block costs no compute).
`DecoderConfig(pruned_attn=..., pruned_mlp=...)` removes blocks structurally: the model has no
parameters for them (parameter paths of the other blocks unchanged) and its KV cache needs only
`cfg.num_cache_layers` layers (attention modules index the cache compactly, in layer order). With
neither, the model and its compiled programs are exactly those of the dense decoder.

KV cache: `model(tokens, cache=cache)` (a `common.sampling.kv_cache.KVCache`) appends the new
tokens' rotated keys and values at `cache.length`, attends over every valid cache slot whose stored
position is <= the query's (and within the window on local layers), and returns the updated cache
with the logits. Prefill and decode are the same call with T > 1 or T = 1; this module reaches the
cache only through its methods (write/read/advance), so it does not import common.sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
import contextlib
import dataclasses
import functools
import math
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import sharding

# Large but finite, so fully masked rows and padded vocabulary entries never produce inf/NaN, even
# after division by a sampling temperature or multiplication by a zero probability.
MASKED_LOGIT = -1e9
_INIT_STD = 0.02

# The residual stream's feature axis. DEFAULT_RULES map 'embed' to 'fsdp', which 'batch' already
# uses, so ('batch', 'length', 'embed') is rejected; a name without a rule replicates the feature
# axis (the usual FSDP/Megatron activation layout) and can be given a rule later.
ACT_EMBED = 'activation_embed'
_BTD = ('batch', 'length', ACT_EMBED)

# Up to this many rows of hidden states, the tied LM head multiplies vocabulary-major (decoding).
_VOCAB_MAJOR_MAX_ROWS = int(os.environ.get('DECODER_VOCAB_MAJOR_MAX_ROWS', 64))

# Open `capture_queries` blocks (innermost last); empty, the attention code does nothing more.
_QUERY_SINKS: list[list[jax.Array]] = []

_ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and per-family switches; see the module docstring for what each family sets."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  vocab_pad_multiple: int = 128
  dtype: str = 'float32'  # Compute dtype; parameters are always float32.
  activation: str = 'silu'  # 'silu' | 'gelu_tanh'
  qkv_bias: bool = False  # qwen2
  qk_norm: bool = False  # gemma3
  post_norms: bool = False  # gemma3: norms after attention and MLP, before the residual add.
  embed_scale: bool = False  # gemma: embeddings times sqrt(d_model), in the compute dtype.
  norm_plus_one: bool = False  # gemma: RMSNorm scale applied as (1 + w); stored w init to zeros.
  sliding_window: int | None = None  # gemma3: a local query sees this many keys, itself too.
  sliding_window_pattern: int = 0  # Layer i is global iff (i + 1) % pattern == 0; 0 = all global.
  rope_local_theta: float | None = None  # RoPE base of local layers (gemma3: 1e4; global 1e6).
  attn_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None  # Attention scale is this ** -0.5, else head_dim.
  # Layers whose MHA / MLP residual block is structurally removed (BlockPruner); () = dense.
  pruned_attn: tuple[int, ...] = ()
  pruned_mlp: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads {self.num_heads} is not a multiple of {self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.head_dim}')
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} not in {sorted(_ACTIVATIONS)}')
    if self.sliding_window_pattern and self.sliding_window is None:
      raise ValueError('sliding_window_pattern is set but sliding_window is None')
    jnp.dtype(self.dtype)  # Raises on an unknown dtype name.
    for name in ('pruned_attn', 'pruned_mlp'):  # JSON lists -> sorted tuples (hashable configs)
      layers = tuple(sorted({int(i) for i in getattr(self, name)}))
      if any(not 0 <= i < self.num_layers for i in layers):
        raise ValueError(f'{name} {layers} names a layer outside [0, {self.num_layers})')
      object.__setattr__(self, name, layers)

  @property
  def padded_vocab(self) -> int:
    """Vocabulary rounded up so the 'vocab' axis divides the tensor-parallel mesh axis."""
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def num_cache_layers(self) -> int:
    """KV-cache layers the model reads and writes: one per attention block not removed."""
    return self.num_layers - len(self.pruned_attn)

  def is_local_layer(self, i: int) -> bool:
    """Whether layer i uses the sliding window (gemma3's pattern: every N-th layer is global)."""
    if self.sliding_window is None or not self.sliding_window_pattern:
      return False
    return (i + 1) % self.sliding_window_pattern != 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any) -> DecoderConfig:
    """Builds a config from a dict or ml_collections.ConfigDict; unknown keys are an error."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'unknown DecoderConfig keys: {unknown}')
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)
    missing = [k for k in missing if k not in d]
    if missing:
      raise ValueError(f'missing DecoderConfig keys: {missing}')
    return cls(**d)


def _kernel_init(names: tuple[str, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(_INIT_STD), names)


class Linear(nnx.Linear):
  """`nnx.Linear` that multiplies as one 2-D matmul over all leading dimensions.

  XLA:CPU's dot for [B, T, d] @ [d, n] is slower than for the same data as [B*T, d] @ [d, n]
  (1.18x CPU time on the whole d_model 256 and 512 train steps of benchmarks/train_step.py, A/B in
  one process); on accelerators the reshape is free. A subclass, not a wrapper, so parameter paths (`kernel`, `bias`) and `isinstance(...,
  nnx.Linear)` checks (adapters select projections that way) are unchanged.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.kernel[...].dtype == jnp.bfloat16:
      return self._bf16_weights(inputs)
    if inputs.ndim <= 2:
      return super().__call__(inputs)
    lead = inputs.shape[:-1]
    out = super().__call__(inputs.reshape(math.prod(lead), inputs.shape[-1]))
    return out.reshape(*lead, out.shape[-1])

  def _bf16_weights(self, inputs: jax.Array) -> jax.Array:
    """Kernel stored in bf16 (`common.sampling.sampler.cast_weights`): see `bf16_matmul`."""
    lead = inputs.shape[:-1]
    out_dtype = self.dtype or inputs.dtype
    y = bf16_matmul(inputs.reshape(math.prod(lead), inputs.shape[-1]), self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(out_dtype).reshape(*lead, y.shape[-1])


def bf16_matmul(x: jax.Array, w: jax.Array, *, vocab_major: bool = False) -> jax.Array:
  """f32 [rows, n] = x [rows, d] @ w, w stored in bf16: x rounded to bf16, f32 accumulation.

  The one low-precision form XLA:CPU (jax 0.10.2) runs fast (benchmarks/low_precision_matmul.py):
  a bf16 x bf16 -> f32 dot with at least 2 rows goes to YNNPACK's AVX512-BF16 / AMX-BF16 kernels
  (0.52x the f32 time at 16 rows). Every other form (a bf16 result, an up-cast weight, or one
  row, which stays on XLA's own f32 matrix-vector loop) converts the whole weight to f32 on every
  call, 2-6x slower than f32, and some fail at run time (DotThunk BF16 x BF16 = F32). So a single
  row is multiplied as two equal rows and the first kept. vocab_major: w is [n, d] (the tied
  embedding table), else [d, n].
  """
  rows = x.shape[0]
  xb = x.astype(jnp.bfloat16)
  if rows == 1:
    xb = jnp.concatenate([xb, xb], axis=0)
  if not vocab_major:
    y = jnp.dot(xb, w, preferred_element_type=jnp.float32)
  elif 4 <= xb.shape[0] <= _VOCAB_MAJOR_MAX_ROWS:  # as the f32 head: [V, d] @ h^T, transposed
    y = jnp.einsum('vd,nd->vn', w, xb, preferred_element_type=jnp.float32).T
  else:
    y = jnp.einsum('nd,vd->nv', xb, w, preferred_element_type=jnp.float32)
  return y[:rows]


def _linear(cfg: DecoderConfig, d_in: int, d_out: int, names, *, bias=False, rngs) -> nnx.Linear:
  return Linear(
    d_in,
    d_out,
    use_bias=bias,
    dtype=cfg.compute_dtype,
    param_dtype=jnp.float32,
    kernel_init=_kernel_init(names),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[1:]),
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """RMSNorm computed in f32 (bf16 variance is too coarse); output in `out_dtype` or the input's."""

  def __init__(self, dim: int, *, eps: float, plus_one: bool, out_dtype=None):
    init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
    self.scale = nnx.Param(nnx.with_partitioning(init, ('norm',))(None, (dim,), jnp.float32))
    self.eps = eps
    self.plus_one = plus_one
    self.out_dtype = out_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...]
    y = y * (1.0 + scale if self.plus_one else scale)
    return y.astype(self.out_dtype or x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF rotate-half convention; x [B, T, N, D], integer positions [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


@contextlib.contextmanager
def capture_queries() -> Iterator[list[jax.Array]]:
  """Collects every attention layer's RoPE-rotated queries while the block is open (opt-in).

      with decoder.capture_queries() as queries:
        logits, cache = model(tokens, cache=cache)
      # queries[i]: layer i's q [B, T, num_heads, head_dim], after q_norm and RoPE, in call order

  For presses that score cached keys with the model's own queries (StreamMem's proxy queries,
  common.kv_press). Call the model inside the same traced function that reads the list (under jit
  the entries are that trace's values). With no block open nothing is recorded and the computation
  is unchanged.
  """
  sink: list[jax.Array] = []
  _QUERY_SINKS.append(sink)
  try:
    yield sink
  finally:
    _QUERY_SINKS.pop()


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: float | None = None):
  """Grouped-query attention with an f32 masked softmax.

  Args:
    q: [B, T, H, D] queries; k, v: [B, S, K, D] with H a multiple of K (query head h reads kv head
      h // (H // K), HF's repeat_kv order).
    mask: bool, broadcastable to [B, 1, T, S]; True = may attend.
    scale: multiplies the logits.
    softcap: if set, logits -> softcap * tanh(logits / softcap) (Gemma-2 style).

  Returns:
    [B, T, H, D] in v's dtype. Rows with no allowed key give zeros rather than a uniform average.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = mask[:, :, None]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(jnp.where(mask, logits, MASKED_LOGIT), axis=-1)
  probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum(
    'bkgts,bskd->btkgd', probs.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return out.reshape(b, t, h, d).astype(v.dtype)


def head_major_attention(q, kt, v, mask, *, scale: float, softcap: float | None = None):
  """`dot_product_attention` over the KV cache's layout: keys kt [B, K, D, S], values v [B, K, S, D].

  The einsums contract with (batch, kv head) leading on both sides, so XLA reads the cache in place
  instead of transposing every layer's cache on every decode step. Same masking and result as
  `dot_product_attention` (q [B, T, H, D], mask broadcastable to [B, 1, T, S]).
  """
  b, t, h, d = q.shape
  kv = kt.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  # One query per row (decoding) with grouped heads (G > 1): multiply-and-reduce fusions beat
  # XLA:CPU's batched matmul of [G, D] x [D, S] blocks. The scores sum over D, a major axis of the
  # slot-minor keys, which XLA:CPU vectorises along the slots: over 30 layers 1.3-1.8x the same sums
  # over a minor D for SmolLM2, 1.1-1.5x for Qwen2.5, 1.6-2.9x with Gemma-3's 256-wide heads. A dot
  # on the cache is no option inside the decode loop: any dot on the cache just written makes
  # XLA:CPU feed it from a duplicate of the update and copy every layer's cache on every step
  # (tests/common/sampling/sampler_test.py checks the loop copies no cache). With G == 1
  # (multi-head attention) the fusions are 10-14x slower than the einsums (a size-1 broadcast dim
  # makes XLA:CPU emit a non-vectorised reduction), so they take the einsums (all:
  # benchmarks/attention.py), and pay for it with those copies when they decode a single row (at
  # several rows XLA:CPU keeps the update in place; the in-place test covers grouped heads only).
  reduce = t == 1 and h // kv > 1
  if reduce:
    qf = q[:, 0, :, :, :, None].astype(jnp.float32)  # [B, K, G, D, 1]
    logits = jnp.sum(qf * kt[:, :, None].astype(jnp.float32), axis=-2)[:, :, :, None] * scale
  else:
    logits = jnp.einsum('btkgd,bkds->bkgts', q, kt, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = mask[:, :, None]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(jnp.where(mask, logits, MASKED_LOGIT), axis=-1)
  probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  if reduce:
    out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None].astype(jnp.float32), axis=3)
    out = out[:, None]  # [B, 1, K, G, D]
  else:
    out = jnp.einsum(
      'bkgts,bksd->btkgd', probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
  return out.reshape(b, t, h, d).astype(v.dtype)


def make_attention_mask(
  length: int, *, segment_ids=None, attention_mask=None, causal: bool = True
) -> jax.Array:
  """Bool mask [B or 1, 1, T, T]: causal & same nonzero segment & the caller's mask."""
  idx = jnp.arange(length)
  mask = (idx[:, None] >= idx[None, :]) if causal else jnp.ones((length, length), bool)
  mask = mask[None, None]
  if segment_ids is not None:
    seg = segment_ids[:, None, :, None]
    mask = mask & (seg == segment_ids[:, None, None, :]) & (seg != 0)
  if attention_mask is not None:
    am = attention_mask.astype(bool)
    mask = mask & (am[:, None] if am.ndim == 3 else am)
  return mask


def cache_attention_mask(
  q_positions: jax.Array,
  k_positions: jax.Array,
  k_valid: jax.Array,
  *,
  window: int | None = None,
  causal: bool = True,
) -> jax.Array:
  """Bool mask [B, 1, T, S] for queries at q_positions [B, T] over cache slots [B, S].

  A slot is readable iff it is valid and (causal) its position is <= the query's; on sliding-window
  layers also |q - k| < window. Positions, not slot indices, decide, so evicted, compacted or
  inserted entries (StreamMem) and ragged rows need no re-indexing.
  """
  q = q_positions[:, None, :, None]
  k = k_positions[:, None, None, :]
  mask = jnp.broadcast_to(k_valid[:, None, None, :], (q.shape[0], 1, q.shape[2], k.shape[3]))
  if causal:
    mask = mask & (k <= q)
  if window is not None:
    mask = mask & (jnp.abs(q - k) < window)
  return mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes (packed sequences)."""
  idx = jnp.arange(segment_ids.shape[1])[None, :]
  start = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


class Attention(nnx.Module):
  """Multi-head attention with GQA, optional qkv bias, qk-norm, sliding window and softcap."""

  def __init__(
    self, cfg: DecoderConfig, *, local: bool, rngs: nnx.Rngs, layer_idx: int | None = None
  ):
    h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    self.q_proj = _linear(cfg, d, h * hd, ('embed', 'heads'), bias=cfg.qkv_bias, rngs=rngs)
    self.k_proj = _linear(cfg, d, kv * hd, ('embed', 'kv_heads'), bias=cfg.qkv_bias, rngs=rngs)
    self.v_proj = _linear(cfg, d, kv * hd, ('embed', 'kv_heads'), bias=cfg.qkv_bias, rngs=rngs)
    self.o_proj = _linear(cfg, h * hd, d, ('heads', 'embed'), rngs=rngs)
    norm = functools.partial(RMSNorm, hd, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.window = cfg.sliding_window if local else None
    self.rope_theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    self.softcap = cfg.attn_logit_softcap
    self.layer_idx = layer_idx  # Which KV-cache layer this module reads and writes.
    # (kernel, bias or None) of q|k|v concatenated along the output, set by `fuse_qkv` for decoding
    # only: never a parameter, so training, checkpoints and adapters never see it.
    self.fused_qkv = nnx.data(None)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    cache: Any = None,
    *,
    input_mask: jax.Array | None = None,
    causal: bool = True,
  ):
    """Attention output [B, T, d]; with `cache`, (output, cache with this layer's new entries).

    Without a cache, `mask` [B or 1, 1, T, T] is the whole mask (the window is added here). With
    one, the mask comes from the cache's positions and validity (`cache_attention_mask`), and
    `mask`, if not None, is and-ed onto it ([B or 1, 1, T, S]); `input_mask` [B, T] marks which new
    tokens are real (padding is written as invalid).
    """
    b, t, _ = x.shape
    if self.fused_qkv is not None and b * t == 1:  # one row: see `fuse_qkv`
      kernel, bias = self.fused_qkv
      qkv = jax.lax.dot_general(x.reshape(1, -1), kernel, (((1,), (0,)), ((), ())))
      if bias is not None:
        qkv = qkv + bias[None]
      nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
      q, k, v = qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :]
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    q = sharding.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = sharding.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = sharding.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))
    if _QUERY_SINKS:
      _QUERY_SINKS[-1].append(q)
    if cache is not None:
      if self.layer_idx is None:
        raise ValueError('Attention was built without layer_idx, so it cannot use a KV cache')
      cache = cache.write(self.layer_idx, cache.length, k, v, positions, input_mask)
      entries = cache.read(self.layer_idx)
      cmask = cache_attention_mask(
        positions, entries.positions, entries.valid, window=self.window, causal=causal
      )
      if mask is not None:
        cmask = cmask & mask
      out = head_major_attention(
        q, entries.kt, entries.v, cmask, scale=self.scale, softcap=self.softcap
      )
      out = sharding.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
      return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache
    if self.window is not None:
      idx = jnp.arange(t)
      mask = mask & (jnp.abs(idx[:, None] - idx[None, :]) < self.window)
    out = dot_product_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
    out = sharding.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for llama/qwen2, GeGLU-tanh for gemma."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.d_model, cfg.mlp_dim, ('embed', 'mlp'), rngs=rngs)
    self.up_proj = _linear(cfg, cfg.d_model, cfg.mlp_dim, ('embed', 'mlp'), rngs=rngs)
    self.down_proj = _linear(cfg, cfg.mlp_dim, cfg.d_model, ('mlp', 'embed'), rngs=rngs)
    self.activation = cfg.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x)
    h = sharding.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return self.down_proj(h)


def fuse_qkv(model: nnx.Module) -> int:
  """Gives each float32 `Attention` in `model` one q|k|v matrix for one-row decoding; returns how many.

  At one row (batch-1 decoding) XLA:CPU runs every projection as its own matrix-vector product on
  the intra-op pool, and each one pays a fixed dispatch cost: SmolLM2's 120 small attention
  matrices (106 MB per token) read at 11-13 GB/s where its MLP's 90 larger ones read at 19-26
  (`benchmarks/decode_roofline.py`). One [d, (h + 2 kv) hd] product per layer instead of three gives
  the same numbers bitwise at one row (each output column is reduced alike); at 2-16 rows YNNPACK
  tiles the wider matrix differently (last-bit differences), so `Attention` uses it only for a
  single row and multi-row calls (prefill, batched decoding) keep the separate projections.
  Fusing the MLP's gate and up matrices gained nothing measurable, so they stay apart.

  Call it on a model merged inside the jitted decoding program, before the loop: the concatenation
  then runs once per call, not once per token, and the stored parameters are untouched. Skips
  attention whose projections are adapted (LoRA), not float32, or computed in another dtype.
  """
  fused = 0
  for _, m in nnx.iter_modules(model):
    if not isinstance(m, Attention):
      continue
    projs = (m.q_proj, m.k_proj, m.v_proj)
    if not all(
      type(p) is Linear and p.kernel[...].dtype == jnp.float32 and p.dtype in (None, jnp.float32)
      for p in projs
    ):
      continue
    kernel = jnp.concatenate([p.kernel[...] for p in projs], axis=1)
    bias = None if projs[0].bias is None else jnp.concatenate([p.bias[...] for p in projs])
    m.fused_qkv = (kernel, bias)
    fused += 1
  return fused


def _run_if(keep, fn, x, cache):
  """fn(x, cache) if `keep`, else (x, cache) unchanged: decided at trace time for a Python bool,
  at run time (`lax.cond`: only the taken branch computes) for a traced one."""
  if keep is True:
    return fn(x, cache)
  if keep is False:
    return x, cache
  return jax.lax.cond(keep, fn, lambda x, cache: (x, cache), x, cache)


class Block(nnx.Module):
  """Pre-norm residual block; with post_norms (gemma3) each branch is also normed before the add.

  Two residual blocks in one layer, MHA then MLP; either may be absent (`cfg.pruned_attn` /
  `cfg.pruned_mlp`) or skipped per call (`keep`). `cache_layer` is the KV-cache layer its attention
  uses (default `layer_idx`; the Decoder numbers the attention blocks that remain).
  """

  def __init__(
    self, cfg: DecoderConfig, layer_idx: int, *, rngs: nnx.Rngs, cache_layer: int | None = None
  ):
    norm = functools.partial(RMSNorm, cfg.d_model, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)
    attn, mlp = layer_idx not in cfg.pruned_attn, layer_idx not in cfg.pruned_mlp
    cache_layer = layer_idx if cache_layer is None else cache_layer
    local = cfg.is_local_layer(layer_idx)
    self.attn_norm = norm() if attn else None
    self.attn = Attention(cfg, local=local, rngs=rngs, layer_idx=cache_layer) if attn else None
    self.post_attn_norm = norm() if attn and cfg.post_norms else None
    self.mlp_norm = norm() if mlp else None
    self.mlp = MLP(cfg, rngs=rngs) if mlp else None
    self.post_mlp_norm = norm() if mlp and cfg.post_norms else None

  def _attn_residual(self, x, cache, positions, mask, kw):
    h = self.attn(self.attn_norm(x), positions, mask, cache, **kw)
    if cache is not None:
      h, cache = h
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    return sharding.with_logical_constraint(x + h, _BTD), cache

  def _mlp_residual(self, x, cache):
    h = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return sharding.with_logical_constraint(x + h, _BTD), cache

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array | None,
    cache: Any = None,
    *,
    keep: tuple[Any, Any] | None = None,
    **kw,
  ):
    """x [B, T, d] -> x, or (x, cache) when a KV cache is given (see `Attention.__call__`).

    keep: (attn, mlp) run flags, Python or traced bools (see `_run_if`); a skipped block leaves x
      (and its cache layer) untouched, exactly as if its residual output were zero. None: both run.
    """
    keep_attn, keep_mlp = (True, True) if keep is None else keep
    if self.attn is not None:
      attn = functools.partial(self._attn_residual, positions=positions, mask=mask, kw=kw)
      x, cache = _run_if(keep_attn, attn, x, cache)
    if self.mlp is not None:
      x, cache = _run_if(keep_mlp, self._mlp_residual, x, cache)
    return x if cache is None else (x, cache)


def block_keeps(block_mask: Any, num_layers: int) -> list[tuple[Any, Any] | None]:
  """Per-layer (attn, mlp) run flags of a bool [num_layers, 2] block mask (see the module docstring):
  Python bools for a numpy / nested-sequence mask (static), traced bools for a jax array, and
  None per layer when there is no mask."""
  if block_mask is None:
    return [None] * num_layers
  static = isinstance(block_mask, np.ndarray | list | tuple)
  m = np.asarray(block_mask, bool) if static else jnp.asarray(block_mask).astype(bool)
  if m.shape != (num_layers, 2):
    raise ValueError(f'block_mask has shape {m.shape}, expected ({num_layers}, 2): (attn, mlp)')
  if static:
    return [(bool(m[i, 0]), bool(m[i, 1])) for i in range(num_layers)]
  return [(m[i, 0], m[i, 1]) for i in range(num_layers)]


class Decoder(nnx.Module):
  """Decoder-only LM returning f32 logits over the padded vocabulary (padded entries masked)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
      cfg.padded_vocab,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      embedding_init=_kernel_init(('vocab', 'embed')),
      rngs=rngs,
    )
    # Attention blocks take consecutive KV-cache layers (their layer index in a dense model).
    cache_layers = np.cumsum([i not in cfg.pruned_attn for i in range(cfg.num_layers)]) - 1
    self.layers = nnx.List(
      [Block(cfg, i, rngs=rngs, cache_layer=int(cache_layers[i])) for i in range(cfg.num_layers)]
    )
    self.final_norm = RMSNorm(
      cfg.d_model, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one, out_dtype=jnp.float32
    )
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else _linear(cfg, cfg.d_model, cfg.padded_vocab, ('embed', 'vocab'), rngs=rngs)
    )

  def hidden_states(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    causal: bool = True,
    cache: Any = None,
    input_mask: jax.Array | None = None,
    block_mask: Any = None,
  ):
    """Final-normed hidden states [B, T, d_model] in f32, or (hidden, cache) with a KV cache.

    Inputs as in `__call__`.
    """
    cfg = self.cfg
    if cache is None and input_mask is not None:
      raise ValueError('input_mask only applies with a KV cache; use attention_mask/segment_ids')
    if cache is not None and segment_ids is not None:
      raise ValueError('segment_ids cannot be combined with a KV cache (use positions/input_mask)')
    # Gather the table's fsdp-sharded feature axis first (what FSDP does for every weight anyway):
    # a lookup straight from the (vocab, embed)-sharded table hits XLA's "involuntary full
    # rematerialization" when the result is resharded onto the batch.
    table = sharding.with_logical_constraint(self.embed.embedding[...], ('vocab', None))
    x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
    x = sharding.with_logical_constraint(x, _BTD)
    keeps = block_keeps(block_mask, cfg.num_layers)
    if cache is not None:
      return self._hidden_states_cached(
        x, positions, attention_mask, causal, cache, input_mask, keeps
      )
    if positions is None:
      if segment_ids is not None:
        positions = segment_positions(segment_ids)
      else:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = make_attention_mask(
      tokens.shape[1], segment_ids=segment_ids, attention_mask=attention_mask, causal=causal
    )
    for layer, keep in zip(self.layers, keeps, strict=True):
      x = layer(x, positions, mask, keep=keep)
    return self.final_norm(x)

  def _hidden_states_cached(self, x, positions, attention_mask, causal, cache, input_mask, keeps):
    b, t, _ = x.shape
    input_mask = jnp.ones((b, t), bool) if input_mask is None else input_mask.astype(bool)
    if positions is None:
      # Real tokens continue each row's sequence; padding gets a position too but is never read.
      steps = jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
      positions = cache.next_position[:, None] + jnp.maximum(steps, 0)
    positions = positions.astype(jnp.int32)
    extra = None
    if attention_mask is not None:
      extra = attention_mask.astype(bool)
      extra = extra[:, None] if extra.ndim == 3 else extra
    for layer, keep in zip(self.layers, keeps, strict=True):
      x, cache = layer(x, positions, extra, cache, keep=keep, input_mask=input_mask, causal=causal)
    last = jnp.max(jnp.where(input_mask, positions + 1, 0), axis=1)
    cache = cache.advance(t, jnp.maximum(cache.next_position, last))
    return self.final_norm(x), cache

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """f32 logits [..., padded_vocab] from hidden states; padded entries are MASKED_LOGIT."""
    dtype = self.cfg.compute_dtype
    if self.lm_head is None:
      table = self.embed.embedding[...]
      rows = math.prod(h.shape[:-1])
      if table.dtype == jnp.bfloat16:  # stored in bf16 (sampler.cast_weights): see `bf16_matmul`
        flat = h.reshape(rows, h.shape[-1])
        logits = bf16_matmul(flat, table, vocab_major=True).reshape(*h.shape[:-1], table.shape[0])
      elif rows <= _VOCAB_MAJOR_MAX_ROWS:
        table = table.astype(dtype)
        # Decoding (a few rows): XLA:CPU runs table @ h^T 2x faster than h @ table^T at 16 rows
        # (measured on SmolLM2's 49152 x 576 table); the [V, rows] -> [rows, V] transpose is tiny.
        flat = h.reshape(rows, h.shape[-1]).astype(dtype)
        logits = jnp.einsum('vd,nd->vn', table, flat, preferred_element_type=jnp.float32)
        logits = logits.T.reshape(*h.shape[:-1], table.shape[0])
      else:  # One 2-D matmul (see `Linear`): [rows, d] x [V, d]^T.
        table = table.astype(dtype)
        flat = h.reshape(rows, h.shape[-1]).astype(dtype)
        logits = jnp.einsum('nd,vd->nv', flat, table, preferred_element_type=jnp.float32)
        logits = logits.reshape(*h.shape[:-1], table.shape[0])
    else:
      logits = self.lm_head(h).astype(jnp.float32)
    if logits.ndim == 3:
      logits = sharding.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    if self.cfg.padded_vocab == self.cfg.vocab_size:
      return logits
    valid = jnp.arange(logits.shape[-1]) < self.cfg.vocab_size
    return jnp.where(valid, logits, MASKED_LOGIT)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    causal: bool = True,
    return_hidden: bool = False,
    cache: Any = None,
    input_mask: jax.Array | None = None,
    block_mask: Any = None,
  ):
    """Runs the LM.

    Args:
      tokens: int [B, T].
      positions: int [B, T] RoPE positions; default arange(T), or restarting at 0 in every segment
        when segment_ids is given.
      segment_ids: int [B, T] for packed sequences: tokens attend only within their own nonzero
        segment; segment 0 is padding (attends to nothing, output rows are still finite).
      attention_mask: bool [B, T, T] or [B, 1, T, T], True = may attend; and-ed with the rest.
      causal: set False for bidirectional attention (e.g. LLM2Vec-style encoders).
      return_hidden: also return the final-normed hidden states.
      cache: a `common.sampling.kv_cache.KVCache`. The tokens are appended at `cache.length` and
        attend to every valid cache entry at a position <= their own (see `cache_attention_mask`);
        positions default to each row's `cache.next_position` onwards (counting real tokens only);
        attention_mask, if given, is [B, T, S] or [B, 1, T, S] over the cache's slots; segment_ids
        are not supported.
      input_mask: bool [B, T], with a cache only: False marks padding (ragged prompts), which is
        written to the cache as invalid and does not advance the row's position.
      block_mask: bool [num_layers, 2], (attn, mlp) per layer, False = skip that residual block
        (numpy: static; jax array: decided at run time); entries of removed blocks are ignored.

    Returns:
      f32 logits [B, T, padded_vocab], or (logits, hidden [B, T, d_model] f32); with a cache, the
      updated cache is appended to the tuple: (logits, cache) or (logits, hidden, cache).
    """
    h = self.hidden_states(
      tokens,
      positions=positions,
      segment_ids=segment_ids,
      attention_mask=attention_mask,
      causal=causal,
      cache=cache,
      input_mask=input_mask,
      block_mask=block_mask,
    )
    if cache is not None:
      h, cache = h
    logits = self.logits_from_hidden(h)
    out = (logits, h) if return_hidden else (logits,)
    if cache is not None:
      return (*out, cache)
    return out if return_hidden else logits


def without_blocks(model: Decoder, attn: Any = (), mlp: Any = ()) -> Decoder:
  """`model` with the MHA blocks of layers `attn` and the MLP blocks of layers `mlp` removed.

  Structural removal (BlockPruner, arXiv 2406.10594): the result's config lists the removed blocks
  (`pruned_attn` / `pruned_mlp`, on top of any already removed), it holds no parameters for them and
  computes what `model(..., block_mask=...)` computes with those blocks skipped. The other
  parameters are the same arrays (no copy; their shardings are kept).
  """
  cfg = dataclasses.replace(
    model.cfg,
    pruned_attn=(*model.cfg.pruned_attn, *attn),
    pruned_mlp=(*model.cfg.pruned_mlp, *mlp),
  )
  captured = {}

  def split():
    with sharding.unsharded():
      captured['graphdef'], state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    return state

  abstract = jax.eval_shape(split)  # shapes only: nothing is initialised
  values = dict(nnx.to_flat_state(nnx.state(model)))
  leaves = [
    (path, var.replace(values[path].get_value())) for path, var in nnx.to_flat_state(abstract)
  ]
  return nnx.merge(captured['graphdef'], nnx.from_flat_state(leaves))
