"""DAPO's soft overlong punishment against an independent numpy reference (arXiv 2503.14476 eq. 13)."""

import jax
import numpy as np
import pytest

from common.rl import rewards


def ref_overlong(lengths, max_len, cache_len):
  """The paper's piecewise definition, one response at a time, in float64."""
  out = np.zeros(len(lengths), np.float64)
  for i, n in enumerate(lengths):
    if n <= max_len - cache_len:
      out[i] = 0.0
    elif n <= max_len:
      out[i] = ((max_len - cache_len) - n) / cache_len
    else:
      out[i] = -1.0
  return out


@pytest.mark.parametrize('max_len,cache_len', [(20, 4), (16, 16), (9, 1), (12, 0), (512, 128)])
def test_overlong_penalty_matches_the_numpy_reference(max_len, cache_len):
  rng = np.random.default_rng(max_len * 31 + cache_len)
  lengths = rng.integers(0, max_len + 6, size=(7, 5))
  got = np.asarray(rewards.overlong_penalty(lengths, max_len, cache_len))
  want = ref_overlong(lengths.reshape(-1), max_len, cache_len).reshape(lengths.shape)
  assert got.shape == lengths.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Zero up to the buffer, in [-1, 0], non-increasing in the length, -1 at L_max and beyond.
  all_n = np.arange(0, max_len + 4)
  p = np.asarray(rewards.overlong_penalty(all_n, max_len, cache_len))
  assert np.all(p[: max_len - cache_len + 1] == 0.0)
  assert np.all((p >= -1.0) & (p <= 0.0)) and np.all(np.diff(p) <= 0.0)
  assert np.all(p[max_len + 1 :] == -1.0)
  if cache_len:
    assert p[max_len] == pytest.approx(-1.0)
    assert p[max_len - cache_len + 1] == pytest.approx(-1.0 / cache_len)


def test_overlong_penalty_is_jittable_and_rejects_bad_limits():
  fn = jax.jit(rewards.overlong_penalty, static_argnums=(1, 2))
  np.testing.assert_allclose(fn(np.array([3, 6, 7, 8, 9]), 8, 4), [0.0, -0.5, -0.75, -1.0, -1.0])
  for max_len, cache_len in [(8, 9), (8, -1), (0, 0)]:
    with pytest.raises(ValueError, match='cache_len'):
      rewards.overlong_penalty(np.array([1]), max_len, cache_len)
