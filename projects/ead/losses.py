"""EAD's sampling side of the RL objective (arXiv 2510.05251): which temperature each rollout
token is sampled at, and the truncated importance weights that correct the surrogate for it.

  * `ead`: tau_t = max(1 + tau_max - e^(t/d_s), tau_min) for generated position t >= c, tau_t = 1
    for the first c tokens (common.sampling.schedules.ead), with the global-step-aware decay
    d_s = min(d_0 + k s, cap) (schedules.ead_decay; the paper's k = 5 per step and cap = 40000).
  * `fixed`: the baselines, one temperature for every token and step.

Either way the loop trains the policy at temperature 1 and, with `tis_cap` > 0, weights each
token's policy-gradient term by w_t = min(pi(y_t) / mu_tau(y_t), C) (common.rl.loss.tis_weights;
both log-probs from the sampler), whatever the estimator (GRPO, Dr.GRPO, RLOO, DAPO).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np

from common import config as config_lib
from common.sampling import schedules

MODES = ('ead', 'fixed')


def ead_config() -> ml_collections.ConfigDict:
  """config.ead: the rollout temperature and the TIS cap."""
  return ml_collections.ConfigDict(
    dict(
      mode='ead',  # ead | fixed
      temperature=1.0,  # fixed mode's temperature
      tau_max=1.2,
      tau_min=0.1,
      warmup_tokens=10,  # c: tokens at temperature 1 before the annealing
      d0=200.0,  # the decay d at step 0
      decay_per_step=5.0,  # d grows by this per RL step (the paper's 5)
      decay_cap=40000.0,  # ... up to this (the paper's 40000)
      tis_cap=2.0,  # C; 0 turns truncated importance sampling off
    )
  )


def check_config(ead: ml_collections.ConfigDict) -> None:
  if ead.mode not in MODES:
    raise config_lib.ConfigError(f'ead.mode={ead.mode!r}; expected one of {MODES}')
  if ead.mode == 'fixed' and not ead.temperature > 0:
    raise config_lib.ConfigError(f'ead.temperature={ead.temperature} must be > 0')
  if ead.mode == 'ead':
    if not 0 < ead.tau_min <= ead.tau_max:
      raise config_lib.ConfigError(
        f'ead.tau_min={ead.tau_min} must be in (0, ead.tau_max={ead.tau_max}]'
      )
    if ead.warmup_tokens < 0 or ead.d0 <= 0 or ead.decay_per_step < 0 or ead.decay_cap < ead.d0:
      raise config_lib.ConfigError(
        'ead.warmup_tokens >= 0, ead.d0 > 0, ead.decay_per_step >= 0 and ead.decay_cap >= ead.d0'
      )
  if ead.tis_cap < 0:
    raise config_lib.ConfigError(f'ead.tis_cap={ead.tis_cap} must be >= 0 (0: off)')


def decay_at(ead: ml_collections.ConfigDict, step: int) -> float:
  """d_s = min(d0 + decay_per_step * s, decay_cap)."""
  return schedules.ead_decay(step, ead.d0, per_step=ead.decay_per_step, cap=ead.decay_cap)


def temperature_schedule(ead: ml_collections.ConfigDict) -> Callable[[int], schedules.Schedule]:
  """step -> the schedule t -> tau_t that step's rollouts are sampled with."""
  check_config(ead)
  if ead.mode == 'fixed':
    sched = schedules.constant(float(ead.temperature))
    return lambda step: sched
  return lambda step: schedules.ead(
    ead.tau_max, ead.tau_min, decay=decay_at(ead, step), warmup_tokens=ead.warmup_tokens
  )


def tis_cap(ead: ml_collections.ConfigDict) -> float | None:
  return float(ead.tis_cap) if ead.tis_cap > 0 else None


def temperatures(ead: ml_collections.ConfigDict, step: int, max_new_tokens: int) -> np.ndarray:
  """[N] the temperatures of step `step`'s rollouts (for plots and mean-temperature reports)."""
  return np.asarray(temperature_schedule(ead)(step)(np.arange(max_new_tokens)), np.float32)
