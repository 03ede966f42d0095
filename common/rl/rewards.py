"""Reward shaping added to the verifier's reward before the advantages.

DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, §3.4, eq. 13): a response of
|y| generated tokens gets

  R_length(y) = 0                               |y| <= L_max - L_cache
              = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
              = -1                              |y| > L_max

added to its correctness reward. DAPO truncates generation at L_max and calls the interval of
length L_cache before it the punishment buffer: a response that runs into it is penalised the
more the longer it is, which the paper found steadier than giving every truncated sample reward 0
(overlong filtering, its other option). Responses that stop exactly at L_max get -1, the same as
longer ones would.

The shaped reward drives the advantages only. The loop keeps the verifier's reward for pass@1 and
reward_mean, and DAPO's dynamic sampling keeps filtering on accuracy, as in the paper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
  """DAPO's R_length per response (<= 0, float32, the shape of `lengths`).

  Args:
    lengths: generated tokens per response (stop tokens included, as the sampler counts them).
    max_len: L_max, the generation limit.
    cache_len: L_cache, the punishment buffer; 0 <= cache_len <= max_len. 0 gives the hard rule
      (-1 only beyond L_max).
  """
  if max_len <= 0 or not 0 <= cache_len <= max_len:
    raise ValueError(
      f'overlong shaping needs 0 <= cache_len <= max_len and max_len > 0; got '
      f'cache_len={cache_len}, max_len={max_len}'
    )
  n = jnp.asarray(lengths, jnp.float32)
  start = float(max_len - cache_len)
  if cache_len == 0:
    return jnp.where(n > max_len, -1.0, 0.0).astype(jnp.float32)
  soft = (start - n) / float(cache_len)
  return jnp.where(n <= start, 0.0, jnp.where(n <= max_len, soft, -1.0)).astype(jnp.float32)
