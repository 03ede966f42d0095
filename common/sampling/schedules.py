"""Temperature schedules over the generated position t (t = 0 is the first generated token).

A schedule is a vectorised function t -> temperature that `SamplingConfig.temperature` accepts; the
sampler evaluates it once on arange(max_new_tokens) outside the decode loop, so a schedule costs
nothing per token and changing it never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array], jax.Array]


def constant(temperature: float) -> Schedule:
  return lambda t: jnp.full(jnp.shape(t), temperature, jnp.float32)


def ead(
  tau_max: float = 1.2, tau_min: float = 0.1, decay: float = 200.0, warmup_tokens: int = 10
) -> Schedule:
  """Exploratory Annealed Decoding (arXiv 2510.05251): tau_t = max(1 + tau_max - e^(t/d), tau_min).

  Explore early, exploit late: the first `warmup_tokens` generated tokens (EAD's c template tokens)
  use temperature 1; afterwards the temperature starts near tau_max and decays to the floor
  tau_min. t is the absolute generated position, as in the paper's formula; `decay` is d (see
  `ead_decay` for its training-step-dependent value).
  """
  if decay <= 0:
    raise ValueError(f'decay must be positive, got {decay}')

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    annealed = jnp.maximum(1.0 + tau_max - jnp.exp(t / decay), tau_min)
    return jnp.where(t < warmup_tokens, 1.0, annealed).astype(jnp.float32)

  return schedule


def ead_decay(step: int, d0: float, *, per_step: float = 5.0, cap: float = 40000.0) -> float:
  """EAD's global-step-aware decay d_s = min(d0 + 5 s, 40000): cooling slows as training goes on."""
  return float(min(d0 + per_step * step, cap))
