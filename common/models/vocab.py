"""Adding tokens to a pretrained model: the tokenizer learns them, the embedding gets rows for them.

Several papers add special tokens (PerSRec's personalised item tokens, reasoning or routing markers,
GEM's summary tokens). `extend_vocab` does the two halves together so ids and rows cannot drift
apart. New rows go into the padding the decoder already keeps (the vocabulary is padded to a
multiple of 128), so adding a handful of tokens usually changes no array shape and nothing needs to
recompile for a new parameter shape; only when the padding is used up are the embedding (and an
untied head) re-padded, keeping their sharding.

Initialisation. 'mean' (default) sets every new row to the mean of the existing embeddings: the new
token's logit then equals the average logit and the distribution over old tokens barely moves
(Hewitt, "Initializing new word embeddings for pretrained language models", 2021). 'normal' draws
each new row from a Gaussian with the existing rows' per-dimension mean and standard deviation, so
several new tokens are distinguishable from the start. An untied output head gets the same treatment
on its columns.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from common import sharding
from common.models import decoder
from common.models import tokenizer as tokenizer_lib


def _resharded(var: nnx.Variable, value: jax.Array, rules: sharding.Rules) -> jax.Array:
  """`value` laid out like `var`'s current value: same mesh, spec recomputed for the new shape."""
  old = var.get_value()
  target = getattr(old, 'sharding', None)
  if isinstance(target, jax.sharding.NamedSharding):
    names = sharding.variable_logical_axes(var)
    spec = sharding.logical_to_spec(names, value.shape, target.mesh, rules)
    return jax.device_put(value, jax.sharding.NamedSharding(target.mesh, spec))
  return jax.device_put(value, target) if target is not None else value


def _init_rows(table: jax.Array, known: int, rows: jax.Array, init: str, key) -> jax.Array:
  """Values for `rows` of `table` [V, d] from the statistics of its first `known` rows."""
  real = table[:known].astype(jnp.float32)
  mean = real.mean(axis=0)
  if init == 'mean':
    return jnp.broadcast_to(mean, (rows.shape[0], table.shape[1]))
  std = real.std(axis=0)
  return mean + std * jax.random.normal(key, (rows.shape[0], table.shape[1]), jnp.float32)


def extend_vocab(
  model: decoder.Decoder,
  tokenizer: tokenizer_lib.Tokenizer,
  new_tokens: Sequence[str],
  init: str = 'mean',
  *,
  special: bool = True,
  seed: int = 0,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> list[int]:
  """Adds `new_tokens` to the tokenizer and embedding rows for them to `model` (in place).

  Tokens the tokenizer already has keep their ids and rows. Returns one id per entry of
  `new_tokens`. `model.cfg.vocab_size` grows to cover the new ids (so their logits are no longer
  masked); the padded size grows only if the padding runs out.

  Args:
    init: 'mean' or 'normal' (see the module docstring).
    special: whether the tokens are special (matched whole in text, skipped by decode).
    seed: for init='normal'.
    rules: logical-axis rules used to lay out a re-padded embedding on the model's mesh.
  """
  if init not in ('mean', 'normal'):
    raise ValueError(f"init must be 'mean' or 'normal', got {init!r}")
  cfg = model.cfg
  before = tokenizer.vocab_size
  ids = tokenizer.add_tokens(list(new_tokens), special=special)
  fresh = jnp.asarray(sorted({i for i in ids if i >= before}), jnp.int32)
  if fresh.size == 0:
    return ids
  new_cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, int(fresh[-1]) + 1))
  key_embed, key_head = jax.random.split(jax.random.key(seed))

  emb = model.embed.embedding
  table = emb.get_value()
  values = _init_rows(table, cfg.vocab_size, fresh, init, key_embed)
  if new_cfg.padded_vocab > table.shape[0]:
    table = jnp.pad(table, ((0, new_cfg.padded_vocab - table.shape[0]), (0, 0)))
  emb.set_value(_resharded(emb, table.at[fresh].set(values.astype(table.dtype)), rules))
  model.embed.num_embeddings = new_cfg.padded_vocab

  if model.lm_head is not None:
    kernel_var = model.lm_head.kernel
    kernel = kernel_var.get_value()  # [d, V]
    values = _init_rows(kernel.T, cfg.vocab_size, fresh, init, key_head)
    if new_cfg.padded_vocab > kernel.shape[1]:
      kernel = jnp.pad(kernel, ((0, 0), (0, new_cfg.padded_vocab - kernel.shape[1])))
    kernel = kernel.at[:, fresh].set(values.T.astype(kernel.dtype))
    kernel_var.set_value(_resharded(kernel_var, kernel, rules))
    model.lm_head.out_features = new_cfg.padded_vocab
  model.cfg = new_cfg
  return ids
