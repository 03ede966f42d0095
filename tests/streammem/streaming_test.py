"""The streaming loop's must-holds (issue 19): the budget holds after every clip, a budget larger
than the stream changes nothing (answers equal full KV bitwise), one memory serves any number of
questions and is bit-identical whatever question follows, short / empty streams and a budget below
the pinned prefix have defined behaviour, and 8 sharded devices give one device's answers."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from common import sharding
from common.kv_press import memory
from projects.streammem import models
from tests.streammem import util

KEY = jax.random.key(0)
# Methods on the same footing; each compiles once per (budget, batch). The default suite runs two
# (the proxy-scored StreamMem and the question-scored oracle); the rest are marked slow.
EVICTING = [
  'streammem',
  'oracle',
  *(
    pytest.param(n, marks=pytest.mark.slow)
    for n in ('h2o', 'fifo', 'uniform', 'random', 'streaming_llm', 'snapkv', 'tova', 'keynorm')
  ),
]


def stream(e, name, budget, *, clip=8, frame_tokens=4, st=None, slots=None):
  m = models.method(name, frames_per_clip=clip // frame_tokens, window=4, sinks=2)
  return models.run_stream(
    st or util.streamer(),
    e,
    m,
    budget,
    clip_len=clip,
    frame_tokens=frame_tokens,
    key=KEY,
    slots=slots,
  )


@pytest.mark.parametrize(
  'name,length,budget',
  [
    ('streammem', 45, 12),
    ('fifo', 29, 7),
    pytest.param('h2o', 37, 10, marks=pytest.mark.slow),
    pytest.param('random', 21, 5, marks=pytest.mark.slow),
  ],
)
def test_kept_tokens_never_exceed_the_budget(name, length, budget):
  r = stream(util.episodes(2, length, seed=length), name, budget)
  clips = -(-length // 8)
  assert r.kept.shape == (clips, util.CFG.num_layers, 2)
  assert r.kept.max() <= budget
  assert r.kept[-1].min() == budget  # the stream outgrew the budget: the memory is full
  assert len(set(r.memory_bytes)) == 1  # the memory's size is constant, clip after clip


@pytest.mark.parametrize('ratio', [0.5, 0.75])
def test_a_ratio_budget_keeps_its_fraction_and_a_memory_bounded_in_stream_length(ratio):
  """Under a compression ratio each clip's press keeps floor(held (1 - r)) entries per layer; the
  memory settles near clip (1 - r) / r, and the cache `capacity` sizes from `ratio_held` is the
  same for a stream 4x longer (constant memory)."""
  length, clip = 45, 8
  r = stream(util.episodes(2, length, seed=3), 'streammem', ratio)
  held, expected = 1, []  # the pinned BOS
  for start in range(0, length, clip):
    held = int(np.floor(np.float32(held + min(clip, length - start)) * np.float32(1 - ratio)))
    expected.append(held)
  np.testing.assert_array_equal(
    r.kept, np.broadcast_to(np.asarray(expected)[:, None, None], r.kept.shape)
  )
  assert max(expected) <= models.ratio_held(ratio, prefix=1, stream=length, clip=clip)
  m = models.method('streammem', frames_per_clip=2)
  short, long = (
    models.capacity(m, ratio, prefix=1, stream=n, clip=clip, extra=4) for n in (length, 4 * length)
  )
  assert (
    short
    == long
    < models.capacity(models.method('full'), 0, prefix=1, stream=length, clip=clip, extra=4)
  )
  assert models.press_budget(ratio) == memory.Budget(compression_ratio=ratio)
  assert models.press_budget(12) == memory.Budget(layer_tokens=12)


@pytest.mark.parametrize('name', EVICTING)
def test_budget_above_the_stream_equals_full_kv_bitwise(name):
  e = util.episodes(2, 40)
  r = stream(e, name, 64)
  slots = 64 + 8 + 4  # the pressed cache's size (budget + clip + question), for full KV too
  full = stream(e, 'full', 0, slots=slots)
  assert r.kept.max() == 41  # the pinned BOS + every stream token: nothing evicted or merged
  # The same entries in the same slots: bitwise (at any XLA optimisation level).
  np.testing.assert_array_equal(r.loglik, full.loglik)
  np.testing.assert_array_equal(r.exact, full.exact)
  # full KV in its own (smaller) cache: the same up to summation order
  np.testing.assert_allclose(stream(e, 'full', 0).loglik, full.loglik, rtol=1e-6)


def test_budget_above_a_stream_with_a_padded_last_clip_equals_full_kv():
  """With a padded last clip, full KV keeps the padding slots (invalid) and the memory compacts
  them away: the same entries in other slots, equal up to summation order."""
  e = util.episodes(2, 37)
  r = stream(e, 'streammem', 64)
  assert r.kept.max() == 38
  np.testing.assert_allclose(r.loglik, stream(e, 'full', 0, slots=76).loglik, rtol=1e-6)


def test_full_kv_with_a_padded_last_clip_equals_one_pass():
  """Regression: full KV's cache must hold the padded last clip (it overflowed and overwrote)."""
  e = util.episodes(2, 37)
  ragged = stream(e, 'full', 0, clip=8)
  whole = stream(e, 'full', 0, clip=37)
  np.testing.assert_allclose(ragged.loglik, whole.loglik, rtol=1e-5)


def test_one_memory_answers_any_questions_and_is_bit_identical_whatever_follows():
  e = util.episodes(2, 45, facts_per_depth=1)
  # The same streams with other questions (reversed order, and only the first): the memory is
  # built before any question is seen, so its digest is the same.
  rev = dataclasses.replace(
    e,
    qa=e.qa[:, ::-1],
    qa_valid=e.qa_valid[:, ::-1],
    qa_target=e.qa_target[:, ::-1],
    qa_mask=e.qa_mask[:, ::-1],
    depth=e.depth[:, ::-1],
  )
  first = dataclasses.replace(
    e,
    qa=e.qa[:, :1],
    qa_valid=e.qa_valid[:, :1],
    qa_target=e.qa_target[:, :1],
    qa_mask=e.qa_mask[:, :1],
    depth=e.depth[:, :1],
  )
  a, b, c = (stream(x, 'streammem', 12) for x in (e, rev, first))
  assert a.digest == b.digest == c.digest
  np.testing.assert_allclose(b.loglik, a.loglik[:, ::-1], rtol=1e-6)  # answers don't interact
  np.testing.assert_allclose(c.loglik, a.loglik[:, :1], rtol=1e-6)


def test_streams_shorter_than_a_clip_and_empty_streams():
  short = util.episodes(2, 5)
  full = stream(short, 'full', 0)
  r = stream(short, 'streammem', 4)
  assert r.kept.shape[0] == 1 and r.kept.max() <= 4
  big = stream(short, 'streammem', 16)  # nothing to evict: equals full KV
  # To float rounding, not bitwise: the two caches have different buffer lengths, and on some CPU
  # kinds (AMD EPYC, measured) XLA's reductions over them round 1 ulp apart.
  np.testing.assert_allclose(big.loglik, full.loglik, rtol=1e-6)
  empty = dataclasses.replace(short, stream=short.stream[:, :0])  # questions, no stream
  e_full = stream(empty, 'full', 0)
  e_mem = stream(empty, 'streammem', 4)
  assert e_mem.kept.size == 0  # no clip ran; the memory is the pinned prefix
  np.testing.assert_array_equal(e_mem.loglik, e_full.loglik)


def test_a_budget_below_the_pinned_prefix_is_a_clear_error():
  e = util.episodes(1, 16)
  e = dataclasses.replace(e, prefix=np.ones((1, 6), np.int32), prefix_valid=np.ones((1, 6), bool))
  with pytest.raises(memory.BudgetError, match='pinned'):
    stream(e, 'streammem', 4)
  r = stream(e, 'fifo', 6)  # exactly the prefix: only pinned entries survive, no error
  assert r.kept.max() == 6


def test_eight_sharded_devices_match_one_device():
  assert jax.device_count() == 8
  e = util.episodes(8, 21, seed=3)
  mesh = sharding.make_mesh([('data', 8), ('fsdp', 1), ('tensor', 1)])
  sharded = models.Streamer(util.model(), mesh=mesh)
  for name in ('streammem',):
    one = stream(e, name, 10)
    eight = stream(e, name, 10, st=sharded)
    np.testing.assert_array_equal(eight.kept, one.kept)
    np.testing.assert_allclose(eight.loglik, one.loglik, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(eight.exact, one.exact)
