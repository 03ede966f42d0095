"""Tests for common.kv_press.frames: StreamMem's input-frame filtering and frame-wise merging
(arXiv 2508.15717 §3 steps 1 and 5), against explicit small cases and numpy sums."""

import jax.numpy as jnp
import numpy as np
import pytest

from common.kv_press import frames


def _frames(*rows):
  return jnp.asarray(np.asarray(rows, np.float32))


def test_identical_frames_are_filtered_against_the_last_kept_frame():
  a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
  out = frames.filter_frames(_frames([a, a, b, b, a, a]), average=False)
  np.testing.assert_array_equal(out.keep, [[True, False, True, False, True, False]])
  np.testing.assert_array_equal(out.last, [a])
  # The next call continues from the last kept frame: a repeat of it is dropped.
  nxt = frames.filter_frames(_frames([a, b]), out.last, out.has_last)
  np.testing.assert_array_equal(nxt.keep, [[False, True]])


def test_a_slow_drift_is_caught_against_the_last_kept_frame():
  # Each step turns by 5 degrees (cos 0.996): consecutive frames always look alike, but against
  # the last kept frame the fourth step (20 degrees, cos 0.940 < 0.95) is new.
  angles = np.deg2rad(5.0 * np.arange(9))
  x = np.stack([np.cos(angles), np.sin(angles)], -1)[None]
  out = frames.filter_frames(jnp.asarray(x, jnp.float32), average=False)
  np.testing.assert_array_equal(
    out.keep, [[True, False, False, False, True] + [False] * 3 + [True]]
  )


def test_threshold_above_one_disables_filtering_and_counts_never_grow():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 4))
  x[:, 1] = x[:, 0]
  x = jnp.asarray(x, jnp.float32)
  assert np.all(frames.filter_frames(x, threshold=1.01).keep)
  for threshold in (-1.0, 0.0, 0.5, 0.95, 0.999):
    keep = np.asarray(frames.filter_frames(x, threshold=threshold).keep)
    assert np.all(keep.sum(1) <= 9) and np.all(keep[:, 0]) and not np.any(keep[:, 1])


def test_kept_frames_average_the_duplicates_that_follow_them():
  a = np.asarray([1.0, 0.0, 0.0])
  near = np.asarray([1.0, 0.01, 0.0])
  c = np.asarray([0.0, 0.0, 1.0])
  out = frames.filter_frames(_frames([a, near, near, c]))
  np.testing.assert_array_equal(out.keep, [[True, False, False, True]])
  np.testing.assert_allclose(out.features[0, 0], (a + 2 * near) / 3, rtol=1e-6)
  np.testing.assert_allclose(out.features[0, 3], c)
  np.testing.assert_allclose(out.last[0], c)  # the reference is the kept frame itself


def test_blank_and_padding_frames():
  zero, a = [0.0, 0.0], [1.0, 1.0]
  out = frames.filter_frames(_frames([zero, zero, a, zero]), average=False)
  np.testing.assert_array_equal(out.keep, [[True, False, True, True]])
  valid = jnp.asarray([[True, False, True, False]])  # a stream shorter than the clip
  out = frames.filter_frames(_frames([a, zero, zero, a]), valid=valid)
  np.testing.assert_array_equal(out.keep, [[True, False, True, False]])
  np.testing.assert_array_equal(out.last, [zero])
  empty = frames.filter_frames(_frames([a, a]), valid=jnp.zeros((1, 2), bool))
  assert not np.any(empty.keep) and not np.any(empty.has_last)


def _groups(frame, fresh=None, max_frames=4):
  frame = jnp.asarray(frame, jnp.int32)
  fresh = jnp.ones(frame.shape, bool) if fresh is None else jnp.asarray(fresh)
  return frames.new_frames(frame, fresh, max_frames)


def test_new_frames_group_fresh_tokens_by_id():
  groups, base = _groups([[-1, 3, 3, 4, 6, 3, 9]], [[True] * 6 + [True]])
  assert int(base[0]) == 3
  got = np.asarray(groups[0]).argmax(-1) + 3
  has = np.asarray(groups[0]).any(-1)
  np.testing.assert_array_equal(has, [False, True, True, True, True, True, False])  # 9 > 3 + 3
  np.testing.assert_array_equal(got[has], [3, 3, 4, 6, 3])
  groups, base = _groups([[1, 1, 2]], [[False, False, False]])
  assert not np.any(groups) and int(base[0]) == 0


@pytest.mark.parametrize('source', ['kept', 'all', 'evicted'])
@pytest.mark.parametrize('weighting', ['scores', 'uniform'])
def test_merge_weights_sum_to_one_over_each_frames_source_tokens(source, weighting):
  rng = np.random.default_rng(1)
  frame = np.asarray([[0, 0, 0, 1, 1, 2, 2, 2, -1]])
  groups, _ = _groups(frame)
  scores = jnp.asarray(rng.random((1, 9)), jnp.float32)
  kept = jnp.asarray([[True, False, True, False, False, True, True, True, True]])
  merge = frames.Merge(max_frames=4, source=source, weighting=weighting)
  w = np.asarray(frames.merge_weights(scores, groups, kept, merge))[0]  # [S, F]
  np.testing.assert_allclose(w.sum(0), [1, 1, 1, 0], rtol=1e-6)
  assert np.all(w >= 0)
  k = np.asarray(kept[0])
  for f in range(3):
    members = frame[0] == f
    src = members & (k if source == 'kept' else ~k if source == 'evicted' else True)
    if not src.any():
      src = members  # frame 1 has no kept token, frame 2 no evicted one: all of the frame
    assert np.all(w[~src, f] == 0)
    want = np.where(src, np.asarray(scores[0]) if weighting == 'scores' else 1.0, 0.0)
    np.testing.assert_allclose(w[:, f], want / want.sum(), rtol=1e-6)


def test_prototypes_are_convex_combinations_with_the_frames_latest_position():
  rng = np.random.default_rng(2)
  k = jnp.asarray(rng.normal(size=(1, 2, 6, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, 2, 6, 4)), jnp.float32)
  frame = jnp.asarray([[[0, 0, 0, 1, 1, 1]] * 2])
  position = jnp.asarray([[[3, 7, 5, 8, 10, 9]] * 2])
  groups, _ = frames.new_frames(frame, jnp.ones(frame.shape, bool), 2)
  scores = jnp.asarray(rng.random((1, 2, 6)), jnp.float32)
  kept = jnp.ones((1, 2, 6), bool)
  w = frames.merge_weights(scores, groups, kept, frames.Merge(max_frames=2))
  kb, vb, pos, exists = frames.prototypes(k, v, position, w, groups)
  np.testing.assert_array_equal(pos, [[[7, 10]] * 2])
  np.testing.assert_array_equal(exists, True)
  for x, xb in ((k, kb), (v, vb)):
    x = np.asarray(x)
    for f, members in ((0, slice(0, 3)), (1, slice(3, 6))):
      seg = x[:, :, members]
      assert np.all(xb[:, :, f] >= seg.min(2) - 1e-6) and np.all(xb[:, :, f] <= seg.max(2) + 1e-6)
      want = np.einsum('bks,bksd->bkd', np.asarray(w)[:, :, members, f], seg)
      np.testing.assert_allclose(xb[:, :, f], want, rtol=1e-5)
  # One-hot weights give exactly that token; uniform weights give the mean.
  onehot = jnp.zeros((1, 2, 6)).at[:, :, 4].set(1.0)
  w1 = frames.merge_weights(onehot, groups, kept, frames.Merge(max_frames=2))
  kb1, _, _, _ = frames.prototypes(k, v, position, w1, groups)
  np.testing.assert_array_equal(kb1[:, :, 1], k[:, :, 4])
  wu = frames.merge_weights(scores, groups, kept, frames.Merge(max_frames=2, weighting='uniform'))
  _, vbu, _, _ = frames.prototypes(k, v, position, wu, groups)
  np.testing.assert_allclose(vbu[:, :, 0], np.asarray(v)[:, :, :3].mean(2), rtol=1e-6)


def test_zero_scores_fall_back_to_the_average_and_bf16_stays_in_range():
  frame = jnp.asarray([[[0, 0, 0, 1]]])
  groups, _ = frames.new_frames(frame, jnp.ones(frame.shape, bool), 2)
  w = frames.merge_weights(
    jnp.zeros((1, 1, 4)), groups, jnp.ones((1, 1, 4), bool), frames.Merge(max_frames=2)
  )
  np.testing.assert_allclose(np.asarray(w)[0, 0, :, 0], [1 / 3] * 3 + [0], rtol=1e-6)
  k = jnp.asarray(np.random.default_rng(3).normal(size=(1, 1, 4, 8)), jnp.bfloat16)
  kb, _, _, _ = frames.prototypes(k, k, jnp.zeros((1, 1, 4), jnp.int32), w, groups)
  assert kb.dtype == jnp.bfloat16
  seg = np.asarray(k[0, 0, :3], np.float32)
  got = np.asarray(kb[0, 0, 0], np.float32)
  assert np.all(got >= seg.min(0)) and np.all(got <= seg.max(0))


def test_merge_config_is_validated():
  with pytest.raises(ValueError, match='source'):
    frames.Merge(source='best')
  with pytest.raises(ValueError, match='weighting'):
    frames.Merge(weighting='max')
  with pytest.raises(ValueError, match='max_frames'):
    frames.Merge(max_frames=0)
