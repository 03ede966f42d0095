"""Tests for common.models.decoder on tiny models.

Each property is checked against an independent reference (a separately run sequence, explicitly
repeated kv heads, the unsharded model) rather than stored numbers. XLA compiles dominate the cost on
2 CPU cores (about 1.3 s per forward, 4 s per gradient, 3-5 s per eager jax.random.normal shape), so
most tests share one config, one token shape and two jitted entry points, random inputs come from
numpy, and models get numpy-random parameters on top of nnx.eval_shape. The real initializer runs
once, in the sharded test.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common import sharding
from common.adapters import core as adapters
from common.adapters import lora
from common.models import decoder
from common.sampling import kv_cache
from common.sampling import sampler

BASE = decoder.DecoderConfig(
  vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
GEMMA3 = dataclasses.replace(
  BASE,
  num_kv_heads=1,
  activation='gelu_tanh',
  qk_norm=True,
  post_norms=True,
  embed_scale=True,
  norm_plus_one=True,
  sliding_window=3,
  sliding_window_pattern=2,  # layer 0 local, layer 1 global
  rope_theta=1e6,
  rope_local_theta=1e4,
  query_pre_attn_scalar=16.0,
  attn_logit_softcap=50.0,
)
QWEN2_UNTIED = dataclasses.replace(BASE, qkv_bias=True, rope_theta=1e6, tie_embeddings=False)
B, T = 4, 8


def _build(cfg, seed=0):
  """A model with random (not initializer) parameters, so norm scales and biases matter too."""
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
def _forward(model, tokens):
  return model(tokens, return_hidden=True)


@nnx.jit
def _forward_full(model, tokens, positions, segment_ids, attention_mask):
  """Every optional input explicit (one compiled program serves all masking tests)."""
  return model(
    tokens,
    positions=positions,
    segment_ids=segment_ids,
    attention_mask=attention_mask,
    causal=False,
  )


def _tokens(shape=(B, T), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, shape), jnp.int32)


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


_POSITIONS = jnp.broadcast_to(jnp.arange(T), (B, T))
_ONE_SEGMENT = jnp.ones((B, T), jnp.int32)
_CAUSAL = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def test_config_from_dict_and_validation():
  d = dataclasses.asdict(GEMMA3)
  assert decoder.DecoderConfig.from_dict(d) == GEMMA3
  assert decoder.DecoderConfig.from_dict(ml_collections.ConfigDict(d)) == GEMMA3
  assert BASE.padded_vocab == 128
  assert dataclasses.replace(BASE, vocab_size=256).padded_vocab == 256
  with pytest.raises(ValueError, match='bogus'):
    decoder.DecoderConfig.from_dict({**d, 'bogus': 1})
  with pytest.raises(ValueError, match='multiple'):
    dataclasses.replace(BASE, num_kv_heads=3)


def test_parameter_paths_and_logical_axes():
  cfg = dataclasses.replace(GEMMA3, qkv_bias=True, tie_embeddings=False)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
  axes = {
    '.'.join(map(str, path)): sharding.variable_logical_axes(var)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  expected = {
    'embed.embedding': ('vocab', 'embed'),
    'layers.1.attn.q_proj.kernel': ('embed', 'heads'),
    'layers.1.attn.q_proj.bias': ('heads',),
    'layers.1.attn.k_proj.kernel': ('embed', 'kv_heads'),
    'layers.1.attn.v_proj.bias': ('kv_heads',),
    'layers.1.attn.o_proj.kernel': ('heads', 'embed'),
    'layers.1.attn.q_norm.scale': ('norm',),
    'layers.1.attn.k_norm.scale': ('norm',),
    'layers.1.attn_norm.scale': ('norm',),
    'layers.1.post_attn_norm.scale': ('norm',),
    'layers.1.mlp_norm.scale': ('norm',),
    'layers.1.post_mlp_norm.scale': ('norm',),
    'layers.1.mlp.gate_proj.kernel': ('embed', 'mlp'),
    'layers.1.mlp.up_proj.kernel': ('embed', 'mlp'),
    'layers.1.mlp.down_proj.kernel': ('mlp', 'embed'),
    'final_norm.scale': ('norm',),
    'lm_head.kernel': ('embed', 'vocab'),
  }
  for path, names in expected.items():
    assert axes.get(path) == names, path
  assert len(axes) == 3 + 2 * 16  # embed, final_norm, lm_head + 16 per layer
  assert all(names is not None for names in axes.values())
  assert model.layers[0].attn.window == 3 and model.layers[1].attn.window is None
  assert model.layers[0].attn.rope_theta == 1e4 and model.layers[1].attn.rope_theta == 1e6


def test_shapes_and_padded_logits_masked():
  model = _build(BASE)
  logits, hidden = _forward(model, _tokens())
  assert logits.shape == (B, T, 128) and logits.dtype == jnp.float32
  assert hidden.shape == (B, T, 32) and hidden.dtype == jnp.float32
  assert np.all(np.asarray(logits[..., 100:]) == decoder.MASKED_LOGIT)
  logp = jax.nn.log_softmax(logits, axis=-1)
  assert np.all(np.isfinite(logp)) and np.all(np.exp(logp[..., 100:]) == 0.0)
  _close(jnp.exp(logp[..., :100]).sum(-1), 1.0)
  _close(model.logits_from_hidden(hidden), logits)


def test_causality():
  model = _build(BASE)
  tokens = _tokens()
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % BASE.vocab_size)
  a, b = _forward(model, tokens)[0], _forward(model, changed)[0]
  _close(a[:, :5], b[:, :5], atol=0)
  assert not np.allclose(a[:, 5:], b[:, 5:])


def test_explicit_masks_and_bidirectional_attention():
  model = _build(BASE)
  tokens = _tokens()
  ref = _forward(model, tokens)[0]
  _close(_forward_full(model, tokens, _POSITIONS, _ONE_SEGMENT, _CAUSAL), ref)
  # A [B, 1, T, T] mask reaches the same code path after broadcasting.
  mask4 = decoder.make_attention_mask(T, attention_mask=_CAUSAL[:, None], causal=False)
  np.testing.assert_array_equal(mask4, decoder.make_attention_mask(T, attention_mask=_CAUSAL))
  # Without the causal mask a later token changes earlier logits.
  full = jnp.ones((B, T, T), bool)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % BASE.vocab_size)
  a = _forward_full(model, tokens, _POSITIONS, _ONE_SEGMENT, full)
  b = _forward_full(model, changed, _POSITIONS, _ONE_SEGMENT, full)
  assert not np.allclose(a[:, 0], b[:, 0])


def test_packed_segments_match_separate_sequences():
  model = _build(BASE)
  seq_a, seq_b = _tokens((1, 5), seed=1), _tokens((1, 3), seed=2)
  # Row 0 packs a and b; row 1 is one sequence of 3 followed by padding (segment 0).
  packed = jnp.concatenate([jnp.concatenate([seq_a, seq_b], 1), _tokens((B - 1, T), seed=3)])
  segment_ids = np.zeros((B, T), np.int32)
  segment_ids[0] = [1] * 5 + [2] * 3
  segment_ids[1:, :3] = 1
  positions = decoder.segment_positions(jnp.asarray(segment_ids))
  np.testing.assert_array_equal(positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(positions[1], [0, 1, 2, 0, 1, 2, 3, 4])
  out = _forward_full(model, packed, positions, jnp.asarray(segment_ids), _CAUSAL)
  assert np.all(np.isfinite(out))  # padding rows attend to nothing and must not be NaN
  # References: each sequence alone at the start of a row; later (causal) tokens cannot leak in.
  alone = packed.at[0, :5].set(seq_a[0]).at[1, :3].set(seq_b[0])
  ref = _forward(model, alone)[0]
  _close(out[0, :5], ref[0, :5])
  _close(out[0, 5:], ref[1, :3])


def test_rope_relative_positions():
  model = _build(BASE)
  tokens = _tokens()
  ref = _forward(model, tokens)[0]
  shifted = _forward_full(model, tokens, _POSITIONS + 37, _ONE_SEGMENT, _CAUSAL)
  _close(shifted, ref, atol=2e-5)
  flipped = _forward_full(model, tokens, _POSITIONS[:, ::-1], _ONE_SEGMENT, _CAUSAL)
  assert not np.allclose(flipped, ref)


def test_rope_rotate_half_reference():
  x = _normal((1, 3, 2, 8), seed=0)
  out = jax.jit(decoder.apply_rope, static_argnums=2)(x, jnp.array([[0, 1, 5]]), 100.0)
  inv = 100.0 ** (-np.arange(0, 8, 2) / 8)
  for t, p in enumerate([0, 1, 5]):
    c, s = np.cos(p * inv), np.sin(p * inv)
    x1, x2 = np.asarray(x[0, t, :, :4]), np.asarray(x[0, t, :, 4:])
    _close(out[0, t], np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1))


def test_grouped_query_attention_matches_repeated_heads():
  q = _normal((2, 5, 4, 8), seed=0)
  kv = _normal((2, 2, 5, 2, 8), seed=1)
  mask = decoder.make_attention_mask(5)

  @jax.jit
  def both(q, kv):
    outs = []
    for num_kv in (1, 2):
      k, v = kv[0, ..., :num_kv, :], kv[1, ..., :num_kv, :]
      gqa = decoder.dot_product_attention(q, k, v, mask, scale=0.3)
      # HF repeat_kv: query head h reads kv head h // (num_heads // num_kv).
      k, v = (jnp.repeat(a, 4 // num_kv, axis=2) for a in (k, v))
      outs.append((gqa, decoder.dot_product_attention(q, k, v, mask, scale=0.3)))
    return outs

  for gqa, ref in both(q, kv):
    _close(gqa, ref)


@pytest.mark.parametrize(
  'b,h,kv,d',
  [(1, 6, 2, 16), (3, 6, 2, 16), (3, 4, 1, 128), (2, 3, 3, 16)],
  ids=['one-row-fused', 'rows-fused', 'wide-heads-fused', 'mha-einsum'],
)
def test_one_query_cache_attention_forms_match_the_reference(b, h, kv, d):
  """Each one-query form of head_major_attention (fused multiply-reduce for grouped heads, einsums
  for multi-head) over the cache's layout (keys [B, K, D, S]) equals dot_product_attention on the
  same keys in [B, S, K, D] order, masked slots included, and a row with no readable slot gives
  zeros."""
  s = 7
  q = _normal((b, 1, h, d), seed=0)
  k, v = _normal((b, kv, s, d), seed=1), _normal((b, kv, s, d), seed=2)
  valid = jnp.asarray(np.arange(s) < s - 2)[None].repeat(b, 0)
  mask = valid.at[-1].set(b == 1)[:, None, None, :]  # the last row reads nothing (if b > 1)
  fn = jax.jit(functools.partial(decoder.head_major_attention, scale=d**-0.5, softcap=5.0))
  ref = jax.jit(functools.partial(decoder.dot_product_attention, scale=d**-0.5, softcap=5.0))
  got, want = fn(q, k.swapaxes(2, 3), v, mask), ref(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
  _close(got, want)
  if b > 1:
    assert np.all(np.asarray(got[-1]) == 0) and np.abs(np.asarray(got[0])).max() > 0.1


def test_sliding_window_limits_receptive_field():
  cfg = dataclasses.replace(BASE, num_layers=1, sliding_window=3, sliding_window_pattern=2)
  model = _build(cfg)
  tokens = _tokens()
  changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % BASE.vocab_size)
  a, b = _forward(model, tokens)[0], _forward(model, changed)[0]
  assert not np.allclose(a[:, 2], b[:, 2])  # position 2 still sees position 0
  _close(a[:, 3:], b[:, 3:], atol=0)


@pytest.mark.parametrize('cfg', [GEMMA3, QWEN2_UNTIED], ids=['gemma3', 'qwen2_untied'])
def test_families_run_with_finite_nonzero_grads(cfg):
  model = _build(cfg)
  tokens = _tokens()

  def loss_fn(m):
    logp = jax.nn.log_softmax(m(tokens[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  assert np.isfinite(loss) and abs(float(loss) - np.log(cfg.vocab_size)) < 1.0
  flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
  assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, g in flat:
    g = np.asarray(g.get_value())
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_bfloat16_compute_close_to_float32():
  model32, model16 = _build(BASE), _build(dataclasses.replace(BASE, dtype='bfloat16'))
  assert model16.layers[0].attn.q_proj.kernel[...].dtype == jnp.float32
  (a, _), (b, h) = _forward(model32, _tokens()), _forward(model16, _tokens())
  assert b.dtype == jnp.float32 and h.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b[..., :100]), np.asarray(a[..., :100]), atol=5e-2)


def test_sharded_init_and_forward_match_unsharded():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices; tests/conftest.py sets them')
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  init = lambda: decoder.Decoder(BASE, rngs=nnx.Rngs(0))  # noqa: E731
  # Logical names are not mesh axes, so flax must not apply them itself: eager sharding stays off
  # and nnx.eval_shape runs outside the mesh (inside one, it reads the names as mesh axes).
  with nnx.use_eager_sharding(False):
    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings)()
  layer = state['layers'][0]
  assert layer['attn']['q_proj']['kernel'].get_value().sharding.spec == jax.P('fsdp', 'tensor')
  assert state['embed']['embedding'].get_value().sharding.spec == jax.P('tensor', 'fsdp')
  # The real initializer: unit norms, N(0, 0.02) kernels.
  np.testing.assert_array_equal(layer['attn_norm']['scale'].get_value(), 1.0)
  assert 0.015 < float(jnp.std(layer['mlp']['up_proj']['kernel'].get_value())) < 0.025

  tokens = _tokens()
  ref = _forward(nnx.merge(graphdef, jax.device_get(state)), tokens)[0]
  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, ndim=2))
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
  assert out.sharding.spec == jax.P(('data', 'fsdp'), None, 'tensor')
  _close(out, ref)


@functools.partial(jax.jit, static_argnames=('graphdef', 'fuse', 'corrupt'))
def _decode_one(graphdef, state, prompt, token, fuse, corrupt=False):
  """Logits of the prefill (T rows) and of one decoded token (one row), fused q|k|v or not;
  `corrupt` doubles the fused matrices, to show which calls read them."""
  model = nnx.merge(graphdef, state)
  fused = decoder.fuse_qkv(model) if fuse else 0
  for layer in model.layers if corrupt else ():
    kernel, bias = layer.attn.fused_qkv
    layer.attn.fused_qkv = (2 * kernel, bias)
  cache = kv_cache.KVCache.init(model.cfg, 1, prompt.shape[1] + 1)
  pre, cache = model(prompt, cache=cache)
  one, _ = model(token, cache=cache)
  return pre, one, fused


@pytest.mark.parametrize('cfg', [BASE, GEMMA3, QWEN2_UNTIED], ids=['llama', 'gemma3', 'qwen2'])
def test_fused_qkv_is_bitwise_at_one_row_and_unused_for_more(cfg):
  graphdef, state = nnx.split(_build(cfg, seed=3))
  prompt, token = _tokens((1, T), seed=4), _tokens((1, 1), seed=5)
  pre, one, n = _decode_one(graphdef, state, prompt, token, fuse=False)
  pre_f, one_f, n_f = _decode_one(graphdef, state, prompt, token, fuse=True)
  assert (int(n), int(n_f)) == (0, cfg.num_layers)
  np.testing.assert_array_equal(np.asarray(one_f), np.asarray(one))  # the one-row product
  np.testing.assert_array_equal(np.asarray(pre_f), np.asarray(pre))  # T rows: separate products
  assert np.isfinite(np.asarray(one)).all() and np.asarray(one).std() > 0
  pre_c, one_c, _ = _decode_one(graphdef, state, prompt, token, fuse=True, corrupt=True)
  np.testing.assert_array_equal(np.asarray(pre_c), np.asarray(pre))
  assert np.abs(np.asarray(one_c) - np.asarray(one)).max() > 1e-3  # the one row read them


def test_fused_qkv_skips_adapted_and_bf16_projections_and_adds_no_parameter():
  model = _build(BASE)
  params_before = jax.tree_util.tree_structure(nnx.state(model, nnx.Param))
  with sharding.unsharded():
    adapters.adapt(model, r'layers/0/attn/q_proj', lora.factory(rank=2, rngs=nnx.Rngs(1)))
  assert decoder.fuse_qkv(model) == 1  # layer 1 only: layer 0's q_proj is now a LoRA wrapper
  assert model.layers[0].attn.fused_qkv is None
  attn = model.layers[1].attn
  kernel, bias = attn.fused_qkv
  parts = [attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...]]
  np.testing.assert_array_equal(np.asarray(kernel), np.concatenate(parts, axis=1))
  assert bias is None
  plain = _build(BASE)
  decoder.fuse_qkv(plain)
  assert jax.tree_util.tree_structure(nnx.state(plain, nnx.Param)) == params_before
  assert decoder.fuse_qkv(sampler.cast_weights(_build(BASE), jnp.bfloat16)) == 0
