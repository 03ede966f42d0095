"""PerSRec's evaluation: ranking metrics against hand-computed rankings, the cold-start fallback and
the candidate set, and the serving check (cached == single pass) the eval and the claims report."""

from __future__ import annotations

import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from projects.persrec import evaluate
from projects.persrec import models
from tests.persrec import util

P, K, R = 6, 2, 3


def _cfg(**kw) -> models.ModelConfig:
  base = dict(
    num_items=40,
    d_model=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    old_len=P,
    recent_len=R,
    token_mode='learned',
    tokens_per_segment=K,
  )
  return models.ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------
# Metrics.


def test_ranks_and_metrics_match_hand_computed_rankings():
  scores = jnp.asarray(
    [
      [0.0, 0.9, 0.8, 0.1, 0.5],  # target 2: only item 1 beats it -> rank 2
      [0.0, 0.2, 0.2, 0.2, 0.9],  # target 1: ties with 2, 3 count against it; 4 beats -> rank 4
      [0.0, 0.3, 0.1, 0.7, 0.2],  # target 3: best -> rank 1
      [0.0, 0.5, 0.6, 0.4, np.nan],  # target 4 scores NaN -> last: rank 5 (4 candidates + 1)
    ],
    jnp.float32,
  )
  cand = jnp.asarray([False, True, True, True, True])
  rank = np.asarray(evaluate.ranks(scores, jnp.asarray([2, 1, 3, 4]), cand))
  assert rank.tolist() == [2, 4, 1, 5]
  m = evaluate.from_ranks(rank, recall_ks=(1, 2, 4), ndcg_ks=(2,))
  assert m['recall_1'] == 0.25 and m['recall_2'] == 0.5 and m['recall_4'] == 0.75
  assert m['ndcg_2'] == pytest.approx((1 / math.log2(3) + 1) / 4)
  assert m['mrr'] == pytest.approx((1 / 2 + 1 / 4 + 1 + 1 / 5) / 4)
  # Excluding seen items: for user 0, hiding item 1 makes the target first.
  seen = jnp.asarray([[False, True, False, False, False]])
  assert int(evaluate.ranks(scores[:1], jnp.asarray([2]), cand & ~seen)[0]) == 1
  sums = evaluate.rank_sums(jnp.asarray(rank), jnp.asarray([1.0, 1.0, 0.0, 1.0]), (1, 2, 4), (2,))
  got = evaluate.from_sums({k: float(v) for k, v in sums.items()})
  want = evaluate.from_ranks(rank, np.array([1.0, 1.0, 0.0, 1.0]), (1, 2, 4), (2,))
  assert got == pytest.approx(want)
  assert evaluate.from_sums({'users': 0.0}) == {'users': 0.0}


def test_a_constant_scorer_ranks_every_target_last():
  scores = jnp.zeros((3, 6))
  rank = np.asarray(evaluate.ranks(scores, jnp.asarray([1, 3, 5]), jnp.arange(6) > 0))
  assert rank.tolist() == [5, 5, 5]


# ---------------------------------------------------------------------------------------------------
# Scores, candidates, the serving check.


def test_eval_scores_fall_back_to_popularity_without_a_known_item():
  """The evaluation's defined behaviour (evaluate.scores / candidates): a user whose window holds no
  known item (empty, or only unknown ids) is ranked by training popularity; others by cosine;
  padding, the rows padded up to vocab_size and (optionally) seen items are never candidates."""
  cfg = _cfg()
  m = util.model(cfg)
  items, ts = util.histories(cfg, 3, seed=7, lengths=[P + R, 0, P + R])
  items[2] = cfg.num_items + 5  # only unknown ids
  vec = util.forward(m, items, ts)[:, -1]
  fallback = evaluate.fallback_scores(np.arange(cfg.num_items + 1), cfg.vocab_size)
  s = np.asarray(evaluate.scores(m, vec, jnp.asarray(items), jnp.asarray(fallback)))
  np.testing.assert_array_equal(s[1], fallback)
  np.testing.assert_array_equal(s[2], fallback)
  assert not np.array_equal(s[0], fallback)
  # Popularity order for the cold users: the most popular item (the last id) ranks first.
  cand = np.asarray(evaluate.candidates(m, jnp.asarray(items)))
  assert cand.shape == (3, cfg.vocab_size) and not cand[:, 0].any()
  assert not cand[:, cfg.num_items + 1 :].any()
  seen = set(items[0].tolist()) - {0}
  assert not cand[0, sorted(seen)].any() and cand[1, 1 : cfg.num_items + 1].all()
  target = jnp.asarray([1, cfg.num_items, cfg.num_items])
  ranks = np.asarray(evaluate.ranks(jnp.asarray(s), target, jnp.asarray(cand)))
  assert ranks[1] == 1 and ranks[2] == 1


@pytest.mark.parametrize('backbone', models.BACKBONES)
def test_serving_gap_is_the_cached_paths_difference_from_the_single_pass(backbone):
  """serving_gap (the eval's serving_max_abs_diff and the cached_equals_single_pass claim) is
  max |serve(compress(old), recent) - user_vectors(window)|, ~0 for a cacheable model, with and
  without user ids, for full, short and empty histories."""
  cfg = _cfg(backbone=backbone, num_segments=2, old_len=2 * P)
  m = util.model(cfg)
  items, ts = util.histories(cfg, 4, seed=3, lengths=[cfg.window + 5, cfg.window - 4, 1, 0])
  served, _ = util.cached(m, items, ts)
  single = util.forward(m, items, ts)[:, -1]
  want = float(jnp.max(jnp.abs(served - m.user_vectors(jnp.asarray(items), jnp.asarray(ts)))))
  # The jitted gap and this eager one round differently (an AMD EPYC gave 1.5e-8 vs 3.0e-8): equal
  # to a few float32 ulps of the vectors, whose entries are O(1).
  assert float(evaluate.serving_gap(m, items, ts)) == pytest.approx(want, abs=5e-7)
  assert want <= 1e-5 and float(jnp.max(jnp.abs(single))) > 0.1  # outputs far from zero
  user = jnp.arange(1, 5, dtype=jnp.int32)
  assert float(evaluate.serving_gap(m, items, ts, user)) <= 1e-5
  # A gap far above rounding is reported as it is: a served path off by 0.25 in one entry.
  shift = jnp.zeros_like(served).at[1, 2].set(0.25)
  broken = _ServedWith(m, shift)
  assert float(evaluate.serving_gap(broken, items, ts)) == pytest.approx(0.25, abs=1e-5)


class _ServedWith(nnx.Module):
  """A model whose cached serving path is off by `shift` (the rest is the wrapped model's)."""

  def __init__(self, model, shift):
    self.model, self.cfg, self.shift = model, model.cfg, nnx.Variable(shift)

  def compress(self, *args, **kwargs):
    return self.model.compress(*args, **kwargs)

  def user_vectors(self, *args, **kwargs):
    return self.model.user_vectors(*args, **kwargs)

  def serve(self, *args, **kwargs):
    return self.model.serve(*args, **kwargs) + self.shift[...]
