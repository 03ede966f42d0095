"""common.embeddings against numpy references and hand-computed rankings."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from common import embeddings


def _np_info_nce(q, d, scale):
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  dn = d / np.linalg.norm(d, axis=1, keepdims=True)
  logits = scale * qn @ dn.T
  m = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
  return float(np.mean(lse - np.diag(logits)))


def test_mean_pool_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], bool)
  got = np.asarray(embeddings.mean_pool(jnp.asarray(h), jnp.asarray(mask)))
  want = np.stack([h[i][mask[i]].mean(0) for i in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  h2 = h.copy()
  h2[~mask] = 1e3  # garbage at padded positions changes nothing
  got2 = np.asarray(embeddings.mean_pool(jnp.asarray(h2), jnp.asarray(mask)))
  np.testing.assert_allclose(got2, want, rtol=1e-6)


def test_last_token_pool_and_empty_rows():
  h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
  got = np.asarray(embeddings.last_token_pool(h, mask))
  np.testing.assert_array_equal(got[0], np.asarray(h[0, 1]))
  np.testing.assert_array_equal(got[1], np.zeros(3))
  np.testing.assert_array_equal(np.asarray(embeddings.mean_pool(h, mask))[1], np.zeros(3))
  np.testing.assert_array_equal(np.asarray(embeddings.last_index(mask)), [1, -1])


def test_gather_positions():
  h = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)
  got = embeddings.gather_positions(h, jnp.array([[0, 4], [2, 3]]))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(h)[[[0], [1]], [[0, 4], [2, 3]]])


@pytest.mark.parametrize('b,scale', [(2, 1.0), (4, 20.0), (8, 100.0)])
def test_info_nce_identical_positives_orthogonal_negatives(b, scale):
  q = np.eye(b, 16, dtype=np.float32) * 3.0  # orthogonal rows, any norm
  loss = float(embeddings.info_nce(jnp.asarray(q), jnp.asarray(q * 0.5), scale))
  np.testing.assert_allclose(loss, math.log(1 + (b - 1) * math.exp(-scale)), rtol=1e-5, atol=1e-7)


def test_info_nce_matches_numpy_and_is_permutation_symmetric():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(6, 8)).astype(np.float32)
  d = (q + 0.5 * rng.normal(size=q.shape)).astype(np.float32)
  got = float(embeddings.info_nce(jnp.asarray(q), jnp.asarray(d), 7.0))
  np.testing.assert_allclose(got, _np_info_nce(q, d, 7.0), rtol=1e-5)
  perm = rng.permutation(6)
  permuted = float(embeddings.info_nce(jnp.asarray(q[perm]), jnp.asarray(d[perm]), 7.0))
  np.testing.assert_allclose(permuted, got, rtol=1e-5)
  sym = float(embeddings.info_nce(jnp.asarray(q), jnp.asarray(d), 7.0, symmetric=True))
  np.testing.assert_allclose(sym, 0.5 * (_np_info_nce(q, d, 7.0) + _np_info_nce(d, q, 7.0)), 1e-5)


def test_info_nce_valid_mask_equals_the_subset():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(5, 4)).astype(np.float32)
  d = rng.normal(size=(5, 4)).astype(np.float32)
  valid = np.array([1, 0, 1, 1, 0], bool)
  got = float(embeddings.info_nce(jnp.asarray(q), jnp.asarray(d), 3.0, jnp.asarray(valid)))
  np.testing.assert_allclose(got, _np_info_nce(q[valid], d[valid], 3.0), rtol=1e-5)
  none = embeddings.info_nce(jnp.asarray(q), jnp.asarray(d), 3.0, jnp.zeros(5, bool))
  assert float(none) == 0.0


def test_logit_scale_init_and_forward_clip():
  s = embeddings.LogitScale()
  np.testing.assert_allclose(float(s()), 20.0, rtol=1e-6)
  s.log_scale[...] = jnp.asarray(10.0)
  np.testing.assert_allclose(float(s()), 100.0, rtol=1e-5)
  s.log_scale[...] = jnp.asarray(-3.0)
  np.testing.assert_allclose(float(s()), 1.0)
  with pytest.raises(ValueError, match='outside'):
    embeddings.LogitScale(init=5.0)


class _Holder(nnx.Module):
  def __init__(self):
    self.scale = embeddings.LogitScale()
    self.w = nnx.Param(jnp.ones((3,)))


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_clamp_holds_after_updates(sign):
  m = _Holder()
  tx = optax.chain(
    optax.sgd(10.0), embeddings.clamp_transform(embeddings.path_endswith('log_scale'))
  )
  opt = nnx.Optimizer(m, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    def loss(m):
      return -sign * m.scale.log_scale[...] + sign * jnp.sum(m.w[...])

    opt.update(m, nnx.grad(loss)(m))

  for _ in range(5):
    step(m, opt)
    v = float(m.scale.log_scale[...])
    assert embeddings.LOG_SCALE_MIN <= v <= embeddings.LOG_SCALE_MAX + 1e-6
  want = embeddings.LOG_SCALE_MAX if sign > 0 else embeddings.LOG_SCALE_MIN
  np.testing.assert_allclose(float(m.scale.log_scale[...]), want, rtol=1e-6, atol=1e-6)
  # Other parameters are untouched by the clamp: plain SGD moved them by 5 * 10 * sign.
  np.testing.assert_allclose(np.asarray(m.w[...]), 1.0 - 50.0 * sign)


def test_retrieval_metrics_hand_computed():
  # Query 0: target 2 ranked 1st. Query 1: target 0 ranked 3rd (scores 0.9, 0.5 ahead of 0.1).
  # Query 2: targets {1, 3}, ranks 2 and 4.
  scores = np.array([[0.1, 0.2, 0.9, 0.0], [0.1, 0.9, 0.5, 0.0], [0.9, 0.8, 0.7, 0.6]], np.float32)
  rel = np.zeros((3, 4), bool)
  rel[0, 2] = rel[1, 0] = rel[2, 1] = rel[2, 3] = True
  m = embeddings.retrieval_metrics(scores, rel, ks=(1, 2, 3))
  assert m['recall@1'] == pytest.approx((1 + 0 + 0) / 3)
  assert m['recall@2'] == pytest.approx((1 + 0 + 0.5) / 3)
  assert m['recall@3'] == pytest.approx((1 + 1 + 0.5) / 3)
  assert m['mrr'] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
  ndcg2 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
  assert m['ndcg@10'] == pytest.approx((1 + 1 / math.log2(4) + ndcg2) / 3)
  # Index targets give the same as the one-hot matrix.
  m1 = embeddings.retrieval_metrics(scores[:2], np.array([2, 0]))
  m2 = embeddings.retrieval_metrics(scores[:2], rel[:2])
  assert m1 == m2


def test_retrieval_ties_break_by_index_and_errors():
  scores = np.zeros((1, 3))
  assert embeddings.ranks_of_relevant(scores, np.array([2]))[0].tolist() == [3]
  with pytest.raises(ValueError, match='outside'):
    embeddings.retrieval_metrics(scores, np.array([3]))
  with pytest.raises(ValueError, match='no query'):
    embeddings.retrieval_metrics(scores, np.zeros((1, 3), bool))


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(3)
  a = rng.integers(0, 5, size=40).astype(float)
  b = a + rng.normal(size=40)
  np.testing.assert_allclose(embeddings.spearman(a, b), scipy.stats.spearmanr(a, b)[0], 1e-12)
  np.testing.assert_array_equal(embeddings.average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
  assert math.isnan(embeddings.spearman([1, 1, 1], [1, 2, 3]))


def test_pooling_is_jittable_on_a_sharded_batch():
  mesh = jax.make_mesh((8,), ('data',))
  h = jax.device_put(
    jnp.ones((8, 4, 2)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  )
  out = jax.jit(embeddings.mean_pool)(h, jnp.ones((8, 4), bool))
  np.testing.assert_allclose(np.asarray(out), 1.0)
