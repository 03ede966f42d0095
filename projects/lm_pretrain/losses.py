"""lm_pretrain's training loss: next-token cross-entropy from common.losses, nothing paper-specific.

`loss_fn` only adapts common.losses.next_token_loss (mean NLL over every target of the packed
sequences) to common.train_loop.fit's (model, batch, key) -> (loss, metrics) signature and adds
the perplexity and the target count to the logged metrics.
"""

from __future__ import annotations

import jax.numpy as jnp

from common import losses


def loss_fn(model, batch, key):
  """(mean next-token NLL of batch['tokens'], {'perplexity', 'tokens'}) for common.train_loop.fit."""
  del key  # deterministic model: no dropout
  loss, count = losses.next_token_loss(model, batch['tokens'])
  return loss, {'perplexity': jnp.exp(loss), 'tokens': count}
