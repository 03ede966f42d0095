"""Tests for common.sampling.kv_cache and the decoder's cached path, on tiny random models.

The reference is always the plain (cache-free) forward pass of the same model: prefill followed by
one-token steps must reproduce its logits for every family (llama, gemma3 with a sliding window
shorter than the sequence, qwen2 with biases), and cache surgery (evict, compact, insert) must give
what a full forward pass with the equivalent attention mask gives. One jitted prefill and one jitted
step serve all shapes of a config, since XLA compiles dominate on 2 CPU cores.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.models import decoder
from common.sampling import kv_cache

LLAMA = decoder.DecoderConfig(
  vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
GEMMA3 = dataclasses.replace(
  LLAMA,
  num_kv_heads=1,
  activation='gelu_tanh',
  qk_norm=True,
  post_norms=True,
  embed_scale=True,
  norm_plus_one=True,
  sliding_window=3,
  sliding_window_pattern=2,  # layer 0 local (window 3 < sequence), layer 1 global
  rope_theta=1e6,
  rope_local_theta=1e4,
  query_pre_attn_scalar=16.0,
  attn_logit_softcap=50.0,
)
QWEN2 = dataclasses.replace(LLAMA, qkv_bias=True, rope_theta=1e6, tie_embeddings=False)
B, T, PREFILL, S = 2, 12, 5, 16


def _build(cfg, seed=0):
  """Random (not initializer) parameters, so norms and biases matter too."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    value = rng.normal(0.0, 0.1, x.shape)
    if 'scale' in jax.tree_util.keystr(path) and not cfg.norm_plus_one:
      value += 1.0
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@nnx.jit
def _full(model, tokens, attention_mask):
  return model(tokens, attention_mask=attention_mask)


@nnx.jit
def _cached(model, tokens, cache):
  return model(tokens, cache=cache)


def _tokens(shape=(B, T), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 100, shape), jnp.int32)


def _causal(t=T):
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (B, t, t))


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize('cfg', [LLAMA, GEMMA3, QWEN2], ids=['llama', 'gemma3', 'qwen2'])
def test_prefill_then_steps_match_full_forward(cfg):
  model = _build(cfg)
  tokens = _tokens()
  ref = _full(model, tokens, _causal())
  cache = kv_cache.KVCache.init(cfg, B, S)
  logits, cache = _cached(model, tokens[:, :PREFILL], cache)
  steps = [logits]
  for t in range(PREFILL, T):
    logits, cache = _cached(model, tokens[:, t : t + 1], cache)
    steps.append(logits)
  _close(jnp.concatenate(steps, axis=1), ref)
  assert int(cache.length) == T
  np.testing.assert_array_equal(cache.next_position, [T, T])
  np.testing.assert_array_equal(cache.num_valid(), np.full((cfg.num_layers, B), T))
  entries = cache.read(0)
  assert entries.k.shape == (B, cfg.num_kv_heads, S, cfg.head_dim)
  assert entries.k.dtype == jnp.float32
  np.testing.assert_array_equal(entries.positions[:, :T], np.broadcast_to(np.arange(T), (B, T)))
  assert not np.any(entries.valid[:, T:])


def test_cache_outputs_and_argument_checks():
  model = _build(LLAMA)
  cache = kv_cache.KVCache.init(LLAMA, B, S)
  out = nnx.eval_shape(lambda: model(_tokens((B, 2)), cache=cache, return_hidden=True))
  assert len(out) == 3 and out[1].shape == (B, 2, 32) and isinstance(out[2], kv_cache.KVCache)
  with pytest.raises(ValueError, match='segment_ids'):
    nnx.eval_shape(lambda: model(_tokens((B, 2)), cache=cache, segment_ids=jnp.ones((B, 2), int)))
  with pytest.raises(ValueError, match='input_mask'):
    nnx.eval_shape(lambda: model(_tokens((B, 2)), input_mask=jnp.ones((B, 2), bool)))


def _prefilled(model, n=8):
  tokens = _tokens((B, n + 1), seed=1)
  _, cache = _cached(model, tokens[:, :n], kv_cache.KVCache.init(model.cfg, B, S))
  return tokens, cache


def test_evict_hides_entries_from_later_queries_only():
  model = _build(LLAMA)
  tokens, cache = _prefilled(model)
  evicted = np.zeros((B, S), bool)
  evicted[0, [1, 4]] = True  # row 0 forgets tokens 1 and 4; row 1 keeps everything
  got, _ = _cached(model, tokens[:, 8:], cache.evict(jnp.asarray(evicted)))
  # Reference: the earlier tokens saw 1 and 4 when they were prefilled; only the new query does not.
  mask = np.array(_causal(9))
  mask[0, 8, [1, 4]] = False
  ref = _full(model, tokens, jnp.asarray(mask))
  _close(got[:, 0], ref[:, 8])
  full, _ = _cached(model, tokens[:, 8:], cache)
  assert not np.allclose(full[0], got[0]) and np.allclose(full[1], got[1])
  np.testing.assert_array_equal(cache.evict(jnp.asarray(evicted)).num_valid(), [[6, 8], [6, 8]])


def test_per_layer_evict_compact_and_free_slots():
  model = _build(LLAMA)
  tokens, cache = _prefilled(model)
  masks = np.zeros((2, B, S), bool)
  masks[0, 0, [0, 2]] = True  # layer 0 only
  masks[1, 1, 7] = True  # layer 1 only
  evicted = cache.evict(jnp.asarray(masks))
  np.testing.assert_array_equal(evicted.num_valid(), [[6, 8], [8, 7]])
  np.testing.assert_array_equal(evicted.free_slots(0, 3), [[0, 2, 8], [8, 9, 10]])
  np.testing.assert_array_equal(evicted.free_slots(0, S)[1, -1], S)  # row 1 has only 8 free
  compact = evicted.compact()
  assert int(compact.length) == 8
  layer0 = compact.read(0)
  np.testing.assert_array_equal(layer0.positions[0, :6], [1, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(layer0.valid.sum(-1), [6, 8])
  _close(layer0.k[0, :, :6], cache.read(0).k[0][:, jnp.asarray([1, 3, 4, 5, 6, 7])], atol=0)
  np.testing.assert_array_equal(layer0.kt[0, ..., 6:], 0.0)  # freed slots are zeroed
  np.testing.assert_array_equal(layer0.v[0, :, 6:], 0.0)
  # Compaction moves entries but changes no attention result.
  a, _ = _cached(model, tokens[:, 8:], evicted)
  b, after = _cached(model, tokens[:, 8:], compact)
  _close(a, b)
  assert int(after.length) == 9
  # Appends continue after the longest surviving row (8 entries in row 1).
  np.testing.assert_array_equal(after.read(0).positions[:, 8], [8, 8])


@jax.jit
def _moved(cache, slots):
  """Every entry of `cache` re-inserted at `slots` of an empty cache (token-major k, v)."""
  out = kv_cache.KVCache.init(LLAMA, B, S)
  for layer in range(LLAMA.num_layers):
    e = cache.read(layer)
    k, v = (jnp.swapaxes(x[:, :, : slots.shape[1]], 1, 2) for x in (e.k, e.v))
    out = out.insert(layer, slots, k, v, e.positions[:, : slots.shape[1]])
  return out


def test_insert_at_arbitrary_slots_keeps_positions():
  model = _build(LLAMA)
  tokens, cache = _prefilled(model)
  ref, _ = _cached(model, tokens[:, 8:], cache)
  # Move every entry to a scrambled slot of an empty cache; stored positions keep the meaning.
  perm = jnp.asarray(np.random.default_rng(0).permutation(S)[:8])
  moved = _moved(cache, jnp.broadcast_to(perm, (B, 8)))
  assert int(moved.length) == int(perm.max()) + 1
  np.testing.assert_array_equal(moved.read(1).positions[:, perm], cache.read(1).positions[:, :8])
  moved = dataclasses.replace(moved, next_position=cache.next_position)
  got, _ = _cached(model, tokens[:, 8:], moved)
  _close(got, ref)
  # Out-of-range and negative slots are dropped, not wrapped or clamped.
  dropped = _moved(cache, jnp.asarray([[S, -1], [S + 3, -2]]))
  assert not np.any(dropped.read(0).valid) and int(dropped.length) == 0
  np.testing.assert_array_equal(dropped.read(0).k, 0.0)


def test_repeat_and_take_rows():
  model = _build(LLAMA)
  _, cache = _prefilled(model)
  rep = cache.repeat(3)
  assert rep.batch == 6 and rep.max_len == S
  np.testing.assert_array_equal(rep.read(1).k[3:6], jnp.repeat(cache.read(1).k[1:2], 3, axis=0))
  np.testing.assert_array_equal(rep.next_position, [8] * 6)
  back = rep.take_rows(jnp.asarray([0, 3]))
  np.testing.assert_array_equal(back.read(0).v, cache.read(0).v)
  np.testing.assert_array_equal(back.read(0).kt, cache.read(0).kt)


def test_grow_adds_empty_slots_and_continues_like_a_larger_cache():
  model = _build(LLAMA)
  tokens = _tokens()
  small = kv_cache.KVCache.init(LLAMA, B, T)
  _, small = _cached(model, tokens, small)  # full: no room for another token
  grown = small.grow(4)
  assert grown.max_len == T + 4 and int(grown.length) == T
  np.testing.assert_array_equal(grown.read(1).k[:, :, :T], small.read(1).k)
  assert not bool(grown.read(0).valid[:, T:].any())
  big = kv_cache.KVCache.init(LLAMA, B, T + 4)
  _, big = _cached(model, tokens, big)
  nxt = _tokens((B, 2), seed=1)
  _close(_cached(model, nxt, grown)[0], _cached(model, nxt, big)[0])
  assert small.grow(0) is small
  with pytest.raises(ValueError, match='extra must be >= 0'):
    small.grow(-1)
