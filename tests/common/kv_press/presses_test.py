"""Tests for common.kv_press.presses: each press keeps exactly the set its definition names.

References are numpy re-derivations from the papers' definitions (float64 attention, explicit sets
of positions), never the library's own helpers; streams are synthetic entries written into the
cache as the decoder writes them (tests/common/kv_press/streams.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.kv_press import frames
from common.kv_press import memory
from common.kv_press import presses
from common.sampling import kv_cache
from tests.common.kv_press import streams

L, B = streams.CFG.num_layers, 2
SCALE = 8**-0.5


def _held(mem, layer, row):
  """Positions of the held (valid, not transient) entries and which of them are pinned."""
  info = mem.info[layer]
  ok = np.asarray(mem.cache.read(layer).valid[row]) & (
    np.asarray(info.kind[row, 0]) != memory.TRANSIENT
  )
  pos = np.asarray(info.position[row, 0])[ok]
  return pos, np.asarray(info.pinned[row, 0])[ok]


def _stream(rng, clips=4, clip=6, slots=24, pinned=0, transient=0):
  """Yields the memory after each clip is appended (with `transient` proxy tokens after it)."""
  mem = streams.empty(B, slots)
  if pinned:
    mem = streams.append(mem, rng, np.full((B, pinned), frames.TEXT), pinned=True)
  for c in range(clips):
    mem = streams.append(mem, rng, streams.clip_frames(B, 2 * c, 2, clip // 2))
    if transient:
      mem = streams.append(mem, rng, np.full((B, transient), frames.TEXT), transient=True)
    mem = yield mem


def _run(press, rng, budget, *, clips=4, pinned=0, transient=0, nq=2, expected=None):
  """Streams clips under `press`; after each step compares the kept positions with
  expected(mem_before, layer, row, queries) -> set."""
  gen = _stream(rng, clips=clips, pinned=pinned, transient=transient)
  mem = next(gen)
  try:
    while True:
      qs = streams.queries(rng, mem, nq)
      out, _ = memory.apply_press(mem, press, budget, qs, key=0)
      for layer in range(L):
        for row in range(B):
          want = expected(mem, layer, row, qs)
          assert streams.held_positions(out, layer, row) == want, (layer, row)
      mem = gen.send(out)
  except StopIteration:
    pass


def test_fifo_keeps_pinned_and_the_most_recent():
  def expected(mem, layer, row, qs):
    pos, pinned = _held(mem, layer, row)
    rest = sorted(pos[~pinned])[::-1][: 7 - pinned.sum()]
    return set(pos[pinned].tolist()) | set(int(p) for p in rest)

  _run(
    presses.FIFO(),
    np.random.default_rng(0),
    memory.Budget(layer_tokens=7),
    pinned=2,
    transient=2,
    expected=expected,
  )


@pytest.mark.parametrize('pinned', [0, 3])
def test_streaming_llm_keeps_the_sinks_and_the_recent_window(pinned):
  sinks, cap = 2, 8

  def expected(mem, layer, row, qs):
    pos, pin = _held(mem, layer, row)
    order = sorted(pos.tolist())
    keep = set(pos[pin].tolist()) | set(order[:sinks])
    for p in order[::-1]:
      if len(keep) >= min(cap, len(order)):
        break
      keep.add(p)
    return keep

  _run(
    presses.StreamingLLM(sinks=sinks),
    np.random.default_rng(1),
    memory.Budget(layer_tokens=cap),
    clips=5,
    pinned=pinned,
    transient=1,
    expected=expected,
  )


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
def test_h2o_keeps_the_recent_window_and_the_heaviest_accumulated_attention(per_head):
  """Reference: accumulate, per entry and kv head, the float64 attention every step's queries
  give it (summed over rows, averaged over the head's query heads); keep the floor(half) most
  recent of the free budget and the top accumulated scores (head-averaged when shared)."""
  cap = 6
  acc = {}  # (layer, row, head, position) -> accumulated attention
  rng = np.random.default_rng(2)
  gen = _stream(rng, clips=4, transient=1)
  mem = next(gen)
  press = presses.H2O(recent_fraction=0.5)
  budget = memory.Budget(layer_tokens=cap, per_head=per_head)
  try:
    while True:
      qs = streams.queries(rng, mem, 3)
      for layer in range(L):
        e, info = mem.cache.read(layer), mem.info[layer]
        q = qs[layer]
        valid = np.broadcast_to(np.asarray(e.valid)[:, None], info.position.shape)
        probs = streams.np_attention(e.k, info.position, valid, q.q, q.positions, SCALE)
        got = probs.sum(3).mean(2)  # [B, K, S]
        for row, head, s in zip(*np.nonzero(valid), strict=True):
          k = (layer, row, head, int(info.position[row, head, s]))
          acc[k] = acc.get(k, 0.0) + got[row, head, s]
      out, _ = memory.apply_press(mem, press, budget, qs)
      for layer in range(L):
        for row in range(B):
          for head in range(2) if per_head else (0,):
            info = mem.info[layer]
            ok = np.asarray(mem.cache.read(layer).valid[row]) & (
              np.asarray(info.kind[row, head]) != memory.TRANSIENT
            )
            pos = sorted(np.asarray(info.position[row, head])[ok].tolist())
            n = min(cap, len(pos))
            recent = pos[::-1][: int(np.floor(0.5 * n))] if len(pos) > cap else pos

            def score(p, layer=layer, row=row, head=head):
              heads = (head,) if per_head else (0, 1)
              return np.mean([acc[(layer, row, h, p)] for h in heads])

            rest = sorted((p for p in pos if p not in recent), key=lambda p: (-score(p), p))
            want = set(recent) | set(rest[: n - len(recent)])
            assert streams.held_positions(out, layer, row, head) == want
      mem = gen.send(out)
  except StopIteration:
    pass


def test_snapkv_keeps_the_window_and_the_top_pooled_window_attention():
  rng = np.random.default_rng(3)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 4, 3))
  window = 3
  pos_q = jnp.broadcast_to(jnp.arange(12 - window, 12), (B, window))
  qs = [
    memory.Queries.create(
      jnp.asarray(rng.normal(size=(B, window, 4, 8)), jnp.float32), pos_q, cfg=streams.CFG
    )
    for _ in range(L)
  ]
  cap = 7
  out, _ = memory.apply_press(
    mem, presses.SnapKV(kernel_size=3), memory.Budget(layer_tokens=cap), qs
  )
  for layer in range(L):
    e, info = mem.cache.read(layer), mem.info[layer]
    valid = np.broadcast_to(np.asarray(e.valid)[:, None], info.position.shape)
    probs = streams.np_attention(e.k, info.position, valid, qs[layer].q, pos_q, SCALE)
    att = probs.mean(3).mean(2).mean(1)[:, :12]  # [B, 12]: rows, group, then kv heads
    for row in range(B):
      line = np.concatenate([[0.0], att[row, : 12 - window], [0.0]])
      pooled = np.convolve(line, np.ones(3) / 3, mode='valid')  # zero-padded kernel-3 mean
      top = sorted(range(12 - window), key=lambda p: (-pooled[p], p))[: cap - window]
      assert streams.held_positions(out, layer, row) == set(top) | {9, 10, 11}


def test_tova_keeps_the_last_token_and_its_top_attention():
  rng = np.random.default_rng(4)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 4, 3))
  pos_q = jnp.asarray([[8, 10, 11], [9, 11, 0]])
  valid_q = jnp.asarray([[True] * 3, [True, True, False]])
  qs = [
    memory.Queries.create(
      jnp.asarray(rng.normal(size=(B, 3, 4, 8)), jnp.float32), pos_q, valid=valid_q, cfg=streams.CFG
    )
    for _ in range(L)
  ]
  out, _ = memory.apply_press(mem, presses.TOVA(), memory.Budget(layer_tokens=5), qs)
  for layer in range(L):
    e, info = mem.cache.read(layer), mem.info[layer]
    valid = np.broadcast_to(np.asarray(e.valid)[:, None], info.position.shape)
    probs = streams.np_attention(e.k, info.position, valid, qs[layer].q, pos_q, SCALE)
    for row, last in ((0, 2), (1, 1)):  # the latest valid query row
      att = probs[row, :, :, last].mean((0, 1))[:12]
      me = int(pos_q[row, last])
      top = sorted((p for p in range(12) if p != me), key=lambda p: (-att[p], p))[:4]
      assert streams.held_positions(out, layer, row) == set(top) | {me}


@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
def test_key_norm_keeps_the_smallest_keys(per_head):
  rng = np.random.default_rng(5)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 4, 3))
  out, _ = memory.apply_press(
    mem, presses.KeyNorm(), memory.Budget(layer_tokens=5, per_head=per_head)
  )
  for layer in range(L):
    norms = np.linalg.norm(np.asarray(mem.cache.read(layer).k, np.float64)[:, :, :12], axis=-1)
    for row in range(B):
      for head in range(2):
        n = norms[row, head] if per_head else norms[row].mean(0)
        want = set(np.argsort(n, kind='stable')[:5].tolist())
        assert streams.held_positions(out, layer, row, head if per_head else 0) == want


def test_uniform_keeps_the_first_entry_of_each_equal_time_bin():
  rng = np.random.default_rng(6)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 4, 3))
  out, _ = memory.apply_press(mem, presses.Uniform(), memory.Budget(layer_tokens=5))
  # 12 positions in 5 bins of width 12/5: bins start at ceil(j * 12 / 5) = 0, 3, 5, 8, 10.
  assert streams.held_positions(out, 0, 0) == {0, 3, 5, 8, 10}


def test_uniform_memory_stays_spread_over_a_long_stream_unlike_fifo():
  cap, clips, clip = 8, 12, 6
  gaps = {}
  for press in (presses.Uniform(), presses.FIFO()):
    rng = np.random.default_rng(7)
    gen = _stream(rng, clips=clips, clip=clip, slots=cap + clip)
    mem = next(gen)
    try:
      while True:
        mem = gen.send(memory.apply_press(mem, press, memory.Budget(layer_tokens=cap))[0])
    except StopIteration:
      pass
    kept = sorted(streams.held_positions(mem, 0, 0))
    gaps[type(press).__name__] = np.diff([0, *kept, clips * clip]).max()
  assert gaps['Uniform'] <= 2 * clips * clip / cap, gaps  # within 2 bins of even spacing
  assert gaps['FIFO'] > clips * clip / 2


def test_random_depends_on_the_key_but_not_on_storage():
  rng = np.random.default_rng(8)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 4, 3))
  budget = memory.Budget(layer_tokens=5)
  sets = [memory.apply_press(mem, presses.Random(), budget, key=k)[0] for k in range(4)]
  kept = [streams.held_positions(m, 0, 0) for m in sets]
  assert all(len(k) == 5 for k in kept) and len({tuple(sorted(k)) for k in kept}) > 1
  perm = np.stack([np.random.default_rng(r).permutation(16) for r in range(B)])
  again = memory.apply_press(streams.permute(mem, perm), presses.Random(), budget, key=0)[0]
  assert streams.held_positions(again, 0, 0) == kept[0]


def test_frame_pool_averages_each_frame_into_its_groups():
  rng = np.random.default_rng(9)
  mem = streams.append(streams.empty(B, 16), rng, streams.clip_frames(B, 0, 2, 5))
  out, stats = memory.apply_press(
    mem, presses.FramePool(tokens_per_frame=2), memory.Budget(layer_tokens=16)
  )
  np.testing.assert_array_equal(stats.kept, 4)
  groups = ([0, 1, 2], [3, 4], [5, 6, 7], [8, 9])  # 5 tokens in 2 groups: floor(i * 2 / 5)
  for layer in range(L):
    before, after = mem.cache.read(layer), out.cache.read(layer)
    for row in range(B):
      for slot, g in enumerate(groups):
        for name in ('k', 'v'):
          want = np.asarray(getattr(before, name))[row][:, g].mean(1)
          np.testing.assert_allclose(getattr(after, name)[row, :, slot], want, rtol=1e-5)
        assert int(after.positions[row, slot]) == max(g)
  # Over budget the oldest pooled entries go first.
  out, _ = memory.apply_press(
    mem, presses.FramePool(tokens_per_frame=2), memory.Budget(layer_tokens=3)
  )
  assert streams.held_positions(out, 1, 1) == {4, 7, 9}


def _aligned_memory(aligned, n=12, slots=16, direction=0):
  """Entries whose keys point along the query direction e_d at `aligned` positions (others are
  orthogonal): any attention over them ranks exactly those entries first."""
  rng = np.random.default_rng(10)
  cache = kv_cache.KVCache.init(streams.CFG, B, slots)
  for layer in range(L):
    k = rng.normal(0.0, 0.1, (B, n, 2, 8))
    k[..., direction] = 0.0
    k[:, aligned, :, direction] = 3.0
    v = rng.normal(size=(B, n, 2, 8))
    cache = cache.write(
      layer,
      0,
      jnp.asarray(k, jnp.float32),
      jnp.asarray(v, jnp.float32),
      jnp.broadcast_to(jnp.arange(n), (B, n)),
    )
  cache = cache.advance(n, jnp.full((B,), n))
  frame = jnp.asarray(streams.clip_frames(B, 0, 4, n // 4))
  return memory.Memory.init(kv_cache.KVCache.init(streams.CFG, B, slots)).record(cache, frame)


def _probe(mem, nq=2, direction=0):
  q = np.zeros((B, nq, 4, 8))
  q[..., direction] = 2.0
  pos = jnp.asarray(mem.cache.next_position)[:, None] + jnp.arange(nq)
  return [memory.Queries.create(jnp.asarray(q, jnp.float32), pos, cfg=streams.CFG)] * L


@pytest.mark.parametrize(
  'press', [presses.StreamMem(merging=False), presses.Oracle()], ids=streams.press_id
)
def test_attention_presses_keep_the_entries_aligned_with_the_query(press):
  aligned = [1, 5, 6, 10]
  mem = _aligned_memory(aligned)
  out, _ = memory.apply_press(mem, press, memory.Budget(layer_tokens=4), _probe(mem))
  for layer in range(L):
    for row in range(B):
      assert streams.held_positions(out, layer, row) == set(aligned)


@pytest.mark.parametrize(
  'make',
  [
    lambda span: presses.StreamMem(merging=False, span=span),
    lambda span: presses.Oracle(span=span),
  ],
  ids=['StreamMem', 'Oracle'],
)
def test_span_scoring_keeps_the_neighbours_of_the_salient_entry(make):
  """With span 3 the entry the query attends to keeps its two neighbours in position order (a
  fact's value next to its key); with span 1 only it is certain to stay."""
  mem = _aligned_memory([5])
  budget = memory.Budget(layer_tokens=3)
  out, _ = memory.apply_press(mem, make(1), budget, _probe(mem))
  spanned, _ = memory.apply_press(mem, make(3), budget, _probe(mem))
  for layer in range(L):
    for row in range(B):
      assert 5 in streams.held_positions(out, layer, row)
      assert streams.held_positions(spanned, layer, row) == {4, 5, 6}


def test_pool_by_position_is_a_moving_average_in_position_order_whatever_the_storage():
  rng = np.random.default_rng(15)
  s, kernel = 12, 5
  position = np.stack([rng.permutation(s) for _ in range(B)])[:, None]  # [B, 1, S], shuffled
  mask = rng.random((B, 1, s)) < 0.7
  scores = rng.random((B, 1, s)).astype(np.float32)
  got = np.asarray(
    presses.pool_by_position(jnp.asarray(scores), jnp.asarray(mask), jnp.asarray(position), kernel)
  )
  for row in range(B):
    slots = [i for i in np.argsort(position[row, 0]) if mask[row, 0, i]]  # masked, by position
    line = np.pad(scores[row, 0, slots].astype(np.float64), kernel // 2)
    want = np.convolve(line, np.ones(kernel) / kernel, mode='valid')
    np.testing.assert_allclose(got[row, 0, slots], want, rtol=1e-6)
  unpooled = presses.pool_by_position(jnp.asarray(scores), jnp.asarray(mask), position, 1)
  np.testing.assert_array_equal(unpooled, scores)
  with pytest.raises(ValueError, match='span must be odd'):
    presses.Oracle(span=4)


def test_streammem_scores_old_memory_and_the_new_clip_jointly():
  """Salient old entries survive a new clip (FIFO would drop them all)."""
  aligned = [1, 2]
  mem = _aligned_memory(aligned, slots=24)
  budget = memory.Budget(layer_tokens=4)
  press = presses.StreamMem(merging=False)
  mem, _ = memory.apply_press(mem, press, budget, _probe(mem))
  rng = np.random.default_rng(11)
  mem = streams.append(mem, rng, streams.clip_frames(B, 4, 2, 3), scale=0.1)
  out, _ = memory.apply_press(mem, press, budget, _probe(mem))
  assert {1, 2} <= streams.held_positions(out, 0, 0)
  fifo, _ = memory.apply_press(mem, presses.FIFO(), budget)
  assert not {1, 2} & streams.held_positions(fifo, 0, 0)


@pytest.mark.parametrize('rows', ['mean', 'max'])
@pytest.mark.parametrize('heads', ['mean', 'max'])
@pytest.mark.parametrize('softmax_over', ['candidates', 'all'])
def test_streammem_scores_reduce_proxy_rows_and_heads(rows, heads, softmax_over):
  rng = np.random.default_rng(12)
  mem = streams.empty(B, 20)
  mem = streams.append(mem, rng, np.full((B, 2), frames.TEXT), pinned=True)
  mem = streams.append(mem, rng, streams.clip_frames(B, 0, 4, 2))
  mem = streams.append(mem, rng, np.full((B, 3), frames.TEXT), transient=True)
  q = memory.Queries.create(
    jnp.asarray(rng.normal(size=(B, 3, 4, 8)), jnp.float32),
    jnp.broadcast_to(jnp.arange(10, 13), (B, 3)),
    cfg=streams.CFG,
  )
  press = presses.StreamMem(rows=rows, heads=heads, softmax_over=softmax_over)
  layer, info = mem.cache.read(0), mem.info[0]
  valid = np.broadcast_to(np.asarray(layer.valid)[:, None], info.position.shape)
  held = valid & (np.asarray(info.kind) != memory.TRANSIENT)
  ctx = memory.Context(layer=0, per_head=False, held=jnp.asarray(held), keep=None, key=None)
  got = press.reduce_heads(press.score(layer, info, q, ctx))[:, 0]
  domain = held & ~np.asarray(info.pinned) if softmax_over == 'candidates' else valid
  probs = streams.np_attention(layer.k, info.position, domain, q.q, q.positions, SCALE)
  red = {'mean': np.mean, 'max': np.max}
  want = red[heads](red[rows](probs, axis=3).reshape(B, 4, 20), axis=1)  # all query heads
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_streammem_prototypes_are_the_score_weighted_mean_of_each_frames_kept_tokens():
  rng = np.random.default_rng(13)
  mem = streams.append(streams.empty(B, 24), rng, streams.clip_frames(B, 0, 3, 4))
  qs = streams.queries(rng, mem, 2)
  press = presses.StreamMem(max_frames=4)
  out, stats = memory.apply_press(mem, press, memory.Budget(layer_tokens=7), qs)
  np.testing.assert_array_equal(stats.merged, 3)  # 7 = 4 tokens + 3 prototypes
  np.testing.assert_array_equal(stats.kept, 7)
  for layer in range(L):
    e, info = mem.cache.read(layer), mem.info[layer]
    held = np.broadcast_to(np.asarray(e.valid)[:, None], info.position.shape)
    domain = held & ~np.asarray(info.pinned)
    probs = streams.np_attention(
      e.k, info.position, domain, qs[layer].q, qs[layer].positions, SCALE
    )
    scores = probs.mean(3).reshape(B, 4, -1).mean(1)  # [B, S]
    after, ainfo = out.cache.read(layer), out.info[layer]
    for row in range(B):
      tokens = np.asarray(after.valid[row]) & (np.asarray(ainfo.kind[row, 0]) == memory.TOKEN)
      kept = set(np.asarray(ainfo.position[row, 0])[tokens].tolist())
      for f in range(3):
        toks = [p for p in range(4 * f, 4 * f + 4)]
        src = [p for p in toks if p in kept] or toks
        w = scores[row, src] / scores[row, src].sum()
        slot = np.nonzero(
          (np.asarray(ainfo.kind[row, 0]) == memory.PROTOTYPE)
          & (np.asarray(ainfo.frame[row, 0]) == f)
          & np.asarray(after.valid[row])
        )[0]
        assert slot.size == 1
        s = int(slot[0])
        assert int(after.positions[row, s]) == max(toks)
        for name in ('k', 'v'):
          x = np.asarray(getattr(e, name), np.float64)[row, :, src]  # [n, K, D]
          got = np.asarray(getattr(after, name))[row, :, s]
          np.testing.assert_allclose(got, np.einsum('n,nkd->kd', w, x), atol=1e-5)
          assert np.all(got >= x.min(0) - 1e-6) and np.all(got <= x.max(0) + 1e-6)


@pytest.mark.parametrize('press', streams.ALL_PRESSES, ids=streams.press_id)
def test_every_press_is_invariant_to_storage_order(press):
  rng = np.random.default_rng(14)
  mem = streams.empty(B, 20)
  mem = streams.append(mem, rng, np.full((B, 2), frames.TEXT), pinned=True)
  mem = streams.append(mem, rng, streams.clip_frames(B, 0, 4, 3))
  mem = streams.append(mem, rng, np.full((B, 2), frames.TEXT), transient=True)
  qs = streams.queries(rng, mem, 2)
  budget = memory.Budget(layer_tokens=7)
  ref, _ = memory.apply_press(mem, press, budget, qs, key=3)
  perm = np.stack([np.random.default_rng(r).permutation(20) for r in range(B)])
  got, _ = memory.apply_press(streams.permute(mem, perm), press, budget, qs, key=3)
  for a, b in zip(got.cache.layers, ref.cache.layers, strict=True):
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.k, b.k, atol=1e-6)
    np.testing.assert_allclose(a.v, b.v, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got.info, ref.info)
