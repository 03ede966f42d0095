"""The switch-style load-balance loss of S'MoRE's gates (Fedus et al.'s form, per routing layer).

    L_bal = w_bal * s * sum_e f_e * P_e

f_e: selections of expert e per routed item (a token at the top layer, a (token, parent path) pair
below), so sum_e f_e = k (the fan-out); P_e: the mean gate probability of e over the same items.
Uniform routing gives w_bal * s * s * (k/s) * (1/s) = w_bal * k; routing collapsed onto k experts
gives w_bal * s. Padding tokens are excluded from both means. f_e is a count (no gradient); the
gradient flows through P_e, which pushes probability away from over-used experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def balance_loss(
  probs: jax.Array, idx: jax.Array, mask: jax.Array | None, weight: float
) -> jax.Array:
  """probs [..., s] (softmax), idx [..., k] (chosen experts), mask [...] (bool, same leading
  shape as probs) -> scalar."""
  s = probs.shape[-1]
  probs = probs.reshape(-1, s).astype(jnp.float32)
  idx = idx.reshape(probs.shape[0], -1)
  valid = (
    jnp.ones(probs.shape[0], jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
  )
  n = jnp.maximum(valid.sum(), 1.0)
  chosen = jax.nn.one_hot(idx, s, dtype=jnp.float32).sum(axis=1)  # [N, s]
  f = jax.lax.stop_gradient((chosen * valid[:, None]).sum(0) / n)
  p = (probs * valid[:, None]).sum(0) / n
  return weight * s * jnp.sum(f * p)
