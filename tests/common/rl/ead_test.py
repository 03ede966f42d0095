"""EAD's two shared pieces in the RL loop (arXiv 2510.05251): a per-step within-sequence rollout
temperature schedule (`RLSetup.temperature_schedule`) and truncated importance sampling in the
surrogate (`RLSetup.tis_cap`, common.rl.loss.tis_weights). Both off by default; with the
temperature fixed at 1 the loop is bitwise today's loop; on, it trains with every estimator,
resumes bitwise and shards like one device."""

import dataclasses
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from common import checkpoint as ckpt_lib
from common import metrics as metrics_lib
from common import sharding
from common.rl import loop
from common.rl import loss as loss_lib
from common.rl import rollout
from common.sampling import schedules
from tests.common.rl import toy

CAP = 2.0


def _ead(step):
  # The toy's 3 new tokens: tau = 1 at t = 0 (c = 1), then 2.2 - e^(t/d) down to the floor 0.3.
  return schedules.ead(
    1.2, 0.3, decay=schedules.ead_decay(step, 2.0, per_step=0.5), warmup_tokens=1
  )


def _rows(workdir, split='train'):
  rows = metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  return [
    {k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in rows if r['split'] == split
  ]


def _params(workdir, step):
  with ckpt_lib.Checkpointer(workdir / 'checkpoints', async_save=False) as c:
    out = c._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))  # noqa: SLF001
  return jax.tree.leaves(out['state'])


def test_tis_weights_are_capped_and_exactly_one_when_the_temperatures_agree():
  rng = np.random.default_rng(0)
  target = rng.normal(-2.0, 1.0, (4, 6)).astype(np.float32)
  behaviour = rng.normal(-2.0, 1.0, (4, 6)).astype(np.float32)
  w = np.asarray(loss_lib.tis_weights(target, behaviour, CAP))
  assert w.max() <= CAP and (w == CAP).any() and (w < 1).any()
  np.testing.assert_allclose(w, np.minimum(np.exp(target - behaviour), CAP), rtol=1e-6)
  assert np.all(np.asarray(loss_lib.tis_weights(target, target, CAP)) == 1.0)
  mask = rng.random((4, 6)) < 0.5
  assert np.all(np.asarray(loss_lib.tis_weights(target, behaviour, CAP, mask))[~mask] == 1.0)
  with pytest.raises(ValueError, match='cap'):
    loss_lib.tis_weights(target, behaviour, 0.0)


def test_the_surrogate_with_weights_matches_a_numpy_reference_and_unit_weights_change_nothing():
  rng = np.random.default_rng(1)
  b, t = 5, 4
  logp, old = (rng.normal(-1.0, 0.3, (b, t)).astype(np.float32) for _ in range(2))
  a = rng.normal(size=b).astype(np.float32)
  mask = np.ones((b, t), np.float32)
  w = rng.uniform(0.2, CAP, (b, t)).astype(np.float32)
  ratio = np.exp(logp - old)
  pg = -w * np.minimum(ratio * a[:, None], np.clip(ratio, 0.8, 1.2) * a[:, None])
  got, m = loss_lib.policy_loss(*map(jnp.asarray, (logp, old, a, mask)), tis_weights=jnp.asarray(w))
  np.testing.assert_allclose(float(got), pg.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['tis_weight_mean']), w.mean(), rtol=1e-5)
  plain = loss_lib.policy_loss(*map(jnp.asarray, (logp, old, a, mask)))[0]
  ones = loss_lib.policy_loss(*map(jnp.asarray, (logp, old, a, mask)), tis_weights=jnp.ones((b, t)))
  assert float(plain) == float(ones[0])

  # The weights are constants: the gradient is w_t times the unweighted token's.
  def grad(weights):
    def f(x):
      args = (jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask))
      return loss_lib.policy_loss(x, *args, tis_weights=weights)[0]

    return np.asarray(jax.grad(f)(jnp.asarray(logp)))

  np.testing.assert_allclose(grad(jnp.asarray(w)), w * grad(None), rtol=1e-5, atol=1e-8)


def test_sample_logprobs_are_under_the_temperature_used_at_each_token():
  model = toy.model()
  prompts = toy.prompts(4)
  n = 3
  sched = _ead(0)
  taus = np.asarray(sched(np.arange(n)))
  assert taus[0] == 1.0 and 1.0 > taus[1] > taus[2] == np.float32(0.3)  # a temperature that moves
  sampling = rollout.Sampling(prompt_len=4, max_new_tokens=n, temperature=1.0, pad_id=0)
  mesh = toy.one_device_mesh()
  ro = rollout.rollout(
    model,
    prompts,
    jax.random.key(3),
    sampling=sampling,
    rewards=rollout.VerifierRewards(toy.verifier),
    num_samples=4,
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    temperature=sched,
    sample_logprobs=True,
  )
  batch = ro.batch

  @nnx.jit
  def forward(model, batch):
    h = model.hidden_states(
      batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )
    return model.logits_from_hidden(h[:, -n:])

  logits = np.asarray(forward(model, batch), np.float32)  # [B, N, V]
  tok = batch['targets'][..., None]
  valid = batch['completion_mask'] > 0
  mu = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / taus[:, None])), tok, -1)[..., 0]
  pi = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tok, -1)[..., 0]
  np.testing.assert_allclose(batch['sample_logp'][valid], mu[valid], atol=3e-5)
  np.testing.assert_allclose(batch['behaviour_logp'][valid], pi[valid], atol=3e-5)
  # At t = 0 (tau = 1) the two are the same bits; after it, not.
  first = valid[:, 0]
  np.testing.assert_array_equal(batch['sample_logp'][first, 0], batch['behaviour_logp'][first, 0])
  assert np.abs(batch['sample_logp'] - batch['behaviour_logp'])[:, 1:][valid[:, 1:]].max() > 1e-3
  # The loop's weights on this rollout: exactly 1 at t < c (tau = 1), <= C everywhere.
  w = np.asarray(loss_lib.tis_weights(batch['behaviour_logp'], batch['sample_logp'], CAP, valid))
  assert np.all(w[:, 0] == 1.0) and np.all(w <= CAP) and (w[:, 1:][valid[:, 1:]] != 1.0).all()


def _with(setup, **kw):
  return dataclasses.replace(setup, **kw)


def test_temperature_fixed_at_one_with_tis_is_bitwise_todays_loop(tmp_path):
  cfg = toy.config(kl_coef=0.01)
  base = toy.train(cfg, tmp_path / 'base', toy.setup())
  fixed = toy.setup()
  fixed = _with(fixed, temperature_schedule=lambda s: schedules.constant(1.0), tis_cap=CAP)
  res = toy.train(cfg, tmp_path / 'fixed', fixed)
  a, b = _rows(tmp_path / 'base'), _rows(tmp_path / 'fixed')
  assert len(a) == len(b) == 4
  for ra, rb in zip(a, b, strict=True):
    assert rb['tis_weight_mean'] == 1.0 and rb['tis_capped_frac'] == 0.0
    assert {k: rb[k] for k in ra} == ra  # every metric of today's loop, bitwise
  assert _rows(tmp_path / 'base', 'eval') == _rows(tmp_path / 'fixed', 'eval')
  assert res['eval'] == base['eval']
  assert {k: res['train'][k] for k in base['train']} == base['train']
  for x, y in zip(_params(tmp_path / 'base', 4), _params(tmp_path / 'fixed', 4), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('estimator', sorted(toy.ESTIMATORS))
def test_the_annealed_schedule_with_tis_trains_with_every_estimator(tmp_path, estimator):
  cfg = toy.config()
  with cfg.unlocked():
    cfg.train.update(num_steps=2, eval_every=0)
  setup = _with(toy.setup(estimator), temperature_schedule=_ead, tis_cap=CAP)
  toy.train(cfg, tmp_path / 'ead', setup)
  rows = _rows(tmp_path / 'ead')
  for r in rows:
    assert 0 < r['tis_weight_mean'] <= CAP and r['tis_weight_mean'] != 1.0
    assert 0.0 <= r['tis_capped_frac'] <= 1.0
    assert np.isfinite(r['loss']) and r['ratio_max_dev'] < 1e-6
  if estimator == 'grpo':  # the same run without the annealing samples other responses
    toy.train(cfg, tmp_path / 'plain', toy.setup(estimator))
    assert [r['loss'] for r in rows] != [r['loss'] for r in _rows(tmp_path / 'plain')]


def test_ead_resume_replays_the_uninterrupted_run(tmp_path):
  cfg = toy.config()
  setup = lambda: _with(toy.setup('running_mean'), temperature_schedule=_ead, tis_cap=CAP)  # noqa: E731
  full = toy.train(cfg, tmp_path / 'full', setup())
  short = toy.config()
  with short.unlocked():
    short.train.num_steps = 2
  toy.train(short, tmp_path / 'part', setup())
  part = toy.train(cfg, tmp_path / 'part', setup())  # resumes at step 2
  assert _rows(tmp_path / 'full') == _rows(tmp_path / 'part')
  assert json.loads((tmp_path / 'full' / 'results.json').read_text()) == json.loads(
    (tmp_path / 'part' / 'results.json').read_text()
  )
  assert full == part


def test_ead_sharded_run_matches_one_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  cfg = toy.config()
  with cfg.unlocked():
    cfg.train.update(num_steps=2, eval_every=0)
  setup = lambda: _with(toy.setup('grpo'), temperature_schedule=_ead, tis_cap=CAP)  # noqa: E731
  toy.train(cfg, tmp_path / 'one', setup())
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  toy.train(cfg, tmp_path / 'eight', setup(), mesh=mesh)
  a, b = _rows(tmp_path / 'one'), _rows(tmp_path / 'eight')
  for ra, rb in zip(a, b, strict=True):
    assert ra['reward_mean'] == rb['reward_mean'] and ra['response_len'] == rb['response_len']
    np.testing.assert_allclose(ra['tis_weight_mean'], rb['tis_weight_mean'], rtol=1e-5)
    np.testing.assert_allclose(ra['loss'], rb['loss'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ra['grad_norm'], rb['grad_norm'], rtol=1e-4)
