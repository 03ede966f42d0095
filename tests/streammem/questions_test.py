"""The video task's counting and order questions, and StreamMem's input-frame filtering wired into
the streaming loop (issue 19: "identical frames are filtered"; the question types of the video
evaluation). The filtering and bookkeeping tests need no asset; the episode and streaming tests use
real frames (the opencv_videos asset and opencv-python-headless) and are skipped without them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from common import assets
from common import config as config_lib
from common import sharding
from experiments.streammem.configs import base
from projects.streammem import evaluate
from projects.streammem import input_pipeline
from projects.streammem import models

KINDS = ('recall', 'count', 'order')
HAVE_VIDEO = assets.is_fetched('opencv_videos')
try:
  import cv2  # noqa: F401
except ImportError:
  HAVE_VIDEO = False
video = pytest.mark.skipif(not HAVE_VIDEO, reason='needs opencv_videos and opencv-python-headless')


def _lang(questions=KINDS):
  return input_pipeline.VideoEvents(size=16, grid=2, square=6, questions=questions)


# ---------------------------------------------------------------------------------------------------
# Frame filtering (no asset).


def test_filter_clip_drops_identical_frames_and_carries_the_reference_across_clips():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 4, 5)).astype(np.float32)  # two different frames of 4 tokens
  clip1 = np.concatenate([a, a, b, b])[None]  # frames a a b b
  clip2 = np.concatenate([b, a, a, a])[None]  # frames b a a a
  valid = np.ones((1, 16), bool)
  p1, v1, keep1, state = models.filter_clip(clip1, valid, 4, 0.95, None)
  np.testing.assert_array_equal(keep1, [[True, False, True, False]])
  np.testing.assert_array_equal(v1, np.repeat(keep1, 4, axis=1))  # dropped tokens never encoded
  np.testing.assert_allclose(p1[0, :4], a, rtol=1e-6)  # kept frames: the mean of identical ones
  p2, _, keep2, _ = models.filter_clip(clip2, valid, 4, 0.95, state)
  # The first b repeats the last kept frame of the previous clip (b): dropped; then a is new.
  np.testing.assert_array_equal(keep2, [[False, True, False, False]])
  np.testing.assert_allclose(p2[0, 4:8], a, rtol=1e-6)  # a averaged with its two repeats
  # Threshold 1 keeps everything (cosine similarity never exceeds 1); padding frames never kept.
  pad = valid.copy()
  pad[0, 12:] = False
  _, v, keep, _ = models.filter_clip(clip1, pad, 4, 1.0, None)
  np.testing.assert_array_equal(keep, [[True, True, True, False]])
  np.testing.assert_array_equal(v, pad)
  with pytest.raises(ValueError, match='whole frames'):
    models.filter_clip(clip1, valid, 5, 0.95, None)


def test_totals_report_question_kinds_and_dropped_frames():
  t = evaluate.Totals()
  exact = np.asarray([[1, 0, 1, 1, 0]], float)
  depth = np.asarray([[0, 1, 2, -1, -1]])
  kind = np.asarray([[0, 0, 0, 1, 2]])
  dropped = np.asarray([[True, False, False, False]])
  t.add('streammem@8', exact, np.zeros((1, 5)), np.zeros((1, 5)), depth, 8, kind, dropped)
  s = evaluate.Totals.from_json(t.to_json()).summary()
  assert s['streammem@8/em'] == pytest.approx(0.6)
  assert (s['streammem@8/em_early'], s['streammem@8/em_middle']) == (1.0, 0.0)
  assert (s['streammem@8/em_count'], s['streammem@8/em_order']) == (1.0, 0.0)
  assert s['streammem@8/dropped'] == 0.25
  t.add('fifo@8', exact, np.zeros((1, 5)), np.zeros((1, 5)), depth, 8)  # recall-only: no extras
  assert 'fifo@8/em_count' not in t.summary() and 'fifo@8/dropped' not in t.summary()


def test_config_checks_of_the_new_keys():
  c = base.get_config('video_smoke')
  c.video.questions = 'recall+when'
  with pytest.raises(config_lib.ConfigError, match='video.questions'):
    input_pipeline.check_config(c)
  c = base.get_config('smoke')
  c.stream.frame_filter = 0.95
  with pytest.raises(config_lib.ConfigError, match='frame_filter'):
    input_pipeline.check_config(c)  # the planted-fact streams have no frames to filter
  c = base.get_config('video_smoke')
  c.stream.update(frame_filter=0.95, clip_len=18)
  with pytest.raises(config_lib.ConfigError, match='whole frames'):
    input_pipeline.check_config(c)
  with pytest.raises(ValueError, match='questions'):
    input_pipeline.VideoEvents(questions=('recall', 'recall'))
  c = base.get_config('video_smoke')
  c.stream.filter_methods = 'fifo'
  with pytest.raises(config_lib.ConfigError, match='filter_methods'):
    input_pipeline.check_config(c)
  c = base.get_config('smoke')
  c.eval.ratios = (0.5, 1.0)
  with pytest.raises(config_lib.ConfigError, match=r'eval.ratios=.*\[0, 1\)'):
    input_pipeline.check_config(c)
  c.eval.ratios = (0.5,)
  input_pipeline.check_config(c)
  assert evaluate.budgets_of(c) == [*c.eval.budgets, 0.5]
  assert evaluate.label('streammem', 0.5) == 'streammem@r0.5'
  assert evaluate.label('streammem', 24) == 'streammem@24'


def test_frame_filtering_applies_to_streammem_only_or_to_every_method():
  c = base.get_config('video_smoke')
  c.stream.frame_filter = 0.95
  for name in ('full', 'streammem', 'streammem_span', 'fifo', 'oracle'):
    m = models.method(name)
    paper = evaluate.frame_filter(c, m)
    assert paper == (0.95 if name.startswith('streammem') else 0.0)
  c.stream.filter_methods = 'all'
  for name in ('full', 'streammem', 'fifo', 'oracle', 'uniform'):
    assert evaluate.frame_filter(c, models.method(name)) == 0.95


def test_recall_only_vocabulary_is_unchanged_and_extras_add_their_tokens():
  recall = _lang(('recall',))
  assert recall.vocab_size == recall.first_colour + len(input_pipeline.PALETTE)
  full = _lang()
  assert full.vocab_size == recall.vocab_size + 2 + full.num_quadrants + 1
  assert len({full.COUNT, full.ORDER, *(full.number(k) for k in range(5))}) == 7
  assert min(full.COUNT, full.ORDER) >= recall.vocab_size


# ---------------------------------------------------------------------------------------------------
# Real frames.


@video
def test_count_and_order_questions_have_the_right_answers():
  lang = _lang()
  e = lang.episodes(3, range(6), videos=('tree.avi',), stream_len=4 * 40)
  assert e.num_questions == 5 and e.kind.tolist() == [[0, 0, 0, 1, 2]] * 6
  assert (e.depth[:, 3:] == input_pipeline.NO_DEPTH).all()
  for b in range(6):
    answer = [int(e.qa_target[b, j][e.qa_mask[b, j]][0]) for j in range(5)]
    colours = answer[:3]  # the recall answers: the colour of each event, in time order
    quads = [int(e.qa[b, j, 2]) for j in range(3)]
    # count: [END, ASSISTANT, COUNT, C_c] -> N_k, k = how many events had colour c (>= 1).
    asked = int(e.qa[b, 3, 3])
    assert e.qa[b, 3, 2] == lang.COUNT
    assert answer[3] == lang.number(colours.count(asked)) and colours.count(asked) >= 1
    # order: [END, ASSISTANT, ORDER, Q_a, Q_b] -> the quadrant of the earlier event.
    a, c = int(e.qa[b, 4, 3]), int(e.qa[b, 4, 4])
    assert e.qa[b, 4, 2] == lang.ORDER and a != c and {a, c} <= set(quads)
    assert answer[4] == min((a, c), key=quads.index)
  # The recall questions are those of a recall-only episode (extra draws come after them).
  r = _lang(('recall',)).episodes(3, range(6), videos=('tree.avi',), stream_len=4 * 40)
  np.testing.assert_array_equal(r.qa, e.qa[:, :3, : r.qa.shape[2]])
  np.testing.assert_array_equal(r.patches, e.patches)


@video
def test_mixed_training_examples_ask_every_kind_with_the_answer_alone_in_the_loss():
  lang = _lang()
  kw = dict(videos=('vtest.avi',), num_frames=8, max_events=3, max_position=1100)
  seen = set()
  for i in range(24):
    x = lang.train_example(0, i, **kw)
    assert x['tokens'].shape == (1 + 32 + 9,) and (np.diff(x['positions']) > 0).all()
    tail = x['tokens'][33:]
    if tail[2] in (lang.COUNT, lang.ORDER):
      seen.add(int(tail[2]))
      eos = 5 if tail[2] == lang.COUNT else 6  # [END, ASSISTANT, COUNT, C, N] / [.., Q, Q, Q]
      assert tail[eos] == lang.EOS and x['mask'].sum() == 2  # the loss: the answer and EOS only
      assert x['mask'][33 + eos - 1] == x['mask'][33 + eos] == 1.0
    else:
      seen.add('describe')
  assert seen == {lang.COUNT, lang.ORDER, 'describe'}
  recall = _lang(('recall',)).train_example(0, 5, **kw)
  assert recall['tokens'].shape == (1 + 32 + 9,) and recall['tokens'].max() < lang.first_extra


@video
def test_identical_frames_are_filtered_in_the_stream_and_take_no_position():
  c = base.get_config('video_smoke')
  with sharding.unsharded():
    m = models.create_video_lm(c)
  st = models.Streamer(m)
  lang = models.video_language(c)
  e = lang.episodes(1, range(2), videos=('tree.avi',), stream_len=4 * 8)
  frozen = e.patches.copy()
  frozen[:, 4:] = np.tile(frozen[:, :4], (1, 7, 1))  # every frame repeats the first
  still = input_pipeline.Episodes(**{**e.__dict__, 'patches': frozen})
  kw = dict(clip_len=8, frame_tokens=4, key=jax.random.key(0))
  seen = []
  on = models.run_stream(
    st,
    still,
    models.method('streammem', frames_per_clip=2),
    16,
    frame_filter=0.95,
    on_clip=lambda i, mem: seen.append(models.memory_contents(mem)),
    **kw,
  )
  assert on.dropped.shape == (2, 8) and on.dropped[:, 1:].all() and not on.dropped[:, 0].any()
  held = seen[-1]['held']
  assert held.sum(-1).max() == 4  # only the first frame's 4 tokens were ever encoded
  np.testing.assert_array_equal(
    np.sort(seen[-1]['position'][held].reshape(-1, 4)), [[1, 2, 3, 4]] * held[..., 0].size
  )
  # A threshold of 1 drops nothing and streams exactly as without filtering.
  a = models.run_stream(st, e, models.method('streammem', frames_per_clip=2), 16, **kw)
  b = models.run_stream(
    st, e, models.method('streammem', frames_per_clip=2), 16, frame_filter=1.0, **kw
  )
  assert not b.dropped.any() and a.digest == b.digest
  np.testing.assert_array_equal(a.loglik, b.loglik)
