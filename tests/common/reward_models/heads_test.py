"""Reward heads: the batch layout, padding invariance, last-token reward == token reward at the last
token, freezing and LoRA, Bradley-Terry training on a toy, an 8-device mesh == 1 device, and a real
LM backbone (real_model)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import assets
from common import sharding
from common.adapters import core as adapters
from common.adapters import lora
from common.models import decoder
from common.preference import scoring
from common.reward_models import heads
from common.reward_models import metrics
from common.reward_models import training

VOCAB = 24


def backbone(seed=0):
  cfg = decoder.DecoderConfig(
    vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
  )
  with sharding.unsharded():
    return decoder.Decoder(cfg, rngs=nnx.Rngs(seed))


def reward_model(pool='last', seed=0):
  with sharding.unsharded():
    return heads.RewardModel(backbone(seed), pool=pool, rngs=nnx.Rngs(seed + 1))


PROMPTS = [[3, 4, 5], [6, 7]]
CHOSEN = [[8, 9, 10, 2], [11, 2]]
REJECTED = [[12, 2], [13, 14, 15]]


def test_sequence_batch_layout():
  pairs = scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
  b = heads.pair_batch(pairs)
  assert b['tokens'].shape == (4, 3 + 4)
  np.testing.assert_array_equal(b['tokens'][1], [0, 6, 7, 11, 2, 0, 0])
  np.testing.assert_array_equal(b['positions'][1], [0, 0, 1, 2, 3, 3, 3])
  np.testing.assert_array_equal(b['segment_ids'][1], [0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(b['last_index'], [6, 4, 4, 5])
  np.testing.assert_array_equal(b['response_mask'][3], [1, 1, 1, 0])
  with pytest.raises(scoring.PreferenceError, match='lengths'):
    heads.sequence_batch(np.zeros((1, 2)), np.ones((1, 2)), np.zeros((1, 3)), np.array([0]))


@pytest.mark.parametrize('pool', heads.POOLS)
def test_rewards_do_not_depend_on_padding(pool):
  model = reward_model(pool)
  tight = heads.apply(model, heads.pair_batch(scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED)))
  loose = heads.apply(
    model,
    heads.pair_batch(
      scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, prompt_len=7, response_len=9, pad_id=1)
    ),
  )
  np.testing.assert_allclose(tight.rewards, loose.rewards, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tight.features, loose.features, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tight.token_rewards, loose.token_rewards[:, :4], atol=1e-5)
  assert np.all(np.asarray(loose.token_rewards)[:, 4:] == 0)


def test_last_token_reward_is_the_token_reward_at_the_last_token_and_a_direct_forward():
  model = reward_model('last')
  b = heads.pair_batch(scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED))
  out = heads.apply(model, b)
  lengths = b['response_mask'].sum(-1).astype(int)
  at_last = np.asarray(out.token_rewards)[np.arange(4), lengths - 1]
  np.testing.assert_allclose(out.rewards, at_last, rtol=1e-6)
  # Row 0 unpadded: prompt + chosen through the backbone alone, the head on the last state.
  seq = jnp.asarray([PROMPTS[0] + CHOSEN[0]])
  h = model.backbone.hidden_states(seq)[0, -1]
  want = float(h @ model.head.kernel[...][:, 0] + model.head.bias[...][0])
  np.testing.assert_allclose(float(out.rewards[0]), want, rtol=1e-5)


def test_mean_pooling_averages_response_states():
  model = reward_model('mean')
  b = heads.pair_batch(scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED))
  out = heads.apply(model, b)
  # The head is linear: the reward of the mean state is the mean of the token rewards.
  np.testing.assert_allclose(
    out.rewards, heads.token_mean(out.token_rewards, b['response_mask']), rtol=1e-5, atol=1e-6
  )


def _trainable(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_freezing_and_lora_leave_the_head_trainable():
  model = reward_model()
  total = _trainable(model)
  frozen = heads.freeze_backbone(model)
  assert _trainable(model) == 33 and frozen == total - 33  # kernel [32, 1] + bias
  model = reward_model()
  with sharding.unsharded():
    paths = adapters.adapt(
      model.backbone, r'layers/\d+/attn/(q|v)_proj', lora.factory(rank=2, rngs=nnx.Rngs(3))
    )
  assert len(paths) == 4
  n_lora = 2 * (lora.num_params(32, 32, 2) + lora.num_params(32, 16, 2))  # q: 32->32, v: 32->16
  assert _trainable(model) == 33 + n_lora
  b = heads.pair_batch(scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED))
  before = heads.apply(reward_model(), b).rewards
  np.testing.assert_allclose(model(jax.tree.map(jnp.asarray, b)).rewards, before, rtol=1e-6)


def _toy_pairs(rng, n):
  """Chosen responses contain token 5, rejected ones do not: a learnable preference."""
  prompts, chosen, rejected = [], [], []
  for _ in range(n):
    prompts.append(list(rng.integers(6, VOCAB, size=2)))
    body = list(rng.integers(6, VOCAB, size=3))
    k = int(rng.integers(0, 3))
    chosen.append(body[:k] + [5] + body[k + 1 :])
    rejected.append(body)
  return heads.pair_batch(scoring.pad_pairs(prompts, chosen, rejected))


@pytest.mark.parametrize('level', training.LEVELS)
def test_bradley_terry_training_learns_a_toy_preference(level):
  model = reward_model('mean' if level == 'token_mean' else 'last')
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  test = _toy_pairs(rng, 64)

  @nnx.jit
  def step(model, opt, batch):
    def f(m):
      return training.bradley_terry_loss(m, batch, level=level)[0]

    loss, grads = nnx.value_and_grad(f)(model)
    opt.update(model, grads)
    return loss

  def accuracy():
    out = heads.apply(model, test)
    c, r = heads.split(np.asarray(training.rewards_of(out, test, level)))
    return metrics.pairwise_accuracy(c, r)

  first = accuracy()
  for _ in range(60):
    step(model, opt, _toy_pairs(rng, 16))
  assert accuracy() > max(0.9, first)


def test_an_eight_device_mesh_gives_the_one_device_rewards():
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  model = reward_model()
  b = heads.pair_batch(scoring.pad_pairs(PROMPTS * 4, CHOSEN * 4, REJECTED * 4))
  one = heads.apply(model, b)
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
    state = nnx.state(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    graphdef = nnx.graphdef(model)
    rows = sharding.global_rows(b, mesh)
    eight = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, rows)
  np.testing.assert_allclose(eight.rewards, one.rewards, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eight.token_rewards, one.token_rewards, rtol=1e-5, atol=1e-6)


@pytest.mark.real_model
@pytest.mark.parametrize('name', ['smollm2', 'gemma3_270m'])
def test_a_real_lm_backbone_gives_padding_invariant_finite_rewards(name):
  from common.models import loader  # noqa: PLC0415

  try:
    assets.path(name)
  except assets.AssetError as e:
    pytest.skip(str(e))
  lm, _, tok = loader.load_pretrained(name)
  with sharding.unsharded():
    model = heads.RewardModel(lm, rngs=nnx.Rngs(0))
  heads.freeze_backbone(model)
  prompts = [tok.encode('What is 2 + 3?', add_bos=False)]
  chosen = [tok.encode(' The answer is 5.', add_bos=False)]
  rejected = [tok.encode(' The answer is 7.', add_bos=False)]
  a = heads.apply(model, heads.pair_batch(scoring.pad_pairs(prompts, chosen, rejected)))
  b = heads.apply(
    model, heads.pair_batch(scoring.pad_pairs(prompts, chosen, rejected, prompt_len=20))
  )
  assert np.all(np.isfinite(a.rewards))
  np.testing.assert_allclose(a.rewards, b.rewards, rtol=1e-4, atol=1e-4)
