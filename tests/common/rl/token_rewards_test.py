"""Token-level rewards in the RL loop: per-token advantages through the same estimators
(common.rl.advantages.token_advantages), against hand-computed values; an outcome reward written on
the last token (rollout.OutcomeAsTokenRewards) gives exactly the sequence path's advantages and the
whole loop's run bitwise; a dense token source trains, resumes bitwise and shards like 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import metrics as metrics_lib
from common import sharding
from common.rl import advantages as adv_lib
from common.rl import loop
from common.rl import loss as loss_lib
from common.rl import rollout
from tests.common.rl import toy


def test_returns_to_go_and_immediate():
  v = np.array([[1.0, 2.0, 3.0, 9.0], [0.5, 0.0, 0.0, 0.0]], np.float32)
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(adv_lib.returns_to_go(v, m), [[6, 5, 3, 0], [0.5, 0, 0, 0]])
  np.testing.assert_array_equal(adv_lib.immediate(v, m), [[1, 2, 3, 0], [0.5, 0, 0, 0]])


def _outcome_case(rng, m=3, g=4, n=5):
  rewards = rng.integers(0, 2, size=(m, g)).astype(np.float32)
  rewards[0] = rng.normal(size=g)  # not only 0/1
  lengths = rng.integers(1, n + 1, size=m * g)
  completion_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  mask = rollout.last_token_mask(lengths, n)
  token = np.where(mask, rewards.reshape(-1, 1), 0.0).astype(np.float32)
  return rewards, token, mask, completion_mask


@pytest.mark.parametrize('name', sorted(toy.ESTIMATORS))
def test_an_outcome_reward_on_the_last_token_gives_the_sequence_advantages_exactly(name):
  rng = np.random.default_rng(0)
  rewards, token, mask, completion_mask = _outcome_case(rng)
  group_mask = np.ones(rewards.shape, bool)
  group_mask[2] = False  # a group DAPO's dynamic sampling dropped
  prompts = toy.prompts(3)
  seq = toy.ESTIMATORS[name]().advantages(rewards, group_mask, prompts)
  tok = adv_lib.token_advantages(
    toy.ESTIMATORS[name](), token, mask, completion_mask, group_mask, prompts
  )
  np.testing.assert_array_equal(tok.advantages.values, seq.values)
  np.testing.assert_array_equal(tok.mask, group_mask)
  want = np.where(completion_mask > 0, seq.values.reshape(-1, 1), 0.0)
  want[8:] = 0.0  # the dropped group's tokens carry no advantage
  np.testing.assert_array_equal(tok.per_token, want)


def test_dense_token_rewards_are_normalised_over_the_groups_tokens():
  # One group of two responses: tokens [1, 0, 1] and [0] (lengths 3 and 1).
  token = np.array([[1, 0, 1], [0, 0, 0]], np.float32)
  completion_mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  tok = adv_lib.token_advantages(
    adv_lib.GRPO(), token, None, completion_mask, np.ones((1, 2), bool), toy.prompts(1)
  )
  r = np.array([1, 0, 1, 0], np.float64)
  z = (r - r.mean()) / (r.std(ddof=1) + adv_lib.EPS)
  np.testing.assert_allclose(tok.advantages.values[0], z, rtol=1e-6)
  want = [[z[0] + z[1] + z[2], z[1] + z[2], z[2]], [z[3], 0, 0]]
  np.testing.assert_allclose(tok.per_token, want, rtol=1e-6, atol=1e-7)
  immediate = adv_lib.token_advantages(
    adv_lib.GRPO(),
    token,
    None,
    completion_mask,
    np.ones((1, 2), bool),
    toy.prompts(1),
    credit=adv_lib.immediate,
  )
  np.testing.assert_allclose(immediate.per_token, [[z[0], z[1], z[2]], [z[3], 0, 0]], rtol=1e-6)


def test_the_loss_with_broadcast_token_advantages_equals_the_sequence_loss_bitwise():
  rng = np.random.default_rng(1)
  logp = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.1, size=(6, 5)), jnp.float32)
  ref = logp + jnp.asarray(rng.normal(0, 0.1, size=(6, 5)), jnp.float32)
  a = jnp.asarray(rng.normal(size=6), jnp.float32)
  mask = jnp.asarray(rng.integers(0, 2, size=(6, 5)), jnp.float32)
  for agg in loss_lib.AGGREGATIONS:
    kw = dict(ref_logp=ref, kl_coef=0.1, agg=agg)
    seq = jax.jit(lambda a: loss_lib.policy_loss(logp, old, a, mask, **kw))(a)  # noqa: B023
    tok = jax.jit(lambda a: loss_lib.policy_loss(logp, old, a, mask, **kw))(  # noqa: B023
      jnp.broadcast_to(a[:, None], (6, 5))
    )
    assert jax.tree.map(lambda x, y: bool(x == y), seq, tok) == jax.tree.map(lambda _: True, seq)


def _lines(workdir):
  rows = metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  return [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS} for r in rows]


@pytest.mark.parametrize(
  ('estimator', 'rl'),
  [
    ('grpo', {'kl_coef': 0.01}),
    ('running_mean', {'num_iterations': 2, 'num_minibatches': 2, 'kl_coef': 0.0}),
    ('dapo', {'loss_agg': 'sequence-mean'}),
  ],
)
def test_the_loop_with_the_outcome_as_token_rewards_equals_the_sequence_loop_bitwise(
  tmp_path, estimator, rl
):
  cfg = toy.config(**rl)
  seq = toy.train(cfg, tmp_path / 'seq', toy.setup(estimator))
  as_tokens = toy.setup(estimator)
  as_tokens.rewards = rollout.OutcomeAsTokenRewards(as_tokens.rewards)
  tok = toy.train(cfg, tmp_path / 'tok', as_tokens)
  assert _lines(tmp_path / 'seq') == _lines(tmp_path / 'tok')
  strip = lambda r: {k: v for k, v in r['train'].items() if k not in loop.TIMING_KEYS}  # noqa: E731
  assert strip(seq) == strip(tok) and seq['eval'] == tok['eval']


class DenseCopyRewards:
  """Per-token rewards for the toy: 1 on each generated token equal to the prompt's answer."""

  def __init__(self):
    self.calls = 0

  def score(self, prompts, completions, lengths, group_size):
    self.calls += 1
    answers = np.repeat([p.payload for p in prompts], group_size)[:, None]
    valid = np.arange(completions.shape[1])[None] < np.asarray(lengths)[:, None]
    token = ((completions == answers) & valid).astype(np.float32)
    seq = token[:, :1].reshape(len(prompts), group_size)  # the verifier: first token correct
    return rollout.Rewards(seq, token)

  def state_dict(self):
    return {'dense_calls': self.calls}

  def load_state_dict(self, state):
    self.calls = int(state.get('dense_calls', 0))

  def metrics(self):
    return {'dense_calls': self.calls}


def _dense_setup():
  s = toy.setup('running_mean')
  s.rewards = DenseCopyRewards()
  return s


def test_a_dense_token_source_trains_resumes_bitwise_and_shards_like_one_device(tmp_path):
  cfg = toy.config()
  full = toy.train(cfg, tmp_path / 'full', _dense_setup())
  assert full['train']['dense_calls'] >= 4 and np.isfinite(full['train']['loss'])
  short = toy.config()
  with short.unlocked():
    short.train.num_steps = 2
  toy.train(short, tmp_path / 'part', _dense_setup())
  toy.train(cfg, tmp_path / 'part', _dense_setup())
  assert _lines(tmp_path / 'full') == _lines(tmp_path / 'part')
  if jax.device_count() < 8:
    return
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  toy.train(cfg, tmp_path / 'eight', _dense_setup(), mesh=mesh)
  for a, b in zip(_lines(tmp_path / 'full'), _lines(tmp_path / 'eight'), strict=True):
    if a['split'] == 'train':
      assert a['reward_mean'] == b['reward_mean']
      np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-4, atol=1e-6)
