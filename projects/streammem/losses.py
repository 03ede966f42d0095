"""StreamMem has no training loss of its own: the method is training-free (arXiv 2508.15717).

What is here: how an answer is scored after the stream (teacher-forced answer log-likelihood and
exact match), and the masked next-token losses that train the small in-repo models the paper's
CPU-scale recipe needs (core.md §5(e)): the planted-fact LM of the smoke runs (models.fact_lm) and
the video-language model (models.VideoLM, `video_loss_fn` on common.train_loop.fit), since no
pretrained video-language model ships offline.

Exact match is teacher-forced: the answer's tokens are all the argmax of the model given the
question and the answer's earlier tokens. That is exactly "greedy decoding starts with the answer",
so one forward pass replaces a decode loop. Log-probabilities and the argmax are in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common import losses


def answer_scores(logits: jax.Array, target: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Per row: {'loglik': sum of log p(answer tokens), 'exact': 1.0 iff every answer token is the
  argmax}. logits [N, T, V], target [N, T] (the next token of each position), mask [N, T] bool
  (the positions that predict an answer token)."""
  logp = losses.token_logprobs(logits, target)
  mask = mask.astype(bool)
  loglik = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)
  hit = (jnp.argmax(logits, axis=-1) == target) | ~mask
  return {'loglik': loglik, 'exact': jnp.all(hit, axis=-1).astype(jnp.float32)}


def answer_loss(model, batch) -> tuple[jax.Array, jax.Array]:
  """(mean NLL of the masked targets, their count) of a FactLanguage training batch: tokens,
  positions, mask [B, T + 1]; position t predicts token t + 1."""
  tokens, positions = batch['tokens'], batch['positions']
  logits = model(tokens[:, :-1], positions=positions[:, :-1])
  return losses.cross_entropy(logits, tokens[:, 1:], batch['mask'][:, 1:])


def video_loss_fn(model, batch, key) -> tuple[jax.Array, dict[str, jax.Array]]:
  """common.train_loop's loss_fn for the video-language model: the masked next-token NLL of the
  event listing ("describe the stream") after the frames; batch: tokens, patches, positions,
  mask [B, T]. Also reports the listing's token accuracy."""
  del key
  tokens, positions = batch['tokens'], batch['positions']
  logits = model(tokens[:, :-1], patches=batch['patches'][:, :-1], positions=positions[:, :-1])
  target, mask = tokens[:, 1:], batch['mask'][:, 1:]
  loss, _ = losses.cross_entropy(logits, target, mask)
  hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
  acc = jnp.sum(hit * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, {'token_accuracy': acc}
