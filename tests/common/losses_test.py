"""Tests for common.losses against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import losses

# Jitted once per shape: eager op-by-op dispatch costs more than the maths in these tests.
_token_logprobs = jax.jit(losses.token_logprobs)
_cross_entropy = jax.jit(losses.cross_entropy)


def _ref_nll(logits, targets):
  """float64 -log softmax(logits)[target] per position."""
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(x, np.asarray(targets)[..., None], axis=-1)[..., 0]
  return logz - picked


def _inputs(shape=(3, 5), vocab=11, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(*shape, vocab)).astype(np.float32) * 3
  targets = rng.integers(0, vocab, size=shape).astype(np.int32)
  return logits, targets


def test_token_logprobs_matches_reference():
  logits, targets = _inputs()
  lp = _token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  assert lp.shape == targets.shape and lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, -_ref_nll(logits, targets), rtol=1e-5, atol=1e-6)


def test_token_logprobs_are_log_probabilities():
  logits, _ = _inputs(shape=(2, 4), vocab=7)
  all_targets = np.broadcast_to(np.arange(7), (2, 4, 7))
  every = jax.jit(jax.vmap(losses.token_logprobs, in_axes=(None, -1), out_axes=-1))
  lp = every(jnp.asarray(logits), jnp.asarray(all_targets))
  assert (np.asarray(lp) <= 0).all()
  np.testing.assert_allclose(jax.scipy.special.logsumexp(lp, axis=-1), 0.0, atol=1e-5)


def test_token_logprobs_are_float32_for_bf16_logits():
  logits, targets = _inputs()
  lp = _token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert lp.dtype == jnp.float32
  ref = -_ref_nll(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets)
  np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)


def test_cross_entropy_matches_reference():
  logits, targets = _inputs()
  loss, count = _cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert loss.dtype == jnp.float32
  assert float(count) == targets.size
  np.testing.assert_allclose(loss, _ref_nll(logits, targets).mean(), rtol=1e-5)


def test_cross_entropy_of_large_logits_is_finite():
  logits = np.array([[1e4, -1e4, 0.0]], np.float32)
  loss, _ = _cross_entropy(jnp.asarray(logits), jnp.array([1]))
  np.testing.assert_allclose(loss, 2e4, rtol=1e-6)


def test_masked_tokens_do_not_contribute_and_mean_is_over_kept_tokens():
  logits, targets = _inputs()
  mask = np.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1]], np.int32)
  loss, count = _cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  ref = _ref_nll(logits, targets)[mask.astype(bool)].mean()
  assert float(count) == mask.sum() == 7
  np.testing.assert_allclose(loss, ref, rtol=1e-5)

  # Changing masked-out logits and targets (any finite values) changes nothing.
  rng = np.random.default_rng(1)
  noisy = np.where(mask[..., None].astype(bool), logits, rng.normal(size=logits.shape) * 100)
  other_targets = np.where(mask.astype(bool), targets, (targets + 3) % 11)
  loss2, _ = _cross_entropy(jnp.asarray(noisy), jnp.asarray(other_targets), jnp.asarray(mask))
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_loss_does_not_depend_on_padding_amount():
  logits, targets = _inputs(shape=(1, 4))
  short, _ = _cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  pad_logits = np.concatenate([logits, np.zeros((1, 6, 11), np.float32)], axis=1)
  pad_targets = np.concatenate([targets, np.zeros((1, 6), np.int32)], axis=1)
  mask = np.array([[1] * 4 + [0] * 6])
  long, count = _cross_entropy(jnp.asarray(pad_logits), jnp.asarray(pad_targets), jnp.asarray(mask))
  assert float(count) == 4
  np.testing.assert_allclose(long, short, rtol=1e-6)


def test_bool_mask_and_all_masked_batch():
  logits, targets = _inputs()
  mask = np.zeros(targets.shape, bool)
  loss, count = _cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert float(count) == 0 and float(loss) == 0.0
  mask[1, 2] = True
  loss, count = _cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(loss, _ref_nll(logits, targets)[1, 2], rtol=1e-5)


def test_cross_entropy_gradient_is_softmax_minus_onehot():
  logits, targets = _inputs(shape=(2, 3), vocab=5)
  grad = jax.jit(jax.grad(lambda x, t: losses.cross_entropy(x, t)[0]))
  g = grad(jnp.asarray(logits), jnp.asarray(targets))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(5)[targets]
  np.testing.assert_allclose(g, (p - onehot) / 6, rtol=1e-5, atol=1e-7)


class _CopyModel:
  """logits[b, t] = 8 * onehot(tokens[b, t]): predicts 'the next token equals this one'.

  Its logits depend on its input, so the loss checks which tokens it was fed as well as the targets.
  """

  def __init__(self, vocab):
    self.vocab = vocab
    self.seen = []
    self.kwargs = []

  def __call__(self, tokens, **kwargs):
    self.seen.append(tokens.shape)
    self.kwargs.append(kwargs)
    return 8.0 * jax.nn.one_hot(tokens, self.vocab)


def test_next_token_loss_uses_shifted_targets():
  tokens = np.array([[1, 1, 2, 2, 3], [4, 4, 4, 0, 0]], np.int32)
  model = _CopyModel(6)
  run = jax.jit(lambda t: losses.next_token_loss(model, t, temperature=1.0))
  loss, count = run(jnp.asarray(tokens))
  assert model.seen == [(2, 4)]
  assert model.kwargs[0] == {'temperature': 1.0}
  assert float(count) == 8
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  ref = _ref_nll(8.0 * np.eye(6)[inputs], targets).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # Unshifted targets would give the copy model a near-zero loss; shifted ones do not.
  unshifted = _ref_nll(8.0 * np.eye(6)[inputs], inputs).mean()
  assert unshifted < 0.01 < float(loss)


def test_next_token_loss_mask_selects_target_positions():
  tokens = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)  # e.g. prompt masked out
  model = _CopyModel(6)
  loss, count = jax.jit(lambda t, m: losses.next_token_loss(model, t, m))(
    jnp.asarray(tokens), jnp.asarray(mask)
  )
  inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].astype(bool)
  assert float(count) == tmask.sum() == 5
  ref = _ref_nll(8.0 * np.eye(6)[inputs], targets)[tmask].mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cross_entropy_jit_matches_eager(dtype):
  logits, targets = _inputs()
  loss, _ = _cross_entropy(jnp.asarray(logits, dtype), jnp.asarray(targets))
  eager, _ = losses.cross_entropy(jnp.asarray(logits, dtype), jnp.asarray(targets))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, eager, rtol=1e-6)
