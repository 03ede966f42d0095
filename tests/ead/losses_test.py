"""EAD's schedule as the configs build it (projects/ead/losses.py): tau = 1 for t < c, non-increasing
after, the floor tau_min reached, the first annealed step ~ tau_max, d_s = min(d0 + k s, 40000)."""

import numpy as np
import pytest

from common import config as config_lib
from common.sampling import schedules
from experiments.ead.configs import base
from projects.ead import losses


def test_the_papers_schedule_has_its_shape():
  ead = losses.ead_config()  # the paper's c = 10, tau_max 1.2, tau_min 0.1, +5 per step
  c = ead.warmup_tokens
  assert c == 10 and ead.tau_max == 1.2 and ead.tau_min == 0.1
  tau = losses.temperatures(ead, 0, 2000)
  np.testing.assert_array_equal(tau[:c], 1.0)  # tau = 1 for t < c
  assert np.all(np.diff(tau[c:]) <= 0)  # non-increasing after
  assert tau[-1] == np.float32(ead.tau_min) and tau.min() == np.float32(ead.tau_min)  # floor
  np.testing.assert_allclose(tau[c], 1 + ead.tau_max - np.exp(c / ead.d0), rtol=1e-6)
  assert abs(tau[c] - ead.tau_max) < 0.25  # the first annealed step is near tau_max
  # Later steps cool more slowly (d_s grows), never hotter than tau_max.
  later = losses.temperatures(ead, 100, 2000)
  assert np.all(later >= tau) and later.max() <= np.float32(ead.tau_max)


def test_the_smollm2_schedule_is_scaled_to_its_responses():
  config = base.get_config('smollm2')
  ead, n = config.ead, config.rl.max_new_tokens
  tau = losses.temperatures(ead, 0, n)
  c = ead.warmup_tokens
  assert c == 0  # the chat template's tokens are in the prompt, none in the response
  assert tau[0] == np.float32(ead.tau_max) and np.all(np.diff(tau) <= 0)  # hot start, cooling
  floor = int(np.argmax(tau == np.float32(ead.tau_min)))
  assert 16 <= floor <= 20 < n  # cooled by the end of a ~19-token worked answer
  end = losses.temperatures(ead, config.train.num_steps, n)
  assert np.all(end >= tau)  # cooling slows over training


def test_the_decay_grows_linearly_per_step_and_clamps_at_40000():
  for ead in (losses.ead_config(), base.get_config('smollm2').ead):
    k = ead.decay_per_step
    assert losses.decay_at(ead, 0) == ead.d0
    assert losses.decay_at(ead, 10) == pytest.approx(ead.d0 + 10 * k, rel=1e-12)
    assert losses.decay_at(ead, 10**8) == 40000.0
  assert losses.decay_at(losses.ead_config(), 10) == 200.0 + 50  # the paper's 5 per step
  assert schedules.ead_decay(10**9, 1.0) == 40000.0
  ead = losses.ead_config()
  k = int((40000 - ead.d0) / 5)
  assert losses.decay_at(ead, k + 1) == 40000.0 and losses.decay_at(ead, k - 1) < 40000.0


def test_the_smoke_schedule_anneals_within_the_answer():
  ead = base.get_config('smoke').ead
  tau = losses.temperatures(ead, 0, 6)
  np.testing.assert_allclose(tau[:3], [1.2, 2.2 - np.exp(1 / 3), 2.2 - np.exp(2 / 3)], rtol=1e-6)
  assert tau[3:].tolist() == [np.float32(0.1)] * 3


def test_fixed_arms_and_bad_input():
  cfg = base.get_config('smoke,ead.mode=fixed,ead.temperature=0.6')
  np.testing.assert_array_equal(losses.temperatures(cfg.ead, 7, 5), np.float32(0.6))
  assert losses.tis_cap(cfg.ead) == 2.0
  assert losses.tis_cap(base.get_config('smoke,ead.tis_cap=0.0').ead) is None
  for bad, match in (
    ('ead.mode=hot', 'ead.mode'),
    ('ead.mode=fixed,ead.temperature=0.0', 'ead.temperature'),
    ('ead.tau_min=0.0', 'tau_min'),
    ('ead.d0=0.0', 'd0'),
    ('ead.tis_cap=-1.0', 'tis_cap'),
  ):
    with pytest.raises(config_lib.ConfigError, match=match):
      losses.check_config(base.get_config(f'smoke,{bad}').ead)
