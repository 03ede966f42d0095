"""InfoNCE against a numpy reference (false negatives, temperature, weights); no loss at token
slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.persrec import losses
from projects.persrec import models
from tests.persrec import util


def _table(v=12, d=6, seed=0):
  e = np.random.default_rng(seed).normal(size=(v, d))
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def _reference(o, targets, weights, table, negs, scale, thres, valid):
  o = o / np.linalg.norm(o, axis=1, keepdims=True)
  total, wsum = 0.0, 0.0
  for i in range(len(o)):
    row = [scale * o[i] @ table[targets[i]]]
    for n in negs:
      if n > 0 and valid[n] and table[targets[i]] @ table[n] <= thres:
        row.append(scale * o[i] @ table[n])
    row = np.array(row)
    total += weights[i] * (np.log(np.exp(row - row.max()).sum()) + row.max() - row[0])
    wsum += weights[i]
  return total / wsum


def test_info_nce_matches_reference_with_false_negative_masking():
  table = _table()
  rng = np.random.default_rng(1)
  o = rng.normal(size=(5, 6))
  targets = np.array([1, 2, 3, 4, 5])
  weights = np.array([1.0, 0.0, 2.0, 1.0, 1.0])
  negs = np.array([2, 3, 7, 0, 11, 5])  # contains targets 2, 3, 5 (false negatives) and padding 0
  valid = np.ones(12, bool)
  valid[11] = False  # a padded vocabulary row is never a negative
  got, aux = losses.info_nce(
    jnp.asarray(o, jnp.float32),
    jnp.asarray(targets),
    jnp.asarray(weights),
    jnp.asarray(table, jnp.float32),
    jnp.asarray(negs),
    jnp.float32(20.0),
    valid_items=jnp.asarray(valid),
  )
  want = _reference(o, targets, weights, table, negs, 20.0, 0.99, valid)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Duplicates of a target never act as its negatives: same loss as without them.
  clean = np.array([7, 0, 0, 0, 0, 0])
  got_clean, _ = losses.info_nce(
    jnp.asarray(o[[0]], jnp.float32),
    jnp.asarray([1]),
    jnp.ones(1),
    jnp.asarray(table, jnp.float32),
    jnp.asarray(np.array([1, 1, 7, 1, 0, 0])),
    jnp.float32(20.0),
  )
  want_clean = _reference(o[[0]], [1], [1.0], table, clean, 20.0, 0.99, np.ones(12, bool))
  np.testing.assert_allclose(float(got_clean), want_clean, rtol=1e-5)
  assert float(aux['loss_positions']) == 5.0


def test_negative_samplers():
  key = jax.random.key(0)
  s = np.asarray(losses.sample_negatives(key, 'sampled', 1000, 7, jnp.zeros((2, 3), jnp.int32)))
  assert s.min() >= 1 and s.max() <= 7 and len(np.unique(s)) == 7
  targets = jnp.asarray([[0, 4, 5], [6, 0, 0]])
  b = np.asarray(losses.sample_negatives(key, 'in_batch', 200, 7, targets))
  assert set(b.tolist()) <= {0, 4, 5, 6}
  assert np.asarray(losses.sample_negatives(key, 'full', 0, 4, targets)).tolist() == [1, 2, 3, 4]
  with pytest.raises(ValueError, match='unknown negatives'):
    losses.sample_negatives(key, 'bogus', 1, 4, targets)


def test_learnable_temperature_is_clamped():
  cfg = models.ModelConfig(num_items=5, recent_len=2, learn_temperature=True, temperature=0.07)
  m = util.model(cfg)
  assert float(m.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-5)
  m.log_scale[...] = jnp.float32(10.0)
  assert float(m.logit_scale()) == pytest.approx(100.0, rel=1e-5)
  m.log_scale[...] = jnp.float32(-3.0)
  assert float(m.logit_scale()) == pytest.approx(1.0)
  fixed = util.model(models.ModelConfig(num_items=5, recent_len=2, learn_temperature=False))
  assert fixed.log_scale is None and float(fixed.logit_scale()) == pytest.approx(20.0)


def test_no_loss_at_token_slots():
  """The loss reads item slots only: perturbing the outputs at token slots changes nothing."""
  cfg = models.ModelConfig(
    num_items=30,
    d_model=8,
    num_heads=1,
    head_dim=8,
    num_layers=1,
    old_len=4,
    recent_len=3,
    token_mode='learned',
    tokens_per_segment=2,
  )
  m = util.model(cfg)
  rng = np.random.default_rng(0)
  items = jnp.asarray(rng.integers(1, 31, (2, 7)), jnp.int32)
  targets = jnp.asarray(rng.integers(1, 31, (2, 7)), jnp.int32)
  out = util.forward(m, items, jnp.zeros((2, 7), jnp.int32))
  tok = jnp.asarray(models.layout(cfg).kind == models.TOKEN)
  table, scale, valid = m.item_table(), m.logit_scale(), m.valid_items()

  @jax.jit
  def grad_wrt_token_outputs(delta):
    def loss_of(delta):
      h = m.item_outputs(out + delta * tok[None, :, None])
      loss, _ = losses.info_nce(
        h.reshape(-1, 8),
        targets.reshape(-1),
        jnp.ones(14),
        table,
        jnp.arange(1, 31),
        scale,
        valid_items=valid,
      )
      return loss

    return jax.grad(loss_of)(delta)

  assert m.item_outputs(out).shape == (2, 7, 8)  # P + R item slots, no token slot
  assert float(jnp.abs(grad_wrt_token_outputs(jnp.float32(0.0)))) == 0.0
