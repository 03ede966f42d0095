"""The fusion objective against a numpy reference, and its limits (lambda = 1: CLM; a one-hot gold
teacher: L_fuse = L_CLM)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from projects.fusechat import losses


def _case(seed=0, b=2, t=5, v=11, k=3):
  r = np.random.default_rng(seed)
  logits = r.normal(size=(b, t, v)).astype(np.float32)
  targets = r.integers(0, v, (b, t))
  mask = r.random((b, t)) < 0.8
  mask[0, 0] = True
  ids = r.integers(0, v, (b, t, k))
  probs = r.random((b, t, k)).astype(np.float32)
  probs /= probs.sum(-1, keepdims=True)
  return logits, targets, mask, ids, probs


def _reference(logits, targets, mask, ids, probs, lam):
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  gold = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  fuse = -(probs * np.take_along_axis(logp, ids, -1)).sum(-1)
  n = mask.sum()
  clm, f = -(gold * mask).sum() / n, (fuse * mask).sum() / n
  return lam * clm + (1 - lam) * f, clm, f


@pytest.mark.parametrize('lam', [0.0, 0.3, 0.9, 1.0])
def test_fusion_loss_matches_numpy(lam):
  case = _case()
  loss, aux = losses.fusion_loss(*map(jnp.asarray, case), lam)
  ref, clm, fuse = _reference(*case, lam)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(aux['clm']), clm, rtol=1e-5)
  np.testing.assert_allclose(float(aux['fuse']), fuse, rtol=1e-5)


def test_one_hot_gold_teacher_is_the_clm_loss():
  logits, targets, mask, _, _ = _case(1)
  ids = np.zeros(targets.shape + (3,), np.int64)
  ids[..., 0] = targets
  probs = np.zeros(targets.shape + (3,), np.float32)
  probs[..., 0] = 1.0
  loss, aux = losses.fusion_loss(*map(jnp.asarray, (logits, targets, mask, ids, probs)), 0.4)
  np.testing.assert_allclose(float(aux['fuse']), float(aux['clm']), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(aux['clm']), rtol=1e-6)
