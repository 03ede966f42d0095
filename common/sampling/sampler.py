"""Batched autoregressive sampling: one prefill, then a jit-compiled `lax.while_loop` decode.

What callers get, and why it is shaped this way:
- Ragged prompts: a [B, P] token array plus a bool mask of real tokens (left- or right-padded, or
  `pad_prompts` from lists). Positions count real tokens only, so a padded row computes exactly what
  it would alone.
- Greedy, temperature, top-k and top-p; the temperature may change with the generated position t
  (a float, an array [N] or [B, N], or a vectorised function of t), which is what EAD's annealing
  needs; a temperature <= 0 at some t means greedy there.
- Stop tokens and stop token sequences with per-row done flags; a finished row emits `pad_id` (with
  logprob and entropy 0) while the others continue, and the loop exits once every row is done.
- Per generated token: `logprobs` under the model itself (temperature 1, no truncation: what a full
  forward pass of the decoder on the finished sequence gives, and what an RL loss recomputes),
  `sample_logprobs` under the distribution actually sampled from (EAD's behaviour policy for
  truncated importance sampling), and the entropies of both.
- Forking (`num_samples=K`): the prompt is prefilled once and its cache tiled K times (GRPO groups,
  OmniOPD); sample k of row b uses key fold_in(key_b, k), so it equals a run on K tiled copies of the
  prompt with `fork_keys` (tested).
- Determinism: row b's randomness is fold_in(key_b, t) at generated position t (one uniform per row
  and token, inverse-CDF sampling: `sample_categorical`), never a function of the other rows, so pass
  per-example keys (`row_keys(key, example_ids)`) to make samples independent of batch composition.
  A single key is split by row index.
- Streaming: `generate_chunks` hands out the tokens every `chunk` decode steps (the same loop body,
  stopped and resumed with its donated carry) and ends with exactly what `generate` returns.

Reduced-precision weights for batched rollouts: `cast_weights(model, jnp.bfloat16)` (opt-in).

Compiles are keyed on (model graph, batch, bucketed prompt length, max_new_tokens, top-k/top-p, stop
lists, greedy or not); the temperature schedule is a traced array, so changing it never recompiles.
Prompt lengths are rounded up to `prompt_bucket` so varying prompts reuse one program.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import functools
import time
from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.models import decoder
from common.sampling import kv_cache

Temperature = float | Sequence[float] | np.ndarray | jax.Array | Callable[[jax.Array], jax.Array]

_NEG = decoder.MASKED_LOGIT


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. temperature: float, [N] or [B, N] array, or f(t) -> temperature (vectorised).

  A temperature <= 0 is greedy (at that position). top_k / top_p apply after the temperature (the
  HF order); top_p keeps the smallest set of most likely tokens whose mass reaches top_p (at least
  one). A stop sequence ends a row once its tokens are the last ones generated; stop tokens are
  sequences of length 1. Emitted stop tokens count in `lengths`.
  """

  max_new_tokens: int = 64
  temperature: Temperature = 1.0
  top_k: int | None = None
  top_p: float | None = None
  stop_tokens: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  pad_id: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
  """Result of `generate`, rows in input order (forked samples of row b at b*K .. b*K+K-1).

  tokens [B, N] int32: generated tokens, stop token included, then pad_id.
  lengths [B] int32: generated tokens per row (<= N).
  logprobs [B, N] f32: log p_model(token) at temperature 1 (0 after the end).
  sample_logprobs [B, N] f32: log of the sampling distribution's probability (0 where greedy).
  entropies [B, N] f32: entropy of the sampling distribution (0 where greedy).
  model_entropies [B, N] f32: entropy of the model's distribution at temperature 1.
  done [B] bool: the row hit a stop token/sequence (False: it ran out of max_new_tokens).
  cache: the final KVCache when `return_cache=True` (multi-turn, cache surgery), else None.
  """

  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  sample_logprobs: jax.Array
  entropies: jax.Array
  model_entropies: jax.Array
  done: jax.Array
  cache: kv_cache.KVCache | None = None


# ---------------------------------------------------------------------------------------------------
# Keys.


def _as_typed_keys(key: Any) -> jax.Array:
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key.astype(jnp.uint32))


def row_keys(key: Any, ids: Any) -> jax.Array:
  """Per-example keys fold_in(key, id): pass global example ids to decouple rows from batching."""
  key = _as_typed_keys(key)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(ids, jnp.uint32))


def fork_keys(keys: Any, num_samples: int) -> jax.Array:
  """The keys `generate(..., num_samples=K)` gives sample k of row b: fold_in(keys[b], k), b-major."""
  keys = _as_typed_keys(keys)
  ks = jnp.arange(num_samples, dtype=jnp.uint32)
  out = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, ks))(keys)
  return out.reshape(-1)


# Jitted for the host-side entry point: run eagerly, the vmap costs milliseconds of Python per call.
_row_keys = jax.jit(row_keys)


def _batch_keys(key: Any, batch: int) -> jax.Array:
  keys = _as_typed_keys(key)
  if keys.ndim == 0:
    return _row_keys(keys, np.arange(batch))
  if keys.shape != (batch,):
    raise ValueError(f'expected one key or {batch} per-row keys, got shape {keys.shape}')
  return keys


# ---------------------------------------------------------------------------------------------------
# The sampling distribution.


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps logits >= the k-th largest per row (ties at the threshold are kept), masks the rest."""
  if k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, _NEG)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the most likely tokens until their mass reaches p (at least one).

  A token is kept iff the probability of the strictly more likely tokens is < p (ties at the
  cut-off are kept).
  """
  desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  return jnp.where(logits >= cutoff, logits, _NEG)


def sampling_logits(
  logits: jax.Array, temperature: jax.Array, top_k: int | None, top_p: float | None
) -> jax.Array:
  """Logits of the distribution sampled from: / temperature (if > 0), then top-k, then top-p."""
  t = jnp.asarray(temperature, jnp.float32)[..., None]
  x = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
  if top_k is not None:
    x = top_k_filter(x, top_k)
  if top_p is not None and top_p < 1.0:
    x = top_p_filter(x, top_p)
  return x


def sample_categorical(keys: jax.Array, logp: jax.Array, block: int = 128) -> jax.Array:
  """One token per row from log-probabilities [B, V] by inverse-CDF sampling; keys [B].

  Exact categorical sampling with one uniform per row (fold_in keys stay per row, so a row's draw
  never depends on the others), and never a zero-probability token. Why not Gumbel-max
  (`jax.random.categorical`): it needs V random numbers per row, and threefry for 16 x 49152 of them
  cost ~20 ms per token on 2 CPU cores, more than the transformer layers' attention. The CDF is
  searched in two levels (blocks of `block` tokens, then within the chosen block) to keep the
  cumulative sums short.
  """
  b, v = logp.shape
  if v % block:
    block = v
  u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # (0, 1]: a zero target could pick p = 0
  p = jnp.exp(logp.astype(jnp.float32)).reshape(b, v // block, block)
  mass = p.sum(-1)  # [B, V/block]
  cum = jnp.cumsum(mass, axis=-1)
  target = u * cum[:, -1]
  blk = jnp.minimum(jnp.sum(cum < target[:, None], axis=-1), v // block - 1)
  # Pick within the block; clamp the target into the block's own (recomputed) mass, so rounding
  # between the two cumulative sums can neither overshoot nor land on a zero-probability token.
  inner = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [B, block]
  before = _pick(cum, blk) - _pick(mass, blk)
  inner_cum = jnp.cumsum(inner, axis=-1)
  t_in = jnp.clip(target - before, jnp.finfo(jnp.float32).tiny, inner_cum[:, -1])
  idx = jnp.sum(inner_cum < t_in[:, None], axis=-1)
  last_nonzero = block - 1 - jnp.argmax(inner[:, ::-1] > 0, axis=-1)
  idx = jnp.minimum(idx, last_nonzero)
  return (blk * block + idx).astype(jnp.int32)


def _entropy(logp: jax.Array) -> jax.Array:
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything that shapes the compiled programs (hashable)."""

  max_new_tokens: int
  top_k: int | None
  top_p: float | None
  stop_tokens: tuple[int, ...]
  stop_sequences: tuple[tuple[int, ...], ...]
  pad_id: int
  greedy: bool
  num_samples: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Prefilled:
  """What prefill hands to the decode loop (rows already forked)."""

  logits: jax.Array  # [B', V] at each row's last prompt token
  cache: kv_cache.KVCache
  keys: jax.Array  # [B'] typed keys
  temps: jax.Array  # [B', N]


def _sample_step(logits, keys, temp, t, st: _Static):
  """One position: (token, model logprob, sample logprob, entropy, model entropy), all [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  zeros = jnp.zeros(best.shape, jnp.float32)
  if st.greedy:
    tok, s_lp, ent = best, zeros, zeros
  else:
    slogp = jax.nn.log_softmax(sampling_logits(logits, temp, st.top_k, st.top_p), axis=-1)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
    drawn = sample_categorical(step_keys, slogp)
    is_greedy = temp <= 0
    tok = jnp.where(is_greedy, best, drawn)
    s_lp = jnp.where(is_greedy, 0.0, _pick(slogp, tok))
    ent = jnp.where(is_greedy, 0.0, _entropy(slogp))
  return tok, _pick(logp, tok), s_lp, ent, _entropy(logp)


def _stop_hit(recent: jax.Array, tok: jax.Array, st: _Static) -> jax.Array:
  hit = jnp.zeros(tok.shape, bool)
  for s in st.stop_tokens:
    hit = hit | (tok == s)
  m = recent.shape[1]
  for seq in st.stop_sequences:
    hit = hit | jnp.all(recent[:, m - len(seq) :] == jnp.asarray(seq, jnp.int32), axis=1)
  return hit


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len', 'num_samples'))
def _prefill(graphdef, state, tokens, mask, cache, keys, temps, cache_len, num_samples):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  if cache is None:
    cache = kv_cache.KVCache.init(model.cfg, b, cache_len)
  # Logits at each row's last real token only (the vocabulary projection of every prompt token
  # would cost more than the rest of a small model's prefill).
  h, cache = model.hidden_states(tokens, cache=cache, input_mask=mask)
  last = p - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  logits = model.logits_from_hidden(h[jnp.arange(b), last])
  k = num_samples
  if k > 1:
    cache = cache.repeat(k)
    logits = jnp.repeat(logits, k, axis=0)
    keys = fork_keys(keys, k)
    temps = jnp.repeat(temps, k, axis=0)
  return _Prefilled(logits=logits, cache=cache, keys=keys, temps=temps)


def _decode_start(pre: _Prefilled, cache: kv_cache.KVCache, st: _Static) -> tuple:
  """The decode loop's initial carry: (t, logits, cache, outs, done, lengths, recent)."""
  b, n = pre.temps.shape
  m = max([len(s) for s in st.stop_sequences] + [1])
  out_tok = jnp.full((b, n), st.pad_id, jnp.int32)
  zeros = jnp.zeros((b, n), jnp.float32)
  outs = (out_tok, zeros, zeros, zeros, zeros)
  return (
    jnp.zeros((), jnp.int32),
    pre.logits,
    cache,
    outs,
    jnp.zeros((b,), bool),
    jnp.zeros((b,), jnp.int32),
    jnp.full((b, m), -1, jnp.int32),
  )


def _decode_step(model, pre: _Prefilled, st: _Static) -> Callable[[tuple], tuple]:
  """The decode loop's body (one generated position), shared by `_decode` and `_decode_until`."""
  keys, temps = pre.keys, pre.temps
  if temps.shape[0] == 1:  # one row: one q|k|v product per layer, built here, outside the loop
    decoder.fuse_qkv(model)
  temp_at = lambda t: temps[:, t]  # noqa: E731

  def body(loop):
    # Sample position t from the carried logits, then feed the token back. One sampling site and
    # one model call in the program (each costs seconds of XLA compile on CPU); the price is one
    # forward pass more than strictly needed (the last token's), and one more cache slot.
    t, logits, cache, outs, done, lengths, recent = loop
    tok, lp, s_lp, ent, m_ent = _sample_step(logits, keys, temp_at(t), t, st)
    active = ~done
    tok = jnp.where(active, tok, st.pad_id)
    recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
    done = done | (active & _stop_hit(recent, tok, st))
    vals = (tok, lp, s_lp, ent, m_ent)
    outs = tuple(
      o.at[:, t].set(jnp.where(active, v, 0).astype(o.dtype) if i else v)
      for i, (o, v) in enumerate(zip(outs, vals, strict=True))
    )
    # Finished rows feed padding that is written to the cache as invalid, so a returned cache holds
    # exactly each row's prompt and generated tokens.
    logits, cache = model(tok[:, None], cache=cache, input_mask=active[:, None])
    return t + 1, logits[:, 0], cache, outs, done, lengths + active.astype(jnp.int32), recent

  return body


def _decode_result(loop: tuple) -> tuple[Generation, kv_cache.KVCache]:
  """(Generation without its cache, the final cache) from the decode loop's final carry."""
  _, _, cache, outs, done, lengths, _ = loop
  tokens_out, lp, s_lp, ent, m_ent = outs
  gen = Generation(
    tokens=tokens_out,
    lengths=lengths,
    logprobs=lp,
    sample_logprobs=s_lp,
    entropies=ent,
    model_entropies=m_ent,
    done=done,
  )
  return gen, cache


# The cache is donated: the loop updates it in place instead of first copying every layer's keys
# and values (tens to hundreds of MB at batch 16) into the loop's carry.
@functools.partial(jax.jit, static_argnames=('graphdef', 'st'), donate_argnames=('cache',))
def _decode(graphdef, state, pre: _Prefilled, cache: kv_cache.KVCache, st: _Static):
  """(Generation without its cache, the final cache): always returned, so the donated input
  buffers alias the output ones (a donated buffer with no output to alias is not reused)."""
  model = nnx.merge(graphdef, state)
  n = pre.temps.shape[1]

  def cond(loop):
    t, _, _, _, done, _, _ = loop
    return (t < n) & ~jnp.all(done)

  loop = _decode_start(pre, cache, st)
  return _decode_result(jax.lax.while_loop(cond, _decode_step(model, pre, st), loop))


# Streaming (`generate_chunks`): the same loop, stopped every few positions to hand tokens out.
@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len', 'st'))
def _prefill_start(graphdef, state, tokens, mask, cache, keys, temps, cache_len, st: _Static):
  """Prefill, then the decode loop's initial carry: (prefill outputs without logits or cache,
  carry)."""
  pre = _prefill(graphdef, state, tokens, mask, cache, keys, temps, cache_len, st.num_samples)
  pre, cache = _split_cache(pre)
  return dataclasses.replace(pre, logits=None), _decode_start(pre, cache, st)


# The carry (cache and outputs) is donated, as in `_decode`: each chunk updates it in place.
@functools.partial(jax.jit, static_argnames=('graphdef', 'st'), donate_argnames=('loop',))
def _decode_until(graphdef, state, pre: _Prefilled, loop: tuple, stop: jax.Array, st: _Static):
  """Runs `_decode`'s loop body from the carry until position `stop` (or every row is done)."""
  model = nnx.merge(graphdef, state)
  n = pre.temps.shape[1]

  def cond(loop):
    t, _, _, _, done, _, _ = loop
    return (t < jnp.minimum(stop, n)) & ~jnp.all(done)

  return jax.lax.while_loop(cond, _decode_step(model, pre, st), loop)


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len', 'st'))
def _generate(graphdef, state, tokens, mask, cache, keys, temps, cache_len, st: _Static):
  """Prefill then decode as one program: one dispatch (and one graphdef hash) per call, which is
  most of a small model's generate time on CPU. The intermediate cache needs no donation here."""
  pre = _prefill(graphdef, state, tokens, mask, cache, keys, temps, cache_len, st.num_samples)
  return _decode(graphdef, state, *_split_cache(pre), st)


def _split_cache(pre: _Prefilled) -> tuple[_Prefilled, kv_cache.KVCache]:
  """(prefill outputs without the cache, the cache): `_decode` donates the cache only."""
  return dataclasses.replace(pre, cache=None), pre.cache


def _with_cache(gen: Generation, cache: kv_cache.KVCache, keep: bool) -> Generation:
  return dataclasses.replace(gen, cache=cache) if keep else gen


# ---------------------------------------------------------------------------------------------------
# Host-side entry points.


def pad_prompts(
  prompts: Sequence[Sequence[int]],
  *,
  side: str = 'left',
  pad_id: int = 0,
  length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (tokens [B, P] int32, mask [B, P] bool), padded on `side`."""
  if side not in ('left', 'right'):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  if any(len(x) == 0 for x in prompts):
    raise ValueError('every prompt needs at least one token')
  longest = max(len(x) for x in prompts)
  if length is not None and longest > length:
    raise ValueError(f'a prompt of {longest} tokens does not fit length={length}')
  p = longest if length is None else length
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    sl = slice(p - len(x), p) if side == 'left' else slice(0, len(x))
    tokens[i, sl] = x
    mask[i, sl] = True
  return tokens, mask


def temperature_array(temperature: Temperature, max_new_tokens: int) -> jax.Array:
  """The schedule as f32 [N] or [B, N]: temperature at generated position t = 0 .. N-1."""
  if callable(temperature):
    out = jnp.asarray(temperature(jnp.arange(max_new_tokens)), jnp.float32)
    return jnp.broadcast_to(out, out.shape[:-1] + (max_new_tokens,)) if out.ndim else out
  out = jnp.asarray(temperature, jnp.float32)
  if out.ndim == 0:
    return jnp.full((max_new_tokens,), out)
  if out.shape[-1] != max_new_tokens or out.ndim > 2:
    raise ValueError(f'temperature array {out.shape} is not [N] or [B, N] with N={max_new_tokens}')
  return out


def _is_greedy(temps: jax.Array) -> bool:
  try:
    return bool(np.all(np.asarray(temps) <= 0))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


class _Call(NamedTuple):
  """A `generate` call's arguments, checked and shaped for the compiled programs."""

  graphdef: Any
  state: Any
  prefill_args: tuple  # (state, tokens, mask, cache, keys, temps)
  cache_len: int
  st: _Static


def _setup(model, prompts, prompt_mask, config, key, num_samples, cache, prompt_bucket) -> _Call:
  """Checks and shapes `generate`'s arguments (see there)."""
  if isinstance(prompts, (list, tuple)) and prompt_mask is None:
    prompts, prompt_mask = pad_prompts(prompts, side='left', pad_id=config.pad_id)
  tokens = jnp.asarray(prompts, jnp.int32)
  mask = jnp.ones(tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f'prompts {tokens.shape} and mask {mask.shape} must both be [B, P]')
  b, p = tokens.shape
  checkable = not isinstance(mask, jax.core.Tracer) and mask.is_fully_addressable
  if checkable and not bool(np.all(np.asarray(mask).any(axis=1))):
    raise ValueError('every prompt row needs at least one real token (prompt_mask row all False)')
  bucket = _round_up(p, max(1, prompt_bucket))
  if bucket > p:  # Extra padding on the right: invalid, so it changes nothing but the shape.
    tokens = jnp.pad(tokens, ((0, 0), (0, bucket - p)), constant_values=config.pad_id)
    mask = jnp.pad(mask, ((0, 0), (0, bucket - p)))
  n = int(config.max_new_tokens)
  if n < 1:
    raise ValueError('max_new_tokens must be >= 1')
  temps = temperature_array(config.temperature, n)
  if temps.ndim == 2 and temps.shape[0] != b:
    raise ValueError(f'per-row temperatures have {temps.shape[0]} rows for {b} prompts')
  temps = jnp.broadcast_to(temps, (b, n))  # One program for shared and per-row schedules.
  greedy = _is_greedy(temps)
  if key is None:
    if not greedy:
      raise ValueError('sampling with temperature > 0 needs a key')
    key = 0
  keys = _batch_keys(key, b)
  cache_len = bucket + n
  if cache is not None:
    if cache.batch != b:
      raise ValueError(f'cache has {cache.batch} rows for {b} prompts')
    cache_len = cache.max_len
    try:
      free = cache.max_len - int(cache.length)
    except (jax.errors.TracerIntegerConversionError, jax.errors.ConcretizationTypeError):
      free = None
    if free is not None and free < bucket + n:
      raise ValueError(
        f'cache has {free} free slots; the prompt (bucketed to {bucket}) and {n} new tokens need '
        f'{bucket + n}'
      )
  st = _Static(
    max_new_tokens=n,
    top_k=None if config.top_k is None else int(config.top_k),
    top_p=None if config.top_p is None else float(config.top_p),
    stop_tokens=tuple(int(x) for x in config.stop_tokens),
    stop_sequences=tuple(tuple(int(x) for x in s) for s in config.stop_sequences if len(s)),
    pad_id=int(config.pad_id),
    greedy=greedy,
    num_samples=int(num_samples),
  )
  graphdef, state = nnx.split(model)
  return _Call(graphdef, state, (state, tokens, mask, cache, keys, temps), cache_len, st)


def generate(
  model: decoder.Decoder,
  prompts: Any,
  prompt_mask: Any = None,
  *,
  config: SamplingConfig = SamplingConfig(),
  key: Any = None,
  num_samples: int = 1,
  cache: kv_cache.KVCache | None = None,
  prompt_bucket: int = 16,
  return_cache: bool = False,
  timings: dict[str, float] | None = None,
) -> Generation:
  """Samples continuations of a batch of prompts (see the module docstring).

  Args:
    model: a `Decoder` (any nnx module with its `hidden_states(..., cache=, input_mask=)`,
      `logits_from_hidden` and `__call__(..., cache=)`), sharded or not.
    prompts: int [B, P] (with `prompt_mask` bool [B, P], True = real token; default all real) or a
      list of token lists (left-padded here).
    config: `SamplingConfig`.
    key: a PRNG key (split by row index), or [B] per-row keys (see `row_keys`); an int is a seed.
      May be None only when every temperature is <= 0 (greedy).
    num_samples: K continuations per prompt from one prefill; output rows b*K .. b*K+K-1.
    cache: continue from an existing cache (its rows are the prompts' rows; it needs room for the
      bucketed prompt plus max_new_tokens more slots after its `length`). Not donated.
    prompt_bucket: prompt lengths are padded up to a multiple of this (fewer recompiles).
    return_cache: also return the final cache (`Generation.cache`).
    timings: if a dict, receives 'compile_s', 'prefill_s' and 'decode_s' (wall seconds; the
      programs are compiled ahead of time so the phases exclude compilation; costs a re-trace
      and a device sync per call, so leave it None in loops that do not report speed), and
      'prefill_cpu_s' / 'decode_cpu_s': this process's CPU seconds (all threads) in those phases,
      steadier than wall time when other jobs share the machine.
  """
  graphdef, state, prefill_args, cache_len, st = _setup(
    model, prompts, prompt_mask, config, key, num_samples, cache, prompt_bucket
  )
  if timings is None:
    return _with_cache(*_generate(graphdef, *prefill_args, cache_len, st), return_cache)
  # Timed: compile ahead of time so the reported prefill/decode seconds exclude compilation (which
  # the persistent compilation cache makes cheap on later runs), and sync between the phases.
  t0 = time.perf_counter()
  prefill_fn = _prefill.lower(graphdef, *prefill_args, cache_len, st.num_samples).compile()
  compile_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  pre = jax.block_until_ready(prefill_fn(*prefill_args))
  timings['prefill_s'] = time.perf_counter() - t0
  timings['prefill_cpu_s'] = time.process_time() - c0
  t0 = time.perf_counter()
  pre, pre_cache = _split_cache(pre)
  decode_fn = _decode.lower(graphdef, state, pre, pre_cache, st).compile()
  timings['compile_s'] = compile_s + time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(decode_fn(state, pre, pre_cache))
  timings['decode_s'] = time.perf_counter() - t0
  timings['decode_cpu_s'] = time.process_time() - c0
  return _with_cache(*out, return_cache)


def generate_chunks(
  model: decoder.Decoder,
  prompts: Any,
  prompt_mask: Any = None,
  *,
  config: SamplingConfig = SamplingConfig(),
  key: Any = None,
  num_samples: int = 1,
  cache: kv_cache.KVCache | None = None,
  prompt_bucket: int = 16,
  chunk: int = 8,
  return_cache: bool = False,
  timings: dict[str, float] | None = None,
) -> Iterator[Generation]:
  """`generate`, handing out the tokens every `chunk` decode steps (streaming: CLIs, servers).

  Yields the `Generation` so far after each chunk: host (numpy) copies, rows' tokens past their
  `lengths` are pad_id, `done` so far, no cache. The last one yielded is the result, exactly what
  `generate` returns for the same arguments (the same prefill and loop body; the loop is stopped
  and resumed with its carry, cache included, donated: tested bitwise), with its cache if
  `return_cache`. Arguments as `generate`'s; `timings` also counts the host syncs between chunks in
  'decode_s' (and excludes the time the caller spends between yields). Programs do not depend on
  `chunk` (the stop position is traced), and use the persistent compilation cache (a host callback
  in the loop would keep its program out of it).
  """
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1, got {chunk}')
  graphdef, state, prefill_args, cache_len, st = _setup(
    model, prompts, prompt_mask, config, key, num_samples, cache, prompt_bucket
  )
  n = st.max_new_tokens
  stop = np.int32(min(chunk, n))
  clock = {'decode_s': 0.0, 'decode_cpu_s': 0.0}
  if timings is None:
    prefill_fn = functools.partial(_prefill_start, graphdef, cache_len=cache_len, st=st)
    pre, loop = prefill_fn(*prefill_args)
    decode_fn = functools.partial(_decode_until, graphdef, st=st)
  else:
    t0 = time.perf_counter()
    prefill_fn = _prefill_start.lower(graphdef, *prefill_args, cache_len, st).compile()
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    pre, loop = jax.block_until_ready(prefill_fn(*prefill_args))
    timings['prefill_s'] = time.perf_counter() - t0
    timings['prefill_cpu_s'] = time.process_time() - c0
    t0 = time.perf_counter()
    decode_fn = _decode_until.lower(graphdef, state, pre, loop, stop, st).compile()
    timings['compile_s'] = compile_s + time.perf_counter() - t0
  while True:
    t0, c0 = time.perf_counter(), time.process_time()
    loop = decode_fn(state, pre, loop, stop)
    t, done = int(loop[0]), np.asarray(loop[4])
    finished = t >= n or bool(done.all())
    if not finished:
      snapshot = jax.tree.map(np.array, _decode_result(loop)[0])  # copies: the next call donates
    clock['decode_s'] += time.perf_counter() - t0
    clock['decode_cpu_s'] += time.process_time() - c0
    if timings is not None:
      timings.update(clock)
    if finished:
      yield _with_cache(*_decode_result(loop), return_cache)
      return
    yield snapshot
    stop = np.int32(min(t + chunk, n))


def cast_weights(model: nnx.Module, dtype: Any) -> nnx.Module:
  """A copy of `model` whose floating weight matrices are stored in `dtype` (e.g. bfloat16).

  The opt-in for batched rollouts: with bf16 matrices (norm scales and biases stay f32, the
  compute dtype, KV cache, attention, norms and logits stay as configured), every projection and
  the tied LM head multiply as bf16 x bf16 with f32 accumulation (`decoder.bf16_matmul`), which
  XLA:CPU sends to YNNPACK's AVX512-BF16 / AMX kernels: about half the f32 matmul time at 16-64
  rows on the Intel VM (`benchmarks/decode.py --jax_weights=float32,bfloat16`). Not bitwise f32
  (weights and activations are rounded to bf16 before each matmul); at one row it is no faster
  than f32 (the weight is re-packed on every call), so keep the f32 model for batch-1 decoding,
  training and anything compared bitwise.
  """
  graphdef, state = nnx.split(model)
  dtype = jnp.dtype(dtype)

  @jax.jit
  def cast(state):
    return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 else x,
      state,
    )

  return nnx.merge(graphdef, cast(state))
