"""projects.gem.qa: the reasoning-gym set, row layout, and teacher-forced exact match == greedy
generation's (common.sampling), with the answer NLL against a numpy reference."""

from flax import nnx
import jax
import numpy as np
import pytest

from common import sharding
from common.models import decoder
from projects.gem import inference
from projects.gem import models
from projects.gem import qa

CFG = decoder.DecoderConfig(
  vocab_size=60, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
SEQ, PAD = 16, 0


@pytest.fixture(scope='module')
def model():
  with sharding.unsharded():
    return models.GemModel(decoder.Decoder(CFG, rngs=nnx.Rngs(3)))


def test_items_are_deterministic_correct_and_shots_disjoint():
  a, b = qa.items(12, seed=5), qa.items(12, seed=5)
  assert a == b and len(a) == 12
  for q, ans in a:
    expr = q.removeprefix('Calculate ').rstrip('.').replace('( ', '(').replace(' )', ')')
    assert float(ans) == pytest.approx(eval(expr))  # the generator's own arithmetic, re-checked
  pairs = qa.prompts(4, seed=5, shots=1)
  shot = qa.items(1, seed=5 + qa.SHOT_SEED_OFFSET)[0]
  for (prompt, ans), (q, gold) in zip(pairs, qa.items(4, seed=5), strict=True):
    assert prompt == f'{shot[0]} Answer: {shot[1]}\n{q} Answer:' and ans == f' {gold}'
  with pytest.raises(ValueError, match='positive'):
    qa.items(0)


def test_row_masks_exactly_the_answer_targets():
  r = qa.row([7, 8, 9], [4, 5], SEQ, PAD)
  assert r['inputs'][:5].tolist() == [7, 8, 9, 4, 5] and (r['inputs'][5:] == PAD).all()
  picked = r['targets'][r['loss_mask'] > 0].tolist()
  assert picked == [4, 5]
  assert int(r['end_pos']) == 4
  assert (r['roles'][:5] == models.PREFIX).all() and (r['roles'][5:] == models.PAD).all()
  with pytest.raises(ValueError, match='over seq_len'):
    qa.row(list(range(1, 16)), [4, 5], SEQ, PAD)
  with pytest.raises(ValueError, match='non-empty'):
    qa.row([], [4], SEQ, PAD)


def test_number_continuation_table():
  names = {0: '', 1: '7', 2: ' 7', 3: '.5', 4: ',', 5: 'ab', 6: '12'}
  got = qa.number_continuation_table(lambda i: names[i], 7)
  assert got.tolist() == [False, True, False, True, True, False, True]


def _batch(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_teacher_forced_exact_match_equals_greedy_generation(model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 50, size=n) for n in (3, 6, 9)]
  gens = [
    inference.greedy_continuations(model, [p], max_new_tokens=3, pad_id=PAD)[0] for p in prompts
  ]
  none = np.zeros(CFG.vocab_size, bool)
  rows, want = [], []
  for p, g in zip(prompts, gens, strict=True):
    rows.append(qa.row(p, g[:2], SEQ, PAD))  # greedy's own answer: a hit
    want.append(1.0)
    wrong = [g[0], (g[1] + 1) % 50]
    rows.append(qa.row(p, wrong, SEQ, PAD))  # second token changed: a miss
    want.append(0.0)
  _, _, exact = jax.device_get(qa.score(model, _batch(rows), none))
  assert exact.tolist() == want
  # The answer must end: if greedy's next token would extend a number, the hit becomes a miss.
  extends = none.copy()
  extends[gens[0][2]] = True
  _, _, exact = jax.device_get(qa.score(model, _batch(rows[:1]), extends))
  assert exact.tolist() == [0.0]


def test_answer_nll_matches_numpy_reference(model):
  r = qa.row([3, 9, 11, 2], [5, 6, 7], SEQ, PAD)
  nll, count, _ = jax.device_get(qa.score(model, _batch([r]), np.zeros(CFG.vocab_size, bool)))
  logits = np.asarray(nnx.jit(lambda m, t: m.lm(t))(model, r['inputs'][None]), np.float64)[0]
  logits = logits[:, : CFG.vocab_size]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  want = -sum(logp[i, t] for i, t in ((3, 5), (4, 6), (5, 7)))
  assert int(count[0]) == 3
  np.testing.assert_allclose(nll[0], want, rtol=1e-4)
