"""StreamMem's streaming loop on the shared decoder (arXiv 2508.15717; core.md §5(a)).

The method is training-free: it is how the KV cache is filled, scored and pruned while a stream is
prefilled clip by clip, so that questions asked later are answered from a memory of fixed size.
`Streamer` runs it on any `common.models.decoder.Decoder` (SmolLM2, or the smoke model below):

    streamer = models.Streamer(model)
    mem = streamer.start(prefix, prefix_valid, capacity)          # pinned system/user prefix
    for each clip:                                                # one jitted call per clip
      mem, stats = streamer.step(mem, clip, valid, frame, proxy, proxy_valid, key,
                                 method=method, budget=budget)
    scores = streamer.answer(mem, qa, qa_valid, qa_target, qa_mask)   # n questions per memory

One step (`_step`), for a `Method` (a press from common.kv_press and where its queries come from):
  1. prefill the clip into the cache, attending over [pinned prefix, memory, clip] (step 3);
  2. for StreamMem, append the proxy tokens (the chat template `<|im_end|><|im_start|>assistant\\n`)
     as transient entries and read their RoPE-rotated queries per layer (step 3; the oracle appends
     the true question + template instead);
  3. press: score every held entry, old memory and new clip jointly, keep the top M/L per layer,
     merge each new frame into one prototype (steps 4-5; common.kv_press.memory.apply_press);
  4. drop the proxy (its KV is not stored, step 6) and restore the next position, so the proxy
     takes no position in the stream.
The cache has a static capacity (the budget plus one clip and the proxy), so every clip runs the
same compiled step and the memory is constant in stream length (step 7). Kept entries keep their
RoPE positions (step 8). Questions are answered from the memory without changing it (step 9):
`answer` repeats the memory once per question, so any number of questions share one memory.

`fact_lm` is the smoke runs' model: a small decoder trained once (cached outside the repo, like
common.models.tiny_lm) on short planted-fact streams (input_pipeline.FactLanguage), which then
streams 4-32x longer inputs training-free, as the paper's CPU-scale recipe has it (core.md §5(e)).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache as cache_lib
from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import sharding
from common.kv_press import frames
from common.kv_press import memory
from common.kv_press import presses
from common.models import decoder
from common.models import loader
from common.sampling import kv_cache
from projects.streammem import input_pipeline
from projects.streammem import losses

# Where a method's scoring queries come from.
QUERY_SOURCES = (
  'none',  # the press reads no queries (FIFO, uniform, random, key-norm, ...)
  'proxy',  # the chat template after the clip (StreamMem)
  'question',  # the true question + template (the oracle; not query-agnostic)
  'clip',  # the clip's own tokens (H2O's accumulated attention, TOVA's last token)
  'window',  # the clip's last `window` tokens (SnapKV's observation window)
)


@dataclasses.dataclass(frozen=True)
class Method:
  """One memory policy: name, press (None: full KV, nothing evicted), its query source."""

  name: str
  press: Any
  queries: str = 'none'
  window: int = 8

  def __post_init__(self):
    if self.queries not in QUERY_SOURCES:
      raise ValueError(f'queries={self.queries!r} not in {QUERY_SOURCES}')
    if self.press is not None and self.press.needs_queries and self.queries == 'none':
      raise ValueError(f'{self.name}: {type(self.press).__name__} needs a query source')

  @property
  def query_agnostic(self) -> bool:
    """The memory never depends on the questions (everything but the oracle)."""
    return self.queries != 'question'

  @property
  def uses_proxy(self) -> bool:
    return self.queries in ('proxy', 'question')


def method(
  name: str, *, frames_per_clip: int = 8, window: int = 8, sinks: int = 4, span: int = 15
) -> Method:
  """The method called `name` (METHODS); frames_per_clip sizes StreamMem's merge and FramePool;
  span: the `_span` variants' score pooling (presses.StreamMem.span: each entry's score averaged
  over `span` neighbours in position order, so that a fact's value survives with its key)."""
  f = max(frames_per_clip, 1)
  table = {
    'full': lambda: Method('full', None),
    'streammem': lambda: Method('streammem', presses.StreamMem(max_frames=f), 'proxy'),
    'streammem_nomerge': lambda: Method(
      'streammem_nomerge', presses.StreamMem(merging=False, max_frames=f), 'proxy'
    ),
    'streammem_max': lambda: Method(
      'streammem_max', presses.StreamMem(rows='max', heads='max', max_frames=f), 'proxy'
    ),
    'streammem_avgmerge': lambda: Method(
      'streammem_avgmerge', presses.StreamMem(max_frames=f, merge_weighting='uniform'), 'proxy'
    ),
    'streammem_span': lambda: Method(
      'streammem_span', presses.StreamMem(merging=False, max_frames=f, span=span), 'proxy'
    ),
    'oracle': lambda: Method('oracle', presses.Oracle(), 'question'),
    'oracle_span': lambda: Method('oracle_span', presses.Oracle(span=span), 'question'),
    'fifo': lambda: Method('fifo', presses.FIFO()),
    'uniform': lambda: Method('uniform', presses.Uniform()),
    'random': lambda: Method('random', presses.Random()),
    'streaming_llm': lambda: Method('streaming_llm', presses.StreamingLLM(sinks=sinks)),
    'h2o': lambda: Method('h2o', presses.H2O(), 'clip'),
    'snapkv': lambda: Method('snapkv', presses.SnapKV(), 'window', window=window),
    'tova': lambda: Method('tova', presses.TOVA(), 'clip'),
    'keynorm': lambda: Method('keynorm', presses.KeyNorm()),
    'framepool': lambda: Method('framepool', presses.FramePool(max_frames=f), 'none'),
  }
  if name not in table:
    raise config_lib.ConfigError(f'unknown method {name!r}; known: {", ".join(table)}')
  return table[name]()


METHODS = (
  'full',
  'streammem',
  'streammem_nomerge',
  'streammem_max',
  'streammem_avgmerge',
  'streammem_span',
  'oracle',
  'oracle_span',
  'fifo',
  'uniform',
  'random',
  'streaming_llm',
  'h2o',
  'snapkv',
  'tova',
  'keynorm',
  'framepool',
)


def press_budget(budget: int | float) -> memory.Budget:
  """A run's budget: an int is entries per layer (the paper's fixed memory), a float the fraction
  of each layer's held entries evicted at every clip (kvpress's compression_ratio; the pinned
  prefix counts among the held entries and is never evicted)."""
  if isinstance(budget, float):
    return memory.Budget(compression_ratio=budget)
  return memory.Budget(layer_tokens=max(int(budget), 1))


def ratio_held(ratio: float, *, prefix: int, stream: int, clip: int) -> int:
  """The most entries a layer can hold after any clip's press under a ratio budget: held entries
  n follow n <- floor((n + clip) (1 - ratio)) from the prefix (the press's float32 rule), which
  settles near clip (1 - ratio) / ratio, so the memory stays bounded whatever the stream length."""
  keep = np.float32(1.0 - ratio)
  n = most = prefix
  for _ in range(-(-stream // clip)):
    n = int(np.floor(np.float32(n + clip) * keep))
    most = max(most, n)
  return most


def capacity(
  method_: Method, budget: int | float, *, prefix: int, stream: int, clip: int, extra: int
) -> int:
  """Cache slots a method needs: a pressed memory holds its per-layer budget (a ratio budget:
  `ratio_held`) plus one clip and the proxy (or, afterwards, the question); full KV holds every
  clip, the last one padded to clip length (padding occupies slots, invalid). `extra` = the
  longest proxy or question + answer appended at once."""
  if method_.press is None:
    return prefix + -(-stream // clip) * clip + extra
  if isinstance(budget, float):
    return ratio_held(budget, prefix=prefix, stream=stream, clip=clip) + clip + extra
  return max(budget, prefix) + clip + extra


def frame_ids(start: int, length: int, frame_tokens: int, batch: int) -> np.ndarray:
  """[B, length] frame id of each stream token from offset `start`: token i belongs to frame
  i // frame_tokens (StreamMem merges per frame); frame_tokens 0 gives frames.TEXT (no merging)."""
  if frame_tokens <= 0:
    return np.full((batch, length), frames.TEXT, np.int32)
  ids = (start + np.arange(length)) // frame_tokens
  return np.broadcast_to(ids.astype(np.int32), (batch, length)).copy()


# ---------------------------------------------------------------------------------------------------
# The jitted pieces.


def _positions(next_position: jax.Array, valid: jax.Array) -> jax.Array:
  """The decoder's default positions for appended tokens: real tokens continue each row."""
  steps = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
  return next_position[:, None] + jnp.maximum(steps, 0)


def _hidden(model, tokens, patches=None, **kw):
  """model.hidden_states, with patch inputs for a VideoLM (visual tokens)."""
  if patches is not None:
    return model.hidden_states(tokens, patches=patches, **kw)
  return model.hidden_states(tokens, **kw)


def _append(
  model,
  mem: memory.Memory,
  tokens,
  valid,
  frame=None,
  *,
  pinned=False,
  transient=False,
  patches=None,
):
  """Prefills `tokens` into the memory's cache (no logits) and labels the new entries; returns
  (memory, one memory.Queries per layer: the tokens' RoPE-rotated queries)."""
  positions = _positions(mem.cache.next_position, valid)
  with decoder.capture_queries() as qs:
    _, cache = _hidden(
      model, tokens, patches, positions=positions, cache=mem.cache, input_mask=valid
    )
  mem = mem.record(cache, frame, pinned=pinned, transient=transient, num_tokens=tokens.shape[1])
  queries = [memory.Queries.create(q, positions, valid=valid, cfg=model.cfg) for q in qs]
  return mem, queries


def _window(q: memory.Queries, n: int) -> memory.Queries:
  return dataclasses.replace(q, q=q.q[:, -n:], positions=q.positions[:, -n:], valid=q.valid[:, -n:])


def _start(graphdef, state, prefix, prefix_valid, empty):
  model = nnx.merge(graphdef, state)
  mem, _ = _append(model, memory.Memory.init(empty), prefix, prefix_valid, pinned=True)
  return mem


def _step(
  graphdef, state, mem, clip, clip_valid, frame, proxy, proxy_valid, key, patches, method_, budget
):
  model = nnx.merge(graphdef, state)
  mem, clip_queries = _append(model, mem, clip, clip_valid, frame, patches=patches)
  if method_.press is None:  # full KV: nothing to press
    return mem, None
  end = mem.cache.next_position
  queries = None
  if method_.uses_proxy:
    mem, queries = _append(model, mem, proxy, proxy_valid, transient=True)
  elif method_.queries == 'clip':
    queries = clip_queries
  elif method_.queries == 'window':
    queries = [_window(q, method_.window) for q in clip_queries]
  mem, stats = memory.apply_press(mem, method_.press, budget, queries, key=key)
  # The proxy's KV is not stored and it takes no position in the stream (step 6).
  mem = dataclasses.replace(mem, cache=dataclasses.replace(mem.cache, next_position=end))
  return mem, stats


def _answer(graphdef, state, mem, tokens, valid, target, mask):
  model = nnx.merge(graphdef, state)
  b, n, t = tokens.shape
  flat = lambda x: x.reshape(b * n, t)  # noqa: E731 - row b * n + j is question j of stream b
  cache = mem.cache.repeat(n)
  positions = _positions(cache.next_position, flat(valid))
  logits, _ = model(flat(tokens), positions=positions, cache=cache, input_mask=flat(valid))
  out = losses.answer_scores(logits, flat(target), flat(mask))
  return jax.tree.map(lambda x: x.reshape(b, n), out)


class Streamer:
  """The streaming loop's jitted functions for one model (graphdef + parameter state).

  With a mesh (`mesh`, `rules`), inputs are placed batch-sharded and the cache follows its logical
  axes (common.kv_press shards rows over 'data'), so one stream per device row runs in parallel.
  """

  def __init__(self, model: nnx.Module, *, mesh=None, rules=sharding.DEFAULT_RULES):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh, rules))
    self._start = jax.jit(_start, static_argnums=0)
    self._step = jax.jit(_step, static_argnums=(0, 10, 11), donate_argnums=2)
    self._answer = jax.jit(_answer, static_argnums=0)

  def _context(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(sharding.axis_rules(self.rules))
    return stack

  def put(self, x):
    """A host array as the step's input: batch-sharded on the mesh (rows first), else as is."""
    x = np.asarray(x)
    if self.mesh is None or x.ndim == 0:
      return jnp.asarray(x)
    return sharding.global_rows(x, self.mesh, self.rules)

  def empty(self, batch: int, slots: int) -> kv_cache.KVCache:
    with self._context():
      return jax.jit(kv_cache.KVCache.init, static_argnums=(0, 1, 2))(self.cfg, batch, slots)

  def start(self, prefix, prefix_valid, slots: int) -> memory.Memory:
    """A memory of `slots` slots per layer holding the pinned prefix [B, P]."""
    empty = self.empty(np.shape(prefix)[0], slots)
    with self._context():
      return self._start(self.graphdef, self.state, self.put(prefix), self.put(prefix_valid), empty)

  def step(
    self, mem, clip, clip_valid, frame, proxy, proxy_valid, key, *, method, budget, patches=None
  ):
    """One clip under `method` at `budget` (memory.Budget); `mem` is donated (do not reuse it).
    patches [B, clip, P]: the clip's visual inputs (VideoLM). Returns (memory, memory.PressStats
    or None for full KV)."""
    with self._context():
      return self._step(
        self.graphdef,
        self.state,
        mem,
        self.put(clip),
        self.put(clip_valid),
        self.put(frame),
        self.put(proxy),
        self.put(proxy_valid),
        key,
        None if patches is None else self.put(patches),
        method,
        budget,
      )

  def answer(self, mem, tokens, valid, target, mask) -> dict[str, jax.Array]:
    """Scores n questions per stream from the memory (which is left as it was): tokens, valid,
    target, mask [B, n, T] (input_pipeline.Episodes.qa*). Returns {'loglik', 'exact'} [B, n]."""
    with self._context():
      return self._answer(
        self.graphdef,
        self.state,
        mem,
        self.put(tokens),
        self.put(valid),
        self.put(target),
        self.put(mask),
      )


def memory_digest(mem: memory.Memory) -> str:
  """sha256 of every array of a memory (cache and slot metadata): equal digests = bitwise equal."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(jax.device_get(mem)):
    x = np.asarray(x)
    h.update(str((x.dtype, x.shape)).encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def memory_bytes(mem: memory.Memory) -> int:
  """Bytes the memory occupies (cache + slot metadata); static, whatever the stream length."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(mem)))


def memory_contents(mem: memory.Memory) -> dict[str, np.ndarray]:
  """What the memory holds, per layer, row and slot ([L, B, S] numpy; kv head 0, which is every
  head's unless a per-head budget ran): `held` (a valid entry that is neither pinned nor a
  transient proxy entry: the stream's memory proper), its RoPE `position`, `frame` id and `kind`
  (common.kv_press.memory.TOKEN or PROTOTYPE). For showing which frames' tokens survive."""
  mem = jax.device_get(mem)
  out = {'held': [], 'position': [], 'frame': [], 'kind': []}
  for layer, info in zip(mem.cache.layers, mem.info, strict=True):
    kind = np.asarray(info.kind)[:, 0]
    held = np.asarray(layer.valid) & ~np.asarray(info.pinned)[:, 0] & (kind != memory.TRANSIENT)
    out['held'].append(held)
    out['position'].append(np.asarray(info.position)[:, 0])
    out['frame'].append(np.asarray(info.frame)[:, 0])
    out['kind'].append(kind)
  return {k: np.stack(v) for k, v in out.items()}


def filter_clip(
  patches: np.ndarray,
  valid: np.ndarray,
  frame_tokens: int,
  threshold: float,
  state: tuple[jax.Array, jax.Array] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[jax.Array, jax.Array]]:
  """StreamMem's input-frame filtering (step 1) on one clip of visual inputs, before encoding:
  a frame whose patch vector (all its tokens' patches, concatenated) has cosine similarity above
  `threshold` to the last kept frame, of this clip or an earlier one, is dropped, and averaged into
  that kept frame when both are in this clip (common.kv_press.frames.filter_frames).

  patches [B, T, P], valid [B, T] with T a multiple of frame_tokens; state: the previous clip's
  (last, has_last) or None. Returns (patches with kept frames averaged, valid with the dropped
  frames' tokens invalid, keep [B, T // frame_tokens], state for the next clip). A dropped frame's
  tokens are never prefilled and take no RoPE position."""
  b, t, p = patches.shape
  if frame_tokens < 1 or t % frame_tokens:
    raise ValueError(
      f'frame filtering needs clips of whole frames: clip of {t} tokens, frames of {frame_tokens}'
    )
  f = t // frame_tokens
  feats = jnp.asarray(patches, jnp.float32).reshape(b, f, frame_tokens * p)
  frame_valid = np.asarray(valid).reshape(b, f, frame_tokens).all(-1)
  last, has_last = (None, None) if state is None else state
  out = frames.filter_frames(
    feats, last, has_last, valid=jnp.asarray(frame_valid), threshold=threshold, average=True
  )
  keep = np.asarray(out.keep)
  new_patches = np.asarray(out.features, np.float32).reshape(b, t, p)
  new_valid = np.asarray(valid) & np.repeat(keep, frame_tokens, axis=1)
  return new_patches, new_valid, keep, (out.last, out.has_last)


# ---------------------------------------------------------------------------------------------------
# Streaming one batch of episodes under one method.


@dataclasses.dataclass(frozen=True)
class StreamResult:
  """What `run_stream` measured: per-question scores [B, n], per-clip kept entries [clips, L, B]
  (max over heads), memory bytes after every clip, the final memory's digest, and the frames that
  input-frame filtering dropped [B, frames] (None without filtering)."""

  loglik: np.ndarray
  exact: np.ndarray
  kept: np.ndarray
  memory_bytes: list[int]
  digest: str
  dropped: np.ndarray | None = None


def run_stream(
  streamer: Streamer,
  episodes: input_pipeline.Episodes,
  method_: Method,
  layer_budget: int | float,
  *,
  clip_len: int,
  frame_tokens: int,
  key: jax.Array,
  slots: int | None = None,
  frame_filter: float = 0.0,
  on_clip: Callable[[int, memory.Memory], None] | None = None,
) -> StreamResult:
  """Streams every episode of the batch clip by clip under `method_`, then answers its questions.

  slots: the cache's size (default: what the method needs, `capacity`). Two runs with the same
  size compute in the same order, so e.g. a budget above the stream reproduces full KV bitwise;
  across sizes the masked slots change only the summation order (~1e-7).
  frame_filter: StreamMem's input-frame filtering threshold (the paper's delta = 0.95; 0: off):
  frames of visual tokens (episodes with patches) that repeat the last kept frame are dropped
  before encoding (`filter_clip`); needs clip_len a multiple of frame_tokens.
  on_clip(c, memory): called after clip c's step with the memory (do not keep it: the next step
  donates it; copy what you need, e.g. `memory_contents`).

  Query-agnostic methods stream once per episode and answer all n questions from that one memory;
  the oracle streams once per question (its proxy is that question), as rows b * n + j.
  """
  e = episodes
  b, n = e.batch, e.num_questions
  length = e.stream.shape[1]
  patches = e.patches
  if method_.query_agnostic:
    rows, stream = b, e.stream
    prefix, prefix_valid = e.prefix, e.prefix_valid
    proxy = np.broadcast_to(e.proxy, (b, e.proxy.size))
    proxy_valid = np.ones(proxy.shape, bool)
  else:
    rows, stream = b * n, np.repeat(e.stream, n, axis=0)
    patches = None if patches is None else np.repeat(patches, n, axis=0)
    prefix, prefix_valid = np.repeat(e.prefix, n, 0), np.repeat(e.prefix_valid, n, 0)
    proxy, proxy_valid = e.oracle.reshape(b * n, -1), e.oracle_valid.reshape(b * n, -1)
  extra = max(proxy.shape[1], e.qa.shape[2])
  need = capacity(
    method_, layer_budget, prefix=prefix.shape[1], stream=length, clip=clip_len, extra=extra
  )
  if slots is not None and slots < need:
    raise ValueError(f'slots={slots} < the {need} this method needs')
  slots = need if slots is None else slots
  budget = press_budget(layer_budget)
  if method_.press is not None:  # a clear error before anything runs (pinned never evicted)
    budget.check_pinned(streamer.cfg.num_layers, int(np.asarray(prefix_valid).sum(1).max()))
  if frame_filter:
    if patches is None:
      raise ValueError('frame_filter needs visual inputs (episodes with patches)')
    if frame_tokens < 1 or clip_len % frame_tokens:
      raise ValueError(
        f'frame_filter needs clips of whole frames: clip_len {clip_len}, frame_tokens '
        f'{frame_tokens}'
      )
  mem = streamer.start(prefix, prefix_valid, slots)
  kept, sizes, dropped, filter_state = [], [], [], None
  for c, start in enumerate(range(0, length, clip_len)):
    clip = stream[:, start : start + clip_len]
    valid = np.ones(clip.shape, bool)
    clip_patches = None if patches is None else patches[:, start : start + clip_len]
    if clip.shape[1] < clip_len:  # the last, shorter clip: padded, same compiled step
      pad = clip_len - clip.shape[1]
      clip = np.pad(clip, ((0, 0), (0, pad)))
      valid = np.pad(valid, ((0, 0), (0, pad)))
      if clip_patches is not None:
        clip_patches = np.pad(clip_patches, ((0, 0), (0, pad), (0, 0)))
    frame = frame_ids(start, clip_len, frame_tokens, rows)
    if frame_filter:
      clip_patches, valid, keep, filter_state = filter_clip(
        clip_patches, valid, frame_tokens, frame_filter, filter_state
      )
      real = -(-min(clip_len, length - start) // frame_tokens)  # the clip's unpadded frames
      dropped.append(~keep[:, :real])
    mem, stats = streamer.step(
      mem,
      clip,
      valid,
      frame,
      proxy,
      proxy_valid,
      jax.random.fold_in(key, c),
      method=method_,
      budget=budget,
      patches=clip_patches,
    )
    if stats is not None:
      stats = jax.device_get(stats)
      stats.check()  # raises BudgetError if pinned entries overflowed (under jit it only reports)
      kept.append(np.asarray(stats.kept))
    sizes.append(memory_bytes(mem))
    if on_clip is not None:
      on_clip(c, mem)
  digest = memory_digest(mem)
  if method_.query_agnostic:
    scores = streamer.answer(mem, e.qa, e.qa_valid, e.qa_target, e.qa_mask)
    scores = jax.device_get(scores)
    if memory_digest(mem) != digest:
      raise AssertionError('answering changed the memory')
  else:
    qa = lambda x: x.reshape(b * n, 1, -1)  # noqa: E731 - one question per oracle row
    scores = streamer.answer(mem, qa(e.qa), qa(e.qa_valid), qa(e.qa_target), qa(e.qa_mask))
    scores = jax.tree.map(lambda x: np.asarray(x).reshape(b, n), jax.device_get(scores))
  return StreamResult(
    loglik=np.asarray(scores['loglik'], np.float64),
    exact=np.asarray(scores['exact'], np.float64),
    kept=np.stack(kept) if kept else np.zeros((0,)),
    memory_bytes=sizes,
    digest=digest,
    dropped=np.concatenate(dropped, axis=1) if dropped else None,
  )


# ---------------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass(frozen=True)
class FactLMConfig:
  """The smoke model: decoder shapes, the planted-fact language, and its training."""

  num_keys: int = 8
  num_values: int = 8
  num_filler: int = 32
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 128
  seq_len: int = 48
  max_facts: int = 4
  max_position: int = 1024
  steps: int = 1500
  batch_size: int = 64
  lr: float = 3e-3
  seed: int = 0


def fact_lm_config(config: ml_collections.ConfigDict) -> FactLMConfig:
  fields = {f.name for f in dataclasses.fields(FactLMConfig)}
  values = {**config.model.to_dict(), **config.data.to_dict()}
  return FactLMConfig(**{k: v for k, v in values.items() if k in fields})


def fact_decoder_config(cfg: FactLMConfig, dtype: str = 'float32') -> decoder.DecoderConfig:
  lang = input_pipeline.FactLanguage(cfg.num_keys, cfg.num_values, cfg.num_filler)
  return decoder.DecoderConfig(
    vocab_size=lang.vocab_size,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.d_model // cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    dtype=dtype,
  )


def _train_fact_lm(cfg: FactLMConfig) -> tuple[dict, list[float]]:
  """Trains on one device (no mesh); returns (parameter dict, loss curve)."""
  lang = input_pipeline.FactLanguage(cfg.num_keys, cfg.num_values, cfg.num_filler)
  with sharding.unsharded():
    model = decoder.Decoder(fact_decoder_config(cfg), rngs=nnx.Rngs(cfg.seed))
    warmup = min(100, cfg.steps // 10)
    tx = optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1)), b2=0.98
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @cache_lib.fixture_step
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lambda m: losses.answer_loss(m, batch)[0])(model)
    opt.update(model, grads)
    return loss

  curve = []
  for i in range(cfg.steps):
    first = i * cfg.batch_size
    examples = [
      lang.train_example(
        cfg.seed,
        j,
        seq_len=cfg.seq_len,
        max_facts=cfg.max_facts,
        max_position=cfg.max_position,
      )
      for j in range(first, first + cfg.batch_size)
    ]
    batch = {k: np.stack([x[k] for x in examples]) for k in examples[0]}
    curve.append(float(step(model, opt, batch)))
    if (i + 1) % 250 == 0:
      logging.info('fact LM step %d/%d: loss %.4f', i + 1, cfg.steps, np.mean(curve[-50:]))
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def fact_lm(cfg: FactLMConfig, dtype: str = 'float32') -> tuple[decoder.Decoder, list[float]]:
  """The smoke model, trained once per machine and config and cached outside the repo (its key
  hashes the config, this module's training code and the process's numerics)."""
  key = hashlib.sha256(
    (
      json.dumps(dataclasses.asdict(cfg), sort_keys=True)
      + cache_lib.code_fingerprint(
        _train_fact_lm,
        input_pipeline.FactLanguage,
        losses.answer_loss,
        decoder,
        cache_lib.fixture_step,
      )
      + cache_lib.numerics_fingerprint()
    ).encode()
  ).hexdigest()[:20]
  path = cache_lib.cache_dir('streammem_fact_lm') / f'{key}.npz'
  with sharding.unsharded():
    model = decoder.Decoder(fact_decoder_config(cfg, dtype), rngs=nnx.Rngs(cfg.seed))

  def train():
    logging.info(
      'training the StreamMem smoke model (%d steps; once per machine and config, cached in %s)',
      cfg.steps,
      path.parent,
    )
    params, curve = _train_fact_lm(cfg)
    flat = cache_lib.tree_to_arrays(params)
    flat['__loss_curve__'] = np.asarray(curve)
    return flat

  flat = cache_lib.load_or_compute(path, train)
  curve = [float(x) for x in flat.pop('__loss_curve__')]
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, cache_lib.arrays_to_tree(flat, state.to_pure_dict()))
  nnx.update(model, state)
  return model, curve


class VideoLM(decoder.Decoder):
  """The shared decoder with visual tokens: a token whose id is `vis_token` is embedded by a small
  patch encoder (a two-layer MLP of its patch pixels, `patches` [B, T, P]) instead of a table row;
  every other
  token (text) as usual. The video evaluation's small video-language transformer, trained in the
  repo (no pretrained vision encoder ships offline). Everything after the embedding (layers, KV
  cache, RoPE, `decoder.capture_queries`) is the shared decoder's, so the presses and the
  streaming loop run on it unchanged."""

  def __init__(self, cfg: decoder.DecoderConfig, patch_dim: int, vis_token: int, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.vis_token = vis_token
    # The patch encoder: a two-layer MLP per patch (a minimal vision encoder), then into d_model.
    self.patch_hidden = nnx.Linear(
      patch_dim,
      cfg.mlp_dim,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, 'mlp')),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('mlp',)),
      rngs=rngs,
    )
    self.patch_embed = nnx.Linear(
      cfg.mlp_dim,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ('mlp', 'embed')),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('embed',)),
      rngs=rngs,
    )

  def embed_inputs(self, tokens: jax.Array, patches: jax.Array | None) -> jax.Array:
    table = self.embed.embedding[...]
    x = jnp.take(table, tokens, axis=0).astype(self.cfg.compute_dtype)
    if patches is not None:
      h = jax.nn.gelu(self.patch_hidden(patches.astype(self.cfg.compute_dtype)))
      vis = self.patch_embed(h)
      x = jnp.where((tokens == self.vis_token)[..., None], vis.astype(x.dtype), x)
    return x

  def hidden_states(
    self,
    tokens,
    *,
    patches=None,
    positions=None,
    cache=None,
    input_mask=None,
    **unsupported,
  ):
    """Final-normed hidden states (and the cache, with one), as `Decoder.hidden_states`; causal,
    no segments or extra masks."""
    if any(v is not None for v in unsupported.values()):
      raise ValueError(f'VideoLM.hidden_states does not take {sorted(unsupported)}')
    x = self.embed_inputs(tokens, patches)
    b, t, _ = x.shape
    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = decoder.make_attention_mask(t)
      for layer in self.layers:
        x = layer(x, positions, mask)
      return self.final_norm(x)
    input_mask = jnp.ones((b, t), bool) if input_mask is None else input_mask.astype(bool)
    if positions is None:
      steps = jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
      positions = cache.next_position[:, None] + jnp.maximum(steps, 0)
    positions = positions.astype(jnp.int32)
    for layer in self.layers:
      x, cache = layer(x, positions, None, cache, input_mask=input_mask, causal=True)
    last = jnp.max(jnp.where(input_mask, positions + 1, 0), axis=1)
    cache = cache.advance(t, jnp.maximum(cache.next_position, last))
    return self.final_norm(x), cache

  def __call__(self, tokens, *, patches=None, positions=None, cache=None, input_mask=None):
    out = self.hidden_states(
      tokens, patches=patches, positions=positions, cache=cache, input_mask=input_mask
    )
    if cache is not None:
      h, cache = out
      return self.logits_from_hidden(h), cache
    return self.logits_from_hidden(out)


def video_language(config: ml_collections.ConfigDict) -> input_pipeline.VideoEvents:
  v = config.video
  return input_pipeline.VideoEvents(
    size=v.size,
    grid=v.grid,
    square=v.square,
    stride=v.stride,
    questions=input_pipeline.question_kinds(v.questions),
  )


def video_decoder_config(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
  m = config.model
  return decoder.DecoderConfig(
    vocab_size=video_language(config).vocab_size,
    d_model=m.d_model,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads,
    head_dim=m.d_model // m.num_heads,
    mlp_dim=m.mlp_dim,
    dtype=config.dtype,
  )


def create_video_lm(config: ml_collections.ConfigDict, *, seed: int | None = None) -> VideoLM:
  """The seeded video-language model of config.model (its logical axes follow the mesh rules)."""
  lang = video_language(config)
  return VideoLM(
    video_decoder_config(config),
    lang.patch_dim,
    lang.VIS,
    rngs=nnx.Rngs(config.seed if seed is None else seed),
  )


def load_video_run(workdir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, VideoLM]:
  """A video run's config (its config.json) and trained model (its newest checkpoint's
  parameters): the models the full suite trained, for sweeps that stream without training."""
  path = pathlib.Path(workdir)
  if not (path / 'config.json').is_file():
    raise config_lib.ConfigError(f'{path} is not a run workdir (no config.json)')
  saved = config_lib.with_added_keys(json.loads((path / 'config.json').read_text()))
  config = ml_collections.ConfigDict(saved)
  if config.data.source != 'video':
    raise config_lib.ConfigError(f'{path}: data.source={config.data.source!r}, not a video run')
  with sharding.unsharded():
    model = create_video_lm(config)
  abstract = ckpt_lib.abstract_like(nnx.state(model))
  nnx.update(model, ckpt_lib.restore_params(path / 'checkpoints', abstract))
  return config, model


def tiny_streamer(seed: int = 0) -> tuple[input_pipeline.FactLanguage, Streamer]:
  """(the default FactLanguage, a Streamer over a tiny random 2-layer decoder of its vocabulary):
  what the invariant claims and tests stream (the invariants hold for any weights)."""
  lang = input_pipeline.FactLanguage()
  cfg = decoder.DecoderConfig(
    vocab_size=lang.vocab_size,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
  )
  with sharding.unsharded():
    return lang, Streamer(decoder.Decoder(cfg, rngs=nnx.Rngs(seed)))


def create_model(config: ml_collections.ConfigDict, mesh=None, rules=sharding.DEFAULT_RULES):
  """(decoder, tokenizer or None) of config.model.kind: 'fact_lm' (the cached smoke model) or
  'pretrained' (config.model.name, e.g. smollm2, via common.models.loader)."""
  kind = config.model.kind
  if kind == 'fact_lm':
    return fact_lm(fact_lm_config(config), config.dtype)[0], None
  if kind == 'pretrained':
    model, _, tok = loader.load_pretrained(
      config.model.name, mesh=mesh, rules=rules, dtype=config.dtype
    )
    return model, tok
  raise config_lib.ConfigError(f"model.kind={kind!r}; expected 'fact_lm' or 'pretrained'")
