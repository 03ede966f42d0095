"""Full-catalogue ranking metrics: Recall@K, NDCG@K and MRR of one held-out item per user.

Every real item is scored (no sampled candidates, which inflate and reorder results; Krichene &
Rendle 2020). The rank of the target is 1 + the number of other candidates whose score is >= the
target's: ties count against the target (a constant scorer ranks every target last, not first), and
a NaN target score ranks last. With one relevant item per user:

  Recall@K = [rank <= K],  NDCG@K = [rank <= K] / log2(rank + 1),  MRR = 1 / rank,

averaged over users with a valid target (weight 1); keys 'recall_K', 'ndcg_K', 'mrr' ('@' is not
a legal TensorBoard name). Candidates exclude padding and, optionally, the
items already in the user's history (MovieLens users rate an item once; see input_pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RECALL_KS = (5, 10, 50)
NDCG_KS = (10, 50)


def ranks(scores: jax.Array, targets: jax.Array, candidates: jax.Array) -> jax.Array:
  """1-based rank of each target among the candidates (pessimistic ties). int32 [B].

  scores [B, V]; targets [B] ids in [0, V); candidates [B, V] or [V] bool (the target's own entry
  is ignored: it is always ranked).
  """
  scores = scores.astype(jnp.float32)
  t = jnp.take_along_axis(scores, targets[:, None].astype(jnp.int32), axis=1)
  ids = jnp.arange(scores.shape[1])
  candidates = jnp.broadcast_to(candidates, scores.shape)
  beats = candidates & (scores >= t) & (ids[None, :] != targets[:, None])
  rank = 1 + jnp.sum(beats, axis=1, dtype=jnp.int32)
  worst = jnp.sum(candidates, axis=1, dtype=jnp.int32) + 1
  return jnp.where(jnp.isnan(t[:, 0]), worst, rank)


def from_ranks(
  rank: np.ndarray,
  weights: np.ndarray | None = None,
  recall_ks: Sequence[int] = RECALL_KS,
  ndcg_ks: Sequence[int] = NDCG_KS,
) -> dict[str, float]:
  """Mean metrics over the users with weight > 0 (float64 on the host)."""
  rank = np.asarray(rank, np.float64)
  w = np.ones_like(rank) if weights is None else np.asarray(weights, np.float64)
  n = w.sum()
  if n == 0:
    return {'users': 0.0}
  out = {f'recall_{k}': float((w * (rank <= k)).sum() / n) for k in recall_ks}
  gain = 1.0 / np.log2(rank + 1.0)
  out.update({f'ndcg_{k}': float((w * np.where(rank <= k, gain, 0.0)).sum() / n) for k in ndcg_ks})
  out['mrr'] = float((w / rank).sum() / n)
  out['users'] = float(n)
  return out


def rank_sums(
  rank: jax.Array,
  weights: jax.Array,
  recall_ks: Sequence[int] = RECALL_KS,
  ndcg_ks: Sequence[int] = NDCG_KS,
) -> dict[str, jax.Array]:
  """Weighted sums of the per-user metrics (jit-able; add over batches, then `from_sums`)."""
  r = rank.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  out = {f'recall_{k}': jnp.sum(w * (r <= k)) for k in recall_ks}
  gain = 1.0 / jnp.log2(r + 1.0)
  out.update({f'ndcg_{k}': jnp.sum(w * jnp.where(r <= k, gain, 0.0)) for k in ndcg_ks})
  out['mrr'] = jnp.sum(w / r)
  out['users'] = jnp.sum(w)
  return out


def from_sums(sums: dict[str, float]) -> dict[str, float]:
  """Means from summed metrics (`users` is the total weight); empty sets give only users=0."""
  n = float(sums['users'])
  if n == 0:
    return {'users': 0.0}
  return {k: (float(v) / n if k != 'users' else n) for k, v in sums.items()}
