"""Shared fixtures for the kv_press tests: synthetic streams written straight into a KV cache, a
tiny random decoder, and numpy references.

Synthetic entries (random keys and values at known positions, written with `KVCache.write` as the
decoder writes them) test the library without a model; the decoder tests use the same tiny
configurations as tests/common/sampling/kv_cache_test.py.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import sharding
from common.kv_press import memory
from common.kv_press import presses
from common.models import decoder
from common.sampling import kv_cache

CFG = decoder.DecoderConfig(
  vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)

# Every press with settings that exercise it on short streams.
ALL_PRESSES = (
  presses.StreamMem(max_frames=4),
  presses.StreamMem(max_frames=4, rows='max', heads='max', merge_source='all'),
  presses.Oracle(),
  presses.Oracle(span=3),
  presses.FIFO(),
  presses.Uniform(),
  presses.Random(),
  presses.StreamingLLM(sinks=2),
  presses.H2O(),
  presses.SnapKV(kernel_size=3),
  presses.TOVA(),
  presses.KeyNorm(),
  presses.FramePool(tokens_per_frame=2, max_frames=4),
)


def press_id(p) -> str:
  span = getattr(p, 'span', 1)
  return (
    type(p).__name__
    + ('-max' if getattr(p, 'rows', 'mean') == 'max' else '')
    + (f'-span{span}' if span > 1 else '')
  )


def empty(batch: int, slots: int, cfg=CFG) -> memory.Memory:
  return memory.Memory.init(kv_cache.KVCache.init(cfg, batch, slots))


def append(
  mem: memory.Memory,
  rng: np.random.Generator,
  frame,
  *,
  valid=None,
  pinned=False,
  transient=False,
  scale: float = 1.0,
) -> memory.Memory:
  """Appends random entries (one per frame id in `frame` [B, T]) as the decoder would: real tokens
  (valid) continue each row's positions; padding is written invalid and takes no position."""
  frame = np.asarray(frame, np.int32)
  b, t = frame.shape
  valid = np.ones((b, t), bool) if valid is None else np.asarray(valid, bool)
  cache = mem.cache
  kh, d = cache.layers[0].k.shape[1], cache.layers[0].k.shape[3]
  steps = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  positions = np.asarray(cache.next_position)[:, None] + steps
  for layer in range(cache.num_layers):
    k = jnp.asarray(rng.normal(0.0, scale, (b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(0.0, 1.0, (b, t, kh, d)), jnp.float32)
    cache = cache.write(layer, cache.length, k, v, jnp.asarray(positions), jnp.asarray(valid))
  cache = cache.advance(t, cache.next_position + jnp.asarray(valid.sum(1), jnp.int32))
  return mem.record(cache, jnp.asarray(frame), pinned=pinned, transient=transient)


def clip_frames(b: int, first_frame: int, frames_per_clip: int, tokens_per_frame: int):
  """[B, F*n] frame ids of one clip: frames first_frame.. each with tokens_per_frame tokens."""
  ids = first_frame + np.repeat(np.arange(frames_per_clip), tokens_per_frame)
  return np.broadcast_to(ids, (b, ids.size)).copy()


def queries(rng, mem: memory.Memory, n: int, cfg=CFG, scale: float = 1.0):
  """One random Queries per layer at the next n positions of each row."""
  b = mem.cache.batch
  pos = jnp.asarray(mem.cache.next_position)[:, None] + jnp.arange(n)
  return [
    memory.Queries.create(
      jnp.asarray(rng.normal(0.0, scale, (b, n, cfg.num_heads, cfg.head_dim)), jnp.float32),
      pos,
      cfg=cfg,
    )
    for _ in range(cfg.num_layers)
  ]


def held_positions(mem: memory.Memory, layer: int, row: int, head: int = 0) -> set[int]:
  info = mem.info[layer]
  ok = np.asarray(mem.cache.read(layer).valid[row])
  return set(np.asarray(info.position[row, head])[ok].tolist())


def entries(mem: memory.Memory, layer: int, row: int, head: int = 0) -> dict:
  """{(position, kind): (k, v)} of one layer/row/head's valid entries (storage-order free)."""
  e = mem.cache.read(layer)
  info = mem.info[layer]
  out = {}
  for s in np.nonzero(np.asarray(e.valid[row]))[0]:
    key = (int(info.position[row, head, s]), int(info.kind[row, head, s]))
    out[key] = (np.asarray(e.k[row, head, s]), np.asarray(e.v[row, head, s]))
  return out


def permute(mem: memory.Memory, perm: np.ndarray) -> memory.Memory:
  """The same memory with every layer's slots stored in another order (perm [B, S])."""
  perm = jnp.asarray(perm)
  layers, infos = [], []
  for layer, info in zip(mem.cache.layers, mem.info, strict=True):
    take_slot = lambda x: jnp.take_along_axis(x, perm, axis=1)  # noqa: E731
    take_kv = lambda x: jnp.take_along_axis(x, perm[:, None, :, None], axis=2)  # noqa: E731
    layers.append(
      kv_cache.LayerKV.from_keys(
        k=take_kv(layer.k),
        v=take_kv(layer.v),
        positions=take_slot(layer.positions),
        valid=take_slot(layer.valid),
      )
    )
    infos.append(jax.tree.map(lambda x: jnp.take_along_axis(x, perm[:, None, :], axis=2), info))
  cache = dataclasses.replace(mem.cache, layers=tuple(layers))
  return memory.Memory(cache=cache, info=tuple(infos))


# ---------------------------------------------------------------------------------------------------
# numpy references.


def np_attention(k, key_pos, key_mask, q, q_pos, scale):
  """[B, K, G, Q, S] softmax attention in float64 (k [B, K, S, D], q [B, Q, H, D])."""
  k = np.asarray(k, np.float64)
  q = np.asarray(q, np.float64)
  b, kh, s, d = k.shape
  nq, h = q.shape[1], q.shape[2]
  q = q.reshape(b, nq, kh, h // kh, d)
  logits = np.einsum('bqkgd,bksd->bkgqs', q, k) * scale
  mask = np.asarray(key_mask)[:, :, None, None, :] & (
    np.asarray(key_pos)[:, :, None, None, :] <= np.asarray(q_pos)[:, None, None, :, None]
  )
  logits = np.where(mask, logits, -np.inf)
  top = np.max(logits, axis=-1, keepdims=True)
  e = np.where(mask, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
  z = e.sum(-1, keepdims=True)
  return np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------
# A tiny random decoder (random parameters, as kv_cache_test.py builds them).


def build_model(cfg=CFG, seed: int = 0) -> decoder.Decoder:
  with sharding.unsharded():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    value = rng.normal(0.0, 0.1, x.shape)
    if 'scale' in jax.tree_util.keystr(path) and not cfg.norm_plus_one:
      value += 1.0
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@nnx.jit
def run_cached(model, tokens, cache):
  return model(tokens, cache=cache)
