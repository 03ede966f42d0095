"""PerSRec model maths: the segment mask, cached == single pass, the token bottleneck, the layers
against independent numpy references, ids and short histories, and the cost model (spec §6(d))."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _mask(cfg, items):
  meta = models.slot_meta(cfg, jnp.asarray(items))
  return np.asarray(
    models.attention_mask(
      meta, meta, blocking=cfg.cacheable, tokens_see_items=cfg.token_mode != 'mean_pool'
    )
  )[:, 0]


# ---------------------------------------------------------------------------------------------------
# Mask.


def test_mask_blocks_recent_from_old_and_tokens_see_old():
  cfg = _cfg()
  items = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11]])  # two padding slots at the start of old
  mask = _mask(cfg, items)[0]
  lay = models.layout(cfg)
  old = np.flatnonzero((lay.kind == models.ITEM) & (lay.segment == 0))
  tok = lay.token_slots
  rec = np.flatnonzero(lay.segment == 1)
  assert old.tolist() == list(range(P)) and tok.tolist() == [P, P + 1]
  assert not mask[np.ix_(rec, old)].any()  # recent x old: all blocked
  assert mask[np.ix_(tok, old[2:])].all()  # tokens see every real old item
  assert not mask[:, :2].any() and not mask[:2, :].any()  # padding columns and rows
  assert mask[np.ix_(rec, tok)].all()  # recent rows see all tokens
  # Everything else is causal: recent x recent lower triangular, tokens causal among themselves.
  np.testing.assert_array_equal(mask[np.ix_(rec, rec)], np.tril(np.ones((R, R), bool)))
  np.testing.assert_array_equal(mask[np.ix_(tok, tok)], np.tril(np.ones((K, K), bool)))
  assert not np.triu(mask, 1).any()


def test_mask_several_segments_and_ablations():
  cfg = _cfg(num_segments=2, tokens_per_segment=1)
  lay = models.layout(cfg)
  mask = _mask(cfg, np.arange(1, P + R + 1)[None])[0]
  seg0 = np.flatnonzero((lay.kind == models.ITEM) & (lay.segment == 0))
  seg1 = np.flatnonzero((lay.kind == models.ITEM) & (lay.segment == 1))
  tok0, tok1 = lay.token_slots
  rec = np.flatnonzero(lay.segment == 2)
  assert not mask[np.ix_(seg1, seg0)].any() and not mask[np.ix_(rec, seg1)].any()
  assert mask[tok0, seg0].all() and not mask[tok1, seg0].any() and mask[tok1, seg1].all()
  assert mask[tok1, tok0] and mask[np.ix_(rec, [tok0, tok1])].all() and mask[seg1[0], tok0]
  # Without blocking the recent rows see old items directly; mean-pool tokens see no item.
  free = _mask(_cfg(blocking=False), np.arange(1, P + R + 1)[None])[0]
  assert free[P + K :, :P].all()
  pooled = _mask(_cfg(token_mode='mean_pool', tokens_per_segment=1), np.arange(1, 10)[None])[0]
  assert not pooled[P, :P].any() and pooled[P, P]


# ---------------------------------------------------------------------------------------------------
# Cached == single pass; the bottleneck.


@pytest.mark.parametrize(
  'backbone, segments, segmentwise',
  [('hstu', 1, False), ('hstu', 2, True), ('sasrec', 1, False), ('sasrec', 2, True)],
)
def test_cached_equals_single_pass(backbone, segments, segmentwise):
  cfg = _cfg(backbone=backbone, num_segments=segments, tokens_per_segment=1 if segments > 1 else K)
  m = util.model(cfg)
  # Full, shorter than P + R, shorter than R, and one item.
  items, ts = util.histories(cfg, 4, lengths=[P + R + 5, P + 1, 2, 1])
  single = np.asarray(util.forward(m, items, ts)[:, -1])
  served, cache = util.cached(m, items, ts, segmentwise=segmentwise)
  assert np.abs(single).max() > 0.1  # the comparison is not between near-zero vectors
  np.testing.assert_allclose(np.asarray(served), single, atol=1e-5, rtol=1e-5)
  # Position offset (spec §6(d).7): the cache holds the tokens at P.., serving starts at P + k.
  assert np.asarray(cache.meta.pos[0]).tolist() == models.layout(cfg).token_slots.tolist()
  assert cache.k.shape[:3] == (cfg.num_layers, 4, cfg.num_tokens)


def test_segmentwise_compression_equals_single_pass_compression():
  cfg = _cfg(num_segments=2, tokens_per_segment=1)
  m = util.model(cfg)
  items, ts = util.histories(cfg, 2)
  _, c1 = util.cached(m, items, ts, segmentwise=False)
  _, c2 = util.cached(m, items, ts, segmentwise=True)
  np.testing.assert_allclose(np.asarray(c1.k), np.asarray(c2.k), atol=1e-5)
  np.testing.assert_allclose(np.asarray(c1.v), np.asarray(c2.v), atol=1e-5)


@pytest.mark.parametrize('backbone', ['hstu', 'sasrec'])
def test_old_items_reach_recent_rows_only_through_the_tokens_kv(backbone):
  cfg = _cfg(backbone=backbone)
  m = util.model(cfg)
  items, ts = util.histories(cfg, 2, seed=1)
  other = items.copy()
  other[:, :P] = (items[:, :P] % cfg.num_items) + 1  # every old item changed
  rec = slice(P + K, None)
  out_a = np.asarray(util.forward(m, items, ts))
  out_b = np.asarray(util.forward(m, other, ts))
  # Old history matters (HSTU's effect is small at init: it passes SiLU(qk)/n twice)...
  assert np.abs(out_a[:, rec] - out_b[:, rec]).max() > 1e-5
  # ...only through the tokens' K/V: patch B's token K/V with A's and the recent rows are A's.
  where = jnp.asarray(
    np.broadcast_to(models.layout(cfg).kind == models.TOKEN, items.shape[:1] + (cfg.length,))
  )
  patched = np.asarray(util.forward_patched(m, other, ts, where, util.kv(m, items, ts)))
  np.testing.assert_allclose(patched[:, rec], out_a[:, rec], atol=1e-6)
  # With the tokens hidden from the recent rows, recent outputs do not depend on old items at all.
  hid_a = np.asarray(util.forward(m, items, ts, hide=1))
  hid_b = np.asarray(util.forward(m, other, ts, hide=1))
  np.testing.assert_allclose(hid_a[:, rec], hid_b[:, rec], atol=1e-6)


def test_tokens_are_shared_but_their_kv_is_personal():
  cfg = _cfg()
  m = util.model(cfg)
  items, ts = util.histories(cfg, 2, seed=2)
  x, _ = m.embed(jnp.asarray(items), jnp.asarray(ts))
  tok = models.layout(cfg).token_slots
  pos = np.asarray(m.position_embedding.embedding[...])[tok]
  np.testing.assert_allclose(np.asarray(x[0, tok]) - pos, np.asarray(m.tokens[...]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(x[0, tok]), np.asarray(x[1, tok]), atol=0)
  _, cache = util.cached(m, items, ts)
  assert np.abs(np.asarray(cache.k[-1, 0] - cache.k[-1, 1])).max() > 1e-3


def test_per_user_tokens_fall_back_to_shared_for_unknown_users():
  cfg = _cfg(token_mode='per_user', num_users=3)
  m = util.model(cfg)
  # Random offsets (a constant offset would vanish in the layers' LayerNorm).
  m.user_offsets[...] = jax.random.normal(jax.random.key(0), m.user_offsets[...].shape)
  items, ts = util.histories(cfg, 3, seed=3)
  items[:], ts[:] = items[0], ts[0]
  out = np.asarray(util.forward(m, items, ts, jnp.asarray([0, 99, 2]))[:, -1])
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # unknown user 99 == user 0 (shared)
  assert np.abs(out[2] - out[0]).max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# Layers against independent numpy references.


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _ln(x, scale=None, bias=None, eps=1e-6):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if scale is None else y * scale + bias


def _random_attn(b, t, nb, seed=0):
  rng = np.random.default_rng(seed)
  valid = rng.random((b, t)) > 0.2
  mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :] & valid[:, :, None]
  dist = np.maximum(np.arange(t)[:, None] - np.arange(t)[None, :], 0)
  bucket = rng.integers(0, nb + 1, (b, t, t))
  return mask, dist, bucket


def test_hstu_layer_matches_numpy_reference():
  cfg = _cfg(token_mode='none', old_len=0, recent_len=5, num_heads=2, head_dim=4, d_model=8)
  m = util.model(cfg)
  layer = m.layers[0]
  rng = np.random.default_rng(0)
  b, t, h, dh = 2, 5, 2, 4
  x = rng.normal(size=(b, t, 8)).astype(np.float32)
  mask, dist, bucket = _random_attn(b, t, cfg.num_time_buckets)
  attn = models.AttnInputs(
    mask=jnp.asarray(mask[:, None]), dist=jnp.asarray(dist), bucket=jnp.asarray(bucket)
  )
  got, _ = jax.jit(lambda x: layer(x, attn))(jnp.asarray(x))
  w = np.asarray(layer.uvqk.kernel[...], np.float64)
  wo, bo = np.asarray(layer.out.kernel[...], np.float64), np.asarray(layer.out.bias[...])
  pw, tw = np.asarray(layer.pos_bias[...], np.float64), np.asarray(layer.time_bias[...], np.float64)
  want = np.zeros((b, t, 8))
  for bi in range(b):
    proj = _silu(_ln(x[bi].astype(np.float64)) @ w)  # eq. 1
    u, v, q, k = (proj[:, i * h * dh : (i + 1) * h * dh].reshape(t, h, dh) for i in range(4))
    o = np.zeros((t, h, dh))
    for i in range(t):
      for j in range(t):
        if mask[bi, i, j]:
          for hh in range(h):  # eq. 2: SiLU(q.k + rab) / n, no softmax
            a = _silu(q[i, hh] @ k[j, hh] + pw[i - j] + tw[bucket[bi, i, j]]) / cfg.length
            o[i, hh] += a * v[j, hh]
    want[bi] = x[bi] + (u.reshape(t, -1) * _ln(o.reshape(t, -1))) @ wo + bo  # eq. 3
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_sasrec_layer_matches_numpy_reference():
  cfg = _cfg(backbone='sasrec', token_mode='none', old_len=0, recent_len=5, d_model=8, head_dim=4)
  m = util.model(cfg)
  layer = m.layers[0]
  rng = np.random.default_rng(1)
  b, t, h, dh = 2, 5, 2, 4
  x = rng.normal(size=(b, t, 8)).astype(np.float32)
  mask, _, _ = _random_attn(b, t, 1, seed=1)
  attn = models.AttnInputs(mask=jnp.asarray(mask[:, None]), dist=None, bucket=None)
  got, _ = jax.jit(lambda x: layer(x, attn))(jnp.asarray(x))

  def p(mod, name):
    return np.asarray(getattr(mod, name)[...], np.float64)

  want = np.zeros((b, t, 8))
  for bi in range(b):
    xb = x[bi].astype(np.float64)
    n = _ln(xb, p(layer.ln1, 'scale'), p(layer.ln1, 'bias'), eps=1e-6)
    q, k, v = (n @ p(lin, 'kernel') + p(lin, 'bias') for lin in (layer.q, layer.k, layer.v))
    q, k, v = (a.reshape(t, h, dh) for a in (q, k, v))
    o = np.zeros((t, h, dh))
    for i in range(t):
      allowed = mask[bi, i]
      if not allowed.any():
        continue  # padding row: zeros
      for hh in range(h):
        s = np.array([q[i, hh] @ k[j, hh] / np.sqrt(dh) for j in range(t)])
        s = np.where(allowed, s, -np.inf)
        pr = np.exp(s - s.max())
        pr /= pr.sum()
        o[i, hh] = pr @ v[:, hh]
    xb = xb + o.reshape(t, -1) @ p(layer.o, 'kernel') + p(layer.o, 'bias')
    n2 = _ln(xb, p(layer.ln2, 'scale'), p(layer.ln2, 'bias'), eps=1e-6)
    f1 = n2 @ p(layer.ff1, 'kernel') + p(layer.ff1, 'bias')
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(f1, jnp.float32)), np.float64)
    want[bi] = xb + gelu @ p(layer.ff2, 'kernel') + p(layer.ff2, 'bias')
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Ids, short and empty histories.


def test_unknown_ids_are_padding_not_out_of_range_gathers():
  cfg = _cfg()
  m = util.model(cfg)
  items, ts = util.histories(cfg, 1, seed=4)
  bad, zero = items.copy(), items.copy()
  bad[0, [1, P + 1]] = [cfg.num_items + 7, -3]
  zero[0, [1, P + 1]] = 0
  np.testing.assert_array_equal(
    np.asarray(models.sanitize_ids(bad, cfg.num_items)), np.asarray(zero)
  )
  out_bad = np.asarray(util.forward(m, bad, ts))
  np.testing.assert_allclose(out_bad, np.asarray(util.forward(m, zero, ts)), atol=0)
  assert np.isfinite(out_bad).all()


@pytest.mark.parametrize('backbone', ['hstu', 'sasrec'])
def test_empty_and_short_histories_are_finite(backbone):
  cfg = _cfg(backbone=backbone)
  m = util.model(cfg)
  items, ts = util.histories(cfg, 3, lengths=[0, 1, R])
  out = np.asarray(util.forward(m, items, ts))
  served, _ = util.cached(m, items, ts)
  assert np.isfinite(out).all() and np.isfinite(np.asarray(served)).all()
  np.testing.assert_allclose(np.asarray(served), out[:, -1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Cost model.


def test_serving_cost_is_flat_in_p_and_full_cost_is_quadratic():
  def cfg(p, mode):
    return _cfg(d_model=64, head_dim=32, old_len=p, recent_len=256, token_mode=mode, num_items=1)

  req = [models.serving_flops(cfg(p, 'learned'))['request'] for p in (256, 1024, 4096)]
  assert req[0] == req[1] == req[2]
  full = [models.serving_flops(cfg(p, 'none'))['request'] for p in (256, 1024, 4096)]
  assert full[2] / full[1] > 4.0  # attention dominates: quadratic in P + R
  assert full[1] / req[1] >= 4.0  # P=1024, R=256: at least 4x cheaper per request
  seg = [
    models.serving_flops(_cfg(old_len=p, num_segments=p // 64, tokens_per_segment=1, recent_len=8))[
      'compress_segmentwise'
    ]
    for p in (256, 512, 1024)
  ]
  assert seg[2] / seg[1] == pytest.approx(seg[1] / seg[0], rel=0.1)
  assert seg[2] / seg[1] < 2.2  # about linear in P for fixed-size segments
  # The mask agrees: the recent rows' allowed keys do not grow with P.
  counts = []
  for p in (4, 8, 16):
    c = _cfg(old_len=p, recent_len=3)
    counts.append(int(_mask(c, np.arange(1, p + 4)[None])[0, -3:].sum()))
  assert counts[0] == counts[1] == counts[2] == 3 * K + 6


def test_cost_measure_returns_the_requested_arms_with_their_flops():
  """benchmarks/persrec_serving.py's measurement (projects/persrec/cost.py) on a tiny model: one
  row per requested arm and P, FLOPs from serving_flops, one time per repetition. No speed check
  (speed lives in benchmarks/)."""
  from projects.persrec import cost  # noqa: PLC0415

  base = _cfg(num_layers=1, recent_len=4)
  rows = cost.measure(base, [8], reps=2, warmup=0, arms=('full', 'persrec'))
  assert [(r.old_len, r.arm) for r in rows] == [(8, 'full'), (8, 'persrec')]
  full, per = rows
  assert all(len(r.times) == 2 and min(r.times) > 0 for r in rows)
  assert (
    per.flops == models.serving_flops(dataclasses.replace(base, old_len=8))['request'] < full.flops
  )
  assert '| 8 | persrec |' in cost.table(rows)
  ratio_row = cost.ratio_table(rows).splitlines()[-1]
  assert ratio_row.startswith(f'| 8 | {full.flops / per.flops:.1f}x |')
  with pytest.raises(ValueError, match='unknown arms'):
    cost.measure(base, [8], arms=('bogus',))
