"""EAD temperature schedule properties (arXiv 2510.05251 §3), checked on the formula's own terms."""

import numpy as np
import pytest

from common.sampling import schedules


def test_ead_schedule_shape():
  c, tau_max, tau_min = 10, 1.2, 0.1
  tau = np.asarray(schedules.ead(tau_max, tau_min, decay=1000.0, warmup_tokens=c)(np.arange(8000)))
  np.testing.assert_array_equal(tau[:c], 1.0)  # template tokens at temperature 1
  assert abs(tau[c] - tau_max) < 0.02  # first annealed step ~ tau_max
  assert np.all(np.diff(tau[c:]) <= 0)  # non-increasing afterwards
  assert tau[-1] == np.float32(tau_min) and tau.min() >= np.float32(tau_min)  # floor reached
  np.testing.assert_allclose(tau[500], 1 + tau_max - np.exp(0.5), rtol=1e-6)


def test_ead_decay_and_constant():
  assert schedules.ead_decay(0, 1000) == 1000
  assert schedules.ead_decay(10, 1000) == 1050
  assert schedules.ead_decay(10**6, 1000) == 40000  # clamps
  np.testing.assert_array_equal(schedules.constant(0.7)(np.arange(3)), np.float32(0.7))
  with pytest.raises(ValueError, match='decay'):
    schedules.ead(decay=0.0)
