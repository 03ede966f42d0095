"""Supervised fine-tuning: chat examples -> masked token sequences -> packed rows -> loss.

What every SFT-style paper here needs (EBPO's warm start, S'MoRE, GEM, SEFT, ...):

  ex = sft.tokenize(tok, {'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}]})
  batch = sft.pack([ex, ...], seq_len=512)          # numpy dict, several examples per row
  loss, metrics = sft.sft_loss(model, batch)        # plugs into train_loop.make_train_step

Masking. Only the reply is learnt: the loss mask is 0 on the prompt (system and user turns and the
assistant header the chat template writes) and 1 on the reply and its end-of-turn token, which is
what teaches the model to stop. The prompt is rendered with `add_generation_prompt=True` and the
reply is the rest of the full rendering; the two are tokenized separately, so the boundary is exact
whatever the tokenizer would merge across it. Anything the template writes after the end-of-turn
token (ChatML's trailing newline) is dropped: generation stops at that token and never sees it.

Packing. Examples are shifted once (inputs = tokens[:-1], targets = tokens[1:]) and then placed
first-fit into rows of `seq_len`, each with its own segment id and positions restarting at 0, which
the decoder turns into block-diagonal causal attention. No target ever crosses an example boundary,
so a packed batch gives exactly the per-token losses of the examples run one by one (tested), and
the batch loss is the mean over all reply tokens in it (each token weighs the same, so long replies
count in proportion to their length).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import numpy as np

from common import errors
from common import losses

BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


class SFTError(errors.UserError):
  """An SFT example that cannot be turned into a training sequence; says why."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example: tokens [n] and a loss mask [n] (1 on the tokens to learn)."""

  tokens: np.ndarray
  loss_mask: np.ndarray

  def __post_init__(self):
    if self.tokens.shape != self.loss_mask.shape or self.tokens.ndim != 1:
      raise SFTError(f'tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} differ')

  @property
  def num_targets(self) -> int:
    """Reply tokens that are predicted (the first token is never a target)."""
    return int(self.loss_mask[1:].sum())


def _example(prompt: Sequence[int], reply: Sequence[int]) -> Example:
  tokens = np.asarray([*prompt, *reply], np.int32)
  mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(reply), np.float32)])
  return Example(tokens, mask)


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, Any]], **template_kwargs) -> Example:
  """A chat whose last message is the assistant reply to learn; earlier turns are the prompt."""
  messages = [dict(m) for m in messages]
  if not messages or messages[-1].get('role') != 'assistant':
    raise SFTError('the last message of an SFT chat must be the assistant reply to learn')
  prompt = tokenizer.apply_chat_template(messages[:-1], True, **template_kwargs)
  full = tokenizer.apply_chat_template(messages, False, **template_kwargs)
  if not full.startswith(prompt):
    raise SFTError(
      'the chat template does not render the prompt as a prefix of the full chat, so the reply '
      f'cannot be located: {prompt[-60:]!r} vs {full[: len(prompt)][-60:]!r}'
    )
  reply = tokenizer.encode(full[len(prompt) :], add_bos=False)
  stops = [i for i, t in enumerate(reply) if t in tokenizer.stop_ids]
  if stops:
    reply = reply[: stops[-1] + 1]
  elif tokenizer.eos_id is not None:
    reply = [*reply, tokenizer.eos_id]
  return _example(tokenizer.encode(prompt, add_bos=False), reply)


def tokenize_text(tokenizer, prompt: str, response: str) -> Example:
  """Plain-text SFT (base models without a chat template): [BOS] prompt response EOS."""
  reply = tokenizer.encode(response, add_bos=False)
  if tokenizer.eos_id is not None:
    reply = [*reply, tokenizer.eos_id]
  return _example(tokenizer.encode(prompt), reply)


def tokenize(tokenizer, example: Mapping[str, Any]) -> Example:
  """{'messages': [...]} (chat) or {'prompt': str, 'response': str} (plain text)."""
  if 'messages' in example:
    return tokenize_chat(tokenizer, example['messages'])
  if 'prompt' in example and 'response' in example:
    return tokenize_text(tokenizer, example['prompt'], example['response'])
  raise SFTError(
    f"an SFT example needs 'messages' or 'prompt' and 'response'; got {sorted(example)}"
  )


# ---------------------------------------------------------------------------------------------------
# Packing.


def _empty(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
    'inputs': np.full((rows, seq_len), pad_id, np.int32),
    'targets': np.full((rows, seq_len), pad_id, np.int32),
    'loss_mask': np.zeros((rows, seq_len), np.float32),
    'segment_ids': np.zeros((rows, seq_len), np.int32),
    'positions': np.zeros((rows, seq_len), np.int32),
  }


def _first_fit(lengths: Sequence[int], seq_len: int) -> list[tuple[int, int]]:
  """(row, offset) per length, placing each in the first row with room (order kept)."""
  used: list[int] = []
  places = []
  for n in lengths:
    row = next((r for r, u in enumerate(used) if u + n <= seq_len), None)
    if row is None:
      row = len(used)
      used.append(0)
    places.append((row, used[row]))
    used[row] += n
  return places


def pack(
  examples: Sequence[Example], seq_len: int, *, num_rows: int | None = None, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Packs examples into rows of `seq_len` (numpy batch with the keys in BATCH_KEYS).

  An example longer than seq_len + 1 tokens is truncated to its first seq_len + 1 (a warning would
  be noise in a loop; callers filter by length if truncation matters). `num_rows` fixes the batch
  size (padding with empty rows; too few rows is an error), so jitted steps see one shape.
  """
  pieces = [(ex.tokens[: seq_len + 1], ex.loss_mask[: seq_len + 1]) for ex in examples]
  pieces = [(t, m) for t, m in pieces if len(t) >= 2]
  places = _first_fit([len(t) - 1 for t, _ in pieces], seq_len)
  rows = 1 + max((r for r, _ in places), default=-1)
  if num_rows is not None:
    if rows > num_rows:
      raise SFTError(f'{len(pieces)} examples need {rows} rows of {seq_len}; num_rows={num_rows}')
    rows = num_rows
  out = _empty(rows, seq_len, pad_id)
  segment = np.zeros(rows, np.int32)
  for (tokens, mask), (row, start) in zip(pieces, places, strict=True):
    n = len(tokens) - 1
    sl = slice(start, start + n)
    segment[row] += 1
    out['inputs'][row, sl] = tokens[:-1]
    out['targets'][row, sl] = tokens[1:]
    out['loss_mask'][row, sl] = mask[1:]
    out['segment_ids'][row, sl] = segment[row]
    out['positions'][row, sl] = np.arange(n)
  return out


def packed_batches(
  examples: Iterable[Example], seq_len: int, batch_size: int, *, pad_id: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Streams fixed-shape packed batches [batch_size, seq_len] from an iterable of examples.

  Examples are added in order while they fit first-fit into the current batch's rows; the first one
  that does not fit starts the next batch. The last, partial batch is padded with empty rows.
  """
  pending: list[Example] = []
  for ex in examples:
    trial = [*pending, ex]
    lengths = [min(len(e.tokens), seq_len + 1) - 1 for e in trial]
    if pending and 1 + max(r for r, _ in _first_fit(lengths, seq_len)) > batch_size:
      yield pack(pending, seq_len, num_rows=batch_size, pad_id=pad_id)
      trial = [ex]
    pending = trial
  if pending:
    yield pack(pending, seq_len, num_rows=batch_size, pad_id=pad_id)


# ---------------------------------------------------------------------------------------------------
# Loss.


def sft_loss(
  model, batch: Mapping[str, jax.Array], key: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over reply tokens of a packed batch.

  Signature matches `common.train_loop.make_train_step`'s loss_fn (the key is unused). Returns
  (loss, {'loss', 'reply_tokens'}).
  """
  del key
  logits = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  loss, count = losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])
  return loss, {'loss': loss, 'reply_tokens': count}
