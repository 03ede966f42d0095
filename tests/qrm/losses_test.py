"""Q-RM's loss and log phi: the formula on hand-computed values, invariance of log phi to a
state-wise constant added to Z, masked means that ignore padding, and the loss decreasing in
m_w - m_l; the DPO loss on pair batches; the token-reward source against its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.rl import rollout
from projects.qrm import losses
from projects.qrm import models


def test_qrm_loss_equals_the_formula_on_hand_computed_values():
  # Chosen: log phi [-0.5, -1.5] (then padding) -> m_w = -1.0; rejected: [-2, -3, -4] -> m_l = -3.
  lw = jnp.array([[-0.5, -1.5, 0.0]])
  mw = jnp.array([[1.0, 1.0, 0.0]])
  ll = jnp.array([[-2.0, -3.0, -4.0]])
  ml = jnp.array([[1.0, 1.0, 1.0]])
  loss, metrics = losses.qrm_loss(lw, mw, ll, ml, beta=0.2, gamma=2.0)
  # -log sigmoid(0.2 * (-1 - -3) - 2) = -log sigmoid(-1.6) = log(1 + e^1.6)
  want = np.log1p(np.exp(1.6))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['margin']), 2.0, rtol=1e-6)
  assert float(metrics['accuracy']) == 1.0
  # Two pairs: the mean of the per-pair losses; other beta / gamma.
  lw2 = jnp.array([[-1.0, 0.0], [-0.2, -0.4]])
  ll2 = jnp.array([[-1.0, -2.0], [-5.0, 0.0]])
  mw2 = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  ml2 = jnp.array([[1.0, 1.0], [1.0, 0.0]])
  loss2, _ = losses.qrm_loss(lw2, mw2, ll2, ml2, beta=1.0, gamma=0.5)
  z = np.array([1.0 * (-1.0 - -1.5) - 0.5, 1.0 * (-0.3 - -5.0) - 0.5])
  np.testing.assert_allclose(float(loss2), np.mean(np.log1p(np.exp(-z))), rtol=1e-6)


def test_defaults_are_the_papers():
  rm = losses.rm_config()
  assert rm.beta == 0.2 and rm.gamma == 2.0


def test_log_phi_is_invariant_to_a_state_wise_constant_added_to_z():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
  actions = jnp.asarray(rng.integers(0, 11, size=(3, 5)))
  c = jnp.asarray(rng.normal(size=(3, 5, 1)) * 50, jnp.float32)  # one constant per state
  a, b = models.log_phi(z, actions), models.log_phi(z + c, actions)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # ... but not to a constant on one action only.
  bumped = z.at[..., 0].add(5.0)
  assert not np.allclose(np.asarray(models.log_phi(bumped, actions)), np.asarray(a), atol=1e-3)
  # log phi = Z(s, a) - logsumexp Z(s, .)
  want = np.take_along_axis(np.asarray(z), np.asarray(actions)[..., None], -1)[..., 0]
  want = want - np.log(np.exp(np.asarray(z, np.float64)).sum(-1))
  np.testing.assert_allclose(np.asarray(a), want, atol=1e-5)


def test_masked_means_ignore_padding():
  x = jnp.array([[1.0, 3.0, jnp.nan, -jnp.inf], [2.0, jnp.inf, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
  m = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(losses.masked_mean(x, m)), [2.0, 2.0, 0.0])
  # The loss of a padded pair equals the loss of the same pair without padding, and its gradient
  # never reaches a padded position.
  lw, mw = jnp.array([[-0.5, -1.5, -99.0]]), jnp.array([[1.0, 1.0, 0.0]])
  ll, ml = jnp.array([[-2.0, 1e9]]), jnp.array([[1.0, 0.0]])
  padded, _ = losses.qrm_loss(lw, mw, ll, ml)
  plain, _ = losses.qrm_loss(lw[:, :2], mw[:, :2], ll[:, :1], ml[:, :1])
  assert float(padded) == float(plain)
  g = jax.grad(lambda a: losses.qrm_loss(a, mw, ll, ml)[0])(lw)
  assert float(g[0, 2]) == 0.0 and float(g[0, 0]) != 0.0


def test_the_loss_decreases_in_the_margin():
  margins = np.linspace(-20, 20, 81)
  vals = []
  for d in margins:
    loss, _ = losses.qrm_loss(
      jnp.array([[d]]), jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1))
    )
    vals.append(float(loss))
  assert np.all(np.diff(vals) < 0)
  grad = jax.grad(
    lambda d: losses.qrm_loss(d[None, None], jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)))[
      0
    ]
  )
  assert all(float(grad(jnp.float32(d))) < 0 for d in (-10.0, 0.0, 10.0))


def test_an_unknown_reward_model_is_a_config_error():
  from common import config as config_lib  # noqa: PLC0415

  with pytest.raises(config_lib.ConfigError, match='reward model'):
    losses.make_rm_loss_fn('orm', losses.rm_config())


class _Verifier:
  def __init__(self):
    self.n = 0

  def score(self, prompts, completions, lengths, g):
    self.n += 1
    return rollout.Rewards(np.arange(len(prompts) * g, dtype=np.float32).reshape(len(prompts), g))

  def state_dict(self):
    return {'n': self.n}

  def load_state_dict(self, s):
    self.n = s['n']

  def metrics(self):
    return {}


def test_token_rewards_are_scaled_log_probs_or_log_ratios_and_keep_the_verifiers_outcome():
  prompts = [rollout.Prompt(uid=i, tokens=(1, 3 + i), cluster='a', payload=None) for i in range(2)]
  completions = np.array([[4, 5, 2], [6, 2, 0], [7, 2, 0], [8, 8, 8]], np.int32)
  lengths = np.array([3, 2, 2, 3])
  seen = []

  def scorer(batch, v=1.0):
    seen.append(batch)
    return np.where(batch['completion_mask'] > 0, -v * (1 + batch['targets']), 7.0)

  src = losses.TokenRewards(_Verifier(), [scorer], 0.2, prompt_len=4, pad_id=0)
  r = src.score(prompts, completions, lengths, 2)
  np.testing.assert_array_equal(r.sequence, [[0, 1], [2, 3]])
  mask = np.arange(3)[None] < lengths[:, None]
  np.testing.assert_allclose(r.token, np.where(mask, -0.2 * (1 + completions), 0.0), rtol=1e-6)
  assert r.token_mask is None
  assert seen[0]['inputs'].shape == (4, 4 + 3 - 1)  # left-padded prompt + completion, LM layout
  two = losses.TokenRewards(
    _Verifier(), [scorer, lambda b: scorer(b, 0.5)], 0.1, prompt_len=4, pad_id=0
  )
  r2 = two.score(prompts, completions, lengths, 2)
  np.testing.assert_allclose(r2.token, np.where(mask, -0.05 * (1 + completions), 0.0), rtol=1e-6)
