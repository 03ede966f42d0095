"""EBPO's estimator (projects/ebpo/losses.py): Welford vs two-pass statistics, the closed-form
shrinkage, the cumulative / cluster / ewm modes vs references, and exact zeros on all-equal batches."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from common.rl import advantages as adv
from projects.ebpo import losses


def _rewards(seed, m=7, g=4, binary=True):
  rng = np.random.default_rng(seed)
  if binary:
    r = (rng.random((m, g)) < rng.random((m, 1))).astype(np.float32)
    r[0] = 0.0  # an all-fail group
    r[1] = 1.0  # an all-pass group
    return r
  return rng.normal(size=(m, g)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Welford.


def test_welford_streaming_equals_two_pass_for_any_batching():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=1000)
  cuts = np.sort(rng.choice(np.arange(1, 1000), size=60, replace=False))
  w = losses.Welford()
  for chunk in np.split(x, cuts):  # sizes vary, several are 1
    w.merge(chunk)
  assert w.count == 1000
  assert abs(w.mean - x.mean()) < 1e-10
  assert abs(w.variance(1) - np.var(x, ddof=1)) < 1e-10
  assert abs(w.variance(0) - np.var(x)) < 1e-10
  # Value by value (the scalar Welford update) gives the same.
  s = losses.Welford()
  for v in x:
    s.merge([v])
  assert abs(s.mean - x.mean()) < 1e-10 and abs(s.variance(1) - np.var(x, ddof=1)) < 1e-10
  # Merging two accumulators equals one pass over both, in either order.
  a = losses.Welford().merge(x[:300])
  b = losses.Welford().merge(x[300:])
  ab = losses.Welford(**a.to_dict()).merge_stats(b.count, b.mean, b.m2)
  ba = losses.Welford(**b.to_dict()).merge_stats(a.count, a.mean, a.m2)
  for m in (ab, ba):
    assert abs(m.mean - x.mean()) < 1e-10 and abs(m.variance(1) - np.var(x, ddof=1)) < 1e-10
  assert losses.Welford().variance(1) == 0.0 and not losses.Welford().merge([1.0]).defined(1)


# ---------------------------------------------------------------------------------------------------
# EBPO.


def ref_ebpo_history(batches, ddof=1, standardize=True, eps=losses.EPS):
  """Two-pass reference: statistics recomputed from the whole history at every step."""
  all_r, all_mu, outs = [], [], []
  for r in batches:
    r = r.astype(np.float64)
    g = r.shape[1]
    all_r.extend(r.reshape(-1).tolist())
    all_mu.extend(r.mean(1).tolist())
    if len(all_r) > ddof and len(all_mu) > ddof:
      sigma2 = np.var(all_r, ddof=ddof)
      tau2 = np.var(all_mu, ddof=ddof)
      s = (sigma2 / g) / (sigma2 / g + tau2) if sigma2 / g + tau2 > 0 else 0.0
    else:
      s = 0.0
    mu_glob = np.mean(all_r)
    v = (1 - s) * r.mean(1, keepdims=True) + s * mu_glob
    raw = r - v
    a = (raw - raw.mean()) / (raw.std() + eps) if standardize else raw
    outs.append((a, raw, s, mu_glob))
  return outs


@pytest.mark.parametrize('standardize', [True, False])
def test_ebpo_cumulative_matches_the_two_pass_reference(standardize):
  rng = np.random.default_rng(1)
  batches = [(rng.random((int(rng.integers(1, 6)), 4)) < 0.3).astype(np.float32) for _ in range(12)]
  est = losses.EBPOEstimator(standardize=standardize)
  for (a_ref, raw_ref, s_ref, mu_ref), r in zip(
    ref_ebpo_history(batches, standardize=standardize), batches, strict=True
  ):
    a, raw, stats = est.advantages(r)
    np.testing.assert_allclose(stats.shrinkage, s_ref, atol=1e-12)
    np.testing.assert_allclose(stats.mu_glob, mu_ref, atol=1e-12)
    np.testing.assert_allclose(raw, raw_ref, atol=1e-6)
    np.testing.assert_allclose(a, a_ref, atol=1e-4)
    assert np.all((stats.shrinkage >= 0) & (stats.shrinkage <= 1))


def test_all_fail_group_grpo_is_exactly_zero_and_ebpo_is_not():
  r = np.array([[0, 0, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]], np.float32)
  assert np.all(np.asarray(adv.grpo(jnp.asarray(r)))[0] == 0.0)
  assert np.all(np.asarray(adv.dr_grpo(jnp.asarray(r)))[0] == 0.0)
  assert np.all(np.asarray(adv.rloo(jnp.asarray(r)))[0] == 0.0)
  est = losses.EBPOEstimator()
  a, raw, stats = est.advantages(r)
  s, mu = stats.shrinkage[0], stats.mu_glob[0]
  assert s > 0 and mu > 0
  np.testing.assert_allclose(raw[0], -s * mu, rtol=1e-6)  # Theorem: A_raw = -S mu_glob < 0
  assert np.all(raw[0] < 0)
  # After batch standardisation: equal within the group, and nonzero.
  assert np.ptp(a[0]) < 1e-6 and abs(a[0, 0]) > 1e-3


def test_failure_penalty_grows_with_the_prior_mean_at_fixed_shrinkage():
  r = jnp.zeros((1, 4))
  pens = [
    float(-losses.ebpo_advantages(r, mu, 0.4, standardize=False)[1][0, 0]) for mu in (0.1, 0.3, 0.6)
  ]
  assert pens == sorted(pens) and pens[0] > 0
  np.testing.assert_allclose(pens, [0.04, 0.12, 0.24], rtol=1e-6)


def test_shrinkage_limits_and_cold_start():
  assert losses.shrinkage(0.25, 0.0, 4) == 1.0  # no between-group variance: the baseline is mu_glob
  assert losses.shrinkage(0.25, 1e6, 4) < 1e-6  # large tau^2: the group mean
  assert (
    losses.shrinkage(0.0, 0.0, 4) == 0.0 and losses.shrinkage(0.3, 0.1, 4, defined=False) == 0.0
  )
  # Cold start: one group (W_mu has one value) -> S = 0, EBPO's raw advantage is Dr.GRPO's.
  r = np.array([[1, 0, 0, 1]], np.float32)
  _, raw, stats = losses.EBPOEstimator().advantages(r)
  assert stats.shrinkage[0] == 0.0
  np.testing.assert_allclose(raw, adv.dr_grpo(jnp.asarray(r)), atol=1e-7)
  # With S = 0 and no standardisation EBPO reduces to Dr.GRPO's centring exactly.
  np.testing.assert_allclose(
    losses.ebpo_advantages(jnp.asarray(_rewards(3)), 0.7, 0.0, standardize=False)[0],
    adv.dr_grpo(jnp.asarray(_rewards(3))),
    atol=1e-7,
  )


def test_standardised_advantages_are_translation_invariant_and_baseline_between():
  r = jnp.asarray(_rewards(4, binary=False))
  a1, _ = losses.ebpo_advantages(r, 0.2, 0.3)
  a2, _ = losses.ebpo_advantages(r + 5.0, 5.2, 0.3)
  np.testing.assert_allclose(a1, a2, atol=1e-4)
  _, raw = losses.ebpo_advantages(r, 0.2, 0.3, standardize=False)
  v = np.asarray(r - raw)[:, 0]
  mu_g = np.asarray(r).mean(1)
  assert np.all((v - np.minimum(mu_g, 0.2) >= -1e-6) & (np.maximum(mu_g, 0.2) - v >= -1e-6))


def test_cluster_mode_keeps_one_prior_per_cluster():
  rng = np.random.default_rng(2)
  est = losses.EBPOEstimator('cluster')
  refs = {
    'a': losses.EBPOEstimator(standardize=False),
    'b': losses.EBPOEstimator(standardize=False),
  }
  for _ in range(5):
    r = (rng.random((6, 4)) < np.array([0.2] * 3 + [0.8] * 3)[:, None]).astype(np.float32)
    clusters = ['a', 'a', 'a', 'b', 'b', 'b']
    stats = est.update(r, clusters=clusters)
    sa = refs['a'].update(r[:3])
    sb = refs['b'].update(r[3:])
    np.testing.assert_allclose(stats.shrinkage, np.r_[sa.shrinkage, sb.shrinkage], atol=1e-12)
    np.testing.assert_allclose(stats.mu_glob, np.r_[sa.mu_glob, sb.mu_glob], atol=1e-12)
  with pytest.raises(ValueError, match='one cluster id per group'):
    est.update(r)


def test_ewm_mode_matches_a_weighted_reference_and_forgets():
  rng = np.random.default_rng(3)
  half_life = 3.0
  est = losses.EBPOEstimator('ewm', half_life=half_life)
  batches = [rng.normal(t, 1.0, size=(4, 3)) for t in range(8)]
  for t, r in enumerate(batches):
    stats = est.update(r)
    w = np.concatenate([np.full(r.size, 0.5 ** ((t - k) / half_life)) for k in range(t + 1)])
    x = np.concatenate([b.reshape(-1) for b in batches[: t + 1]])
    mean = np.sum(w * x) / w.sum()
    var = np.sum(w * (x - mean) ** 2) / (w.sum() - 1)
    np.testing.assert_allclose(stats.mu_glob[0], mean, rtol=1e-10)
    np.testing.assert_allclose(stats.sigma2[0], var, rtol=1e-10)
  cumulative = losses.EBPOEstimator()
  for r in batches:
    c = cumulative.update(r)
  assert stats.mu_glob[0] > c.mu_glob[0]  # tracks the drifting stream more closely
  with pytest.raises(ValueError, match='unknown EBPO mode'):
    losses.EBPOEstimator('nope')


def test_state_json_round_trip_continues_identically():
  rng = np.random.default_rng(4)
  batches = [(rng.random((5, 4)) < 0.4).astype(np.float32) for _ in range(6)]
  for mode, kw in (('cumulative', {}), ('ewm', {'half_life': 2.0}), ('cluster', {})):
    clusters = ['x', 'y', 'x', 'y', 'y'] if mode == 'cluster' else None
    a = losses.EBPOEstimator(mode, **kw)
    for r in batches[:3]:
      a.update(r, clusters=clusters)
    b = losses.EBPOEstimator(mode, state=losses.EBPOState.from_json(a.state.to_json()), **kw)
    for r in batches[3:]:
      ra, rb = a.advantages(r, clusters=clusters), b.advantages(r, clusters=clusters)
      np.testing.assert_array_equal(ra[0], rb[0])
    assert a.state.to_json() == b.state.to_json()


def test_all_equal_batches_standardise_to_exactly_zero():
  """Every response failed (or every one passed) across the batch: A = 0 exactly, as GRPO gives
  an all-equal group, for batch shapes from 1 x 2 to 64 x 16 (odd, prime and power-of-two sizes:
  each shape compiles its own eager ops, so the grid is a sample) and random histories. (Before
  the fix, float32 rounding of the batch mean left e.g. -0.0074 after [[1, 0], [1, 1]].)"""
  est = losses.EBPOEstimator('cumulative')
  est.advantages(np.array([[1.0, 0.0], [1.0, 1.0]], np.float32))
  a, raw, _ = est.advantages(np.zeros((5, 2), np.float32))
  assert np.all(a == 0.0) and np.all(raw != 0.0)
  rng = np.random.default_rng(0)
  for m, g in itertools.product((1, 2, 3, 5, 13, 64), (2, 3, 16)):
    est = losses.EBPOEstimator('cumulative')
    for _ in range(int(rng.integers(1, 4))):  # a random history
      est.update((rng.random((int(rng.integers(1, 9)), g)) < rng.random()).astype(np.float32))
    for value in (0.0, 1.0):
      a, _, _ = est.advantages(np.full((m, g), value, np.float32))
      assert np.all(a == 0.0), (m, g, value, float(np.abs(a).max()))
  # A batch that is not all-equal is still standardised (mean 0, std 1 over valid responses).
  a, _, _ = est.advantages(_rewards(0, m=16, g=4))
  np.testing.assert_allclose([a.mean(), a.std()], [0.0, 1.0], atol=1e-4)


def test_ebpo_is_a_loop_estimator_whose_state_round_trips():
  from common.rl import curriculum  # noqa: PLC0415
  from experiments.ebpo.configs import base  # noqa: PLC0415

  prompts = [curriculum.Prompt(uid=i, tokens=(1,), cluster='ab'[i % 2]) for i in range(4)]
  est = losses.EBPO.from_config(base.get_config('smoke').ebpo)
  out = est.advantages(_rewards(1, m=4), np.ones((4, 4), bool), prompts)
  assert set(out.metrics) == {'ebpo_shrinkage', 'ebpo_mu_glob', 'ebpo_sigma2', 'ebpo_tau2'}
  assert est.group_filter(out.values) is None
  again = losses.EBPO.from_config(base.get_config('smoke').ebpo)
  again.load_state_dict(est.state_dict())
  r = _rewards(2, m=4)
  np.testing.assert_array_equal(
    again.advantages(r, np.ones((4, 4), bool), prompts).values,
    est.advantages(r, np.ones((4, 4), bool), prompts).values,
  )
