"""Shared helpers for the PerSRec tests: jit-built tiny models and random histories."""

from __future__ import annotations

import functools

from flax import nnx
import numpy as np

from projects.persrec import models


@functools.lru_cache(maxsize=32)
def model(cfg: models.ModelConfig, seed: int = 0) -> models.SeqRec:
  """A SeqRec built under jit without a mesh, with item embeddings of order 1 rather than the 0.02
  init, so outputs (and the differences the tests look for) are far from zero and tolerances are
  meaningful."""
  return models.build(cfg, seed, item_scale=25.0)


def histories(cfg: models.ModelConfig, batch: int, seed: int = 0, lengths=None):
  """(items [B, P+R], timestamps [B, P+R]) left-padded by the window rule; lengths per user."""
  from projects.persrec import input_pipeline  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  lengths = lengths if lengths is not None else [cfg.window] * batch
  items, ts = [], []
  for n in lengths:
    seq = rng.integers(1, cfg.num_items + 1, n)
    t = np.cumsum(rng.integers(0, 5000, n))
    ex = input_pipeline.eval_example(seq, t, 1, cfg.old_len, cfg.recent_len)
    items.append(ex['items'])
    ts.append(ex['timestamps'])
  return np.stack(items), np.stack(ts)


@nnx.jit(static_argnames=('hide',))
def forward(m, items, ts, user=None, hide=None):
  return m(items, ts, user, hide_tokens_from_segment=hide)


@nnx.jit
def forward_patched(m, items, ts, where, cache):
  return m(items, ts, patch=(where, cache))


@nnx.jit(static_argnames=('segmentwise',))
def cached(m, items, ts, user=None, segmentwise=False):
  old, recent = models.split_window(items, m.cfg)
  old_ts, recent_ts = models.split_window(ts, m.cfg)
  cache = m.compress(old, old_ts, user, segmentwise=segmentwise)
  return m.serve(cache, recent, recent_ts), cache


@nnx.jit
def kv(m, items, ts):
  return m.kv(items, ts)
