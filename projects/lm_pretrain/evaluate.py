"""Held-out evaluation of the template run: loss per token against the unigram baseline.

Every evaluation reads the same fixed held-out examples (input_pipeline.Data.eval) and reports the
loss (nats/token) and perplexity next to the unigram baseline's loss on the same targets (train-split
token frequencies, add-one smoothed): the run's claim is that the model beats it. For text it also
reports bits per UTF-8 byte (the same total nats over the bytes the targets encode); on the Markov
language, the exact optimum (the language's entropy rate) that no model can beat.
"""

from __future__ import annotations

from collections.abc import Callable
import math

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import losses
from common import sharding
from projects.lm_pretrain import input_pipeline


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
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  d: input_pipeline.Data,
) -> Callable[[nnx.Module, int], dict[str, float]]:
  """fit's eval_fn(model, step): the metrics above on the fixed held-out batches."""
  batches = input_pipeline.eval_batches(config, d, jax.process_index(), jax.process_count())
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
