"""Decoder-only LM pretraining: the template every paper's train.py follows.

`train_and_evaluate(config, workdir)` wires the shared pieces: model (common.models.decoder), data
(input_pipeline), loss (common.losses), optimizer, and the standard loop (common.train_loop.fit) with
checkpointing, metrics and resume. Its claim: the eval loss approaches the procedural language's
exact optimum and beats a unigram model of the same data.
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
  return decoder.DecoderConfig.from_dict({**config.model.to_dict(), 'dtype': config.dtype})


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


def unigram_loss(config: ml_collections.ConfigDict, num_examples: int = 512) -> float:
  """Held-out loss of the unigram model fitted on train examples (the baseline to beat)."""
  lang = input_pipeline.language(config)
  counts = np.ones(config.data.vocab_size)  # add-one smoothing
  for i in range(num_examples):
    np.add.at(counts, lang[i]['tokens'][1:], 1)
  logp = np.log(counts / counts.sum())
  held = [lang[input_pipeline.EVAL_OFFSET + i]['tokens'][1:] for i in range(num_examples // 4)]
  return float(-np.mean(np.concatenate([logp[t] for t in held])))


def make_eval_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  batches = input_pipeline.eval_batches(config, jax.process_index(), jax.process_count())
  rules = tuple(tuple(r) for r in config.sharding.rules)
  optimum = input_pipeline.language(config).optimal_loss()

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
    loss = total / count
    return {
      'loss': loss,
      'perplexity': math.exp(loss),
      'optimal_loss': optimum,
      'excess_loss': loss - optimum,
    }

  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  mesh = sharding.make_mesh([(n, int(config.mesh[n])) for n in sharding.MESH_AXES])
  return train_loop.fit(
    config,
    workdir,
    create_state=create_state_fn(config),
    loss_fn=loss_fn,
    train_iter=input_pipeline.train_iterator(config),
    eval_fn=make_eval_fn(config, mesh),
    mesh=mesh,
  )
