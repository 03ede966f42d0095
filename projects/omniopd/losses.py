"""OmniOPD's maths (arXiv 2606.01476, spec rest.md §1) and its baselines' losses.

* `peak_entropy_positions`: the audit scheduler. Along a student rollout with per-token entropies
  H_t (the sampler's, at temperature 1), a position is a peak when H_t > H_{t-1} and H_t >= H_{t+1}
  (outside the response counts as -inf) and H_t >= `min_entropy`; the `k` highest peaks are audited
  (ties: the earlier position). Design choice (the paper's k and peak rule are unverified).
* Chunk similarity (text only, as a black-box teacher gives): 'exact' (1 iff equal), 'edit'
  (1 - Levenshtein / longer length) and 'embedding' (the cosine of sentence embeddings, MiniLM by
  default (common.minilm), mapped to [0, 1] by (1 + cos) / 2). `teacher_chunk` cuts the teacher's
  continuation to the candidate's length (a candidate that ended compares with all of it).
* `dirichlet_posterior_mean`: p_c = (n_c + alpha_c) / (sum n + sum alpha). OmniOPD's use of it here
  (the paper's exact use is unverified): each of the K candidates at an audited fork is one trial
  whose outcome is accept (with soft count s_k, its score) or reject (1 - s_k); the smoothed
  acceptance rate p = (sum s + alpha_acc) / (K + alpha_acc + alpha_rej) is the fork's baseline, and
  candidate k's advantage is s_k - p. With K = 2 candidates the raw mean would swing between 0, 1/2
  and 1; the prior bounds it and keeps a small push (1 / (K + sum alpha)) when all candidates agree.
* `omniopd_loss`: - sum A_k log pi(chunk_k tokens) over the audited candidates' tokens (token mean)
  plus beta * KL(pi || pi_base) (Schulman's k3 estimate on the rollout's own tokens) on the rollout
  tokens no audit covers: the base-model anchor where the teacher says nothing.
* `reverse_kl`: white-box on-policy distillation, sum_v pi(v) (log pi(v) - log pi_T(v)) per rollout
  token with a same-vocabulary teacher's log-probs.
* `sft_loss`: the negative log-likelihood of teacher traces (SFT-on-traces baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import text
from common.rl import loss as rl_loss

SIMILARITIES = ('exact', 'edit', 'embedding')


def omniopd_config() -> ml_collections.ConfigDict:
  """OmniOPD's knobs (config.omniopd)."""
  return ml_collections.ConfigDict(
    dict(
      audits=1,  # k: entropy peaks audited per rollout
      min_entropy=0.0,  # a peak below this entropy (nats) is not audited
      num_candidates=4,  # K student chunks forked at each audited position
      chunk_len=2,  # L: tokens per candidate chunk
      similarity='edit',  # exact | edit | embedding (MiniLM)
      alpha_accept=1.0,  # the Dirichlet prior over (accept, reject)
      alpha_reject=1.0,
      anchor_coef=0.1,  # beta: KL(pi || pi_base) on unaudited rollout tokens
      pg_coef=1.0,
      teacher_timeout_s=30.0,  # a teacher call slower than this is counted and skipped
    )
  )


def check_config(c: ml_collections.ConfigDict) -> None:
  if c.similarity not in SIMILARITIES:
    raise config_lib.ConfigError(f'omniopd.similarity={c.similarity!r}; expected {SIMILARITIES}')
  if c.audits < 1 or c.num_candidates < 1 or c.chunk_len < 1:
    raise config_lib.ConfigError('omniopd.audits, num_candidates and chunk_len must be >= 1')
  if not (c.alpha_accept > 0 and c.alpha_reject > 0):
    raise config_lib.ConfigError('omniopd.alpha_accept and alpha_reject must be > 0')
  if c.anchor_coef < 0 or c.teacher_timeout_s <= 0:
    raise config_lib.ConfigError('omniopd.anchor_coef must be >= 0, teacher_timeout_s > 0')


# ---------------------------------------------------------------------------------------------------
# The audit scheduler.


def peak_entropy_positions(
  entropies: np.ndarray, lengths: np.ndarray, k: int, min_entropy: float = 0.0
) -> list[list[int]]:
  """Per row, the (at most k) audited positions, ascending: the k highest entropy peaks among the
  row's first lengths[b] tokens (see the module docstring)."""
  h = np.asarray(entropies, np.float64)
  out = []
  for b in range(h.shape[0]):
    n = int(lengths[b])
    row = h[b, :n]
    left = np.concatenate([[-np.inf], row[:-1]])
    right = np.concatenate([row[1:], [-np.inf]])
    peaks = np.flatnonzero((row > left) & (row >= right) & (row >= min_entropy))
    order = sorted(peaks, key=lambda t: (-row[t], t))[:k]
    out.append(sorted(int(t) for t in order))
  return out


# ---------------------------------------------------------------------------------------------------
# Chunk similarity.


def teacher_chunk(teacher_text: str, candidate_text: str, candidate_ended: bool) -> str:
  """The part of the teacher's continuation a candidate chunk is compared with."""
  return teacher_text if candidate_ended else teacher_text[: len(candidate_text)]


def similarity_fn(
  kind: str, embed: Callable[[Sequence[str]], np.ndarray] | None = None
) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
  """scores(candidates, references) -> [n] in [0, 1] for pairs of texts."""
  if kind == 'exact':
    return lambda cs, rs: np.asarray([float(c == r) for c, r in zip(cs, rs, strict=True)])
  if kind == 'edit':
    return lambda cs, rs: np.asarray(
      [1.0 - text.edit_distance(c, r) / max(len(c), len(r), 1) for c, r in zip(cs, rs, strict=True)]
    )
  if kind == 'embedding':
    if embed is None:
      raise ValueError("similarity 'embedding' needs an embed(texts) -> [n, d] function")

    def scores(cs, rs):
      if not len(cs):
        return np.zeros((0,))
      e = np.asarray(embed(list(cs) + list(rs)), np.float64)
      e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
      cos = np.sum(e[: len(cs)] * e[len(cs) :], axis=1)
      same = np.asarray([c == r for c, r in zip(cs, rs, strict=True)])
      return np.where(same, 1.0, np.clip((1.0 + cos) / 2.0, 0.0, 1.0))

    return scores
  raise ValueError(f'unknown similarity {kind!r}; expected one of {SIMILARITIES}')


# ---------------------------------------------------------------------------------------------------
# The Dirichlet-multinomial smoothing and the chunk advantages.


def dirichlet_posterior_mean(counts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """(n_c + alpha_c) / (sum_c n_c + sum_c alpha_c) over the last axis (counts may be soft)."""
  n = np.asarray(counts, np.float64)
  a = np.broadcast_to(np.asarray(alpha, np.float64), n.shape)
  if np.any(a <= 0):
    raise ValueError('Dirichlet concentrations must be > 0')
  return (n + a) / (n.sum(-1, keepdims=True) + a.sum(-1, keepdims=True))


def chunk_advantages(scores: np.ndarray, alpha_accept: float, alpha_reject: float):
  """(advantages [K], smoothed acceptance p) of one fork's K candidate scores in [0, 1]."""
  s = np.asarray(scores, np.float64)
  counts = np.asarray([s.sum(), len(s) - s.sum()])
  p = float(dirichlet_posterior_mean(counts, np.asarray([alpha_accept, alpha_reject]))[0])
  return (s - p).astype(np.float32), p


# ---------------------------------------------------------------------------------------------------
# Losses (jax).


def anchor_kl(logp: jax.Array, base_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """Token mean of k3 KL(pi || pi_base) over `mask` (0 with zero gradient where pi = pi_base)."""
  m = mask.astype(jnp.float32)
  kl = rl_loss.k3_kl(logp, jnp.where(m > 0, base_logp, logp))
  return jnp.sum(kl * m) / jnp.maximum(m.sum(), 1.0)


def chunk_pg(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """- token mean of A_row * log pi(token) over the candidate chunks' tokens (`mask`)."""
  m = mask.astype(jnp.float32)
  return -jnp.sum(advantages[:, None] * logp * m) / jnp.maximum(m.sum(), 1.0)


def omniopd_loss(
  cand_logp, cand_adv, cand_mask, roll_logp, roll_base_logp, anchor_mask, *, pg_coef, anchor_coef
):
  """(loss, metrics): pg_coef * chunk_pg + anchor_coef * anchor_kl (see the module docstring)."""
  pg = chunk_pg(cand_logp, cand_adv, cand_mask)
  kl = anchor_kl(roll_logp, roll_base_logp, anchor_mask)
  return pg_coef * pg + anchor_coef * kl, {'pg_loss': pg, 'anchor_kl': kl}


def reverse_kl(logits: jax.Array, teacher_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """Token mean over `mask` of KL(pi || pi_T) = sum_v pi(v) (log pi(v) - log pi_T(v)).

  The teacher's log-probs cover the tokenizer's vocabulary; the student's logits beyond it (the
  decoder's padded vocabulary, MASKED_LOGIT) carry no mass and are dropped."""
  logits = logits[..., : teacher_logp.shape[-1]]
  lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per = jnp.sum(jnp.exp(lsm) * (lsm - teacher_logp.astype(jnp.float32)), axis=-1)
  m = mask.astype(jnp.float32)
  return jnp.sum(per * m) / jnp.maximum(m.sum(), 1.0)


def sft_loss(logp: jax.Array, mask: jax.Array) -> jax.Array:
  """Token mean negative log-likelihood of the trace tokens."""
  m = mask.astype(jnp.float32)
  return -jnp.sum(logp * m) / jnp.maximum(m.sum(), 1.0)
