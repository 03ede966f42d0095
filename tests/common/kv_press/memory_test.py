"""Tests for common.kv_press.memory: budgets, top-k selection, compaction, positions, edge cases and
sharding, over every press.

References are independent: sets of positions computed in numpy from the scores, the full
(unpressed) cache with the dropped entries evicted through `KVCache.evict` for attention, and a
one-device run for the sharded step.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common.kv_press import frames
from common.kv_press import memory
from common.kv_press import presses
from common.models import decoder
from common.sampling import kv_cache
from tests.common.kv_press import streams

L = streams.CFG.num_layers


@dataclasses.dataclass(frozen=True)
class TableScore(presses.Press):
  """A test press: the score of an entry is table[position] (a function of the entry, not slot)."""

  table: tuple[float, ...] = ()

  def score(self, layer, info, queries, ctx):
    return jnp.asarray(self.table, jnp.float32)[info.position]


def _count(mem, layer):
  return np.asarray(mem.cache.read(layer).valid.sum(-1))


def test_budget_validation():
  with pytest.raises(memory.BudgetError, match='exactly one'):
    memory.Budget()
  with pytest.raises(memory.BudgetError, match='exactly one'):
    memory.Budget(tokens=8, compression_ratio=0.5)
  with pytest.raises(memory.BudgetError, match='positive int'):
    memory.Budget(tokens=0)
  with pytest.raises(memory.BudgetError, match=r'\[0, 1\)'):
    memory.Budget(compression_ratio=1.0)
  with pytest.raises(memory.BudgetError, match='leaves none per layer'):
    memory.Budget(tokens=3).layer_capacity(4)
  assert memory.Budget(tokens=13).layer_capacity(4) == 3
  assert memory.Budget(layer_tokens=5).layer_capacity(4) == 5
  assert memory.Budget(compression_ratio=0.5).layer_capacity(4) is None
  with pytest.raises(memory.BudgetError, match='pinned'):
    memory.Budget(tokens=8).check_pinned(2, 5)
  memory.Budget(tokens=8).check_pinned(2, 4)
  assert memory.capacity_needed(memory.Budget(layer_tokens=6), 2, 10) == 16


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
@pytest.mark.parametrize('press', streams.ALL_PRESSES, ids=streams.press_id)
def test_every_layer_stays_within_budget_for_random_streams_and_budgets(press, per_head):
  """After every press step, each layer (and head) holds <= its budget, whatever the stream."""
  rng = np.random.default_rng(zlib.crc32(streams.press_id(press).encode()))
  b, tpf, fpc = 2, 3, 4  # tokens per frame, frames per clip
  clip = tpf * fpc
  for trial in range(3):
    if trial == 2:
      budget = memory.Budget(compression_ratio=float(rng.uniform(0.1, 0.9)), per_head=per_head)
    else:
      budget = memory.Budget(layer_tokens=int(rng.integers(1, 20)), per_head=per_head)
    cap = budget.layer_capacity(L)
    slots = (cap or 64) + clip + 2
    mem = streams.empty(b, slots)
    held = np.zeros((L, b), int)
    for c in range(int(rng.integers(1, 6))):
      valid = rng.random((b, clip)) < 0.8  # ragged clips, some shorter than a clip
      mem = streams.append(mem, rng, streams.clip_frames(b, c * fpc, fpc, tpf), valid=valid)
      mem = streams.append(mem, rng, np.full((b, 2), frames.TEXT), transient=True)
      before = held + valid.sum(1)
      mem, stats = memory.apply_press(mem, press, budget, streams.queries(rng, mem, 2), key=c)
      np.testing.assert_array_equal(stats.held, before)
      for layer in range(L):
        n = _count(mem, layer)
        limit = cap if cap is not None else np.floor(before[layer] * (1 - budget.compression_ratio))
        assert np.all(n <= limit), (c, layer, n, limit)
        np.testing.assert_array_equal(n, stats.kept[layer])
        kinds = np.asarray(mem.info[layer].kind)
        valid_h = np.broadcast_to(np.asarray(mem.cache.read(layer).valid)[:, None], kinds.shape)
        assert not np.any(valid_h & (kinds == memory.TRANSIENT))
        if not isinstance(press, presses.FramePool):  # pooling removes entries by itself
          np.testing.assert_array_equal(n, np.minimum(limit, before[layer]))
      held = np.asarray(stats.kept)
      assert int(mem.cache.length) == held.max()


@pytest.mark.parametrize('press', streams.ALL_PRESSES, ids=streams.press_id)
def test_a_budget_larger_than_the_stream_changes_nothing(press):
  """Nothing evicted, nothing merged: the pressed cache is the input, bit for bit."""
  rng = np.random.default_rng(1)
  mem = streams.empty(2, 24)
  mem = streams.append(mem, rng, streams.clip_frames(2, 0, 4, 2), pinned=False)
  mem = streams.append(mem, rng, streams.clip_frames(2, 4, 4, 2))
  if isinstance(press, presses.FramePool):  # pooling is a fixed rate: a no-op at >= frame size
    press = dataclasses.replace(press, tokens_per_frame=2)
  out, stats = memory.apply_press(
    mem, press, memory.Budget(layer_tokens=16), streams.queries(rng, mem, 2), key=0
  )
  np.testing.assert_array_equal(stats.merged, 0)
  for a, b in zip(mem.cache.layers, out.cache.layers, strict=True):
    for name in ('k', 'v', 'positions', 'valid'):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  assert int(out.cache.length) == int(mem.cache.length) == 16


def test_logits_after_a_no_op_press_equal_full_kv_exactly():
  model = streams.build_model()
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, 100, (2, 14)), jnp.int32)
  cache = kv_cache.KVCache.init(streams.CFG, 2, 20)
  _, cache = streams.run_cached(model, tokens[:, :12], cache)
  mem = memory.Memory.init(kv_cache.KVCache.init(streams.CFG, 2, 20)).record(
    cache, jnp.asarray(np.repeat(np.arange(4), 3)[None].repeat(2, 0))
  )
  ref, _ = streams.run_cached(model, tokens[:, 12:], cache)
  for press in (presses.StreamMem(max_frames=4), presses.H2O(), presses.Uniform()):
    out, _ = memory.apply_press(
      mem, press, memory.Budget(tokens=40), streams.queries(rng, mem, 2), key=0
    )
    got, _ = streams.run_cached(model, tokens[:, 12:], out.cache)
    np.testing.assert_array_equal(got, ref)


def _scored_memory(rng, b=2, n=12, s=20, pinned=2):
  mem = streams.empty(b, s)
  if pinned:
    mem = streams.append(mem, rng, np.full((b, pinned), frames.TEXT), pinned=True)
  return streams.append(mem, rng, streams.clip_frames(b, 0, 4, (n - pinned) // 4))


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
def test_top_k_keeps_exactly_the_highest_scores_whatever_the_storage_order(per_head):
  rng = np.random.default_rng(3)
  mem = _scored_memory(rng)
  table = tuple(rng.permutation(64).astype(float).tolist())
  press = TableScore(table=table)
  budget = memory.Budget(layer_tokens=6, per_head=per_head)
  out, _ = memory.apply_press(mem, press, budget)
  for layer in range(L):
    for row in range(2):
      held = sorted(streams.held_positions(mem, layer, row))
      pinned = held[:2]
      rest = sorted(held[2:], key=lambda p: -table[p])[:4]
      assert streams.held_positions(out, layer, row) == set(pinned + rest)
      # Entries keep their own keys, values and positions, written in position order.
      before, after = streams.entries(mem, layer, row), streams.entries(out, layer, row)
      for key, (k, v) in after.items():
        np.testing.assert_array_equal(k, before[key][0])
        np.testing.assert_array_equal(v, before[key][1])
      pos = np.asarray(out.cache.read(layer).positions[row])[:6]
      assert list(pos) == sorted(pinned + rest)
  # The same entries stored in another order give the same memory, bit for bit.
  for seed in range(3):
    perm = np.stack([np.random.default_rng(seed + r).permutation(20) for r in range(2)])
    again, _ = memory.apply_press(streams.permute(mem, perm), press, budget)
    jax.tree.map(np.testing.assert_array_equal, again.cache.layers, out.cache.layers)
    jax.tree.map(np.testing.assert_array_equal, again.info, out.info)


def test_rank_breaks_ties_by_position_then_kind():
  scores = jnp.asarray([[1.0, 3.0, 3.0, 2.0, 3.0]])
  held = jnp.asarray([[True, True, True, True, False]])
  pinned = jnp.asarray([[True, False, False, False, False]])
  position = jnp.asarray([[9, 5, 4, 1, 0]])
  kind = jnp.asarray([[0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(
    memory.rank(scores, held, pinned, position, kind), [[0, 2, 1, 3, 4]]
  )
  kept = memory.top_k(scores, held, pinned, position, kind, jnp.asarray([2]))
  np.testing.assert_array_equal(kept, [[True, False, True, False, False]])


@pytest.mark.parametrize(
  'press', [presses.KeyNorm(), presses.StreamMem(merging=False)], ids=streams.press_id
)
def test_attention_over_the_pressed_cache_equals_the_full_cache_with_the_same_entries(press):
  """Kept entries keep their RoPE positions: the next tokens' logits over the compacted memory
  equal those over the full cache in which exactly the dropped entries are evicted."""
  model = streams.build_model()
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, 100, (2, 15)), jnp.int32)
  cache = kv_cache.KVCache.init(streams.CFG, 2, 24)
  _, cache = streams.run_cached(model, tokens[:, :12], cache)
  mem = memory.Memory.init(kv_cache.KVCache.init(streams.CFG, 2, 24)).record(
    cache, jnp.asarray(np.repeat(np.arange(4), 3)[None].repeat(2, 0))
  )
  out, _ = memory.apply_press(mem, press, memory.Budget(tokens=12), streams.queries(rng, mem, 2))
  masks = np.zeros((L, 2, 24), bool)
  for layer in range(L):
    for row in range(2):
      kept = streams.held_positions(out, layer, row)
      assert len(kept) == 6
      pos = np.asarray(cache.read(layer).positions[row])
      masks[layer, row, :12] = ~np.isin(pos[:12], sorted(kept))
  got, _ = streams.run_cached(model, tokens[:, 12:], out.cache)
  ref, _ = streams.run_cached(model, tokens[:, 12:], cache.evict(jnp.asarray(masks)))
  np.testing.assert_allclose(got, ref, atol=2e-6, rtol=2e-6)
  assert not np.allclose(got, streams.run_cached(model, tokens[:, 12:], cache)[0], atol=1e-4)


def test_per_head_selection_matches_per_head_masked_attention():
  """With per_head each kv head keeps its own entries; attention of new queries over the
  compacted memory equals attention over the full layer masked per head."""
  rng = np.random.default_rng(5)
  mem = _scored_memory(rng, pinned=0)
  out, _ = memory.apply_press(mem, presses.KeyNorm(), memory.Budget(layer_tokens=5, per_head=True))
  q = jnp.asarray(rng.normal(size=(2, 3, 4, 8)), jnp.float32)
  qpos = jnp.full((2, 3), 12, jnp.int32)
  for layer in range(L):
    full, small = mem.cache.read(layer), out.cache.read(layer)
    kept = np.zeros((2, 2, 20), bool)
    for row in range(2):
      for head in range(2):
        keep = streams.held_positions(out, layer, row, head)
        pos = np.asarray(full.positions[row])
        kept[row, head] = np.isin(pos, sorted(keep)) & np.asarray(full.valid[row])
      assert (
        len(streams.held_positions(out, layer, row, 0) ^ streams.held_positions(out, layer, row, 1))
        > 0
      )  # the heads disagree, so this tests something
    mask = jnp.asarray(kept)[:, :, None, :]  # [B, K, T=1, S]
    ref = decoder.head_major_attention(q, full.kt, full.v, mask, scale=8**-0.5)
    cmask = decoder.cache_attention_mask(qpos, small.positions, small.valid)
    got = decoder.head_major_attention(q, small.kt, small.v, cmask, scale=8**-0.5)
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=2e-6)
    # Per-head positions: every head's kept entries carry their own original positions.
    info = out.info[layer]
    for row in range(2):
      for head in range(2):
        n = int(small.valid[row].sum())
        np.testing.assert_array_equal(
          np.sort(np.asarray(info.position[row, head, :n])),
          sorted(streams.held_positions(out, layer, row, head)),
        )


def test_streams_shorter_than_a_clip_and_empty_clips():
  rng = np.random.default_rng(6)
  mem = streams.empty(2, 20)
  valid = np.zeros((2, 8), bool)
  valid[0, :3] = True  # row 0: 3 real tokens; row 1: none (an empty clip)
  mem = streams.append(mem, rng, streams.clip_frames(2, 0, 4, 2), valid=valid)
  for press in streams.ALL_PRESSES:
    out, stats = memory.apply_press(
      mem, press, memory.Budget(layer_tokens=6), streams.queries(rng, mem, 1), key=0
    )
    np.testing.assert_array_equal(stats.held, [[3, 0]] * L)
    np.testing.assert_array_equal(stats.kept, stats.held)
    assert streams.held_positions(out, 0, 0) == {0, 1, 2}
    assert streams.held_positions(out, 0, 1) == set()
    for info in out.info:
      assert np.all(np.isfinite(info.accumulated))
    assert np.all(np.isfinite(out.cache.read(0).k))


def test_empty_frames_merge_into_nothing():
  """Frame ids with no tokens (filtered or never sent) add no prototype and no NaN."""
  rng = np.random.default_rng(7)
  mem = streams.empty(1, 24)
  ids = np.asarray([[0, 0, 0, 2, 2, 2, 5, 5]])  # frames 1, 3, 4 are empty
  mem = streams.append(mem, rng, ids)
  out, stats = memory.apply_press(
    mem,
    presses.StreamMem(max_frames=8),
    memory.Budget(layer_tokens=5),
    streams.queries(rng, mem, 2),
  )
  np.testing.assert_array_equal(stats.merged, [[3]] * L)
  for layer in range(L):
    info = out.info[layer]
    valid = np.asarray(out.cache.read(layer).valid[0])
    protos = np.asarray(info.kind[0, 0])[valid] == memory.PROTOTYPE
    assert sorted(np.asarray(info.frame[0, 0])[valid][protos].tolist()) == [0, 2, 5]
    assert np.all(np.isfinite(out.cache.read(layer).k))


def test_a_budget_smaller_than_the_pinned_prefix():
  rng = np.random.default_rng(8)
  mem = streams.empty(2, 20)
  mem = streams.append(mem, rng, np.full((2, 6), frames.TEXT), pinned=True)
  mem = streams.append(mem, rng, streams.clip_frames(2, 0, 2, 2))
  budget = memory.Budget(layer_tokens=4)
  with pytest.raises(memory.BudgetError, match='pinned'):
    memory.apply_press(mem, presses.FIFO(), budget)
  # Under jit: reported, and the earliest pinned entries fill the budget.
  out, stats = jax.jit(lambda m: memory.apply_press(m, presses.FIFO(), budget))(mem)
  assert np.all(stats.pinned_overflow) and np.all(stats.pinned == 6)
  assert streams.held_positions(out, 1, 0) == {0, 1, 2, 3}
  with pytest.raises(memory.BudgetError, match='layer 0, row 0 holds 6 pinned'):
    stats.check()


def test_missing_queries_or_key_is_an_error():
  rng = np.random.default_rng(9)
  mem = _scored_memory(rng)
  with pytest.raises(ValueError, match='pass queries'):
    memory.apply_press(mem, presses.StreamMem(), memory.Budget(layer_tokens=4))
  with pytest.raises(ValueError, match='pass key'):
    memory.apply_press(mem, presses.Random(), memory.Budget(layer_tokens=4))
  with pytest.raises(ValueError, match='record: give'):
    mem.record(mem.cache)


def test_records_label_appended_entries():
  rng = np.random.default_rng(10)
  mem = streams.append(streams.empty(2, 12), rng, np.full((2, 3), frames.TEXT), pinned=True)
  mem = streams.append(mem, rng, [[4, 4, 5], [4, 5, 5]])
  mem = streams.append(mem, rng, np.full((2, 2), frames.TEXT), transient=True)
  info = mem.info[1]
  np.testing.assert_array_equal(info.position[:, 1, :8], np.broadcast_to(np.arange(8), (2, 8)))
  np.testing.assert_array_equal(info.frame[1, 0, :8], [-1, -1, -1, 4, 5, 5, -1, -1])
  np.testing.assert_array_equal(info.pinned[0, 0, :6], [True] * 3 + [False] * 3)
  np.testing.assert_array_equal(info.kind[0, 0, :9], [0] * 6 + [2] * 2 + [0])
  assert np.all(info.fresh[:, :, :8]) and not np.any(info.fresh[:, :, 8:])
  out, _ = memory.apply_press(mem, presses.FIFO(), memory.Budget(layer_tokens=5))
  assert not np.any(out.info[1].fresh)
  assert streams.held_positions(out, 1, 0) == {0, 1, 2, 4, 5}
  # Wrapping a prefilled cache: its entries become (optionally pinned) text.
  again = memory.Memory.init(mem.cache, pinned=True)
  assert np.all(again.info[0].pinned[:, :, :8]) and not np.any(again.info[0].pinned[:, :, 8:])


@pytest.mark.parametrize(
  'press',
  [presses.StreamMem(max_frames=4), presses.H2O(), presses.FramePool(max_frames=4)],
  ids=streams.press_id,
)
def test_sharded_press_step_matches_one_device(press):
  """A press step on 8 fake devices (batch sharded over 'data') equals the one-device step: the
  same entries kept, values equal up to float rounding."""
  rng = np.random.default_rng(11)
  b = 8
  mem = streams.empty(b, 24)
  mem = streams.append(mem, rng, np.full((b, 2), frames.TEXT), pinned=True)
  mem = streams.append(mem, rng, streams.clip_frames(b, 0, 4, 3))
  mem = streams.append(mem, rng, np.full((b, 2), frames.TEXT), transient=True)
  qs = streams.queries(rng, mem, 2)
  budget = memory.Budget(tokens=16)

  def run(mesh):
    def put(x):
      x = np.asarray(x)
      spec = sharding.batch_sharding(mesh, x.ndim) if x.ndim else None
      return jax.device_put(x, spec) if spec is not None else x

    with jax.set_mesh(mesh):
      step = jax.jit(lambda m, q: memory.apply_press(m, press, budget, q))
      return step(jax.tree.map(put, mem), jax.tree.map(put, qs))

  one = run(sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  eight_mesh = sharding.make_mesh([('data', 8)])
  eight = run(eight_mesh)
  assert eight[0].cache.read(0).kt.sharding.spec[0] is not None  # really batch-sharded
  assert len(eight[0].cache.read(0).kt.sharding.device_set) == 8

  def same(a, b):  # selections exactly; merged/pooled values to float rounding (einsum order)
    if np.issubdtype(np.asarray(a).dtype, np.floating):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(a, b)

  jax.tree.map(same, jax.device_get(eight), jax.device_get(one))
