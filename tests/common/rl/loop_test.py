"""The RL loop on a toy copy task with a tiny random decoder (tests/common/rl/toy.py): logprob
agreement, ratio = 1, the all-fail invariant on gradients, every estimator runs, DAPO refills,
resume replays the run with the estimator's state, 8 devices and 2 processes match 1."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import metrics as metrics_lib
from common import sharding
from common import testing
from common.models import decoder
from common.rl import advantages as adv_lib
from common.rl import loop
from common.rl import loss as loss_lib
from common.rl import rollout
from common.sampling import sampler as sampler_lib
from tests.common.rl import toy

EOS = toy.EOS
_model, _prompts, _config, _train = toy.model, toy.prompts, toy.config, toy.train


def test_training_forward_logprobs_equal_the_samplers():
  model = _model()
  prompts = _prompts(6)
  tokens, mask = rollout.pad_prompts(prompts, 4, 0)
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
  batch = rollout.build_batch(np.repeat(tokens, 3, 0), np.repeat(mask, 3, 0), completion, lengths)
  logp, ent = rollout.completion_logprobs(model, jax.device_put(batch), with_entropy=True)
  valid = batch['completion_mask'] > 0
  assert valid.sum() > 6
  np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(gen.logprobs)[valid], atol=2e-5)
  np.testing.assert_allclose(
    np.asarray(ent)[valid], np.asarray(gen.model_entropies)[valid], atol=2e-5
  )


def test_grouped_logprobs_keep_values_and_gradients_and_hold_one_groups_activations():
  """row_groups: the same log-probs and gradients as one forward, a smaller compiled working set
  (XLA's own accounting), and a clear error when the rows do not split."""
  cfg = dataclasses.replace(_model().cfg, num_layers=4, d_model=64, mlp_dim=256)
  with sharding.unsharded():
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  rows, p, n = 16, 40, 8
  toks = rng.integers(3, toy.VOCAB, (rows, p)).astype(np.int32)
  mask = np.ones((rows, p), bool)
  mask[::2, :5] = False  # left padding on half the rows
  completion = rng.integers(3, toy.VOCAB, (rows, n)).astype(np.int32)
  batch = rollout.build_batch(toks, mask, completion, rng.integers(1, n + 1, rows))
  batch = jax.device_put({k: v for k, v in batch.items()})
  graphdef, state = nnx.split(model)

  def grad_fn(groups):
    def loss(s):
      logp = rollout.completion_logprobs(nnx.merge(graphdef, s), batch, row_groups=groups)
      return -jnp.sum(logp * batch['completion_mask']), logp

    return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state).compile()

  whole, grouped = grad_fn(1), grad_fn(4)
  (loss1, logp1), g1 = whole(state)
  (loss4, logp4), g4 = grouped(state)
  np.testing.assert_allclose(np.asarray(logp4), np.asarray(logp1), atol=2e-5)
  np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  temp = [f.memory_analysis().temp_size_in_bytes for f in (whole, grouped)]
  assert temp[1] < 0.6 * temp[0], temp
  with pytest.raises(ValueError, match='16 rows do not split into 3'):
    rollout.completion_logprobs(model, batch, row_groups=3)


def _ragged_batch(rng, rows=8, p=24, n=12):
  """build_batch rows whose prompts are left-padded by 9..15 columns and whose completions end
  by column 7: trimmable at both ends."""
  toks = rng.integers(3, toy.VOCAB, (rows, p)).astype(np.int32)
  mask = np.arange(p)[None, :] >= rng.integers(9, 16, rows)[:, None]
  toks = np.where(mask, toks, 0)
  completion = rng.integers(3, toy.VOCAB, (rows, n)).astype(np.int32)
  lengths = rng.integers(1, 8, rows)
  lengths[0] = 7
  batch = rollout.build_batch(toks, mask, completion, lengths)
  batch['advantages'] = rng.normal(size=rows).astype(np.float32)
  batch['token_adv'] = rng.normal(size=(rows, n)).astype(np.float32)
  return batch


def test_trimmed_columns_keep_every_real_token_and_round_to_the_multiple():
  batch = _ragged_batch(np.random.default_rng(0))  # prompt 24 (9..15 padding), completion 12
  t = rollout.trim_columns(batch, 4)
  # The prompt keeps its last 16 columns (24 - 9 = 15 hold a real token somewhere, rounded up to
  assert t['inputs'].shape == (8, 16 + 8 - 1)  # 16), the completion its first 8 (7 -> 8).
  assert t['targets'].shape == t['completion_mask'].shape == t['token_adv'].shape == (8, 8)
  assert t['advantages'] is batch['advantages']  # per-sequence arrays pass through
  assert t['segment_ids'].sum() == batch['segment_ids'].sum()  # no real token lost
  np.testing.assert_array_equal(t['inputs'], batch['inputs'][:, 8 : 8 + 23])
  np.testing.assert_array_equal(t['completion_mask'].sum(1), batch['completion_mask'].sum(1))
  np.testing.assert_array_equal(t['positions'], batch['positions'][:, 8 : 8 + 23])
  for k, v in rollout.trim_columns(batch, 0).items():  # 0: no trim
    assert v is batch[k]
  whole = rollout.trim_columns(batch, 64)  # a multiple wider than the batch keeps it whole
  assert all(whole[k].shape == batch[k].shape for k in batch)


@pytest.mark.parametrize('agg', loss_lib.AGGREGATIONS)
def test_trimmed_update_has_the_untrimmed_loss_and_gradient(agg):
  """The loss (every aggregation, sequence-sum-norm normalised by the generation budget rather
  than the trimmed width) and its gradient are the whole rectangle's up to float rounding."""
  cfg = dataclasses.replace(_model().cfg, num_layers=2)
  with sharding.unsharded():
    model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  batch = _ragged_batch(np.random.default_rng(1))
  batch['old_logp'] = np.zeros_like(batch['completion_mask'])
  graphdef, state = nnx.split(model)

  def loss_and_grad(b):
    def loss(s):
      logp = rollout.completion_logprobs(nnx.merge(graphdef, s), b)
      return loss_lib.policy_loss(
        logp, b['old_logp'], b['token_adv'], b['completion_mask'], agg=agg, max_len=12
      )[0]

    return jax.value_and_grad(loss)(state)

  l0, g0 = loss_and_grad(jax.device_put(batch))
  trimmed = rollout.trim_columns(batch, 4)
  assert trimmed['inputs'].shape[1] < batch['inputs'].shape[1]
  l1, g1 = loss_and_grad(jax.device_put(trimmed))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _grads(model, batch, **kw):
  def f(m):
    logp = rollout.completion_logprobs(m, batch)
    return loss_lib.policy_loss(
      logp, jax.lax.stop_gradient(logp), batch['advantages'], batch['completion_mask'], **kw
    )[0]

  return nnx.grad(f)(model)


def test_all_fail_group_gives_zero_gradient_for_grpo_and_not_with_a_prior_baseline():
  model = _model()
  prompts = _prompts(2)
  tokens, mask = rollout.pad_prompts(prompts, 4, 0)
  completion = np.array([[5, 6, 2], [7, 2, 0], [3, 3, 3], [4, 2, 0]], np.int32)
  lengths = np.array([3, 2, 3, 2])
  batch = rollout.build_batch(np.repeat(tokens, 2, 0), np.repeat(mask, 2, 0), completion, lengths)
  rewards = np.zeros((2, 2), np.float32)  # both groups fail completely
  a_grpo = adv_lib.GRPO().advantages(rewards, np.ones((2, 2), bool), prompts).values.reshape(-1)
  assert np.all(a_grpo == 0.0)
  for agg in loss_lib.AGGREGATIONS:
    g = _grads(model, dict(batch, advantages=a_grpo), kl_coef=0.0, agg=agg)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))
  # A baseline with a prior from earlier successes gives A = r - prior < 0: a nonzero gradient.
  est = toy.RunningMeanBaseline()
  est.advantages(np.array([[1, 0], [1, 1]], np.float32), np.ones((2, 2), bool), prompts)
  a = est.advantages(rewards, np.ones((2, 2), bool), prompts).values.reshape(-1)
  assert np.all(a < 0)
  g = _grads(model, dict(batch, advantages=a), kl_coef=0.0)
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


@pytest.mark.parametrize('estimator', sorted(toy.ESTIMATORS))
def test_every_estimator_trains_with_ratio_one_and_logs_the_metrics(tmp_path, estimator):
  cfg = _config(kl_coef=0.01)
  res = _train(cfg, tmp_path, toy.setup(estimator))
  assert res['step'] == 4 and set(res) == {'step', 'train', 'eval'}
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
      'verifier_failures',
    ):
      assert k in r and np.isfinite(r[k]), k
    assert r['ratio_max_dev'] < 1e-6  # num_iterations=1: behaviour logprobs == training forward
    assert r['behaviour_logp_dev'] < 2e-5  # the sampler's logprobs, not a second forward
  evals = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [0, 2, 4]
  assert all(('dapo_discarded_frac' in r) == (estimator == 'dapo') for r in rows)
  if estimator == 'running_mean':
    assert all(0 <= r['running_mean'] <= 1 for r in rows)


def test_estimator_names_resolve_at_setup_not_in_the_loop():
  assert isinstance(loop.estimator_from_config(_config().rl), adv_lib.GRPO)
  mine = object()
  assert loop.estimator_from_config(_config(estimator='mine').rl, mine=lambda: mine) is mine
  with pytest.raises(config_lib.ConfigError, match="rl.estimator='nope'; expected one of dapo"):
    loop.estimator_from_config(_config(estimator='nope').rl)
  src = (pathlib.Path(loop.__file__)).read_text()
  assert 'rl.estimator ==' not in src and "== 'dapo'" not in src and "== 'ebpo'" not in src


def test_update_groups_train_the_same_run_and_must_divide_a_minibatch(tmp_path):
  """rl.update_groups changes the update's memory, not its maths: the same per-step losses (to
  float rounding) as one group; a count that does not divide a minibatch is a config error."""
  rows = {}
  for g in (1, 4):
    _train(_config(kl_coef=0.01, update_groups=g), tmp_path / str(g), toy.setup('grpo'))
    rows[g] = [r for r in metrics_lib.read_jsonl(tmp_path / str(g) / 'metrics.jsonl')]
    rows[g] = [r for r in rows[g] if r['split'] == 'train']
  assert len(rows[1]) == len(rows[4]) == 4
  for a, b in zip(rows[1], rows[4], strict=True):
    for key in ('loss', 'kl', 'grad_norm', 'reward_mean'):
      assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
  with pytest.raises(config_lib.ConfigError, match='rl.update_groups=3 must be >= 1 and divide'):
    loop.check_config(_config(update_groups=3), toy.one_device_mesh(), sharding.DEFAULT_RULES)


def test_trimming_padding_columns_trains_the_same_run(tmp_path):
  """rl.trim_multiple drops padding columns from the update, not maths: prompts padded to 12
  columns (2-3 real tokens) train as with trimming off, to float rounding; < 0 is refused."""
  rows = {}
  for m in (0, 2):
    cfg = _config(kl_coef=0.01, prompt_len=12, trim_multiple=m, loss_agg='sequence-sum-norm')
    _train(cfg, tmp_path / str(m), toy.setup('grpo'))
    rows[m] = [r for r in metrics_lib.read_jsonl(tmp_path / str(m) / 'metrics.jsonl')]
  for a, b in zip(rows[0], rows[2], strict=True):
    for key in ('loss', 'kl', 'grad_norm', 'reward_mean', 'pass_at_1', 'entropy'):
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
  assert len(rows[0]) == len(rows[2]) == 7  # 4 train + 3 eval lines
  with pytest.raises(config_lib.ConfigError, match='rl.trim_multiple=-1 must be >= 0'):
    loop.check_config(_config(trim_multiple=-1), toy.one_device_mesh(), sharding.DEFAULT_RULES)


def test_several_iterations_move_the_ratio_and_clip(tmp_path):
  cfg = _config(num_iterations=3, num_minibatches=2, clip_low=0.01, clip_high=0.01)
  _train(cfg, tmp_path, toy.setup('grpo'))
  rows = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'train']
  assert max(r['clip_frac'] for r in rows) > 0


def _extra_at(workdir, step):
  with ckpt_lib.Checkpointer(workdir / 'checkpoints', async_save=False) as c:
    args = ocp.args.Composite(extra=ocp.args.JsonRestore())
    return c._mngr.restore(step, args=args)['extra']  # noqa: SLF001


def test_resume_replays_the_uninterrupted_run_with_the_estimator_state(tmp_path):
  full, part = tmp_path / 'full', tmp_path / 'part'
  cfg = _config(curriculum='clustered')
  _train(cfg, full, toy.setup('running_mean'))
  short = _config(curriculum='clustered')
  with short.unlocked():
    short.train.num_steps = 2
  _train(short, part, toy.setup('running_mean'))
  _train(cfg, part, toy.setup('running_mean'))  # resumes at step 2 from the checkpoint
  assert _train_lines(full) == _train_lines(part)
  extras = [_extra_at(d, 4) for d in (full, part)]
  assert extras[0] == extras[1] and json.loads(extras[0]['running_mean'])[1] == 4 * 16
  assert json.loads((full / 'results.json').read_text()) == json.loads(
    (part / 'results.json').read_text()
  )


def test_a_kill_after_the_last_checkpoint_resumes_to_the_same_results(tmp_path):
  """Stopped after the final step's checkpoint but before results.json: the re-run restores that
  checkpoint and writes the uninterrupted run's results (not empty train/eval)."""
  cfg = _config()
  done = _train(cfg, tmp_path / 'full', toy.setup())
  with cfg.unlocked():
    cfg.debug.sigterm_after_step = 4
  from common import train_loop  # noqa: PLC0415

  with pytest.raises(train_loop.Preempted, match='step 4'):
    _train(cfg, tmp_path / 'cut', toy.setup())
  assert not (tmp_path / 'cut' / 'results.json').exists()
  with cfg.unlocked():
    cfg.debug.sigterm_after_step = -1
  again = _train(cfg, tmp_path / 'cut', toy.setup())
  assert again == done and again['train'] and again['eval']


def test_sharded_run_matches_one_device(tmp_path):
  """8 fake devices (data=2, fsdp=2, tensor=2) give the 1-device run's rollouts and losses: the
  update's rows are sharded over data x fsdp (2 x 2), the weights over fsdp and tensor."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  cfg = _config()
  with cfg.unlocked():
    cfg.train.num_steps = 2
  one = _train(cfg, tmp_path / 'one', toy.setup('running_mean'))
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  eight = _train(cfg, tmp_path / 'eight', toy.setup('running_mean'), mesh=mesh)
  _assert_same_run(tmp_path / 'one', tmp_path / 'eight')
  assert one['eval']['pass_at_1'] == eight['eval']['pass_at_1']


def _assert_same_run(a_dir, b_dir):
  """Same rollouts (rewards, lengths: exact), losses and gradient norms to 1e-4 relative."""
  a, b = _train_lines(a_dir), _train_lines(b_dir)
  assert len(a) == len(b)
  for ra, rb in zip(a, b, strict=True):
    if ra['split'] == 'eval':
      assert ra['pass_at_1'] == rb['pass_at_1']
      continue
    assert ra['reward_mean'] == rb['reward_mean'] and ra['response_len'] == rb['response_len']
    np.testing.assert_allclose(ra['loss'], rb['loss'], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ra['grad_norm'], rb['grad_norm'], rtol=1e-4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Slow: two JAX processes compile the whole loop (about 50 s of CPU); the default suite keeps
# tests/lm_pretrain's two-process test as its multi-host check.
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  """The loop as 2 processes x 4 CPU devices (gloo) == 1 process x 8 devices, same mesh (2, 2, 2):
  identical rollouts and rewards, losses and gradient norms to 1e-4 relative."""

  def launch(workdir, n):
    port = _free_port()
    env = {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': testing.xla_flags_with_devices(8 // n),
    }
    dist = lambda i: (  # noqa: E731
      [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}', f'--process_id={i}']
      if n > 1
      else []
    )
    procs = [
      subprocess.Popen(
        [sys.executable, '-m', 'tests.common.rl.toy', f'--workdir={workdir}', *dist(i)],
        cwd=testing.REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(n)
    ]
    for p in procs:
      _, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-3000:]

  launch(tmp_path / 'one', 1)
  launch(tmp_path / 'two', 2)
  _assert_same_run(tmp_path / 'one', tmp_path / 'two')
  assert json.loads((tmp_path / 'two' / 'run.json').read_text())['devices']['processes'] == 2


def test_verifier_exceptions_and_non_finite_rewards_score_zero_and_are_counted():
  prompts = _prompts(2)

  def flaky(prompt, completion):
    if prompt.uid == 0 and len(completion) == 1:
      raise RuntimeError('verifier crashed')
    if prompt.uid == 1 and len(completion) == 2:
      return float('nan')
    return 1.0

  source = rollout.VerifierRewards(flaky)
  completions = np.array([[5, 0], [5, 6], [7, 0], [7, 8]], np.int32)
  lengths = np.array([1, 2, 1, 2])
  r = source.score(prompts, completions, lengths, 2)
  np.testing.assert_array_equal(r.sequence, [[0.0, 1.0], [1.0, 0.0]])
  assert r.token is None and source.failures == 2
  restored = rollout.VerifierRewards(flaky)
  restored.load_state_dict(source.state_dict())
  assert restored.failures == 2


def test_difficulty_curriculum_computes_pass_rates_once_and_caches_them(tmp_path):
  cfg = _config(curriculum='difficulty', difficulty_rollouts=2)
  with cfg.unlocked():
    cfg.train.num_steps = 1
  cache = tmp_path / 'rates.json'
  _train(cfg, tmp_path / 'a', toy.setup(), pass_rates_cache=cache)
  saved = json.loads(cache.read_text())
  assert len(saved['pass_rates']) == 32
  assert all(v in (0.0, 0.5, 1.0) for v in saved['pass_rates'].values())  # K=2 rollouts each
  stamp = cache.stat().st_mtime_ns
  _train(cfg, tmp_path / 'b', toy.setup(), pass_rates_cache=cache)
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
  runs = {}
  for name, cfg in (('off', off), ('on', on)):
    with cfg.unlocked():
      cfg.train.update(num_steps=1, eval_every=0)  # one step is the comparison; keeps it cheap
    setup = dataclasses.replace(toy.setup(), stop_tokens=tuple(range(2, 10)))
    _train(cfg, tmp_path / name, setup)
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
    _train(_config(overlong_shaping=True, overlong_cache_len=5), tmp_path / 'bad', toy.setup())
  assert not (tmp_path / 'bad').exists()  # checked before the run made its workdir
