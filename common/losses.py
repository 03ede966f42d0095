"""Language-model losses shared by pretraining, SFT and RL papers.

Cross-entropy is computed in float32 from logits of any dtype, and averaged over the tokens a mask
selects (prompt tokens, padding and packing boundaries are masked out by the caller's mask), so the
loss of a batch does not depend on how much padding it carries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, in float32. logits [..., V], targets [...] int.

  Picks the target logit with a one-hot select rather than `take_along_axis`: the gradient is then
  an elementwise select that fuses with the softmax's, where a gather's gradient is a scatter
  (slow on CPU, serialised on accelerators); and logsumexp never materialises log-probabilities.
  """
  logits = logits.astype(jnp.float32)
  hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
  picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  return picked - jax.nn.logsumexp(logits, axis=-1)


def cross_entropy(
  logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """(mean negative log-likelihood over masked-in tokens, number of those tokens)."""
  nll = -token_logprobs(logits, targets)
  if mask is None:
    mask = jnp.ones_like(nll)
  mask = mask.astype(jnp.float32)
  count = mask.sum()
  # where, not multiply: a non-finite logit at a masked-out position must not poison the loss.
  return jnp.where(mask > 0, nll * mask, 0.0).sum() / jnp.maximum(count, 1.0), count


def next_token_loss(
  model, tokens: jax.Array, mask: jax.Array | None = None, **model_kwargs
) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy of `model` on `tokens` [B, T+1]: predicts tokens[:, 1:].

  `mask` [B, T+1] marks the tokens that count as targets (e.g. 0 on the prompt for SFT).
  """
  logits = model(tokens[:, :-1], **model_kwargs)
  target_mask = None if mask is None else mask[:, 1:]
  return cross_entropy(logits, tokens[:, 1:], target_mask)
