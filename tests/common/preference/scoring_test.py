"""common.preference.scoring: pair layout, prompt masking, and agreement with a one-row forward."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from common.preference import scoring

CFG = decoder.DecoderConfig(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
PROMPTS = [[1, 2, 3, 4], [5, 6], [7]]
CHOSEN = [[10, 11], [12, 13, 14, 15], [16]]
REJECTED = [[20], [21, 22], [23, 24, 25]]


@pytest.fixture(scope='module')
def model():
  with sharding.unsharded():
    return decoder.Decoder(CFG, rngs=nnx.Rngs(0))


_score_pairs = jax.jit(lambda g, s, b: scoring.score_pairs(nnx.merge(g, s), b), static_argnums=0)


def _score(model, pairs):
  return _score_pairs(*nnx.split(model), scoring.pair_batch(pairs))


def _one_row_logps(model, prompt, response):
  """Response log-probs from a forward over the unpadded prompt + response (float64 sum)."""
  seq = np.asarray([prompt + response], np.int32)
  logits = np.asarray(model(seq), np.float64)[0]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  targets = np.asarray(response)
  pos = np.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
  return logits[pos, targets] - logz[pos]


def test_pad_pairs_layout():
  pairs = scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=63)
  assert set(pairs) == set(scoring.PAIR_KEYS)
  np.testing.assert_array_equal(pairs['prompt_tokens'][1], [63, 63, 5, 6])  # left-padded
  np.testing.assert_array_equal(pairs['prompt_mask'][2], [False, False, False, True])
  np.testing.assert_array_equal(pairs['chosen'][0], [10, 11, 63, 63])  # right-padded, one width
  np.testing.assert_array_equal(pairs['rejected'][2], [23, 24, 25, 63])
  np.testing.assert_array_equal(pairs['chosen_lengths'], [2, 4, 1])
  np.testing.assert_array_equal(pairs['rejected_lengths'], [1, 2, 3])
  assert scoring.check_pairs(pairs) == 3
  batch = scoring.pair_batch(pairs)
  assert batch['targets'].shape == (6, 4) and batch['inputs'].shape == (6, 4 + 4 - 1)
  np.testing.assert_array_equal(batch['completion_mask'].sum(1), [2, 4, 1, 1, 2, 3])


def test_pad_pairs_errors():
  with pytest.raises(scoring.PreferenceError, match='rejected 1 is empty'):
    scoring.pad_pairs(PROMPTS, CHOSEN, [[1], [], [2]])
  with pytest.raises(scoring.PreferenceError, match='chosen 1 has 4 tokens, more than the 3'):
    scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, response_len=3)
  with pytest.raises(scoring.PreferenceError, match='prompt 0 has 4 tokens'):
    scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, prompt_len=2)
  with pytest.raises(scoring.PreferenceError, match='3 prompts, 2 chosen'):
    scoring.pad_pairs(PROMPTS, CHOSEN[:2], REJECTED)
  pairs = scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED)
  with pytest.raises(scoring.PreferenceError, match='missing'):
    scoring.check_pairs({k: v for k, v in pairs.items() if k != 'chosen'})
  with pytest.raises(scoring.PreferenceError, match='disagree on the number of rows'):
    scoring.check_pairs({**pairs, 'chosen_lengths': pairs['chosen_lengths'][:2]})


def test_scores_equal_an_unpadded_forward_of_each_pair(model):
  chosen, rejected = _score(model, scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED))
  for seq, responses in ((chosen, CHOSEN), (rejected, REJECTED)):
    assert seq.sum.dtype == jnp.float32 and seq.sum.shape == (3,)
    for i, (prompt, response) in enumerate(zip(PROMPTS, responses, strict=True)):
      ref = _one_row_logps(model, prompt, response)
      np.testing.assert_allclose(seq.sum[i], ref.sum(), rtol=1e-5)
      np.testing.assert_allclose(seq.mean[i], ref.mean(), rtol=1e-5)
      assert seq.length[i] == len(response)


def test_padding_and_pad_ids_change_nothing(model):
  """Masked positions never contribute: other pad ids, extra padding, junk after the response."""
  a = _score(model, scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0))
  pairs = scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED, prompt_len=7, response_len=6, pad_id=9)
  pairs['chosen'][0, 2:] = 42  # junk beyond chosen_lengths[0] = 2
  pairs['prompt_tokens'][1, :5] = 17  # junk in the prompt's left padding
  b = _score(model, pairs)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5)


def test_prompt_is_context_not_target(model):
  """Changing a prompt changes the responses' log-probs (context) but the prompt tokens are never
  scored: a response's score only counts its own tokens."""
  a = _score(model, scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED))
  b = _score(model, scoring.pad_pairs([[1, 2, 3, 9], *PROMPTS[1:]], CHOSEN, REJECTED))
  assert not np.isclose(a[0].sum[0], b[0].sum[0])
  np.testing.assert_allclose(a[0].sum[1:], b[0].sum[1:], rtol=1e-5)
  np.testing.assert_array_equal(a[0].length, [2, 4, 1])


def test_reduce_ignores_non_finite_masked_entries():
  logp = jnp.asarray([[-1.0, -2.0, -jnp.inf, jnp.nan], [-0.5, jnp.nan, jnp.nan, jnp.nan]])
  mask = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
  out = scoring.reduce(logp, mask)
  np.testing.assert_allclose(out.sum, [-3.0, -0.5])
  np.testing.assert_allclose(out.mean, [-1.5, -0.5])
  np.testing.assert_allclose(out.length, [2, 1])
  g = jax.grad(lambda x: scoring.reduce(x, mask).sum.sum())(logp)
  np.testing.assert_array_equal(g, mask)
  empty = scoring.reduce(jnp.zeros((1, 3)), jnp.zeros((1, 3)))
  assert empty.mean[0] == 0 and empty.length[0] == 0


def test_score_pairs_is_differentiable_and_jit_matches_eager(model):
  pairs = scoring.pad_pairs(PROMPTS, CHOSEN, REJECTED)
  batch = scoring.pair_batch(pairs)
  eager = scoring.score_pairs(model, batch)
  jitted = _score(model, pairs)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5)
  graphdef, state = nnx.split(model)

  def margin(state):
    chosen, rejected = scoring.score_pairs(nnx.merge(graphdef, state), batch)
    return jnp.sum(chosen.sum - rejected.sum)

  grads = jax.grad(margin)(state)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
