"""Full-catalogue evaluation of a SeqRec model: ranking metrics, the cold-start fallback, the
serving check, and `make_eval_fn` (what every training run's evaluation computes).

Metrics: Recall@K, NDCG@K and MRR of one held-out item per user. Every real item is scored (no
sampled candidates, which inflate and reorder results; Krichene & Rendle 2020). The rank of the
target is 1 + the number of other candidates whose score is >= the target's: ties count against the
target (a constant scorer ranks every target last, not first), and a NaN target score ranks last.
With one relevant item per user:

  Recall@K = [rank <= K],  NDCG@K = [rank <= K] / log2(rank + 1),  MRR = 1 / rank,

averaged over users with a valid target (weight 1); keys 'recall_K', 'ndcg_K', 'mrr' ('@' is not
a legal TensorBoard name). Candidates exclude padding and, optionally, the items already in the
user's history (MovieLens users rate an item once; see input_pipeline).

Every evaluation ranks the whole catalogue for each held-out user of the validation and test sets
(keys 'val/...' and 'test/...'); on the synthetic source also on the users whose target is a
long-term favourite ('.../longterm/...'). A user whose window holds no known item gets the
training-popularity ranking (the defined cold-start fallback). For a cacheable PerSRec model, every
evaluation also runs the serving path (compress, then serve) on the first validation batch and
reports the largest difference from the single pass ('serving_max_abs_diff', ~1e-7; spec §6(d).2).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import sharding
from projects.persrec import input_pipeline
from projects.persrec import losses
from projects.persrec import models

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


# ---------------------------------------------------------------------------------------------------
# Scores, candidates and the serving check.


def fallback_scores(popularity: np.ndarray, vocab_size: int) -> np.ndarray:
  """log(1 + training count) per item id: the ranking for users with no known history item."""
  out = np.zeros(vocab_size, np.float32)
  out[: len(popularity)] = np.log1p(popularity)
  return out


def scores(model: models.SeqRec, vectors: jax.Array, items: jax.Array, fallback: jax.Array):
  """Cosine scores [B, vocab] of user vectors; users with no known item get `fallback`."""
  cos = losses.normalize(vectors) @ model.item_table().T
  known = jnp.any(models.sanitize_ids(items, model.cfg.num_items) > 0, axis=1)
  return jnp.where(known[:, None], cos, fallback[None, :])


def candidates(model: models.SeqRec, seen: jax.Array | None) -> jax.Array:
  """[B, vocab] (or [vocab]) items that may be recommended: real items not already seen."""
  valid = model.valid_items()
  if seen is None:
    return valid
  b = seen.shape[0]
  hit = jnp.zeros((b, model.cfg.vocab_size), bool).at[jnp.arange(b)[:, None], seen].set(True)
  return valid[None, :] & ~hit


@nnx.jit
def serving_gap(
  model: models.SeqRec, items: jax.Array, timestamps: jax.Array, user: jax.Array | None = None
) -> jax.Array:
  """max |cached - single pass| of the user vectors of [B, P + R] history windows: the old part
  compressed into the tokens' K/V (`SeqRec.compress`), the recent part served against it
  (`SeqRec.serve`), against `SeqRec.user_vectors` over the whole window (PerSRec §3.3; spec
  §6(d).2). A cacheable model only."""
  old, recent = models.split_window(items, model.cfg)
  old_ts, recent_ts = models.split_window(timestamps, model.cfg)
  cache = model.compress(old, old_ts, user)
  cached = model.serve(cache, recent, recent_ts)
  single = model.user_vectors(items, timestamps, user)
  return jnp.max(jnp.abs(cached - single))


# ---------------------------------------------------------------------------------------------------
# The evaluation of a training run.


def make_eval_fn(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  d: input_pipeline.Data,
  mcfg: models.ModelConfig,
) -> Callable[[nnx.Module, int], dict[str, float]]:
  """fit's eval_fn(model, step): the metrics of the module docstring on d.evals' fixed batches."""
  batches = {
    split: input_pipeline.eval_batches(config, exs, jax.process_index(), jax.process_count())
    for split, exs in d.evals.items()
  }
  fallback = jnp.asarray(fallback_scores(d.popularity, mcfg.vocab_size))
  exclude = d.exclude_seen

  @nnx.jit
  def batch_sums(model, batch):
    vec = model.user_vectors(batch['items'], batch['timestamps'], batch['user'])
    s = scores(model, vec, batch['items'], fallback)
    cand = candidates(model, batch['seen'] if exclude else None)
    rank = ranks(s, batch['target'], cand)
    out = {'': rank_sums(rank, batch['weight'])}
    out['longterm/'] = rank_sums(rank, batch['weight'] * batch['longterm'])
    return out

  def evaluate(model, step):
    del step
    out = {}
    for split, bs in batches.items():
      total: dict = {}
      for b in bs:
        sums = jax.device_get(batch_sums(model, sharding.to_global(b, mesh, rules)))
        for group, vals in sums.items():
          for k, v in vals.items():
            total.setdefault(group, {}).setdefault(k, 0.0)
            total[group][k] += float(v)
      for group, vals in total.items():
        if group and vals['users'] == 0:
          continue  # no long-term targets (MovieLens)
        for k, v in from_sums(vals).items():
          out[f'{split}/{group}{k}'] = v
    if mcfg.cacheable:
      first = sharding.to_global(batches['val'][0], mesh, rules)
      out['serving_max_abs_diff'] = float(
        serving_gap(model, first['items'], first['timestamps'], first['user'])
      )
    return out

  return evaluate
