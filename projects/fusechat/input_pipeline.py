"""FuseChat's data: the shared fusion corpus with each source's aligned teacher distributions.

`make_fusion_data(config, pivot, sources)`:
  1. texts: `fuse.num_examples` texts of the shared corpus (`corpora.fusion_texts`: code-ish string
     tasks alternating with R documentation excerpts, train split, seed fuse.data_seed), each cut
     to at most `fuse.seq_len` pivot tokens (the cut text is what every member reads);
  2. per source: its top-k next-token distributions on the cut texts (`models.topk_distributions`,
     computed once and cached on disk under the common cache, keyed by the member's parameters
     and tokenizer, the texts and k), the one-to-one token alignment of its tokenisation with the
     pivot's (`align.align_tokens`), the vocabulary mapping from those alignments' statistics
     (`align.vocab_mapping`) and the teacher moved onto the pivot's positions and vocabulary
     (`align.transfer`);
  3. the pivot's own top-k distributions (the "target LLM" distribution of FuseChat's pairwise
     fusion), cached the same way;
  4. MinCE (the paper's fusion function): per text, the teacher is the source's aligned
     distribution if the source's NLL of the text per character is lower than the pivot's, else
     the pivot's own.

Rows: tokens int32 [N, T + 1] = [start] + pivot tokens (0-padded), mask [N, T + 1] (scored
targets), teachers {source: (ids int32 [N, T, k], probs float32 [N, T, k])} (position t teaches
the prediction of tokens[:, t + 1]). Batches are drawn by step from a seeded permutation
(`batch_rows`), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json

from absl import logging
import ml_collections
import numpy as np

from common import cache
from common import config as config_lib
from projects.fusechat import align
from projects.fusechat import corpora
from projects.fusechat import models

FUSIONS = ('mince', 'source')  # teacher choice: MinCE (paper) or always the aligned source
MERGES = ('sce', 'linear', 'task_arithmetic', 'ties', 'dare')


def check_config(config: ml_collections.ConfigDict) -> None:
  """The paper's keys, checked before the run creates its workdir."""
  f, m, e = config.fuse, config.merge, config.eval
  if not config.model.sources:
    raise config_lib.ConfigError('model.sources: at least one source model')
  if len(set(config.model.sources)) != len(config.model.sources):
    raise config_lib.ConfigError(f'model.sources repeat: {config.model.sources}')
  if not 0.0 <= f.lam <= 1.0:
    raise config_lib.ConfigError(f'fuse.lam={f.lam} must lie in [0, 1]')
  if f.fusion not in FUSIONS:
    raise config_lib.ConfigError(f'fuse.fusion={f.fusion!r}: one of {FUSIONS}')
  if f.topk < 1 or f.seq_len < 2 or f.num_examples < f.batch_size or f.batch_size < 1:
    raise config_lib.ConfigError(
      'fuse.topk >= 1, fuse.seq_len >= 2 and fuse.num_examples >= fuse.batch_size >= 1'
    )
  unknown = [x for x in m.methods if x not in MERGES]
  if unknown:
    raise config_lib.ConfigError(f'merge.methods {unknown}: known {MERGES}')
  for name in ('sce_density', 'ties_density'):
    if not 0.0 < m[name] <= 1.0:
      raise config_lib.ConfigError(f'merge.{name}={m[name]} must lie in (0, 1]')
  if not 0.0 <= m.dare_drop < 1.0:
    raise config_lib.ConfigError(f'merge.dare_drop={m.dare_drop} must lie in [0, 1)')
  if e.num_items < 1 or e.ppl_docs < 1:
    raise config_lib.ConfigError('eval.num_items and eval.ppl_docs must be >= 1')


def _digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cut_texts(pivot: models.Member, texts: Sequence[str], seq_len: int) -> list[list[int]]:
  """Each text's first <= seq_len pivot tokens, re-encoded from their decoded text so that
  `encode(decode(ids)) == ids` (every member then reads exactly the decoded text)."""
  tok = pivot.tokenizer
  rows = []
  for t in texts:
    ids = tok.encode(t, add_bos=False)[:seq_len]
    for _ in range(4):
      again = tok.encode(tok.decode(ids, skip_special=False), add_bos=False)[:seq_len]
      if again == ids:
        break
      ids = again
    rows.append(ids)
  return rows


def cached_topk(
  member: models.Member, texts: Sequence[str], k: int, batch_size: int
) -> models.TopK:
  """`models.topk_distributions` of `member` on `texts`, computed once and cached on disk."""
  key = _digest(member.fingerprint(), list(texts), k, 'fusechat-topk-1')
  path = cache.cache_dir('fusechat', 'topk') / f'{key}.npz'
  if path.is_file():
    with np.load(path) as f:
      return models.TopK(**{name: f[name] for name in f.files})
  rows = [member.tokenizer.encode(t, add_bos=False) for t in texts]
  logging.info('top-%d distributions of %s on %d texts (once; %s)', k, member.name, len(rows), path)
  out = models.topk_distributions(member, rows, k=k, batch_size=batch_size)
  cache.savez(path, **out.arrays())
  return out


@dataclasses.dataclass
class SourceTeacher:
  name: str
  ids: np.ndarray  # int32 [N, T, k]
  probs: np.ndarray  # float32 [N, T, k]
  mapping: np.ndarray  # int32 [source vocab]
  aligned_frac: float  # share of pivot target tokens one-to-one aligned
  chosen: np.ndarray  # bool [N]: MinCE picked the source's distribution for this text


@dataclasses.dataclass
class FusionData:
  tokens: np.ndarray  # int32 [N, T + 1]
  mask: np.ndarray  # bool [N, T + 1]
  texts: list[str]
  teachers: dict[str, SourceTeacher]
  rows: list[list[int]]  # the pivot tokens of each text
  own: models.TopK  # the pivot's own top-k
  own_ids: np.ndarray  # int32 [N, T, k]
  own_probs: np.ndarray  # float32 [N, T, k]

  def __len__(self) -> int:
    return len(self.tokens)


def _pivot_teacher(top: models.TopK, width: int) -> tuple[np.ndarray, np.ndarray]:
  ids = top.ids[:, :width]
  p = np.exp(top.logp[:, :width].astype(np.float64))
  probs = (p / p.sum(-1, keepdims=True)).astype(np.float32)
  return ids.astype(np.int32), probs


def fusion_base(config: ml_collections.ConfigDict, pivot: models.Member) -> FusionData:
  """The corpus cut to pivot tokens, and the pivot's own top-k (no source teacher yet)."""
  f = config.fuse
  raw = corpora.fusion_texts(f.num_examples, f.data_seed, f.chars)
  rows = cut_texts(pivot, raw, f.seq_len)
  texts = [pivot.tokenizer.decode(r, skip_special=False) for r in rows]
  n, width = len(rows), f.seq_len
  tokens = np.zeros((n, width + 1), np.int32)
  mask = np.zeros((n, width + 1), bool)
  start = pivot.start_id
  tokens[:, 0] = 0 if start is None else start
  for i, r in enumerate(rows):
    tokens[i, 1 : 1 + len(r)] = r
    mask[i, 1 : 1 + len(r)] = True
  own = cached_topk(pivot, texts, f.topk, config.eval.batch_size)
  own_ids, own_probs = _pivot_teacher(own, width)
  own_ids = np.pad(own_ids, ((0, 0), (0, width - own_ids.shape[1]), (0, 0)))
  own_probs = np.pad(own_probs, ((0, 0), (0, width - own_probs.shape[1]), (0, 0)))
  return FusionData(tokens, mask, texts, {}, rows, own, own_ids, own_probs)


_TEACHERS: dict[str, SourceTeacher] = {}  # add_source's results in this process, by their inputs


def add_source(
  config: ml_collections.ConfigDict, data: FusionData, pivot: models.Member, src: models.Member
) -> SourceTeacher:
  """The source's aligned MinCE teacher on `data` (added to data.teachers and returned).

  Memoised in the process on what it reads (the source's name, the two members' fingerprints, the cut texts,
  fuse.topk / seq_len / fusion, eval.batch_size): runs that differ only in what follows, e.g. a
  seed's fusion run and its lambda = 1 control, share one alignment. The arrays are read-only.
  """
  f = config.fuse
  key = _digest(
    src.name,
    src.fingerprint(),
    pivot.fingerprint(),
    data.texts,
    [f.topk, f.seq_len, f.fusion, config.eval.batch_size],
  )
  if key not in _TEACHERS:
    _TEACHERS[key] = _source_teacher(config, data, pivot, src)
  teacher = _TEACHERS[key]
  data.teachers[src.name] = teacher
  logging.info(
    'source %s: %.1f%% of pivot tokens one-to-one aligned, %d of %d source tokens mapped, '
    'MinCE picked the source on %d of %d texts',
    src.name,
    100 * teacher.aligned_frac,
    int((teacher.mapping >= 0).sum()),
    len(teacher.mapping),
    int(teacher.chosen.sum()),
    len(teacher.chosen),
  )
  return teacher


def _source_teacher(
  config: ml_collections.ConfigDict, data: FusionData, pivot: models.Member, src: models.Member
) -> SourceTeacher:
  f = config.fuse
  rows, texts = data.rows, data.texts
  n, width = len(rows), f.seq_len
  chars = np.asarray([max(len(t), 1) for t in texts], np.float64)
  top = cached_topk(src, texts, f.topk, config.eval.batch_size)
  aligned = [
    align.align_tokens(src.tokenizer, top.tokens[i, : top.lengths[i]], pivot.tokenizer, rows[i])
    for i in range(n)
  ]
  mapping = align.vocab_mapping(
    src.tokenizer,
    pivot.tokenizer,
    [(top.tokens[i, : top.lengths[i]], rows[i], aligned[i]) for i in range(n)],
  )
  ids = np.zeros((n, width, f.topk), np.int32)
  probs = np.zeros((n, width, f.topk), np.float32)
  for i in range(n):
    ids[i], probs[i] = align.transfer(
      top.ids[i], top.logp[i], mapping, aligned[i], np.asarray(rows[i]), width
    )
  if f.fusion == 'mince':
    chosen = top.nll / chars < data.own.nll / chars
  else:
    chosen = np.ones(n, bool)
  ids = np.where(chosen[:, None, None], ids, data.own_ids)
  probs = np.where(chosen[:, None, None], probs, data.own_probs)
  frac = sum(len(a) for a in aligned) / max(1, sum(len(r) for r in rows))
  for a in (ids, probs, mapping, chosen):
    a.setflags(write=False)
  return SourceTeacher(src.name, ids, probs, mapping, float(frac), chosen)


def make_fusion_data(
  config: ml_collections.ConfigDict, pivot: models.Member, sources: Sequence[models.Member]
) -> FusionData:
  """`fusion_base` plus every source's teacher (see the module docstring)."""
  data = fusion_base(config, pivot)
  for src in sources:
    add_source(config, data, pivot, src)
  return data


def batch_rows(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """The rows of (1-based) `step`: consecutive slices of per-epoch seeded permutations."""
  first = (step - 1) * batch_size
  out = []
  for g in range(first, first + batch_size):
    epoch, pos = divmod(g, n)
    out.append(int(corpora.rng(seed, f'epoch{epoch}').permutation(n)[pos]))
  return np.asarray(out, np.int64)
