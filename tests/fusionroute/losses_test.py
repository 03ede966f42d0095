"""FusionRoute's losses (Eq. 2, Eq. 3, Algorithm 1) against closed forms and numpy references."""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.adapters import core as adapters_core
from common.preference import scoring
from projects.fusionroute import input_pipeline as ip
from projects.fusionroute import losses
from projects.fusionroute import models
from tests.fusionroute import conftest


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sft_batch(n: int = 6) -> dict:
  rows = [ip.sft_row(ip.problem(i % 3, 0, 'train', i)) for i in range(n)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _pref_batch(model: models.FusionRoute, n: int = 4) -> dict:
  probs = [ip.problem(i % 3, 0, 'train', i) for i in range(n)]
  wrong = ['7', 'abc', 'ABCD', '12']
  pairs = ip.make_pairs(probs, [[wrong[j % 4] for j in range(n)]])
  ref = np.zeros(len(pairs['chosen']), np.float32)
  pairs['ref_chosen_logps'], pairs['ref_rejected_logps'] = ref, ref
  items = [ip.pref_item({k: v[j] for k, v in pairs.items()}) for j in range(len(pairs['chosen']))]
  batch = {k: jnp.asarray(np.stack([it[k] for it in items])) for k in items[0]}
  # The reference = the model itself: pi == pi_ref.
  chosen, rejected = scoring.score_pairs(model.router.lm, ip.pair_rows(batch))
  batch['ref_chosen_logps'], batch['ref_rejected_logps'] = chosen.sum, rejected.sum
  return batch


def test_disagreement_set_is_empty_for_identical_experts_and_the_head_gets_no_gradient():
  model = conftest.make_model(n=3, expert_seeds=[7, 7, 7])
  batch = _sft_batch()
  logits = model.expert_logits(batch['inputs'], segment_ids=batch['segment_ids'])
  assert not bool(losses.disagreement(logits, batch['loss_mask']).any())

  def l_expert(m):
    _, metrics = losses.sft_loss(m, batch, lam=1.0)
    return metrics['expert']

  grads = nnx.grad(l_expert)(model)
  assert float(l_expert(model)) == 0.0
  np.testing.assert_array_equal(np.asarray(grads.router.head.kernel[...]), 0.0)


def test_disagreement_is_computed_from_greedy_tokens_only():
  n, b, t, v = 3, 2, 4, 5
  x = np.zeros((n, b, t, v), np.float32)
  x[:, :, :, 0] = 1.0  # everyone's greedy token is 0 ...
  x[1, 0, 2, 3] = 2.0  # ... except expert 1 at (0, 2)
  x[2, 1, 1, 0] = 9.0  # a sharper distribution with the same greedy token is no disagreement
  s = np.asarray(losses.disagreement(jnp.asarray(x)))
  want = np.zeros((b, t), bool)
  want[0, 2] = True
  np.testing.assert_array_equal(s, want)
  mask = np.ones((b, t))
  mask[0, 2] = 0
  assert not np.asarray(losses.disagreement(jnp.asarray(x), jnp.asarray(mask))).any()


def test_l_expert_with_one_hot_weights_is_that_experts_nll():
  n, b, t, v = 3, 2, 5, 7
  rng = np.random.default_rng(0)
  experts = rng.normal(size=(n, b, t, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, (b, t))
  for i in range(n):
    routing = np.full((b, t, n), -1e4, np.float32)
    routing[..., i] = 1e4  # softmax(routing) is one-hot on expert i
    nll = np.asarray(losses.expert_nll(jnp.asarray(routing), jnp.asarray(experts), targets))
    want = -np.take_along_axis(_log_softmax(experts[i]), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
    raw = np.eye(n, dtype=np.float32)[np.full((b, t), i)]  # raw one-hot weights, as written
    nll = np.asarray(losses.expert_nll(raw, jnp.asarray(experts), targets, raw_weights=True))
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)


def test_uniform_routing_weights_give_the_normalised_average_of_the_experts():
  n, b, t, v = 3, 2, 3, 6
  experts = np.random.default_rng(1).normal(size=(n, b, t, v)).astype(np.float32)
  agg = np.asarray(losses.aggregated_logprobs(jnp.zeros((b, t, n)), jnp.asarray(experts)))
  want = _log_softmax(_log_softmax(experts).mean(0))
  np.testing.assert_allclose(agg, want, atol=1e-5)


def test_sft_loss_is_l_lm_plus_lambda_l_expert_over_reply_tokens(model):
  batch = _sft_batch()
  loss, m = losses.sft_loss(model, batch, lam=1 / 3)
  np.testing.assert_allclose(float(loss), float(m['lm'] + m['expert'] / 3), rtol=1e-6)
  # L_LM by hand: mean NLL of the reply targets under the router LM.
  logits = model.router.lm(batch['inputs'], segment_ids=batch['segment_ids'])
  lp = np.take_along_axis(_log_softmax(logits), np.asarray(batch['targets'])[..., None], -1)[..., 0]
  mask = np.asarray(batch['loss_mask']) > 0
  np.testing.assert_allclose(float(m['lm']), -lp[mask].mean(), rtol=1e-5)
  l_lm_only, _ = losses.sft_loss(model, batch, lam=1 / 3, routing=False)
  np.testing.assert_allclose(float(l_lm_only), float(m['lm']), rtol=1e-6)


def test_cdpo_is_log_2_at_the_reference_with_zero_bias():
  model = conftest.make_model(n=2)
  batch = _pref_batch(model)
  out = losses.cdpo_loss(model, batch, beta=0.1, routing=False)  # plain DPO: bias 0
  np.testing.assert_allclose(float(out.loss), math.log(2.0), rtol=1e-5)
  # With the routed expert's bias b per pair, the loss is the mean of -log sigmoid(b) at pi_ref.
  out = losses.cdpo_loss(model, batch, beta=0.1)
  want = np.mean(np.log1p(np.exp(-bias_pairs(model, batch))))  # -log sigmoid(bias)
  np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)


def bias_pairs(model, batch, beta=0.1):
  """The CDPO bias by hand: beta (log pi_e(y_w) - log pi_e(y_l)), pi_e the routed expert per token."""
  rows = ip.pair_rows(batch)
  h = model.router.lm.hidden_states(
    rows['inputs'], positions=rows['positions'], segment_ids=rows['segment_ids']
  )
  n_tok = rows['targets'].shape[1]
  sel = np.argmax(np.asarray(model.router.route(h[:, -n_tok:])), -1)  # [R, N]
  total = np.zeros(rows['targets'].shape[0])
  for i, e in enumerate(model.experts):
    logits = e(rows['inputs'], positions=rows['positions'], segment_ids=rows['segment_ids'])
    lp = _log_softmax(np.asarray(logits)[:, -n_tok:])
    lp = np.take_along_axis(lp, np.asarray(rows['targets'])[..., None], -1)[..., 0]
    total += np.where((sel == i) & (np.asarray(rows['completion_mask']) > 0), lp, 0).sum(1)
  half = len(total) // 2
  return beta * (total[:half] - total[half:])


def test_cdpo_gives_no_gradient_to_the_experts_the_bias_or_the_routing_head():
  model = conftest.make_model(n=3)
  model.router.head.kernel[...] = 3.0 * jax.random.normal(
    jax.random.key(0), model.router.head.kernel[...].shape
  )
  batch = _pref_batch(model)

  def loss_wrt(kind):
    def f(m):
      return losses.cdpo_loss(m, batch, beta=0.1).loss

    return nnx.grad(f, argnums=nnx.DiffState(0, kind))(model)

  grads = loss_wrt(nnx.Param)
  np.testing.assert_array_equal(np.asarray(grads.router.head.kernel[...]), 0.0)
  assert float(jnp.abs(grads.router.lm.embed.embedding[...]).sum()) > 0  # the LM does learn
  frozen = loss_wrt(adapters_core.Frozen)  # the experts' weights, differentiated explicitly
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(frozen))


def test_mixed_loss_is_the_sum_of_its_parts_and_jit_matches_eager():
  model = conftest.make_model(n=3)
  batch = {'sft': _sft_batch(4), 'pref': _pref_batch(model)}
  loss, m = losses.mixed_loss(model, batch, lam=1 / 3, beta=0.1)
  l_sft, _ = losses.sft_loss(model, batch['sft'], lam=1 / 3)
  pref = losses.cdpo_loss(model, batch['pref'], beta=0.1)
  np.testing.assert_allclose(float(loss), float(l_sft + pref.loss), rtol=1e-6)
  assert 'cdpo/rewards/margins' in m and 'sft/expert' in m
  jitted = nnx.jit(lambda mdl, b: losses.mixed_loss(mdl, b, lam=1 / 3, beta=0.1)[0])(model, batch)
  np.testing.assert_allclose(float(jitted), float(loss), rtol=1e-5)


def test_the_routing_head_learns_only_from_the_sft_items():
  model = conftest.make_model(n=3)
  batch = {'sft': _sft_batch(4), 'pref': _pref_batch(model)}
  g_mixed = nnx.grad(lambda m: losses.mixed_loss(m, batch, lam=1 / 3, beta=0.1)[0])(model)
  g_sft = nnx.grad(lambda m: losses.sft_loss(m, batch['sft'], lam=1 / 3)[0])(model)
  np.testing.assert_allclose(
    np.asarray(g_mixed.router.head.kernel[...]), np.asarray(g_sft.router.head.kernel[...]), 1e-5
  )
