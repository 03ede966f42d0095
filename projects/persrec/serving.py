"""Serving: raw user histories in, top-k items out, with the PerSRec K/V cache.

Defined behaviour for the cases a live service meets (each has a test):
  * unknown item ids (not an int in 1..num_items: new items, corrupt ids) are dropped from the
    history before windowing and counted in `Request.unknown`; they never reach an embedding gather
    (the model itself also treats out-of-range ids as padding);
  * histories shorter than P + R are left-padded by the window rule (input_pipeline.window_indices);
  * an empty history (or one with only unknown ids) has no query item: the user gets the training
    popularity ranking and `Request.fallback` is True;
  * with `exclude_seen`, items already in the history are never recommended.

`Recommender.recommend` runs the single pass; for a cacheable PerSRec model `compress` builds each
user's cache from the old part of the history (refreshed offline) and `recommend_cached` serves the
recent part against it (PerSRec §3.3). With a fresh cache both give identical rankings.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from flax import nnx
import jax.numpy as jnp
import numpy as np

from projects.persrec import input_pipeline
from projects.persrec import losses
from projects.persrec import models


@dataclasses.dataclass
class Request:
  """One user's model inputs built from a raw history."""

  items: np.ndarray  # [P + R] int32 window
  timestamps: np.ndarray  # [P + R] int32
  seen: np.ndarray  # known history ids (for exclude_seen)
  unknown: int  # ids dropped as unknown
  fallback: bool  # no known item: popularity ranking


def build_request(
  cfg: models.ModelConfig, items: Sequence[int], timestamps: Sequence[int] | None = None
) -> Request:
  """The window for a raw history (chronological), dropping unknown ids first."""
  raw = list(items)
  ts = list(timestamps) if timestamps is not None else [0] * len(raw)
  if len(ts) != len(raw):
    raise ValueError(f'{len(raw)} items but {len(ts)} timestamps')
  keep = [
    i
    for i, x in enumerate(raw)
    if isinstance(x, int | np.integer) and not isinstance(x, bool) and 1 <= int(x) <= cfg.num_items
  ]
  known = np.asarray([int(raw[i]) for i in keep], np.int32)
  known_ts = np.asarray([int(ts[i]) for i in keep], np.int64)
  ex = input_pipeline.eval_example(known, known_ts, 0, cfg.old_len, cfg.recent_len)
  return Request(
    items=ex['items'],
    timestamps=ex['timestamps'],
    seen=known,
    unknown=len(raw) - len(keep),
    fallback=len(known) == 0,
  )


class Recommender:
  """Top-k recommendations from a trained SeqRec model and the training popularity counts."""

  def __init__(self, model: models.SeqRec, popularity: np.ndarray):
    self.model = model
    self.cfg = model.cfg
    fallback = np.zeros(self.cfg.vocab_size, np.float32)
    fallback[: len(popularity)] = np.log1p(np.asarray(popularity, np.float64))
    self.fallback = jnp.asarray(fallback)
    self._single = nnx.jit(lambda m, i, t: m.user_vectors(i, t))
    self._compress = nnx.jit(lambda m, i, t: m.compress(i, t))
    self._serve = nnx.jit(lambda m, c, i, t: m.serve(c, i, t))

  def _rank(self, vectors, requests: list[Request], k: int, exclude_seen: bool):
    cos = np.asarray(losses.normalize(vectors) @ self.model.item_table().T)
    valid = np.asarray(self.model.valid_items())
    out_ids, out_scores = [], []
    for row, req in zip(cos, requests, strict=True):
      s = np.asarray(self.fallback) if req.fallback else row
      s = np.where(valid, s, -np.inf)
      if exclude_seen and len(req.seen):
        s[req.seen] = -np.inf
      top = np.argsort(-s, kind='stable')[:k]
      out_ids.append(top)
      out_scores.append(s[top])
    return np.stack(out_ids), np.stack(out_scores)

  def requests(self, histories, timestamps=None) -> list[Request]:
    ts = timestamps if timestamps is not None else [None] * len(histories)
    return [build_request(self.cfg, h, t) for h, t in zip(histories, ts, strict=True)]

  def recommend(self, histories, timestamps=None, *, k: int = 10, exclude_seen: bool = True):
    """(ids [B, k], scores [B, k], requests) by the single pass over each history window."""
    reqs = self.requests(histories, timestamps)
    items = jnp.asarray(np.stack([r.items for r in reqs]))
    ts = jnp.asarray(np.stack([r.timestamps for r in reqs]))
    ids, scores = self._rank(self._single(self.model, items, ts), reqs, k, exclude_seen)
    return ids, scores, reqs

  def compress(self, histories, timestamps=None) -> models.Cache:
    """Each user's cache from the old part of the history window (the offline refresh)."""
    reqs = self.requests(histories, timestamps)
    p = self.cfg.old_len
    items = jnp.asarray(np.stack([r.items[:p] for r in reqs]))
    ts = jnp.asarray(np.stack([r.timestamps[:p] for r in reqs]))
    return self._compress(self.model, items, ts)

  def recommend_cached(
    self, cache: models.Cache, histories, timestamps=None, *, k: int = 10, exclude_seen=True
  ):
    """Like `recommend`, but only the recent R items run, against `cache` (which may be stale)."""
    reqs = self.requests(histories, timestamps)
    p = self.cfg.old_len
    items = jnp.asarray(np.stack([r.items[p:] for r in reqs]))
    ts = jnp.asarray(np.stack([r.timestamps[p:] for r in reqs]))
    vec = self._serve(self.model, cache, items, ts)
    ids, scores = self._rank(vec, reqs, k, exclude_seen)
    return ids, scores, reqs
