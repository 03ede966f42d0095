"""EAD's schedule as the configs build it (projects/ead/losses.py): tau = 1 for t < c, non-increasing
after, the floor tau_min reached, the first annealed step ~ tau_max, d_s = min(d0 + k s, 40000)."""

import numpy as np
import pytest

from common import config as config_lib
from common.sampling import schedules
from experiments.ead.configs import base
from projects.ead import losses


def test_the_smollm2_schedule_has_the_papers_shape():
  ead = base.get_config('smollm2').ead
  c = ead.warmup_tokens
  assert c == 10 and ead.tau_max == 1.2 and ead.tau_min == 0.1
  tau = losses.temperatures(ead, 0, 400)
  np.testing.assert_array_equal(tau[:c], 1.0)  # tau = 1 for t < c
  assert np.all(np.diff(tau[c:]) <= 0)  # non-increasing after
  assert tau[-1] == np.float32(ead.tau_min) and tau.min() == np.float32(ead.tau_min)  # floor
  np.testing.assert_allclose(tau[c], 1 + ead.tau_max - np.exp(c / ead.d0), rtol=1e-6)
  assert abs(tau[c] - ead.tau_max) < 0.25  # the first annealed step is near tau_max
  # Later steps cool more slowly (d_s grows), never hotter than tau_max.
  later = losses.temperatures(ead, 100, 400)
  assert np.all(later >= tau) and later.max() <= np.float32(ead.tau_max)


def test_the_decay_grows_5_per_step_and_clamps_at_40000():
  ead = base.get_config('smollm2').ead
  assert losses.decay_at(ead, 0) == ead.d0
  assert losses.decay_at(ead, 10) == ead.d0 + 50
  assert losses.decay_at(ead, 10**6) == 40000.0 == schedules.ead_decay(10**9, 1.0)
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
