"""Tiny decoder runs that record their model (model.json), and small tokenizers, for the tests of
common.models.spec, common.models.hf, common.models.gguf_writer and common.export."""

from __future__ import annotations

import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import config as config_lib
from common import data
from common import sharding
from common import train_loop
from common.adapters import core
from common.adapters import lora
from common.models import decoder
from common.models import spec
from common.models import tokenizer as tokenizer_lib
from tests.common.models import synthetic_gguf

CFG = decoder.DecoderConfig(
  vocab_size=280, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
LORA_LAYERS = {'layers/0/mlp/up_proj': 4, 'layers/1/attn/q_proj': 2}
# Merging moves the adapter's contribution into the kernel: x (W + s A B) vs x W + s (x A) B, the
# same sum in another order, so merged and applied logits agree to float32 rounding only.
MERGE_RTOL = 1e-5


def bpe_tokenizer(pre: str = 'smollm') -> tokenizer_lib.Tokenizer:
  """synthetic_gguf's small byte-level BPE with ChatML specials (as the loader builds it)."""
  tokens, types, merges = synthetic_gguf.bpe_vocab()
  return tokenizer_lib.from_gguf_metadata(
    {
      'tokenizer.ggml.model': 'gpt2',
      'tokenizer.ggml.pre': pre,
      'tokenizer.ggml.tokens': tokens,
      'tokenizer.ggml.token_type': types,
      'tokenizer.ggml.merges': merges,
      'tokenizer.ggml.bos_token_id': 1,
      'tokenizer.ggml.eos_token_id': 2,
      'tokenizer.ggml.padding_token_id': 2,
      'tokenizer.ggml.add_bos_token': False,
      'tokenizer.chat_template': synthetic_gguf.CHATML,
    }
  )


def spm_tokenizer() -> tokenizer_lib.Tokenizer:
  """synthetic_gguf's Gemma-style sentencepiece vocabulary."""
  tokens, scores, types = synthetic_gguf.spm_vocab()
  return tokenizer_lib.from_gguf_metadata(
    {
      'tokenizer.ggml.model': 'llama',
      'tokenizer.ggml.tokens': tokens,
      'tokenizer.ggml.scores': scores,
      'tokenizer.ggml.token_type': types,
      'tokenizer.ggml.bos_token_id': 2,
      'tokenizer.ggml.eos_token_id': 1,
      'tokenizer.ggml.unknown_token_id': 3,
      'tokenizer.ggml.padding_token_id': 0,
      'tokenizer.ggml.add_bos_token': True,
      'tokenizer.ggml.add_space_prefix': False,
      'tokenizer.chat_template': synthetic_gguf.GEMMA_TEMPLATE,
    }
  )


def tokens(vocab: int = CFG.vocab_size, shape=(2, 11), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Tiny fit runs that record their model.


class Stream:
  """Example i: 17 token ids from (seed, i)."""

  def __len__(self):
    return 10_000

  def __getitem__(self, i):
    return {'tokens': np.random.default_rng([3, i]).integers(0, 200, 17).astype(np.int32)}


def loss_fn(model, batch, key):
  del key
  t = batch['tokens']
  logp = jax.nn.log_softmax(model(t[:, :-1]))
  return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1)), {}


class Wrapped(nnx.Module):
  """A decoder one attribute down, as GEM's model holds it, plus a parameter of its own."""

  def __init__(self, cfg, rngs):
    self.lm = decoder.Decoder(cfg, rngs=rngs)
    self.extra = nnx.Param(jnp.zeros((3,)))

  def __call__(self, x):
    return self.lm(x)


class Gated(core.Adapter):
  """A token-dependent (unmergeable) adapter: delta(x) = sigmoid(x g) * (x a) b."""

  def __init__(self, d_in, d_out, rngs):
    self.d_in, self.d_out = d_in, d_out
    self.g = core.AdapterParam(0.1 * jax.random.normal(rngs.params(), (d_in, 1)))
    self.a = core.AdapterParam(0.1 * jax.random.normal(rngs.params(), (d_in, 2)))
    self.b = core.AdapterParam(jnp.zeros((2, d_out)))

  def __call__(self, x):
    return jax.nn.sigmoid(x @ self.g[...]) * ((x @ self.a[...]) @ self.b[...])


def make_model(kind: str, seed: int = 0) -> nnx.Module:
  if kind == 'wrapped':
    return Wrapped(CFG, nnx.Rngs(seed))
  model = decoder.Decoder(CFG, rngs=nnx.Rngs(seed))
  pattern = '|'.join(LORA_LAYERS)
  if kind == 'lora':
    rngs = nnx.Rngs(seed + 1)

    def make(path, linear):
      return lora.LoRA(
        linear.in_features, linear.out_features, rank=LORA_LAYERS[path], alpha=8.0, rngs=rngs
      )

    core.adapt(model, pattern, make)
  if kind == 'mixture':
    rngs = nnx.Rngs(seed + 1)
    core.adapt(model, pattern, lambda p, lin: Gated(lin.in_features, lin.out_features, rngs))
  return model


def adapters_entry(kind: str):
  if kind == 'lora':
    return spec.lora_adapters(LORA_LAYERS, alpha=8.0)
  if kind == 'mixture':
    return spec.mixture_adapters('gated', {p: {'experts': 1} for p in LORA_LAYERS}, note='test')
  return None


def fit_run(workdir: pathlib.Path, kind: str = 'plain', *, tokenizer='bpe', steps: int = 3):
  """Trains `kind` ('plain' | 'wrapped' | 'lora' | 'mixture') for a few steps, recording
  model.json as a paper's train.py does; returns the trained model."""
  c = config_lib.base_config()
  c.mesh.data = 1
  c.train.update(num_steps=steps, log_every=steps, eval_every=0)
  c.checkpoint.update(every_steps=0, async_save=False)
  c = config_lib.finalize(c, {})
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  tok = {'bpe': bpe_tokenizer, 'none': lambda: None}[tokenizer]()
  with train_loop.Run(c, workdir, mesh=mesh) as run:
    spec.write(
      run.workdir,
      CFG,
      tokenizer=tok,
      path=('lm',) if kind == 'wrapped' else (),
      adapters=adapters_entry(kind),
      context_length=64,
    )
    result = train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(make_model(kind), optax.adam(3e-2)),
      loss_fn=loss_fn,
      train_iter=data.batch_iterator(Stream(), global_batch_size=4),
    )
  model = train_loop.model_of(result.graphdef, result.state)
  return model.lm if kind == 'wrapped' else model
