"""The GRPO-family advantage estimators vs independent numpy references, and as objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.rl import advantages as adv


def _rewards(seed, m=7, g=4, binary=True):
  rng = np.random.default_rng(seed)
  if binary:
    r = (rng.random((m, g)) < rng.random((m, 1))).astype(np.float32)
    r[0] = 0.0  # an all-fail group
    r[1] = 1.0  # an all-pass group
    return r
  return rng.normal(size=(m, g)).astype(np.float32)


def _mask(seed, shape):
  rng = np.random.default_rng(seed + 100)
  m = rng.random(shape) < 0.8
  m[:, 0] = True
  return m


# Independent references: explicit loops over groups and responses.
def ref_grpo(r, mask, eps=adv.EPS):
  out = np.zeros_like(r, np.float64)
  for i in range(r.shape[0]):
    v = r[i][mask[i]].astype(np.float64)
    sd = np.std(v, ddof=1) if v.size > 1 else 0.0
    out[i][mask[i]] = (v - v.mean()) / (sd + eps)
  return out


def ref_dr_grpo(r, mask):
  out = np.zeros_like(r, np.float64)
  for i in range(r.shape[0]):
    v = r[i][mask[i]].astype(np.float64)
    out[i][mask[i]] = v - v.mean()
  return out


def ref_rloo(r, mask):
  out = np.zeros_like(r, np.float64)
  for i in range(r.shape[0]):
    idx = np.flatnonzero(mask[i])
    if idx.size < 2:
      continue
    for j in idx:
      others = [r[i, k] for k in idx if k != j]
      out[i, j] = r[i, j] - np.mean(others)
  return out


@pytest.mark.parametrize('binary', [True, False])
@pytest.mark.parametrize('masked', [False, True])
def test_stateless_estimators_match_numpy_references(binary, masked):
  for seed in range(3):
    r = _rewards(seed, binary=binary)
    mask = _mask(seed, r.shape) if masked else np.ones(r.shape, bool)
    jm = jnp.asarray(mask) if masked else None
    np.testing.assert_allclose(adv.grpo(jnp.asarray(r), jm), ref_grpo(r, mask), atol=2e-5)
    np.testing.assert_allclose(adv.dr_grpo(jnp.asarray(r), jm), ref_dr_grpo(r, mask), atol=1e-6)
    np.testing.assert_allclose(adv.rloo(jnp.asarray(r), jm), ref_rloo(r, mask), atol=1e-6)
    keep = np.array([len(set(r[i][mask[i]].tolist())) > 1 for i in range(r.shape[0])])
    np.testing.assert_array_equal(adv.dapo_keep(jnp.asarray(r), jm), keep)
    ref_dapo = ref_grpo(r, mask) * keep[:, None]
    np.testing.assert_allclose(adv.dapo(jnp.asarray(r), jm), ref_dapo, atol=2e-5)


def test_stateless_estimators_jit_and_vmap():
  r = jnp.asarray(_rewards(0))
  for fn in (adv.grpo, adv.dr_grpo, adv.rloo, adv.dapo):
    np.testing.assert_allclose(jax.jit(fn)(r), fn(r), atol=1e-6)
    stacked = jnp.stack([r, 1.0 - r])
    np.testing.assert_allclose(jax.vmap(fn)(stacked)[1], fn(1.0 - r), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The estimator objects the loop calls.


def test_estimator_objects_wrap_the_functions_and_have_no_state():
  r, m = _rewards(5), _mask(5, (7, 4))
  for name, fn in (('grpo', adv.grpo), ('dr_grpo', adv.dr_grpo), ('rloo', adv.rloo)):
    est = adv.ESTIMATORS[name]()
    out = est.advantages(r, m, prompts=[None] * 7)
    np.testing.assert_array_equal(out.values, np.asarray(fn(jnp.asarray(r), jnp.asarray(m))))
    assert est.group_filter(r) is None and est.state_dict() == {}
  dapo = adv.ESTIMATORS['dapo']()
  np.testing.assert_array_equal(dapo.group_filter(r), adv.dapo_keep(jnp.asarray(r)))
  assert not dapo.group_filter(r)[0] and not dapo.group_filter(r)[1]  # all-fail, all-pass
