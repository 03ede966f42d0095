"""Shared fixtures of the BlockPruner tests: a small random decoder with peaked predictions and
calibration text sampled from it.

Sampling the calibration rows from the model itself makes perplexity meaningful without a trained
model: the model's own distribution p minimises the expected NLL over every other model q (Gibbs'
inequality, E_p[-log q] >= E_p[-log p]), so removing a block that changes the predictions raises
the calibration perplexity, and removing a block that changes nothing leaves it as it is.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.models import decoder
from common.models import perplexity

CFG = decoder.DecoderConfig(
  vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
GEMMA3 = dataclasses.replace(
  CFG,
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


def build(cfg: decoder.DecoderConfig = CFG, seed: int = 0, std: float = 0.25) -> decoder.Decoder:
  """Random (not initializer) parameters: every block matters and the predictions are peaked."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    value = rng.normal(0.0, std, x.shape)
    if 'scale' in jax.tree_util.keystr(path) and not cfg.norm_plus_one:
      value += 1.0
    if 'embedding' in jax.tree_util.keystr(path):
      value *= 4.0  # peaked logits through the tied head
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def zero_block(model: decoder.Decoder, layer: int, kind: str) -> decoder.Decoder:
  """A copy of `model` whose (layer, kind) block has every weight zero (its residual output is 0)."""
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x, state)
  sub = state['layers'][layer]['attn' if kind == 'mha' else 'mlp']
  for path, var in nnx.to_flat_state(sub):
    del path
    var.set_value(jnp.zeros_like(var.get_value()))
  return nnx.merge(graphdef, state)


def sample_windows(
  model: decoder.Decoder, rows: int, seq_len: int, seed: int = 0
) -> perplexity.Windows:
  """`rows` sequences sampled from `model` (temperature 1) after token 0, as scored windows."""
  tokens = np.zeros((rows, seq_len + 1), np.int32)
  vocab = model.cfg.vocab_size

  @nnx.jit
  def logits_at(m, toks, t):
    logits = m(toks)[:, :, :vocab]
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)

  key = jax.random.key(seed)
  for t in range(seq_len):
    key, sub = jax.random.split(key)
    logits = logits_at(model, jnp.asarray(tokens), t)
    tokens[:, t + 1] = np.asarray(jax.random.categorical(sub, logits))
  mask = np.ones_like(tokens, bool)
  mask[:, 0] = False
  return perplexity.Windows(tokens, mask)


class ByteTokenizer:
  """UTF-8 bytes shifted by one (0 is the end-of-text token): what the pipeline needs of a
  tokenizer, with no training or files."""

  add_bos, bos_id, eos_id = False, None, 0

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    del add_bos
    return [b + 1 for b in text.encode('utf-8')]

  def decode(self, ids) -> str:
    return bytes(i - 1 for i in ids if i > 0).decode('utf-8', errors='replace')
