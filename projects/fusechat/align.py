"""Cross-tokenizer alignment (FuseLLM / FuseChat, arXiv 2401.10491 and 2408.07990).

Two steps, as in FuseChat's `align_token_and_vocab.py`:

1. Token alignment of one text (`align_tokens`): both tokenisations are spans of the same string
   (`spans`: character offsets recovered by incremental decoding, so any tokenizer works, byte-level
   BPE or SentencePiece). A dynamic-programming alignment (DTW with steps (1,1), (1,0), (0,1)) runs
   over the band of token pairs whose spans overlap or touch, with cost = the edit distance of the
   two token strings (the paper's choice); ties prefer the diagonal, then the smaller index, so the
   path is deterministic. A pair on the path whose two tokens appear on it exactly once is a
   *one-to-one* alignment; many-to-one regions are not.
2. Vocabulary mapping (`vocab_mapping`): over a corpus, count every one-to-one aligned pair
   (source token, target token) and map each source token to its most frequent target token (ties:
   the smaller target id). A source token never aligned falls back to the target token with the
   same normalised string (byte-level 'Ġ' and SentencePiece '▁' read as a space), else to -1
   (dropped from the distribution). Identical tokenizers give the identity mapping.

`transfer` then moves a source's top-k distributions onto the target's positions and vocabulary:
at a target token one-to-one aligned to a source token, the source's distribution that predicts
that source token, its ids mapped through the vocabulary mapping (ids mapping to one target token
summed, unmapped ids dropped, renormalised); everywhere else the teacher is the one-hot gold token
(FuseLLM's treatment of unaligned positions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np

from common import text
from common.models import tokenizer as tokenizer_lib


def spans(tok: tokenizer_lib.Tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
  """(the decoded text, [start, end) character span of every token). A token that only completes
  in a later token (a partial UTF-8 byte) gets an empty span where it starts."""
  ids = [int(i) for i in ids]
  text = tok.decode(ids, skip_special=False)
  out, prev = [], 0
  for n in range(1, len(ids) + 1):
    prefix = tok.decode(ids[:n], skip_special=False)
    common = 0
    limit = min(len(prefix), len(text))
    while common < limit and prefix[common] == text[common]:
      common += 1
    end = max(prev, common)
    out.append((prev, end))
    prev = end
  return text, out


def dtw(a_spans, b_spans, a_strs, b_strs) -> list[tuple[int, int]]:
  """The minimum-cost monotone path from (0, 0) to (n-1, m-1) over the band of pairs whose
  spans overlap or touch (cost: edit distance of the strings); see the module docstring."""
  n, m = len(a_spans), len(b_spans)
  if n == 0 or m == 0:
    return []

  def near(i, j):
    (sa, ea), (sb, eb) = a_spans[i], b_spans[j]
    return sa <= eb and sb <= ea

  inf = float('inf')
  cost: dict[tuple[int, int], float] = {}
  back: dict[tuple[int, int], tuple[int, int] | None] = {}
  lo = 0  # the first j that can be near row i (spans are sorted)
  for i in range(n):
    while lo < m and b_spans[lo][1] < a_spans[i][0]:
      lo += 1
    j = lo
    while j < m and b_spans[j][0] <= a_spans[i][1]:
      if near(i, j):
        c = text.edit_distance(a_strs[i], b_strs[j])
        if i == 0 and j == 0:
          cost[(0, 0)], back[(0, 0)] = c, None
        else:
          best, arg = inf, None
          for p in ((i - 1, j - 1), (i - 1, j), (i, j - 1)):  # diagonal first: wins ties
            if p in cost and cost[p] < best:
              best, arg = cost[p], p
          if arg is not None:
            cost[(i, j)], back[(i, j)] = best + c, arg
      j += 1
  if (n - 1, m - 1) not in cost:
    raise ValueError('the two tokenisations do not cover the same text')
  path, node = [], (n - 1, m - 1)
  while node is not None:
    path.append(node)
    node = back[node]
  return path[::-1]


def align_tokens(
  a_tok: tokenizer_lib.Tokenizer,
  a_ids: Sequence[int],
  b_tok: tokenizer_lib.Tokenizer,
  b_ids: Sequence[int],
) -> list[tuple[int, int]]:
  """One-to-one aligned (index in a_ids, index in b_ids) pairs of two tokenisations of one text."""
  a_text, a_sp = spans(a_tok, a_ids)
  b_text, b_sp = spans(b_tok, b_ids)
  if a_text != b_text:
    raise ValueError(
      f'the tokenisations decode to different texts: {a_text[:40]!r} vs {b_text[:40]!r}'
    )
  path = dtw(a_sp, b_sp, [a_text[s:e] for s, e in a_sp], [b_text[s:e] for s, e in b_sp])
  ca = Counter(i for i, _ in path)
  cb = Counter(j for _, j in path)
  return [(i, j) for i, j in path if ca[i] == 1 and cb[j] == 1]


def _norm(piece: str | None) -> str | None:
  if piece is None:
    return None
  return piece.replace('Ġ', ' ').replace('▁', ' ').replace('Ċ', '\n')


def vocab_mapping(
  source_tok: tokenizer_lib.Tokenizer,
  target_tok: tokenizer_lib.Tokenizer,
  pairs: Iterable[tuple[Sequence[int], Sequence[int], list[tuple[int, int]]]],
) -> np.ndarray:
  """int32 [source vocab]: each source token's target token (-1: none); see the module docstring.

  pairs: (source ids, target ids, one-to-one alignment as (source index, target index)) per text.
  """
  counts: Counter = Counter()
  for s_ids, t_ids, aligned in pairs:
    for i, j in aligned:
      counts[(int(s_ids[i]), int(t_ids[j]))] += 1
  best: dict[int, tuple[int, int]] = {}
  for (s, t), c in sorted(counts.items()):
    if s not in best or c > best[s][1]:
      best[s] = (t, c)
  by_string: dict[str, int] = {}
  for t in range(target_tok.vocab_size):
    piece = _norm(target_tok.id_to_token(t))
    if piece is not None and piece not in by_string:
      by_string[piece] = t
  out = np.full(source_tok.vocab_size, -1, np.int32)
  for s in range(source_tok.vocab_size):
    if s in best:
      out[s] = best[s][0]
    else:
      out[s] = by_string.get(_norm(source_tok.id_to_token(s)), -1)
  return out


def transfer(
  src_ids: np.ndarray,
  src_logp: np.ndarray,
  mapping: np.ndarray,
  aligned: Sequence[tuple[int, int]],
  target_tokens: np.ndarray,
  width: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [width, k], probs float32 [width, k]): one text's teacher on the target side.

  src_ids / src_logp [S, k]: the source's top-k at the position predicting source token s;
  aligned: one-to-one (source index, target index); target_tokens [>= T]: the target's tokens
  (row position t holds the teacher predicting target token t). Unaligned positions (and aligned
  ones whose top-k has no mapped id) get the one-hot gold token (id, probability 1, rest 0).
  """
  k = src_ids.shape[-1]
  ids = np.zeros((width, k), np.int32)
  probs = np.zeros((width, k), np.float32)
  n = min(width, len(target_tokens))
  ids[:n, 0] = target_tokens[:n]
  probs[:n, 0] = 1.0
  for s, t in aligned:
    if t >= width:
      continue
    mapped = mapping[src_ids[s]]
    p = np.exp(src_logp[s].astype(np.float64))
    p = np.where(mapped >= 0, p, 0.0)
    if p.sum() <= 0:
      continue
    merged: dict[int, float] = {}
    for m, q in zip(mapped.tolist(), p.tolist(), strict=True):
      if q > 0:
        merged[m] = merged.get(m, 0.0) + q
    total = sum(merged.values())
    items = sorted(merged.items(), key=lambda x: (-x[1], x[0]))
    ids[t] = 0
    probs[t] = 0
    for c, (m, q) in enumerate(items):
      ids[t, c], probs[t, c] = m, q / total
  return ids, probs
