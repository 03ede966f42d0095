"""Skipping and structurally removing residual blocks of common.models.decoder (BlockPruner support).

The references are independent of the mask code: a block is "skipped" correctly when the model
equals the dense model whose block has a zero residual output (its output projection zeroed), and
removed correctly when the smaller model equals the masked one. Two configs: llama (GQA) and
gemma3 (post-norms, qk-norm, sliding window, so removing a layer keeps its local/global pattern).
"""

import dataclasses
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoint
from common.models import decoder
from common.models import spec
from common.sampling import kv_cache

LLAMA = decoder.DecoderConfig(
  vocab_size=100, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
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
  sliding_window_pattern=2,
  rope_local_theta=1e4,
  query_pre_attn_scalar=16.0,
)
B, T = 2, 8
# Layer 0 loses its MLP, layer 1 its attention, layer 2 both (an identity layer).
MASK = np.array([[True, False], [False, True], [False, False]])
REMOVED = {'attn': (1, 2), 'mlp': (0, 2)}


def _build(cfg, seed=0):
  """Random (not initializer) parameters, so norm scales and biases matter too."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    value = rng.normal(0.0, 0.2, x.shape)
    if 'scale' in jax.tree_util.keystr(path) and not cfg.norm_plus_one:
      value += 1.0
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 100, (B, T)), jnp.int32)


@nnx.jit
def _masked(model, tokens, block_mask):
  return model(tokens, block_mask=block_mask)


@nnx.jit
def _plain(model, tokens):
  return model(tokens)


def _zeroed(model, mask):
  """A copy of `model` whose skipped blocks output exactly zero (o_proj / down_proj zeroed)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x, state)
  for i, (attn, mlp) in enumerate(mask):
    layer = state['layers'][i]
    if not attn:
      layer['attn']['o_proj']['kernel'].set_value(jnp.zeros_like(layer['attn']['o_proj']['kernel']))
    if not mlp:
      kernel = layer['mlp']['down_proj']['kernel']
      kernel.set_value(jnp.zeros_like(kernel))
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize('cfg', [LLAMA, GEMMA3], ids=['llama', 'gemma3'])
def test_skipping_a_block_equals_zeroing_its_residual_output(cfg):
  model, tokens = _build(cfg), _tokens()
  reference = _plain(_zeroed(model, MASK), tokens)
  dynamic = _masked(model, tokens, jnp.asarray(MASK))  # traced: lax.cond per block
  static = model(tokens, block_mask=MASK)  # numpy: skipped blocks are not traced at all
  np.testing.assert_allclose(dynamic, reference, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(static, reference, atol=2e-5, rtol=1e-5)
  # An all-True mask is the dense model; the mask changes the output at all.
  np.testing.assert_allclose(
    _masked(model, tokens, jnp.ones((3, 2), bool)), _plain(model, tokens), atol=2e-5, rtol=1e-5
  )
  assert np.abs(np.asarray(dynamic) - np.asarray(_plain(model, tokens))).max() > 1e-2


@pytest.mark.parametrize('cfg', [LLAMA, GEMMA3], ids=['llama', 'gemma3'])
def test_structural_removal_equals_the_mask(cfg):
  model, tokens = _build(cfg), _tokens()
  small = decoder.without_blocks(model, attn=REMOVED['attn'], mlp=REMOVED['mlp'])
  assert small.cfg.pruned_attn == (1, 2) and small.cfg.pruned_mlp == (0, 2)
  assert small.layers[2].attn is None and small.layers[2].mlp is None
  assert small.layers[0].attn.layer_idx == 0 and small.cfg.num_cache_layers == 1
  # Gemma's local/global pattern follows the original layer index.
  assert small.layers[0].attn.window == model.layers[0].attn.window
  dense = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kept = sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))
  attn = sum(x.size for x in jax.tree.leaves(nnx.state(model.layers[0].attn_norm, nnx.Param)))
  attn += sum(x.size for x in jax.tree.leaves(nnx.state(model.layers[0].attn, nnx.Param)))
  if cfg.post_norms:
    attn += cfg.d_model
  mlp = 2 * cfg.d_model * cfg.mlp_dim + cfg.mlp_dim * cfg.d_model + cfg.d_model
  mlp += cfg.d_model if cfg.post_norms else 0
  assert dense - kept == 2 * attn + 2 * mlp
  np.testing.assert_allclose(
    _plain(small, tokens), _masked(model, tokens, jnp.asarray(MASK)), atol=2e-5, rtol=1e-5
  )
  np.testing.assert_allclose(
    _plain(small, tokens), model(tokens, block_mask=MASK), atol=2e-5, rtol=1e-5
  )


def test_removed_model_decodes_with_a_compact_kv_cache():
  """Prefill + one decode step of the removed model (its cache has one layer per attention block
  kept) give the masked dense model's full-sequence logits."""
  model, tokens = _build(LLAMA), _tokens()
  small = decoder.without_blocks(model, attn=REMOVED['attn'], mlp=REMOVED['mlp'])
  full = _masked(model, tokens, jnp.asarray(MASK))

  @nnx.jit
  def step(m, toks, cache):
    return m(toks, cache=cache)

  cache = kv_cache.KVCache.init(small.cfg, B, T)
  assert cache.num_layers == small.cfg.num_cache_layers == 1  # one per attention block kept
  first, cache = step(small, tokens[:, :-1], cache)
  last, cache = step(small, tokens[:, -1:], cache)
  np.testing.assert_allclose(first, full[:, :-1], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=2e-5, rtol=1e-5)
  assert np.asarray(cache.layers[0].valid).all()
  assert kv_cache.KVCache.init(LLAMA, B, T).num_layers == 3  # the dense model's cache


def test_a_traced_mask_serves_every_mask_with_one_program():
  model, tokens = _build(LLAMA), _tokens()
  traces = []

  @nnx.jit
  def f(m, t, bm):
    traces.append(1)  # runs once per trace, not per call
    return m(t, block_mask=bm)

  outs = [f(model, tokens, jnp.asarray(mask)) for mask in (MASK, ~MASK, np.ones((3, 2), bool))]
  assert len(traces) == 1
  assert np.abs(np.asarray(outs[0]) - np.asarray(outs[1])).max() > 1e-2
  with pytest.raises(ValueError, match='block_mask has shape'):
    model(tokens, block_mask=np.ones((2, 2), bool))


def test_removed_model_round_trips_config_json_and_checkpoints(tmp_path):
  model = _build(GEMMA3)
  small = decoder.without_blocks(model, attn=[1], mlp=[2])
  d = json.loads(json.dumps(dataclasses.asdict(small.cfg)))
  assert decoder.DecoderConfig.from_dict(d) == small.cfg  # JSON lists back to tuples
  with pytest.raises(ValueError, match='outside'):
    dataclasses.replace(LLAMA, pruned_mlp=(3,))
  # model.json + an Orbax checkpoint: common.models.spec rebuilds the smaller model.
  spec.write(tmp_path, small.cfg)
  with checkpoint.Checkpointer(tmp_path / 'checkpoints', async_save=False) as ckpt:
    ckpt.save(0, {'model': nnx.state(small)})
  restored, _ = spec.restore(tmp_path)
  assert restored.cfg == small.cfg
  tokens = _tokens()
  np.testing.assert_array_equal(_plain(restored, tokens), _plain(small, tokens))
  params = spec.decoder_params(small)
  assert ('layers', 1, 'attn', 'q_proj', 'kernel') not in params
  np.testing.assert_array_equal(
    _plain(spec.build(small.cfg, params), tokens), _plain(small, tokens)
  )
