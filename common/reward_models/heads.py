"""Reward heads on the shared decoder: a scalar reward per sequence and a reward per response token.

A reward model reads a whole (prompt, response) sequence, so its batch holds every response token
(`sequence_batch`; the LM layout of `common.rl.rollout.build_batch` drops the last one, which is
only ever a target there). Prompts are left-padded and responses right-padded, positions count
real tokens only and padding is segment 0, so the rewards of a row do not depend on its padding.

  batch = pair_batch(pairs)            # chosen rows [0, B), rejected rows [B, 2B)
  out = model(batch)                   # RewardOutput: rewards [2B], features [2B, d], tokens [2B, N]

`RewardModel` = backbone (any `common.models.decoder.Decoder`: a tiny one from scratch, or
SmolLM2 / Gemma-3 / Qwen2.5 from `common.models.loader`) + one linear head d_model -> 1 on the
final-normed hidden states h (float32):
  sequence reward  r(x, y) = w . phi + b, phi = h at the last response token (pool='last', the
                   InstructGPT / TRL reward model) or the mean of h over response tokens ('mean');
  token rewards    r(s_t, a_t) = w . h_t + b at response token t (h_t has read a_t), the dense head
                   of token-level reward models; 0 on padding.
`phi` is returned as `features`: the representation Causal Rewards regularises.

Which parameters train is the caller's choice (`freeze_backbone`: a linear probe on a frozen LM;
`common.adapters.core.adapt(model.backbone, ...)`: LoRA on the backbone, head still trainable).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import functools
from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.adapters import core as adapters
from common.models import decoder
from common.preference import scoring

POOLS = ('last', 'mean')


class RewardOutput(NamedTuple):
  """rewards [B] (sequence head), features [B, d] (phi, what the head reads), token_rewards [B, N]
  (0 where the response mask is 0); all float32. A pytree, so it leaves jit whole."""

  rewards: jax.Array
  features: jax.Array
  token_rewards: jax.Array


def sequence_batch(
  prompt_tokens: np.ndarray,
  prompt_mask: np.ndarray,
  responses: np.ndarray,
  lengths: np.ndarray,
) -> dict[str, np.ndarray]:
  """Reward-model rows of (left-padded prompt, right-padded response) pairs of arrays.

  Returns numpy arrays: tokens, positions, segment_ids [B, P+N] (int32; segment 1 real, 0 padding),
  response_mask [B, N] (float32) and last_index [B] (int32, the row's last response token P+len-1).
  """
  prompt_tokens = np.asarray(prompt_tokens)
  responses = np.asarray(responses)
  lengths = np.asarray(lengths)
  p, n = prompt_tokens.shape[1], responses.shape[1]
  if np.any(lengths < 1) or np.any(lengths > n):
    raise scoring.PreferenceError(f'response lengths must be in [1, {n}]; got {lengths.tolist()}')
  response_mask = np.arange(n)[None, :] < lengths[:, None]
  real = np.concatenate([np.asarray(prompt_mask, bool), response_mask], axis=1)
  return {
    'tokens': np.concatenate([prompt_tokens, responses], axis=1).astype(np.int32),
    'positions': np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32),
    'segment_ids': real.astype(np.int32),
    'response_mask': response_mask.astype(np.float32),
    'last_index': (p + lengths - 1).astype(np.int32),
  }


def pair_batch(pairs: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """`sequence_batch` rows of a batch of pairs (`common.preference.scoring.PAIR_KEYS`, e.g. from
  `scoring.pad_pairs`): chosen rows [0, B), then rejected rows [B, 2B), each with its prompt."""
  scoring.check_pairs(pairs)
  two = lambda k: np.concatenate([pairs[k], pairs[k]], axis=0)  # noqa: E731
  return sequence_batch(
    two('prompt_tokens'),
    two('prompt_mask'),
    np.concatenate([pairs['chosen'], pairs['rejected']], axis=0),
    np.concatenate([pairs['chosen_lengths'], pairs['rejected_lengths']], axis=0),
  )


def split(x: Any) -> tuple[Any, Any]:
  """(chosen, rejected) halves of every leaf of a `pair_batch` result (or its rewards)."""
  return scoring.split(x)


class RewardModel(nnx.Module):
  """A decoder backbone and a linear reward head (see the module docstring)."""

  def __init__(self, backbone: decoder.Decoder, *, pool: str = 'last', rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f'pool={pool!r}; expected one of {POOLS}')
    d = backbone.cfg.d_model
    self.backbone = backbone
    # TRL's score-head init: normal with std 1/sqrt(d + 1), so initial rewards are O(1) on the
    # RMS-normed hidden states; the bias starts at 0 (Bradley-Terry ignores a shared shift).
    self.head = nnx.Linear(
      d,
      1,
      use_bias=True,
      param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal((d + 1) ** -0.5), ('embed', None)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, (None,)),
      rngs=rngs,
    )
    self.pool = pool

  def hidden(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Final-normed hidden states [B, P+N, d] (float32) of a `sequence_batch`."""
    return self.backbone.hidden_states(
      batch['tokens'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )

  def _reward(self, h: jax.Array) -> jax.Array:
    return self.head(h.astype(jnp.float32))[..., 0].astype(jnp.float32)

  def __call__(self, batch: Mapping[str, jax.Array]) -> RewardOutput:
    h = self.hidden(batch)
    n = batch['response_mask'].shape[1]
    mask = batch['response_mask'] > 0
    response_h = h[:, -n:]
    if self.pool == 'last':
      idx = batch['last_index'].astype(jnp.int32)[:, None, None]
      features = jnp.take_along_axis(h, idx, axis=1)[:, 0]
    else:
      count = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
      features = jnp.where(mask[..., None], response_h, 0.0).sum(1) / count
    tokens = jnp.where(mask, self._reward(response_h), 0.0)
    return RewardOutput(self._reward(features), features, tokens)


def freeze_backbone(model: RewardModel) -> int:
  """Makes every backbone weight `common.adapters.core.Frozen` (no gradient, no optimizer state):
  only the head (and adapters added later) trains. Returns the number of frozen scalars."""
  return adapters.freeze_base(model.backbone)


def token_mean(token_rewards: jax.Array, response_mask: jax.Array) -> jax.Array:
  """Per-row mean of token rewards over response tokens [B] (llama-rlhf's PairwiseScoreLoss
  reduction): how a token-level head is trained with a sequence-level Bradley-Terry loss."""
  keep = response_mask > 0
  total = jnp.where(keep, token_rewards, 0.0).sum(-1)
  return total / jnp.maximum(keep.sum(-1), 1).astype(jnp.float32)


@functools.cache
def _jitted(graphdef) -> Callable:
  return jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))


def apply(model: RewardModel, batch: Mapping[str, Any]) -> RewardOutput:
  """`model(batch)` jit-compiled once per model structure (host arrays in, device arrays out)."""
  graphdef, state = nnx.split(model)
  return _jitted(graphdef)(state, batch)
