"""Chronological histories (ties by row order), leave-last-out, windows, the procedural source,
the MovieLens TFDS build, and serving's defined behaviour for short/empty histories and unknown ids."""

from __future__ import annotations

import numpy as np
import pytest

from common import assets
from projects.persrec import input_pipeline as ip
from projects.persrec import models
from projects.persrec import serving
from projects.persrec import synthetic
from tests.persrec import util


def test_histories_sort_by_time_with_ties_in_row_order():
  #        row:   0    1    2    3    4    5
  user = np.array([7, 3, 7, 7, 3, 7])
  item = np.array([100, 50, 200, 300, 60, 100])
  ts = np.array([5, 9, 3, 5, 1, 5])
  h = ip.user_histories(user, item, ts)
  assert h.raw_users.tolist() == [3, 7] and h.raw_items.tolist() == [50, 60, 100, 200, 300]
  # user 3: ts 1 (row 4, item 60 -> id 2), ts 9 (row 1, item 50 -> id 1)
  assert h.items[0].tolist() == [2, 1]
  # user 7: ts 3 (row 2: 200), then ts 5 in row order 0, 3, 5: 100, 300, 100
  assert h.items[1].tolist() == [4, 3, 5, 3]
  assert h.timestamps[1].tolist() == [3, 5, 5, 5]


def test_leave_last_out():
  assert ip.leave_last_out(5) == ip.Split(train=3, val=3, test=4)
  assert ip.leave_last_out(3) == ip.Split(train=1, val=1, test=2)
  assert ip.leave_last_out(2) == ip.Split(train=2, val=None, test=None)
  assert ip.leave_last_out(0) == ip.Split(train=0, val=None, test=None)


@pytest.mark.parametrize(
  'n, want',
  [
    (9, [4, 5, 6, 7, 8]),  # longer than P + R: the last 5
    (4, [-1, 0, 1, 2, 3]),  # between R and P + R: old partly padded
    (2, [-1, -1, -1, 0, 1]),  # shorter than R: old empty, recent padded
    (0, [-1, -1, -1, -1, -1]),  # empty
  ],
)
def test_window_indices(n, want):
  assert ip.window_indices(n, 3, 2).tolist() == want


def test_train_window_targets_are_next_items():
  seq = np.array([11, 12, 13, 14, 15])
  ex = ip.train_window(seq, np.arange(5) * 10 + 100, 2, 2, final_weight=4.0)
  assert ex['items'].tolist() == [11, 12, 13, 14]
  assert ex['targets'].tolist() == [12, 13, 14, 15]
  assert ex['weights'].tolist() == [1, 1, 1, 4]
  assert ex['timestamps'].tolist() == [0, 10, 20, 30]
  short = ip.train_window(seq[:3], np.arange(3), 2, 2)
  assert short['items'].tolist() == [0, 0, 11, 12] and short['targets'].tolist() == [0, 0, 12, 13]
  assert short['weights'].tolist() == [0, 0, 1, 1]


def test_synthetic_users_are_deterministic_and_plant_old_interests():
  cfg = synthetic.SyntheticConfig(num_items=200, num_categories=10, history_len=120, late_len=40)
  a, b = synthetic.LongHistories(cfg), synthetic.LongHistories(cfg)
  np.testing.assert_array_equal(a[3]['items'], b[3]['items'])
  assert not np.array_equal(a[3]['items'], a[4]['items'])
  held = synthetic.LongHistories(cfg, offset=synthetic.EVAL_OFFSET)
  assert not np.array_equal(held[3]['items'], a[3]['items'])
  old_share, late_share, fav_targets = [], [], 0
  for i in range(40):
    u = a[i]
    counts = np.bincount(u['items'][:80], minlength=201)
    favs = np.flatnonzero(counts >= 3)  # repeated in old history: (mostly) the favourites
    old_share.append(np.isin(u['items'][:80], favs).mean())
    late_share.append(np.isin(u['items'][80:], favs).mean())
    fav_targets += int(u['favourite_target'])
    assert np.all(np.diff(u['timestamps']) >= 0) and u['items'].min() >= 1
  assert np.mean(old_share) > 2 * np.mean(late_share)
  assert 4 <= fav_targets <= 25  # rho = 0.3 of 40


# ---------------------------------------------------------------------------------------------------
# Serving: defined behaviour for short/empty histories and unknown ids.


def _recommender():
  cfg = models.ModelConfig(
    num_items=20,
    d_model=8,
    num_heads=1,
    head_dim=8,
    num_layers=1,
    old_len=4,
    recent_len=2,
    token_mode='learned',
    tokens_per_segment=1,
  )
  popularity = np.arange(21)  # item 20 most popular
  return serving.Recommender(util.model(cfg), popularity), cfg


def test_serving_short_empty_and_unknown():
  rec, cfg = _recommender()
  histories = [[3, 4, 5, 6, 7, 8, 9], [5], [], [99, -1, 'x', 5]]
  ids, scores, reqs = rec.recommend(histories, k=3)
  assert [r.fallback for r in reqs] == [False, False, True, False]
  assert [r.unknown for r in reqs] == [0, 0, 0, 3]
  assert reqs[1].items.tolist() == [0, 0, 0, 0, 0, 5]  # short: left-padded
  assert reqs[0].items.tolist() == [4, 5, 6, 7, 8, 9]  # long: the last P + R
  assert ids[2].tolist() == [20, 19, 18]  # empty: training popularity
  # Unknown ids are dropped: the same answer as the history without them.
  np.testing.assert_array_equal(ids[3], ids[1])
  assert np.isfinite(scores).all()
  for row, h in zip(ids, histories, strict=True):  # exclude_seen, padding never recommended
    assert 0 not in row and not set(row.tolist()) & {x for x in h if isinstance(x, int)}
  # The cached path: identical rankings from a fresh cache.
  cache = rec.compress(histories)
  ids_c, scores_c, _ = rec.recommend_cached(cache, histories, k=3)
  np.testing.assert_array_equal(ids_c, ids)
  np.testing.assert_allclose(scores_c, scores, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The real MovieLens-100K build (skipped unless `python -m common.assets fetch ml100k` was run).


@pytest.mark.skipif(
  not assets.is_fetched('ml100k'), reason='run: python -m common.assets fetch ml100k'
)
def test_ml100k_builds_chronological_histories():
  users = ip.load_movielens('ml100k')
  assert len(users) == 943
  assert sum(len(u['items']) for u in users) == 100_000
  assert max(int(u['items'].max()) for u in users) == 1682
  assert min(len(u['items']) for u in users) >= 20
  for u in users[:50]:
    assert np.all(np.diff(u['timestamps']) >= 0)
  titles = ip.item_titles('ml100k')
  assert len(titles) == 1683 and titles[0] == '<pad>'
