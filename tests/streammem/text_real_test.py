"""StreamMem's memory on real SmolLM2-135M-Instruct weights (the text setting (C) of the README).

Run after `python -m common.assets fetch smollm2`:
`python -m pytest -n 0 -m real_model tests/streammem/text_real_test.py -q` (~3-5 min on 2 busy
cores, mostly compiling 30 layers per cache shape).

These pin down that a compressed cache is used exactly as the cache it is a subset of, on a real
RoPE model with a real chat prefix: with a budget above the stream nothing changes (bitwise), and
a pressed memory answers exactly like the full cache with the same entries masked out per layer
(same RoPE positions, same validity, same next position for the question). Setting (C)'s losses
are therefore what the presses keep, not how the memory is read (README, "Text (C)").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assets
from common import sharding
from common.models import loader
from projects.streammem import input_pipeline
from projects.streammem import models

pytestmark = pytest.mark.real_model

LENGTH, CLIP = 96, 48


@functools.cache
def _setup():
  if not assets.is_fetched('smollm2'):
    pytest.skip('smollm2 is not fetched: python -m common.assets fetch smollm2')
  with sharding.unsharded():
    model, _, tok = loader.load_pretrained('smollm2')
    streamer = models.Streamer(model)
  e = input_pipeline.TextEpisodes(tok).episodes(0, range(1), stream_len=LENGTH, facts_per_depth=1)
  return streamer, e


def _slots(e, budget: int, clip: int) -> int:
  extra = max(e.proxy.size, e.qa.shape[2])
  return max(budget, e.prefix.shape[1]) + max(clip, LENGTH) + extra


def test_a_budget_above_the_stream_equals_full_kv_bitwise_on_smollm2():
  streamer, e = _setup()
  slots = _slots(e, LENGTH + e.prefix.shape[1], CLIP) + CLIP
  key = jax.random.key(0)
  full = models.run_stream(
    streamer, e, models.method('full'), 0, clip_len=CLIP, frame_tokens=16, key=key, slots=slots
  )
  for name in ('fifo', 'streammem_nomerge'):
    got = models.run_stream(
      streamer,
      e,
      models.method(name, frames_per_clip=CLIP // 16),
      LENGTH + e.prefix.shape[1],
      clip_len=CLIP,
      frame_tokens=16,
      key=key,
      slots=slots,
    )
    np.testing.assert_array_equal(got.loglik, full.loglik)
    np.testing.assert_array_equal(got.exact, full.exact)


def test_a_pressed_memory_answers_like_the_full_cache_with_the_same_entries_masked():
  """One press over the whole stream (one clip), so the kept entries are exactly the full cache's:
  the memory's answers equal the full cache's with every other stream entry made invalid, per
  layer (different entries per layer), up to float32 summation order."""
  streamer, e = _setup()
  budget = 48  # 35 pinned prefix tokens + 13 of the 96 stream tokens per layer
  slots = _slots(e, budget, LENGTH)
  key = jax.random.key(0)
  snap = {}
  full = models.run_stream(
    streamer,
    e,
    models.method('full'),
    0,
    clip_len=LENGTH,
    frame_tokens=16,
    key=key,
    slots=slots,
    on_clip=lambda c, mem: snap.__setitem__('full', jax.tree.map(jnp.copy, mem)),
  )
  pressed = models.run_stream(
    streamer,
    e,
    models.method('streammem_span', frames_per_clip=LENGTH // 16, span=5),
    budget,
    clip_len=LENGTH,
    frame_tokens=16,
    key=key,
    slots=slots,
    on_clip=lambda c, mem: snap.__setitem__('held', models.memory_contents(mem)),
  )
  held = snap['held']
  prefix = e.prefix.shape[1]
  mem = snap['full']
  masks = []
  for layer in range(mem.cache.num_layers):
    kept = held['position'][layer, 0][held['held'][layer, 0]]
    assert len(kept) == budget - prefix
    positions = np.asarray(mem.cache.layers[layer].positions[0])
    masks.append(jnp.asarray(~((positions < prefix) | np.isin(positions, kept)))[None])
  # The layers keep different entries (else this would not test per-layer masking).
  assert len({tuple(held['position'][i, 0][held['held'][i, 0]]) for i in range(len(masks))}) > 1
  masked = dataclasses.replace(mem, cache=mem.cache.evict(masks))
  want = streamer.answer(masked, e.qa, e.qa_valid, e.qa_target, e.qa_mask)
  np.testing.assert_allclose(pressed.loglik, np.asarray(want['loglik']), atol=1e-3)
  np.testing.assert_array_equal(pressed.exact, np.asarray(want['exact']))
  assert np.abs(pressed.loglik - full.loglik).max() > 1e-2  # the press did evict what matters
