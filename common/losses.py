"""Language-model losses shared by pretraining, SFT and RL papers.

Cross-entropy is computed in float32 from logits of any dtype, and averaged over the tokens a mask
selects (prompt tokens, padding and packing boundaries are masked out by the caller's mask), so the
loss of a batch does not depend on how much padding it carries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, in float32. logits [..., V], targets [...] int."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


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
