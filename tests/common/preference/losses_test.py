"""common.preference.losses against closed forms, float64 numpy transcriptions and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from common.preference import losses

TRL_METRICS = {
  'loss',
  'rewards/chosen',
  'rewards/rejected',
  'rewards/accuracies',
  'rewards/margins',
  'logps/chosen',
  'logps/rejected',
}


def _logps(b=6, seed=0, scale=5.0):
  """Four [B] f32 arrays of plausible summed log-probs (policy chosen/rejected, ref ...)."""
  rng = np.random.default_rng(seed)
  return tuple(-np.abs(rng.normal(size=b) * scale).astype(np.float32) - 1.0 for _ in range(4))


def _np_log_sigmoid(x):
  x = np.asarray(x, np.float64)
  return -np.logaddexp(0.0, -x)


# ---------------------------------------------------------------------------------------------------
# DPO and conservative DPO.


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1, 0.3])
def test_dpo_is_log2_at_pi_equal_ref(label_smoothing):
  pc, pr, _, _ = _logps()
  out = jax.jit(lambda a, b: losses.dpo(a, b, a, b, beta=0.7, label_smoothing=label_smoothing))(
    pc, pr
  )
  np.testing.assert_allclose(out.loss, np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(out.losses, np.full(6, np.log(2.0)), rtol=1e-6)
  assert out.metrics['rewards/margins'] == 0 and out.metrics['rewards/accuracies'] == 0


def test_dpo_matches_numpy_and_label_smoothing_zero_is_dpo():
  pc, pr, rc, rr = _logps(seed=1)
  beta, eps = 0.3, 0.2
  h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
  plain = -_np_log_sigmoid(beta * h)
  smoothed = -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)
  out = losses.dpo(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(out.losses, plain, rtol=1e-5)
  np.testing.assert_allclose(out.loss, plain.mean(), rtol=1e-5)
  zero = losses.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
  np.testing.assert_array_equal(zero.losses, out.losses)
  smooth = losses.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
  np.testing.assert_allclose(smooth.losses, smoothed, rtol=1e-5)
  # Metrics: TRL's names, TRL's definitions.
  assert set(out.metrics) == TRL_METRICS
  m = out.metrics
  np.testing.assert_allclose(m['rewards/chosen'], (beta * (pc - rc)).mean(), rtol=1e-5)
  np.testing.assert_allclose(m['rewards/rejected'], (beta * (pr - rr)).mean(), rtol=1e-5)
  np.testing.assert_allclose(m['rewards/margins'], (beta * h).mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m['rewards/accuracies'], (h > 0).mean())
  np.testing.assert_allclose(m['logps/chosen'], pc.mean(), rtol=1e-6)
  np.testing.assert_allclose(m['logps/rejected'], pr.mean(), rtol=1e-6)


def test_dpo_gradient_is_beta_sigmoid_of_minus_margin():
  pc, pr, rc, rr = _logps(seed=2, b=4)
  beta = 0.5
  g_c, g_r = jax.grad(lambda a, b: losses.dpo(a, b, rc, rr, beta=beta).loss, argnums=(0, 1))(pc, pr)
  h = (pc - rc) - (pr - rr)
  expected = beta / (1 + np.exp(beta * h.astype(np.float64))) / 4  # mean over 4 pairs
  np.testing.assert_allclose(-g_c, expected, rtol=1e-5)
  np.testing.assert_allclose(g_r, expected, rtol=1e-5)
  # No gradient ever reaches the reference.
  g_ref = jax.grad(lambda a: losses.dpo(pc, pr, a, rr, beta=beta).loss)(rc)
  np.testing.assert_allclose(g_ref, -g_c, rtol=1e-6)  # d/d ref = -d/d policy: the ratio only
  metrics_grad = jax.grad(lambda a: losses.dpo(a, pr, rc, rr, beta=beta).metrics['loss'])(pc)
  np.testing.assert_array_equal(metrics_grad, 0.0)


# ---------------------------------------------------------------------------------------------------
# IPO and hinge: where the gradient must vanish.


def test_ipo_formula_and_zero_gradient_at_target_margin():
  pc, pr, rc, rr = _logps(seed=3)
  beta = 0.25
  h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
  out = losses.ipo(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(out.losses, (h - 1 / (2 * beta)) ** 2, rtol=1e-5)
  # Move the chosen log-prob so the margin is exactly 1 / (2 beta) = 2: gradient zero.
  target_pc = (rc + pr - rr + 1 / (2 * beta)).astype(np.float32)
  g = jax.grad(lambda a, b: losses.ipo(a, b, rc, rr, beta=beta).loss, argnums=(0, 1))(target_pc, pr)
  np.testing.assert_allclose(g[0], 0.0, atol=1e-5)
  np.testing.assert_allclose(g[1], 0.0, atol=1e-5)
  np.testing.assert_allclose(losses.ipo(target_pc, pr, rc, rr, beta=beta).loss, 0.0, atol=1e-9)


def test_hinge_has_no_gradient_beyond_the_margin():
  beta = 0.5
  rc = rr = np.zeros(4, np.float32)
  pr = np.zeros(4, np.float32)
  pc = np.asarray([0.5, 1.5, 2.5, 10.0], np.float32)  # beta h = 0.25, 0.75, 1.25, 5
  out = losses.hinge(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(out.losses, np.maximum(0, 1 - beta * pc), rtol=1e-6)
  g = jax.grad(lambda a: losses.hinge(a, pr, rc, rr, beta=beta).loss)(pc)
  np.testing.assert_allclose(g, [-beta / 4, -beta / 4, 0.0, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# SimPO and ORPO.


def test_simpo_is_its_formula():
  rng = np.random.default_rng(4)
  cm, rm = (-rng.uniform(0.1, 3.0, 8).astype(np.float32) for _ in range(2))
  beta, gamma = 2.0, 0.5
  out = jax.jit(lambda a, b: losses.simpo(a, b, beta=beta, gamma=gamma))(cm, rm)
  ref = -_np_log_sigmoid(beta * cm.astype(np.float64) - beta * rm - gamma)
  np.testing.assert_allclose(out.losses, ref, rtol=1e-5)
  np.testing.assert_allclose(out.metrics['rewards/chosen'], beta * cm.mean(), rtol=1e-5)
  # gamma = 0 at equal rewards: log 2.
  np.testing.assert_allclose(losses.simpo(cm, cm, beta=beta, gamma=0.0).loss, np.log(2), rtol=1e-6)


def _np_orpo(cm, rm, lam):
  """ORPO transcribed in float64: odds = P / (1 - P), P = exp(mean log-prob)."""
  pw, pl = np.exp(np.asarray(cm, np.float64)), np.exp(np.asarray(rm, np.float64))
  log_or = np.log((pw / (1 - pw)) / (pl / (1 - pl)))
  ratio = _np_log_sigmoid(log_or)
  return -np.asarray(cm, np.float64) - lam * ratio, ratio, log_or


def test_orpo_odds_ratio_matches_numpy():
  rng = np.random.default_rng(5)
  cm = -rng.uniform(0.01, 4.0, 16).astype(np.float32)
  rm = -rng.uniform(0.01, 4.0, 16).astype(np.float32)
  lam = 0.1
  out = jax.jit(lambda a, b: losses.orpo(a, b, lam=lam))(cm, rm)
  ref, ratio, log_or = _np_orpo(cm, rm, lam)
  np.testing.assert_allclose(out.losses, ref, rtol=1e-5)
  np.testing.assert_allclose(out.metrics['log_odds_chosen'], log_or.mean(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.metrics['log_odds_ratio'], ratio.mean(), rtol=1e-5)
  np.testing.assert_allclose(out.metrics['nll_loss'], -cm.mean(), rtol=1e-6)
  assert set(out.metrics) >= TRL_METRICS
  custom = losses.orpo(cm, rm, lam=lam, nll=np.ones(16, np.float32))
  np.testing.assert_allclose(custom.losses, 1.0 - lam * ratio, rtol=1e-5)


def test_log_odds_is_stable_at_both_ends():
  x = np.asarray([-1e-7, -1e-6, -1e-4, -0.3, -0.69, -0.7, -5.0, -40.0, -200.0], np.float32)
  x64 = x.astype(np.float64)
  # float64: log(-expm1(x)) is exact near 0 but rounds 1 - 4e-18 to 1 at x = -40; log1p(-exp(x))
  # is exact there.
  ref = np.where(x64 > -1.0, np.log(-np.expm1(x64)), np.log1p(-np.exp(x64)))
  np.testing.assert_allclose(losses.log1mexp(x), ref, rtol=1e-5, atol=1e-30)
  lo = losses.log_odds(np.asarray([0.0, -1e-9, -50.0], np.float32))
  assert np.all(np.isfinite(lo))
  g = jax.grad(lambda a: losses.orpo(a, jnp.full(3, -2.0), lam=1.0).loss)(
    jnp.asarray([-1e-7, -0.5, -80.0])
  )
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------------------
# Bradley-Terry reward heads.


def test_bradley_terry_recovers_logistic_regression():
  """A linear reward head fitted with the BT loss equals logistic regression on feature
  differences (the pairs shown in random order with a 0/1 label), fitted independently."""
  rng = np.random.default_rng(6)
  n, d = 400, 3
  theta_true = np.asarray([1.5, -2.0, 0.5])
  xa, xb = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  a_wins = rng.uniform(size=n) < 1 / (1 + np.exp(-(xa - xb) @ theta_true))
  xw = np.where(a_wins[:, None], xa, xb)
  xl = np.where(a_wins[:, None], xb, xa)

  def bt_loss(theta):
    return losses.bradley_terry(xw @ theta, xl @ theta).loss

  bt_fit = scipy.optimize.minimize(
    lambda t: float(bt_loss(jnp.asarray(t, jnp.float32))),
    np.zeros(d),
    jac=lambda t: np.asarray(jax.grad(bt_loss)(jnp.asarray(t, jnp.float32)), np.float64),
    method='BFGS',
    options={'gtol': 1e-6},
  ).x
  # Logistic regression: features x_a - x_b, label 1 if a was preferred (float64 numpy).
  z, y = xa - xb, a_wins.astype(np.float64)

  def lr_nll(t):
    s = z @ t
    return np.mean(np.logaddexp(0.0, s) - y * s)

  def lr_grad(t):
    return z.T @ (1 / (1 + np.exp(-(z @ t))) - y) / n

  lr_fit = scipy.optimize.minimize(lr_nll, np.zeros(d), jac=lr_grad, method='BFGS').x
  np.testing.assert_allclose(bt_fit, lr_fit, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(float(bt_loss(jnp.asarray(lr_fit, jnp.float32))), lr_nll(lr_fit), 1e-5)
  out = losses.bradley_terry(xw @ bt_fit, xl @ bt_fit)
  assert {'loss', 'accuracy', 'margin', 'mean_reward'} == set(out.metrics)
  np.testing.assert_allclose(out.metrics['accuracy'], ((xw - xl) @ bt_fit > 0).mean(), rtol=1e-6)


def test_bradley_terry_margin_and_centering():
  rc = np.asarray([1.0, 0.0, -2.0], np.float32)
  rr = np.asarray([0.0, 0.5, -1.0], np.float32)
  out = losses.bradley_terry(
    rc, rr, margin=np.asarray([0.5, 0.0, 1.0]), center_rewards_coefficient=0.1
  )
  ref = -_np_log_sigmoid(rc - rr - np.asarray([0.5, 0.0, 1.0])) + 0.1 * (rc + rr) ** 2
  np.testing.assert_allclose(out.losses, ref, rtol=1e-6)
  # Shifting both rewards changes nothing without centering.
  base = losses.bradley_terry(rc, rr).loss
  np.testing.assert_allclose(losses.bradley_terry(rc + 7.0, rr + 7.0).loss, base, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# FusionRoute's CDPO.


def test_cdpo_closed_forms():
  pc, pr, rc, rr = _logps(seed=7)
  beta = 0.1
  zero = np.zeros(6, np.float32)
  np.testing.assert_allclose(losses.cdpo(pc, pr, pc, pr, zero, beta=beta).loss, np.log(2), 1e-6)
  bias = np.linspace(-3, 3, 6).astype(np.float32)
  at_ref = losses.cdpo(pc, pr, pc, pr, bias, beta=beta)
  np.testing.assert_allclose(at_ref.losses, -_np_log_sigmoid(bias), rtol=1e-6)
  # Zero bias is DPO; otherwise the bias shifts DPO's logit.
  dpo = losses.dpo(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(losses.cdpo(pc, pr, rc, rr, zero, beta=beta).losses, dpo.losses)
  h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
  out = losses.cdpo(pc, pr, rc, rr, bias, beta=beta)
  np.testing.assert_allclose(out.losses, -_np_log_sigmoid(beta * h + bias), rtol=1e-5)
  np.testing.assert_allclose(out.metrics['cdpo/bias'], bias.mean(), atol=1e-6)
  assert TRL_METRICS | {'cdpo/bias'} == set(out.metrics)


def test_cdpo_bias_and_experts_get_no_gradient():
  pc, pr, rc, rr = _logps(seed=8)
  ec, er = _logps(seed=9)[:2]
  beta = 0.1

  def loss(pc, pr, ec, er):
    return losses.cdpo(pc, pr, rc, rr, losses.expert_bias(ec, er, beta=beta), beta=beta).loss

  g_pc, g_pr, g_ec, g_er = jax.grad(loss, argnums=(0, 1, 2, 3))(pc, pr, ec, er)
  np.testing.assert_array_equal(g_ec, 0.0)
  np.testing.assert_array_equal(g_er, 0.0)
  assert np.all(g_pc < 0) and np.all(g_pr > 0)
  # Even a bias passed straight in gets none (cdpo stops it again).
  g_bias = jax.grad(lambda b: losses.cdpo(pc, pr, rc, rr, b, beta=beta).loss)(
    np.ones(6, np.float32)
  )
  np.testing.assert_array_equal(g_bias, 0.0)
  # The router's gradient shrinks where the expert already separates the pair.
  g_small = jax.grad(lambda a: losses.cdpo(a, pr, rc, rr, np.full(6, 5.0), beta=beta).loss)(pc)
  g_large = jax.grad(lambda a: losses.cdpo(a, pr, rc, rr, np.full(6, -5.0), beta=beta).loss)(pc)
  assert np.all(np.abs(g_small) < np.abs(g_large))


def test_cdpo_is_monotone_in_the_router_margin():
  rc = rr = pr = np.zeros(9, np.float32)
  pc = np.linspace(-4, 4, 9).astype(np.float32)
  out = losses.cdpo(pc, pr, rc, rr, np.full(9, 0.3, np.float32), beta=0.5)
  assert np.all(np.diff(np.asarray(out.losses)) < 0)


# ---------------------------------------------------------------------------------------------------
# Masks, shapes, dtypes, jit.


_ALL = {
  'dpo': lambda a, b, c, d, m: losses.dpo(a, b, c, d, beta=0.1, label_smoothing=0.1, mask=m),
  'ipo': lambda a, b, c, d, m: losses.ipo(a, b, c, d, beta=0.1, mask=m),
  'hinge': lambda a, b, c, d, m: losses.hinge(a, b, c, d, beta=0.1, mask=m),
  'simpo': lambda a, b, c, d, m: losses.simpo(a / 10, b / 10, beta=2.0, gamma=0.5, mask=m),
  'orpo': lambda a, b, c, d, m: losses.orpo(a / 10, b / 10, lam=0.1, mask=m),
  'bt': lambda a, b, c, d, m: losses.bradley_terry(a, b, mask=m),
  'cdpo': lambda a, b, c, d, m: losses.cdpo(a, b, c, d, (c - d) * 0.1, beta=0.1, mask=m),
}


@pytest.mark.parametrize('name', sorted(_ALL))
def test_masked_pairs_never_contribute(name):
  fn = _ALL[name]
  args = _logps(seed=10)
  mask = np.asarray([1, 0, 1, 1, 0, 1], np.float32)
  kept = mask > 0
  full = jax.jit(fn)(*args, mask)
  only = fn(*(a[kept] for a in args), None)
  np.testing.assert_allclose(full.loss, only.loss, rtol=1e-6)
  for k in only.metrics:
    np.testing.assert_allclose(full.metrics[k], only.metrics[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(full.losses)[~kept], 0.0)
  # Garbage (NaN, inf) in masked-out pairs changes nothing and has no gradient.
  poisoned = tuple(np.where(kept, a, np.nan).astype(np.float32) for a in args[:2]) + args[2:]
  bad = fn(*poisoned, mask)
  np.testing.assert_allclose(bad.loss, only.loss, rtol=1e-6)
  g = jax.grad(lambda a: fn(a, *poisoned[1:], mask).loss)(poisoned[0])
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~kept] == 0)


@pytest.mark.parametrize('name', sorted(_ALL))
def test_losses_are_float32_scalars_from_any_float_dtype(name):
  fn = _ALL[name]
  args = tuple(jnp.asarray(a, jnp.bfloat16) for a in _logps(seed=11))
  out = fn(*args, None)
  assert out.loss.shape == () and out.loss.dtype == jnp.float32
  assert out.losses.shape == (6,) and out.losses.dtype == jnp.float32
  assert all(v.shape == () and v.dtype == jnp.float32 for v in out.metrics.values())
  eager = fn(*_logps(seed=11), None)
  jitted = jax.jit(fn)(*_logps(seed=11), None)
  np.testing.assert_allclose(jitted.loss, eager.loss, rtol=1e-6)
