"""Text-embedding pieces shared by embedding papers (GEM first; CAFe, Lookahead, ... next).

Pooling turns a decoder's hidden states [B, T, D] into one vector per row; InfoNCE trains the vectors
with in-batch negatives and a CLIP-style learnable temperature; the retrieval metrics (Recall@k, MRR,
nDCG@10) and Spearman's rho evaluate them on the host in numpy.

Conventions, chosen so the pieces compose without surprises:
  * masks are [B, T] (1/True = a real token); a row with no real token pools to the zero vector
    (defined, finite, and it cannot win a cosine ranking by accident);
  * similarities are cosines (each vector L2-normalised with an epsilon, so a zero vector gives 0);
  * the temperature is stored as a log-scale lambda, the logits are exp(lambda) * cos, and lambda is
    clamped to [0, log 100] both in the forward pass and, through `clamp_transform`, on the stored
    parameter after every optimizer update (CLIP, Radford et al. 2021, Sec. 2.5);
  * ranking ties are broken by candidate index (a stable sort), so metrics are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

LOG_SCALE_INIT = math.log(20.0)
LOG_SCALE_MIN = 0.0
LOG_SCALE_MAX = math.log(100.0)


# ---------------------------------------------------------------------------------------------------
# Pooling.


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of hidden [B, T, D] over the positions mask [B, T] selects; [B, D] in float32."""
  m = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def last_index(mask: jax.Array) -> jax.Array:
  """Index [B] of the last True position of each mask row; -1 for a row with none."""
  t = mask.shape[1]
  idx = jnp.where(mask.astype(bool), jnp.arange(t)[None, :], -1)
  return jnp.max(idx, axis=1)


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Hidden state [B, D] at each row's last real token (EOS pooling); zeros for an empty row."""
  last = last_index(mask)
  picked = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  return jnp.where((last >= 0)[:, None], picked.astype(jnp.float32), 0.0)


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [B, T, D] at positions [B, K] -> [B, K, D] (e.g. the special tokens' outputs)."""
  return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
  """[N, M] cosine similarities of a [N, D] and b [M, D]."""
  return l2_normalize(a) @ l2_normalize(b).T


# ---------------------------------------------------------------------------------------------------
# InfoNCE with a learnable, clamped log-temperature.


class LogitScale(nnx.Module):
  """CLIP's learnable log logit-scale lambda; `scale()` = exp(clip(lambda, 0, log 100))."""

  def __init__(self, init: float = LOG_SCALE_INIT):
    if not LOG_SCALE_MIN <= init <= LOG_SCALE_MAX:
      raise ValueError(f'log scale init {init} outside [{LOG_SCALE_MIN}, {LOG_SCALE_MAX:.4f}]')
    self.log_scale = nnx.Param(jnp.asarray(init, jnp.float32))

  def __call__(self) -> jax.Array:
    return jnp.exp(jnp.clip(self.log_scale[...], LOG_SCALE_MIN, LOG_SCALE_MAX))


def info_nce(
  queries: jax.Array,
  docs: jax.Array,
  scale: jax.Array | float,
  valid: jax.Array | None = None,
  *,
  symmetric: bool = False,
) -> jax.Array:
  """Mean InfoNCE loss of queries [B, D] against docs [B, D]; row i's positive is docs[i].

  loss_i = -log(exp(s * cos(q_i, d_i)) / sum_j exp(s * cos(q_i, d_j))), the other rows being the
  in-batch negatives (GEM Eq. 1 with its typo fixed: the sum runs over the negatives). `valid` [B]
  drops rows (e.g. texts skipped as empty) both as anchors and as negatives; with none valid the loss
  is 0. `symmetric` averages the query->doc and doc->query directions (CLIP).
  """
  b = queries.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  logits = jnp.asarray(scale, jnp.float32) * cosine_matrix(queries, docs)
  pair_ok = valid[:, None] & valid[None, :]
  logits = jnp.where(pair_ok, logits, -1e9)

  def one_direction(lg):
    pos = jnp.diagonal(lg)
    per_row = jax.nn.logsumexp(lg, axis=1) - pos
    w = valid.astype(jnp.float32)
    return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(w.sum(), 1.0)

  loss = one_direction(logits)
  if symmetric:
    loss = 0.5 * (loss + one_direction(logits.T))
  return loss


def clamp_transform(
  predicate: Callable[[tuple, Any], bool],
  lo: float = LOG_SCALE_MIN,
  hi: float = LOG_SCALE_MAX,
) -> optax.GradientTransformation:
  """Chain last: rewrites updates so params + updates stays in [lo, hi] where predicate(path, p).

  This is CLIP's post-step clamp of the log-temperature expressed as an optax transformation, so it
  runs inside the jit-ed step (common.train_loop.make_train_step) and its state is checkpointed
  with the optimizer's (it has none).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('clamp_transform needs params (pass them to the optimizer update)')

    def fix(path, u, p):
      if u is None or not predicate(path, p):
        return u
      return jnp.clip(p + u, lo, hi) - p

    return jax.tree_util.tree_map_with_path(fix, updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def path_endswith(name: str) -> Callable[[tuple, Any], bool]:
  """A `clamp_transform` predicate: the leaf's path ends with the attribute/key `name`."""

  def pred(path, _):
    keys = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None))) for k in path]
    keys = [k for k in keys if k not in ('value', 'raw_value')]
    return bool(keys) and keys[-1] == name

  return pred


# ---------------------------------------------------------------------------------------------------
# Retrieval metrics and Spearman (host side, numpy).


def _as_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [queries, candidates], got shape {scores.shape}')
  rel = np.asarray(relevant)
  if rel.ndim == 1:  # one relevant candidate index per query
    if rel.shape[0] != scores.shape[0]:
      raise ValueError(f'{rel.shape[0]} targets for {scores.shape[0]} queries')
    if rel.min(initial=0) < 0 or rel.max(initial=0) >= scores.shape[1]:
      raise ValueError(f'target index outside [0, {scores.shape[1]})')
    out = np.zeros(scores.shape, bool)
    out[np.arange(scores.shape[0]), rel] = True
    return out
  if rel.shape != scores.shape:
    raise ValueError(f'relevance {rel.shape} does not match scores {scores.shape}')
  return rel.astype(bool)


def ranks_of_relevant(scores: np.ndarray, relevant: np.ndarray) -> list[np.ndarray]:
  """Per query, the sorted 1-based ranks of its relevant candidates (ties: lower index first)."""
  rel = _as_relevance(scores, relevant)
  order = np.argsort(-np.asarray(scores, np.float64), axis=1, kind='stable')
  ranked_rel = np.take_along_axis(rel, order, axis=1)
  return [np.flatnonzero(r) + 1 for r in ranked_rel]


def retrieval_metrics(
  scores: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 10)
) -> dict[str, float]:
  """Recall@k (share of a query's relevant candidates in its top k), MRR and nDCG@10 (binary
  relevance), each averaged over the queries that have at least one relevant candidate.

  scores [Q, N] (higher = more similar); relevant: [Q] target indices or a [Q, N] bool matrix.
  """
  per_query = ranks_of_relevant(scores, relevant)
  per_query = [r for r in per_query if r.size]
  if not per_query:
    raise ValueError('no query has a relevant candidate')
  out = {}
  for k in ks:
    out[f'recall@{k}'] = float(np.mean([np.mean(r <= k) for r in per_query]))
  out['mrr'] = float(np.mean([1.0 / r[0] for r in per_query]))
  ndcg = []
  for r in per_query:
    dcg = np.sum(1.0 / np.log2(r[r <= 10] + 1.0))
    ideal = np.sum(1.0 / np.log2(np.arange(1, min(r.size, 10) + 1) + 1.0))
    ndcg.append(dcg / ideal)
  out['ndcg@10'] = float(np.mean(ndcg))
  return out


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x with ties sharing their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind='stable')
  ranks = np.empty(x.size, np.float64)
  sorted_x = x[order]
  i = 0
  while i < x.size:
    j = i
    while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho: the Pearson correlation of the average ranks; NaN if either side is constant."""
  a, b = np.ravel(a), np.ravel(b)
  if a.size != b.size or a.size < 2:
    raise ValueError(
      f'spearman needs two equal-length vectors of >= 2 values, got {a.size}, {b.size}'
    )
  ra, rb = average_ranks(a), average_ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
  return float(np.sum(ra * rb) / denom) if denom > 0 else float('nan')
