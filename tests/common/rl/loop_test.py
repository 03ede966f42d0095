"""The RL loop on a toy copy task with a tiny random decoder: logprob agreement, ratio = 1, the
all-fail invariant on gradients, every estimator runs, DAPO refills, resume replays the run."""

import dataclasses
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import metrics as metrics_lib
from common.models import decoder
from common.rl import advantages as adv_lib
from common.rl import curriculum
from common.rl import loop
from common.rl import loss as loss_lib
from common.sampling import sampler as sampler_lib

VOCAB = 16
EOS = 2


def _model(seed=0):
  cfg = decoder.DecoderConfig(
    vocab_size=VOCAB,
    d_model=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
  )
  with nnx.use_eager_sharding(False):
    return decoder.Decoder(cfg, rngs=nnx.Rngs(seed))


def _prompts(n, offset=0):
  # Prompt [1, (1,) x]: ragged lengths; the answer is to copy x.
  return [
    curriculum.Prompt(
      uid=offset + i,
      tokens=(1,) * (1 + i % 2) + (3 + i % 8,),
      cluster=f'c{i % 2}',
      payload=3 + i % 8,
    )
    for i in range(n)
  ]


def _verifier(prompt, completion):
  return float(len(completion) > 0 and int(completion[0]) == prompt.payload)


def _setup(seed=0):
  return loop.RLSetup(
    create_model=lambda: _model(seed),
    tx=optax.adam(3e-2),
    train_prompts=_prompts(32),
    eval_prompts=_prompts(8, offset=100),
    verifier=_verifier,
    stop_tokens=(EOS,),
    pad_id=0,
    mesh=jax.sharding.Mesh(
      np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor')
    ),
  )


def _config(**rl):
  c = config_lib.base_config()
  c.rl = loop.rl_config()
  c.rl.update(prompts_per_step=8, group_size=2, prompt_len=4, max_new_tokens=3, eval_batch=8)
  c.rl.update(**rl)
  c.train.update(num_steps=4, log_every=1, eval_every=2)
  c.checkpoint.update(every_steps=2, async_save=False)
  return config_lib.finalize(c, {})


def test_training_forward_logprobs_equal_the_samplers():
  model = _model()
  prompts = _prompts(6)
  tokens, mask = loop.pad_prompts(prompts, 4, 0)
  gen = sampler_lib.generate(
    model,
    tokens,
    mask,
    config=sampler_lib.SamplingConfig(max_new_tokens=5, stop_tokens=(EOS,)),
    key=jax.random.key(1),
    num_samples=3,
    prompt_bucket=4,
  )
  completion, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  batch = loop.build_batch(np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0), completion, lengths)
  logp, ent = loop.completion_logprobs(model, jax.device_put(batch), with_entropy=True)
  valid = batch['completion_mask'] > 0
  assert valid.sum() > 6
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(gen.logprobs)[valid], atol=2e-5)
  np.testing.assert_allclose(
    np.asarray(ent)[valid], np.asarray(gen.model_entropies)[valid], atol=2e-5
  )


def _grads(model, batch, **kw):
  def f(m):
    logp = loop.completion_logprobs(m, batch)
    return loss_lib.policy_loss(
      logp, jax.lax.stop_gradient(logp), batch['advantages'], batch['completion_mask'], **kw
    )[0]

  return nnx.grad(f)(model)


def test_all_fail_group_gives_zero_gradient_for_grpo_and_not_for_ebpo():
  model = _model()
  prompts = _prompts(2)
  tokens, mask = loop.pad_prompts(prompts, 4, 0)
  completion = np.array([[5, 6, 2], [7, 2, 0], [3, 3, 3], [4, 2, 0]], np.int32)
  lengths = np.array([3, 2, 3, 2])
  batch = loop.build_batch(np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0), completion, lengths)
  rewards = np.zeros((2, 2), np.float32)  # both groups fail completely
  a_grpo = np.asarray(adv_lib.grpo(jnp.asarray(rewards))).reshape(-1)
  assert np.all(a_grpo == 0.0)
  for agg in loss_lib.AGGREGATIONS:
    g = _grads(model, dict(batch, advantages=a_grpo), kl_coef=0.0, agg=agg)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))
  # EBPO with a prior from earlier successes: A_raw = -S mu_glob != 0, so the gradient is not zero.
  est = adv_lib.EBPOEstimator(standardize=False)
  est.update(np.array([[1, 0], [1, 1], [0, 0]], np.float32))
  _, raw, stats = est.advantages(rewards)
  assert np.all(raw < 0) and np.all(stats.shrinkage > 0)
  g = _grads(model, dict(batch, advantages=raw.reshape(-1)), kl_coef=0.0)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) > 1e-6


def test_policy_loss_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  b, t = 5, 4
  logp, old, ref = (rng.normal(-1.0, 0.3, (b, t)).astype(np.float32) for _ in range(3))
  a = rng.normal(size=b).astype(np.float32)
  mask = (rng.random((b, t)) < 0.8).astype(np.float32)
  mask[:, 0] = 1
  ratio = np.exp(logp - old)
  pg = -np.minimum(ratio * a[:, None], np.clip(ratio, 0.8, 1.28) * a[:, None])
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per = pg + 0.1 * kl
  refs = {
    'token-mean': (per * mask).sum() / mask.sum(),
    'sequence-mean': ((per * mask).sum(1) / mask.sum(1)).mean(),
    'sequence-sum-norm': ((per * mask).sum(1) / t).mean(),
  }
  for agg, want in refs.items():
    got, m = loss_lib.policy_loss(
      jnp.asarray(logp),
      jnp.asarray(old),
      jnp.asarray(a),
      jnp.asarray(mask),
      ref_logp=jnp.asarray(ref),
      clip_low=0.2,
      clip_high=0.28,
      kl_coef=0.1,
      agg=agg,
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(m['kl']), (kl * mask).sum() / mask.sum(), rtol=1e-5)
  assert np.all(kl >= 0)
  with pytest.raises(ValueError, match='unknown loss aggregation'):
    loss_lib.aggregate(jnp.zeros((2, 2)), jnp.ones((2, 2)), 'nope')


def _train_lines(workdir):
  rows = metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in rows]


@pytest.mark.parametrize('estimator', adv_lib.ESTIMATORS)
def test_every_estimator_trains_with_ratio_one_and_logs_the_metrics(tmp_path, estimator):
  cfg = _config(estimator=estimator, kl_coef=0.01)
  res = loop.train(cfg, tmp_path, _setup())
  assert res['step'] == 4
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'train']
  assert len(rows) == 4
  for r in rows:
    for k in (
      'reward_mean',
      'pass_at_1',
      'zero_signal_frac',
      'entropy',
      'kl',
      'clip_frac',
      'response_len',
      'grad_norm',
      'rollout_tok_s',
      'update_tok_s',
    ):
      assert k in r and np.isfinite(r[k]), k
    assert r['ratio_max_dev'] < 1e-6  # num_iterations=1: behaviour logprobs == training forward
    assert r['behaviour_logp_dev'] < 2e-5  # the sampler's logprobs, not a second forward
  evals = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [0, 2, 4]
  if estimator == 'dapo':
    assert all('dapo_discarded_frac' in r for r in rows)
  if estimator == 'ebpo':
    assert all(0 <= r['ebpo_shrinkage'] <= 1 for r in rows)


def test_several_iterations_move_the_ratio_and_clip(tmp_path):
  cfg = _config(
    estimator='grpo', num_iterations=3, num_minibatches=2, clip_low=0.01, clip_high=0.01
  )
  loop.train(cfg, tmp_path, _setup())
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'train']
  assert max(r['clip_frac'] for r in rows) > 0


def test_resume_replays_the_uninterrupted_run_with_the_ebpo_state(tmp_path):
  full, part = tmp_path / 'full', tmp_path / 'part'
  cfg = _config(estimator='ebpo', curriculum='clustered', ebpo_mode='cluster')
  loop.train(cfg, full, _setup())
  short = _config(estimator='ebpo', curriculum='clustered', ebpo_mode='cluster')
  with short.unlocked():
    short.train.num_steps = 2
  loop.train(short, part, _setup())
  loop.train(cfg, part, _setup())  # resumes at step 2 from the checkpoint
  assert _train_lines(full) == _train_lines(part)
  extras = []
  for d in (full, part):
    with ckpt_lib.Checkpointer(d / 'checkpoints', every_steps=2, keep=3, async_save=False) as c:
      args = ocp.args.Composite(extra=ocp.args.JsonRestore())
      extras.append(c._mngr.restore(4, args=args)['extra'])  # noqa: SLF001
  assert extras[0] == extras[1] and json.loads(extras[0]['ebpo'])['num_updates'] == 4


def test_sharded_run_matches_one_device(tmp_path):
  """8 fake devices (data=2, fsdp=2, tensor=2) give the 1-device run's rollouts and losses."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  cfg = _config(estimator='ebpo')
  with cfg.unlocked():
    cfg.train.num_steps = 2
  one = loop.train(cfg, tmp_path / 'one', _setup())
  setup = _setup()
  setup.mesh = jax.sharding.Mesh(
    np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor')
  )
  eight = loop.train(cfg, tmp_path / 'eight', setup)
  a, b = _train_lines(tmp_path / 'one'), _train_lines(tmp_path / 'eight')
  assert len(a) == len(b)
  for ra, rb in zip(a, b, strict=True):
    if ra['split'] == 'eval':
      assert ra['pass_at_1'] == rb['pass_at_1']
      continue
    assert ra['reward_mean'] == rb['reward_mean'] and ra['response_len'] == rb['response_len']
    np.testing.assert_allclose(ra['loss'], rb['loss'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ra['grad_norm'], rb['grad_norm'], rtol=1e-4)
  assert one['eval']['pass_at_1'] == eight['eval']['pass_at_1']


def test_verifier_exceptions_and_non_finite_rewards_score_zero_and_are_counted():
  prompts = _prompts(2)

  def flaky(prompt, completion):
    if prompt.uid == 0 and len(completion) == 1:
      raise RuntimeError('verifier crashed')
    if prompt.uid == 1 and len(completion) == 2:
      return float('nan')
    return 1.0

  counter = loop._Counter()  # noqa: SLF001
  completions = np.array([[5, 0], [5, 6], [7, 0], [7, 8]], np.int32)
  lengths = np.array([1, 2, 1, 2])
  r = loop.safe_rewards(flaky, prompts, completions, lengths, 2, counter)
  np.testing.assert_array_equal(r, [[0.0, 1.0], [1.0, 0.0]])
  assert counter.failures == 2


def test_difficulty_curriculum_computes_pass_rates_once_and_caches_them(tmp_path):
  cfg = _config(estimator='ebpo', curriculum='difficulty', difficulty_rollouts=2)
  with cfg.unlocked():
    cfg.train.num_steps = 1
  cache = tmp_path / 'rates.json'
  loop.train(cfg, tmp_path / 'a', _setup(), pass_rates_cache=cache)
  saved = json.loads(cache.read_text())
  assert len(saved['pass_rates']) == 32
  assert all(v in (0.0, 0.5, 1.0) for v in saved['pass_rates'].values())  # K=2 rollouts each
  stamp = cache.stat().st_mtime_ns
  loop.train(cfg, tmp_path / 'b', _setup(), pass_rates_cache=cache)
  assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed


def test_overlong_shaping_adds_the_penalty_to_the_advantages_only(tmp_path):
  rewards = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)
  lengths = np.array([1, 3, 2, 3])
  off = _config()
  same, zero = loop.shaped_rewards(off.rl, rewards, lengths)
  assert same is rewards and not zero.any()
  on = _config(overlong_shaping=True, overlong_cache_len=2)  # L_max = max_new_tokens = 3
  shaped, pen = loop.shaped_rewards(on.rl, rewards, lengths)
  np.testing.assert_allclose(pen, [[0.0, -1.0], [-0.5, -1.0]])
  np.testing.assert_allclose(shaped, rewards + pen)
  # An all-pass group whose responses differ in length now has a GRPO signal.
  assert np.abs(np.asarray(adv_lib.grpo(jnp.asarray(shaped))[0])).max() > 0.5

  # Half the vocabulary stops generation, so response lengths vary within a group (with equal
  # lengths the penalty is a per-batch constant that the standardised advantages do not see).
  setup = dataclasses.replace(_setup(), stop_tokens=tuple(range(2, 10)))
  runs = {}
  for name, cfg in (('off', off), ('on', on)):
    with cfg.unlocked():
      cfg.train.update(num_steps=1, eval_every=0)  # one step is the comparison; keeps it cheap
    loop.train(cfg, tmp_path / name, setup)
    runs[name] = [
      r for r in metrics_lib.read_jsonl(tmp_path / name / 'metrics.jsonl') if r['split'] == 'train'
    ]
  # Step 1 samples from the same initial policy: same verifier rewards, different advantages.
  first_off, first_on = runs['off'][0], runs['on'][0]
  assert first_on['reward_mean'] == first_off['reward_mean']
  assert first_on['pass_at_1'] == first_off['pass_at_1']
  assert first_on['adv_abs_mean'] != first_off['adv_abs_mean']
  for r in runs['on']:
    assert -1.0 <= r['overlong_penalty'] <= 0.0 and 0.0 < r['overlong_frac'] < 1.0
  assert 'overlong_penalty' not in first_off
  with pytest.raises(config_lib.ConfigError, match='overlong_cache_len'):
    loop.train(_config(overlong_shaping=True, overlong_cache_len=5), tmp_path / 'bad', _setup())
