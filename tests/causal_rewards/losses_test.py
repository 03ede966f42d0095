"""Causal Rewards' objective: the MMD^2 estimators' must-holds (0 for identical samples, symmetric,
biased >= 0, unbiased mean ~ 0 for two samples of one distribution), agreement with a numpy
reference, the median heuristic, the CRM penalty's bins and labels, lambda = 0 == the vanilla
Bradley-Terry reward model bitwise, and on a toy whose label is a pure spurious cue a large lambda
drives |corr(reward, Z)| near 0 (the vanilla model's is near 1)."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import sharding
from common import train_loop
from common.reward_models import heads
from common.reward_models import metrics as rm_metrics
from common.reward_models import training
from experiments.causal_rewards.configs import base
from projects.causal_rewards import losses


def _np_mmd2(x, y, sigma, unbiased):
  """Gretton et al. (2012) Eq. 3 / Eq. 5 with explicit loops over the kernel's terms."""
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
  n, m = len(x), len(y)
  kxx = [k(x[i], x[j]) for i in range(n) for j in range(n) if not (unbiased and i == j)]
  kyy = [k(y[i], y[j]) for i in range(m) for j in range(m) if not (unbiased and i == j)]
  kxy = [k(x[i], y[j]) for i in range(n) for j in range(m)]
  return np.mean(kxx) + np.mean(kyy) - 2 * np.mean(kxy)


@pytest.mark.parametrize('unbiased', [False, True])
def test_mmd2_matches_the_reference_and_is_symmetric(unbiased):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))
  got = float(losses.mmd2(x, y, bandwidth=1.3, unbiased=unbiased))
  np.testing.assert_allclose(got, _np_mmd2(x, y, 1.3, unbiased), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    got, float(losses.mmd2(y, x, bandwidth=1.3, unbiased=unbiased)), rtol=1e-6, atol=1e-7
  )
  # Median heuristic: the same estimator at sigma = sqrt(median pairwise d^2 / 2) of the pool.
  z = np.concatenate([x, y])
  d2 = ((z[:, None] - z[None]) ** 2).sum(-1)[~np.eye(len(z), dtype=bool)]
  sigma = np.sqrt(np.median(d2) / 2)
  np.testing.assert_allclose(
    float(losses.mmd2(x, y, unbiased=unbiased)), _np_mmd2(x, y, sigma, unbiased), rtol=1e-4
  )


def test_mmd2_is_zero_for_identical_samples_and_biased_is_non_negative():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 4))
  assert abs(float(losses.mmd2(x, x))) < 1e-6
  assert abs(float(losses.mmd2(x, x, bandwidth=0.7))) < 1e-6
  r = np.random.default_rng(7)
  a, b = r.normal(size=(64, 5, 2)), r.normal(0.3, 1.0, size=(64, 4, 2))
  sig = r.uniform(0.2, 3, size=64)
  many = jax.jit(jax.vmap(lambda a, b, s: losses.mmd2(a, b, bandwidth=s)))(a, b, sig)
  assert float(np.min(many)) >= -1e-7
  # Distinct distributions: clearly positive, for both estimators.
  far = rng.normal(3.0, 1.0, size=(9, 4))
  assert float(losses.mmd2(x, far)) > 0.1 and float(losses.mmd2(x, far, unbiased=True)) > 0.1


def test_unbiased_mmd2_averages_zero_for_one_distribution_and_biased_does_not():
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.vmap(lambda k: jax.random.normal(k, (2, 8, 2)))(keys)
  f = lambda unbiased: jax.vmap(lambda s: losses.mmd2(s[0], s[1], bandwidth=1.0, unbiased=unbiased))  # noqa: E731
  u, b = np.asarray(f(True)(draw)), np.asarray(f(False)(draw))
  assert abs(u.mean()) < 3 * u.std() / np.sqrt(len(u))  # 0 within 3 standard errors
  assert (u < 0).any()  # unbiased: it can go negative
  assert b.mean() > 10 * b.std() / np.sqrt(len(b))  # the biased one is positively biased


def test_crm_penalty_bins_labels_and_weights():
  rng = np.random.default_rng(2)
  phi = rng.normal(size=(12, 3)).astype(np.float32)
  z = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1])
  labels = np.array([1] * 6 + [0] * 6)
  sig = 1.1
  want_u = sum(_np_mmd2(phi[z == m], phi, sig, False) for m in (0, 1))
  got_u = losses.crm_penalty(phi, z, labels, num_bins=2, conditional=False, bandwidth=sig)
  np.testing.assert_allclose(float(got_u), want_u, rtol=1e-5)
  want_c = sum(
    _np_mmd2(phi[(z == m) & (labels == v)], phi[labels == v], sig, False)
    for v in (0, 1)
    for m in (0, 1)
  )
  got_c = losses.crm_penalty(phi, z, labels, num_bins=2, conditional=True, bandwidth=sig)
  np.testing.assert_allclose(float(got_c), want_c, rtol=1e-5)
  # Weight 0 drops a row; an empty bin (and one of a single row) contributes 0.
  w = np.ones(12)
  w[:3] = 0
  keep = w > 0
  want_w = sum(_np_mmd2(phi[keep & (z == m)], phi[keep], sig, False) for m in (0, 1))
  got_w = losses.crm_penalty(
    phi, z, labels, num_bins=3, conditional=False, bandwidth=sig, weights=w
  )
  np.testing.assert_allclose(float(got_w), want_w, rtol=1e-5)
  # Z independent of phi's distribution (each bin a copy of the pool): 0.
  twice = np.concatenate([phi, phi])
  z2 = np.array([0] * 12 + [1] * 12)
  assert abs(float(losses.crm_penalty(twice, z2, z2, num_bins=2, conditional=False))) < 1e-6


def _tiny_config(*overrides):
  tiny = ('model.warmup_steps=0', 'model.d_model=16', 'model.num_layers=1', 'model.mlp_dim=32')
  return base.get_config(','.join(('smoke', *tiny, *overrides)))


def _pairs(rng, b, tokens=12):
  """A random batch of [B, 2, ...] pair examples in input_pipeline's layout."""
  prompts = [list(rng.integers(3, 90, size=int(rng.integers(2, 6)))) for _ in range(b)]
  chosen = [list(rng.integers(3, 90, size=int(rng.integers(1, tokens)))) for _ in range(b)]
  rejected = [list(rng.integers(3, 90, size=int(rng.integers(1, tokens)))) for _ in range(b)]
  from common.preference import scoring  # noqa: PLC0415

  rows = heads.pair_batch(scoring.pad_pairs(prompts, chosen, rejected, prompt_len=6))
  out = {k: np.stack([v[:b], v[b:]], axis=1) for k, v in rows.items()}
  out['z'] = rng.integers(0, 2, size=(b, 2)).astype(np.int32)
  out['weight'] = np.ones((b,), np.float32)
  return out


def test_lambda_zero_reproduces_the_vanilla_reward_model_bitwise():
  """With crm.lam = 0 the CRM loss and its training steps are the plain Bradley-Terry model's."""
  from projects.causal_rewards import models  # noqa: PLC0415

  config = _tiny_config('crm.lam=0.0', 'crm.mode=conditional')
  rng = np.random.default_rng(3)
  batches = [_pairs(rng, 8) for _ in range(3)]
  crm_loss = losses.make_loss_fn(config, 2)

  def vanilla_loss(model, batch, key):
    del key
    loss, m, _ = training.bradley_terry_loss(model, losses.rows_of(batch), weights=batch['weight'])
    return loss, m

  tx = optax.adam(1e-2)
  mesh = sharding.make_mesh([('data', 1), ('fsdp', 1), ('tensor', 1)], jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.sharding.rules)

  def steps(loss_fn):
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      spec = train_loop.init_state(
        lambda: train_loop.TrainState(models.build(config), tx), mesh, rules
      )
      step = train_loop.make_train_step(spec.graphdef, loss_fn, spec.shardings)
      state, out = spec.state, []
      for i, b in enumerate(batches):
        state, m = step(state, sharding.to_global(b, mesh, rules), train_loop.step_key(0, i, 'x'))
        out.append(float(m['loss']))
      params = jax.device_get(nnx.state(train_loop.model_of(spec.graphdef, state), nnx.Param))
    return out, params

  la, pa = steps(crm_loss)
  lb, pb = steps(vanilla_loss)
  assert la == lb
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And a positive lambda does change the first step's loss (the penalty is live).
  crm1 = losses.make_loss_fn(_tiny_config('crm.lam=1.0'), 2)
  with sharding.unsharded():
    model = models.build(config)
  both = nnx.jit(lambda m, b: (crm_loss(m, b, None), crm1(m, b, None)))
  (l0, m0), (l1, m1) = both(model, jax.tree.map(jnp.asarray, batches[0]))
  assert float(m0['mmd']) > 0 and float(l1) == pytest.approx(float(l0) + float(m1['mmd']), rel=1e-5)


class _Toy(nnx.Module):
  """An MLP reward model on vectors: phi = tanh(W x + b), reward = w . phi."""

  def __init__(self, d, h, rngs):
    self.body = nnx.Linear(d, h, rngs=rngs)
    self.head = nnx.Linear(h, 1, rngs=rngs)

  def __call__(self, x):
    phi = jnp.tanh(self.body(x))
    return self.head(phi)[..., 0], phi


def _toy_correlation(lam, mode, representation='features', steps=300, seed=0):
  """Pairs whose label is the cue alone (Z = 1 on every chosen response, 0 on every rejected one;
  the other coordinates are noise): |corr(reward, Z)| on fresh responses after training."""
  rng = np.random.default_rng(seed)
  d = 6

  def sample(n):
    x = rng.normal(size=(2 * n, d)).astype(np.float32)
    z = np.concatenate([np.ones(n), np.zeros(n)]).astype(np.int32)
    x[:, 0] = 2.0 * z - 1.0 + 0.1 * rng.normal(size=2 * n)  # the cue coordinate
    return jnp.asarray(x), jnp.asarray(z)

  model = _Toy(d, 16, nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, z):
    def f(m):
      r, phi = m(x)
      n = x.shape[0] // 2
      bt = -jnp.mean(jax.nn.log_sigmoid(r[:n] - r[n:]))
      rep = phi if representation == 'features' else r
      pen = losses.crm_penalty(
        rep, z, (jnp.arange(2 * n) < n).astype(jnp.int32), num_bins=2, conditional=mode
      )
      return bt + lam * pen

    loss, g = nnx.value_and_grad(f)(model)
    opt.update(model, g)
    return loss

  for _ in range(steps):
    step(model, opt, *sample(32))
  x, z = sample(512)
  r, _ = model(x)
  return abs(rm_metrics.pearson(np.asarray(r), np.asarray(z)))


@pytest.mark.parametrize(('representation', 'lam'), [('features', 1000.0), ('reward', 100.0)])
def test_a_large_lambda_drives_the_reward_cue_correlation_near_zero_on_a_pure_cue_toy(
  representation, lam
):
  vanilla = _toy_correlation(0.0, False, representation)
  crm = _toy_correlation(lam, False, representation)
  assert vanilla > 0.9
  assert crm < 0.1, (vanilla, crm)
