"""OmniOPD's maths: the entropy-peak scheduler on hand-built logits, the Dirichlet posterior mean and
its limits, the base-model KL anchor (zero, with zero gradient, at pi = pi_base), gradients only on
audited chunk tokens and anchor tokens, the chunk similarities, white-box reverse KL."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import text
from common.rl import rollout
from projects.omniopd import losses
from tests.common.rl import toy


def _entropy(logits):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
  return np.asarray(-jnp.sum(jnp.exp(logp) * logp, -1))


def _logits_with_entropy_order(scales):
  """[N, V] logits: a peaked distribution scaled by 1/scale, so a larger scale = higher entropy."""
  base = np.asarray([4.0, 1.0, 0.0, -1.0, -2.0])
  return np.stack([base / s for s in scales])


def test_scheduler_picks_exactly_the_entropy_peaks():
  # Entropy rises with the scale: peaks at t = 1 (3.0), 3 (5.0) and 5 (2.0, the last position).
  scales = [1.0, 3.0, 0.5, 5.0, 0.7, 2.0]
  h = _entropy(_logits_with_entropy_order(scales))[None]
  assert list(np.argsort(-h[0])[:3]) == [3, 1, 5]
  assert losses.peak_entropy_positions(h, [6], k=1) == [[3]]
  assert losses.peak_entropy_positions(h, [6], k=2) == [[1, 3]]
  assert losses.peak_entropy_positions(h, [6], k=5) == [[1, 3, 5]]  # only three peaks exist
  # The threshold drops peaks below it; the response length ends the row (t = 5 is padding).
  assert losses.peak_entropy_positions(h, [6], k=5, min_entropy=float(h[0, 5]) + 1e-6) == [[1, 3]]
  assert losses.peak_entropy_positions(h, [5], k=5) == [[1, 3]]
  # A plateau counts once (its first position), a monotone row peaks at its end, empty rows none.
  flat = np.asarray([[0.1, 0.5, 0.5, 0.2], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
  assert losses.peak_entropy_positions(flat, [4, 4, 0], k=3) == [[1], [3], []]


def test_dirichlet_posterior_mean_and_its_limits():
  n, a = np.asarray([3.0, 1.0, 0.0]), np.asarray([0.5, 1.0, 2.5])
  got = losses.dirichlet_posterior_mean(n, a)
  np.testing.assert_allclose(got, (n + a) / (n.sum() + a.sum()))
  assert got.sum() == pytest.approx(1.0)
  # K -> infinity: the empirical frequencies; K -> 0: the prior mean.
  big = losses.dirichlet_posterior_mean(n * 1e9, a)
  np.testing.assert_allclose(big, n / n.sum(), atol=1e-8)
  np.testing.assert_allclose(losses.dirichlet_posterior_mean(np.zeros(3), a), a / a.sum())
  with pytest.raises(ValueError, match='> 0'):
    losses.dirichlet_posterior_mean(n, np.asarray([1.0, 0.0, 1.0]))


def test_chunk_advantages_use_the_smoothed_acceptance():
  s = np.asarray([1.0, 0.0, 0.5, 1.0])
  adv, p = losses.chunk_advantages(s, 1.0, 1.0)
  assert p == pytest.approx((2.5 + 1.0) / (4 + 2.0))
  np.testing.assert_allclose(adv, s - p, rtol=1e-6)
  # All candidates accepted: a small push of 1 / (K + sum alpha), not zero.
  adv, _ = losses.chunk_advantages(np.ones(4), 1.0, 1.0)
  np.testing.assert_allclose(adv, 1 / 6, rtol=1e-6)


def _batch(model_vocab, b, p, n, seed):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, model_vocab, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  mask[0, :2] = False  # ragged, left-padded
  comp = rng.integers(3, model_vocab, (b, n)).astype(np.int32)
  lens = np.asarray([n, n - 1, 2, n][:b], np.int32)
  return rollout.build_batch(toks, mask, comp, lens)


def test_kl_anchor_is_zero_with_zero_gradient_at_the_base_model():
  model = toy.model(0)
  batch = _batch(toy.VOCAB, 3, 5, 4, 0)
  base_logp = rollout.completion_logprobs(model, batch)
  mask = jnp.asarray(batch['completion_mask'])

  def loss(m):
    return losses.anchor_kl(rollout.completion_logprobs(m, batch), base_logp, mask)

  value, grads = nnx.value_and_grad(loss)(model)
  assert float(value) == 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(nnx.state(grads)))
  # Another model: positive KL, non-zero gradient.
  other = toy.model(1)
  assert float(losses.anchor_kl(rollout.completion_logprobs(other, batch), base_logp, mask)) > 0


def test_gradient_only_on_audited_chunk_tokens_and_anchor_tokens():
  rng = np.random.default_rng(0)
  cand_logp = jnp.asarray(rng.normal(size=(6, 3)) - 2.0, jnp.float32)
  cand_mask = np.zeros((6, 3), np.float32)
  cand_mask[0, :2] = cand_mask[1, :3] = cand_mask[4, :1] = 1.0  # rows 2, 3, 5: skipped audits
  adv = jnp.asarray([0.5, -0.25, 0.0, 0.3, 0.1, 0.2], jnp.float32)
  roll_logp = jnp.asarray(rng.normal(size=(2, 5)) - 2.0, jnp.float32)
  base_logp = roll_logp + jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  anchor = np.ones((2, 5), np.float32)
  anchor[0, 1:3] = 0.0  # the audited chunk of rollout 0
  anchor[1, 4] = 0.0  # padding

  def loss(c, r):
    return losses.omniopd_loss(
      c, adv, cand_mask, r, base_logp, anchor, pg_coef=1.0, anchor_coef=0.1
    )[0]

  gc, gr = jax.grad(loss, argnums=(0, 1))(cand_logp, roll_logp)
  np.testing.assert_array_equal(np.asarray(gc) != 0, cand_mask > 0)
  np.testing.assert_array_equal(np.asarray(gr) != 0, anchor > 0)


def test_similarities():
  assert text.edit_distance('kitten', 'sitting') == 3
  edit = losses.similarity_fn('edit')
  np.testing.assert_allclose(edit(['12', '1', ''], ['12', '13', '']), [1.0, 0.5, 1.0])
  exact = losses.similarity_fn('exact')
  np.testing.assert_array_equal(exact(['a', 'b'], ['a', 'c']), [1.0, 0.0])
  # Embedding: cosine mapped to [0, 1]; identical texts score 1 whatever the embedder.
  vecs = {'a': [1.0, 0.0], 'b': [0.0, 1.0], 'c': [-1.0, 0.0]}
  emb = losses.similarity_fn('embedding', lambda ts: np.asarray([vecs[t] for t in ts]))
  np.testing.assert_allclose(emb(['a', 'a', 'a'], ['a', 'b', 'c']), [1.0, 0.5, 0.0], atol=1e-12)
  with pytest.raises(ValueError, match='embed'):
    losses.similarity_fn('embedding')
  # The teacher's chunk: cut to the candidate's length unless the candidate ended.
  assert losses.teacher_chunk('234', '2', candidate_ended=False) == '2'
  assert losses.teacher_chunk('234', '2', candidate_ended=True) == '234'


def test_reverse_kl_is_zero_at_the_teacher_and_positive_elsewhere():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  mask = jnp.ones((2, 3))
  same = jax.nn.log_softmax(logits, -1)
  assert float(losses.reverse_kl(logits, same, mask)) == pytest.approx(0.0, abs=1e-6)
  other = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32), -1)
  assert float(losses.reverse_kl(logits, other, mask)) > 0.01
