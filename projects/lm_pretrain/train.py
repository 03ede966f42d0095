"""Decoder-only LM pretraining: the template every paper's train.py follows.

`train_and_evaluate(config, workdir)` wires the shared pieces: model (common.models.decoder), data
(input_pipeline: real text by default, or the procedural Markov language), loss (common.losses),
optimizer, and the standard loop (common.train_loop.fit) with checkpointing, metrics and resume.

Its claim: the held-out loss per token is below that of the unigram baseline (token frequencies of
the train split, add-one smoothed) on the same held-out tokens; every evaluation reports both, as
nats/token and, for text, bits per UTF-8 byte. On the Markov language it also reports the exact
optimum (the language's entropy rate) that no model can beat.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import losses
from common import sharding
from common import train_loop
from common.models import decoder
from projects.lm_pretrain import input_pipeline


def model_config(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
  """The decoder's shapes; its vocabulary is the data's (data.vocab_size)."""
  return decoder.DecoderConfig.from_dict(
    {**config.model.to_dict(), 'vocab_size': config.data.vocab_size, 'dtype': config.dtype}
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    o.lr,
    o.warmup_steps,
    max(config.train.num_steps, o.warmup_steps + 1),
    o.lr * o.final_lr_frac,
  )
  return optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
  )


def create_state_fn(config: ml_collections.ConfigDict):
  mcfg = model_config(config)
  tx = make_optimizer(config)
  return lambda: train_loop.TrainState(decoder.Decoder(mcfg, rngs=nnx.Rngs(config.seed)), tx)


def loss_fn(model, batch, key):
  del key  # deterministic model: no dropout
  loss, count = losses.next_token_loss(model, batch['tokens'])
  return loss, {'perplexity': jnp.exp(loss), 'tokens': count}


def unigram_logprobs(counts: np.ndarray) -> np.ndarray:
  """log p(token) of the unigram model with add-one smoothing over the `len(counts)` tokens."""
  counts = np.asarray(counts, np.float64) + 1.0
  return np.log(counts / counts.sum())


def eval_statistics(d: input_pipeline.Data, held_out) -> dict[str, float]:
  """Fixed facts about the held-out targets: their count, the unigram baseline's total loss on them
  (nats) and, for text, the UTF-8 bytes they encode. `held_out` is the whole (global) eval source."""
  logp = unigram_logprobs(d.train_counts)
  targets = np.concatenate([held_out[i]['tokens'][1:] for i in range(len(held_out))])
  out = {'tokens': float(targets.size), 'unigram_nll': float(-logp[targets].sum())}
  if d.byte_lengths is not None:
    out['bytes'] = float(d.byte_lengths[targets].sum())
  return out


def unigram_loss(config: ml_collections.ConfigDict, workdir: str | None = None) -> float:
  """The unigram baseline's held-out loss (nats/token) for `config`, without training anything."""
  d = input_pipeline.make_data(config, workdir)
  stats = eval_statistics(d, d.eval)
  return stats['unigram_nll'] / stats['tokens']


def make_eval_fn(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, d: input_pipeline.Data
):
  batches = input_pipeline.eval_batches(config, d, jax.process_index(), jax.process_count())
  rules = tuple(tuple(r) for r in config.sharding.rules)
  stats = eval_statistics(d, d.eval)  # every process: the whole held-out set, no collectives
  unigram = stats['unigram_nll'] / stats['tokens']
  optimum = d.language.optimal_loss() if d.language is not None else None

  @nnx.jit
  def nll_sum(model, tokens):
    loss, count = losses.next_token_loss(model, tokens)
    return loss * count, count

  def evaluate(model, step):
    del step
    total, count = 0.0, 0.0
    for b in batches:
      s, c = nll_sum(model, sharding.to_global(b, mesh, rules)['tokens'])
      total, count = total + float(s), count + float(c)
    # nll_sum sees the global batch, so these are already totals over every process.
    loss = total / count
    out = {'loss': loss, 'perplexity': math.exp(loss), 'unigram_loss': unigram}
    if 'bytes' in stats:  # bits per byte: total nats over the bytes the targets encode
      out['bits_per_byte'] = total / stats['bytes'] / math.log(2)
      out['unigram_bits_per_byte'] = stats['unigram_nll'] / stats['bytes'] / math.log(2)
    if optimum is not None:
      out.update(optimal_loss=optimum, excess_loss=loss - optimum)
    return out

  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.fit(run, create_state=None, loss_fn=None, train_iter=None)
    d = input_pipeline.make_data(config, run.workdir)
    return train_loop.fit(
      run,
      create_state=create_state_fn(config),
      loss_fn=loss_fn,
      train_iter=input_pipeline.train_iterator(config, d),
      eval_fn=make_eval_fn(config, run.mesh, d),
    )
