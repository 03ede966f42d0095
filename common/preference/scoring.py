"""Sequence log-probabilities of (prompt, response) pairs, with the prompt masked out.

Every preference loss compares log pi(y | x) for a chosen and a rejected response y to the same
prompt x. Here a batch of pairs becomes one forward pass over 2B rows (chosen rows first, then the
rejected ones, as TRL's and tunix's "concatenated forward" do), laid out by
`common.rl.rollout.build_batch`: prompts left-padded, responses right-padded, positions counting
real tokens only, so padding changes no log-prob. Only response tokens are scored
(`rollout.completion_logprobs`: the prompt is context, never a target), and the per-token
log-probs are reduced with a `where` on the response mask, so a masked position contributes
nothing even when its logit is not finite.

  pairs = pad_pairs(prompts, chosen, rejected, pad_id=0)   # numpy [B, ...] (PAIR_KEYS)
  batch = pair_batch(pairs)                                # numpy [2B, ...] model inputs
  seq = score(model, batch)                                # SequenceLogps of the 2B rows
  chosen, rejected = split(seq)                            # each [B]

A `SequenceLogps` holds the three reductions the losses need: `sum` (log pi(y|x); DPO, IPO,
hinge, CDPO), `mean` (sum / |y|; SimPO's length normalisation, ORPO's odds) and `length` (|y|).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from common import errors
from common.rl import rollout
from common.sampling import sampler as sampler_lib

# What a batch of pairs holds (numpy, one row per pair): prompts left-padded with their mask;
# responses right-padded with their lengths.
PAIR_KEYS = (
  'prompt_tokens',
  'prompt_mask',
  'chosen',
  'chosen_lengths',
  'rejected',
  'rejected_lengths',
)


class PreferenceError(errors.UserError, ValueError):
  """A preference pair that cannot be scored (empty response, too long, mismatched rows)."""


class SequenceLogps(NamedTuple):
  """Per-sequence reductions of response log-probs (each [R], float32; a pytree, jit-friendly).

  sum: log pi(y | x) = sum over response tokens. mean: sum / length (length-normalised, SimPO and
  ORPO). length: number of response tokens (float32, so it divides without casts).
  """

  sum: jax.Array
  mean: jax.Array
  length: jax.Array


def reduce(token_logps: jax.Array, mask: jax.Array) -> SequenceLogps:
  """Masked sum, mean and count over the last axis of per-token log-probs [..., N].

  `where`, not multiply: a masked position holding -inf or NaN (a padded token's logit) must not
  poison the sum. The mean of an empty row is 0 (its length is 0 and the sum is 0).
  """
  keep = mask > 0
  total = jnp.sum(jnp.where(keep, token_logps.astype(jnp.float32), 0.0), axis=-1)
  length = jnp.sum(keep, axis=-1).astype(jnp.float32)
  return SequenceLogps(total, total / jnp.maximum(length, 1.0), length)


def _check_tokens(name: str, rows: Sequence[Sequence[int]]) -> None:
  for i, r in enumerate(rows):
    if len(r) == 0:
      raise PreferenceError(f'{name} {i} is empty: every prompt and response needs a token')


def pad_pairs(
  prompts: Sequence[Sequence[int]],
  chosen: Sequence[Sequence[int]],
  rejected: Sequence[Sequence[int]],
  *,
  prompt_len: int | None = None,
  response_len: int | None = None,
  pad_id: int = 0,
) -> dict[str, np.ndarray]:
  """Token lists -> a numpy batch of pairs (PAIR_KEYS): prompts left-padded to `prompt_len`,
  chosen and rejected right-padded to one `response_len` (defaults: the longest).

  Nothing is truncated: a prompt or response longer than its length is a PreferenceError naming
  the row (truncating a response silently changes what is preferred; filter before padding).
  """
  if not len(prompts) == len(chosen) == len(rejected):
    raise PreferenceError(
      f'{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses'
    )
  named = (('prompt', prompts, prompt_len), ('chosen', chosen, None), ('rejected', rejected, None))
  for name, rows, _ in named:
    _check_tokens(name, rows)
  n = max(len(r) for r in [*chosen, *rejected]) if response_len is None else response_len
  for name, rows, limit in named:
    limit = n if name != 'prompt' else limit
    over = [] if limit is None else [i for i, r in enumerate(rows) if len(r) > limit]
    if over:
      raise PreferenceError(
        f'{name} {over[0]} has {len(rows[over[0]])} tokens, more than the {limit} allowed '
        f'({len(over)} such rows); filter long pairs before padding'
      )
  prompt_tokens, prompt_mask = sampler_lib.pad_prompts(
    prompts, side='left', pad_id=pad_id, length=prompt_len
  )
  out = {'prompt_tokens': prompt_tokens, 'prompt_mask': prompt_mask}
  for name, rows in (('chosen', chosen), ('rejected', rejected)):
    tokens = np.full((len(rows), n), pad_id, np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r)] = r
    out[name] = tokens
    out[f'{name}_lengths'] = np.asarray([len(r) for r in rows], np.int32)
  return out


def check_pairs(pairs: Mapping[str, Any]) -> int:
  """The number of pairs in a PAIR_KEYS batch; a missing key or ragged rows is a PreferenceError."""
  missing = [k for k in PAIR_KEYS if k not in pairs]
  if missing:
    raise PreferenceError(f'a batch of pairs needs {PAIR_KEYS}; missing {missing}')
  rows = {k: np.shape(pairs[k])[0] for k in PAIR_KEYS}
  if len(set(rows.values())) != 1:
    raise PreferenceError(f'pair arrays disagree on the number of rows: {rows}')
  if np.shape(pairs['chosen'])[1] != np.shape(pairs['rejected'])[1]:
    raise PreferenceError(
      f"chosen {np.shape(pairs['chosen'])} and rejected {np.shape(pairs['rejected'])} responses "
      'must be padded to one length (pad_pairs does)'
    )
  return rows['chosen']


def pair_batch(pairs: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The model inputs of a batch of pairs: `rollout.build_batch` rows, chosen [0, B) then
  rejected [B, 2B), each with the pair's prompt (inputs, positions, segment_ids, targets,
  completion_mask)."""
  check_pairs(pairs)
  two = lambda k: np.concatenate([pairs[k], pairs[k]], axis=0)  # noqa: E731
  return rollout.build_batch(
    two('prompt_tokens'),
    two('prompt_mask').astype(bool),
    np.concatenate([pairs['chosen'], pairs['rejected']], axis=0),
    np.concatenate([pairs['chosen_lengths'], pairs['rejected_lengths']], axis=0),
  )


def token_logps(model, batch: Mapping[str, jax.Array]) -> jax.Array:
  """log pi(response token) [R, N] in float32 (0 where the response mask is 0)."""
  logp = rollout.completion_logprobs(model, batch)
  return jnp.where(batch['completion_mask'] > 0, logp, 0.0)


def score(model, batch: Mapping[str, jax.Array]) -> SequenceLogps:
  """SequenceLogps of every row of a `pair_batch` (or any `rollout.build_batch`) batch."""
  return reduce(rollout.completion_logprobs(model, batch), batch['completion_mask'])


def split(x: Any) -> tuple[Any, Any]:
  """(first half, second half) of every leaf's rows: (chosen, rejected) of a `pair_batch` result."""
  leaves = jax.tree.leaves(x)
  half = leaves[0].shape[0] // 2
  return jax.tree.map(lambda a: a[:half], x), jax.tree.map(lambda a: a[half:], x)


def score_pairs(model, batch: Mapping[str, jax.Array]) -> tuple[SequenceLogps, SequenceLogps]:
  """(chosen, rejected) SequenceLogps [B] each of a `pair_batch` batch, from one forward."""
  return split(score(model, batch))
