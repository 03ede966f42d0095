"""Rollouts for RL with verifiable rewards: sample G responses per prompt, score them, and lay the
rows out for training.

Rows are prompt-major (prompt m's G responses are rows m*G .. m*G+G-1). Every array that enters a
jit-ed program is a global array sharded over the mesh's batch axes (`sharding.global_rows`), and
every result comes back to each host whole (`sharding.gather_rows`), so each process sees the same
completions, computes the same rewards and advantages, and the host-side state (a stateful
estimator's statistics, the reward source's counters) stays identical on every process without
communication. On one device these are plain device_put / device_get.

Rewards come from a `RewardSource`: per-sequence rewards from a verifier (`VerifierRewards`; an
exception or a non-finite reward scores 0 and is counted, never raised), and optionally per-token
rewards (`Rewards.token`, with `Rewards.token_mask` marking the tokens that carry one) for
token-level reward models (Q-RM, DPO-implicit rewards). `OutcomeAsTokenRewards` writes a source's
sequence reward onto each response's last token: the token-level form of an outcome reward, which
the loop's token path turns into exactly the advantages of the sequence path.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import math
import time
from typing import Any
from typing import Protocol

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import losses
from common import sharding
from common import train_loop
from common.rl import curriculum as curriculum_lib
from common.sampling import kv_cache
from common.sampling import sampler as sampler_lib

Prompt = curriculum_lib.Prompt
Verifier = Callable[[Prompt, np.ndarray], float]


# ---------------------------------------------------------------------------------------------------
# Rewards.


@dataclasses.dataclass
class Rewards:
  """What a reward source says about one rollout batch.

  sequence: [M, G] one reward per response (pass@1 counts reward >= 1).
  token: [M*G, N] per-token rewards aligned with the completion tokens, or None when the source
    scores whole sequences only (the loop then computes advantages from `sequence`).
  token_mask: [M*G, N] bool, the tokens that carry a reward (None: every completion token). An
    outcome reward carries one reward per response, on its last token; a dense token-level reward
    model, one per token.
  """

  sequence: np.ndarray
  token: np.ndarray | None = None
  token_mask: np.ndarray | None = None


class RewardSource(Protocol):
  """Scores sampled responses. Host-side and deterministic; its state is checkpointed as JSON."""

  def score(
    self, prompts: Sequence[Prompt], completions: np.ndarray, lengths: np.ndarray, group_size: int
  ) -> Rewards: ...

  def state_dict(self) -> dict[str, Any]: ...

  def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

  def metrics(self) -> dict[str, float]: ...


class VerifierRewards:
  """Per-sequence rewards from `verifier(prompt, completion tokens) -> float`.

  A verifier that raises or returns a non-finite value scores 0 for that response and is counted
  (`verifier_failures`, checkpointed), so one bad answer never stops a long run.
  """

  def __init__(self, verifier: Verifier):
    self.verifier = verifier
    self.failures = 0

  def score(self, prompts, completions, lengths, group_size) -> Rewards:
    out = np.zeros((len(prompts), group_size), np.float32)
    for i, p in enumerate(prompts):
      for j in range(group_size):
        row = i * group_size + j
        try:
          r = float(self.verifier(p, completions[row, : int(lengths[row])]))
          if not math.isfinite(r):
            raise ValueError(f'non-finite reward {r}')
        except Exception as e:  # noqa: BLE001  (a verifier failure never stops training)
          self.failures += 1
          if self.failures <= 10 or self.failures % 1000 == 0:
            logging.warning('verifier failed on prompt %d (#%d): %s', p.uid, self.failures, e)
          r = 0.0
        out[i, j] = r
    return Rewards(out)

  def state_dict(self) -> dict[str, Any]:
    return {'verifier_failures': self.failures}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self.failures = int(state.get('verifier_failures', 0))

  def metrics(self) -> dict[str, float]:
    return {'verifier_failures': self.failures}


def last_token_mask(lengths: np.ndarray, n: int) -> np.ndarray:
  """[R, n] bool: True at each response's last generated token (none for an empty response)."""
  lengths = np.asarray(lengths)
  return np.arange(n)[None, :] == (lengths[:, None] - 1)


class OutcomeAsTokenRewards:
  """A sequence-reward source whose rewards also come as token rewards: r_i on the last token of
  response i, no reward elsewhere (`Rewards.token_mask`), the usual placement of an outcome reward
  in token-level RLHF. Through the loop's token path (returns-to-go of the estimator's advantages,
  common.rl.advantages.token_advantages) every token of response i gets exactly the sequence
  path's advantage A_i."""

  def __init__(self, source: RewardSource):
    self.source = source

  def score(self, prompts, completions, lengths, group_size) -> Rewards:
    r = self.source.score(prompts, completions, lengths, group_size)
    mask = last_token_mask(lengths, completions.shape[1])
    token = np.where(mask, np.asarray(r.sequence, np.float32).reshape(-1, 1), 0.0)
    return Rewards(r.sequence, token.astype(np.float32), mask)

  def state_dict(self) -> dict[str, Any]:
    return self.source.state_dict()

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self.source.load_state_dict(state)

  def metrics(self) -> dict[str, float]:
    return self.source.metrics()


# ---------------------------------------------------------------------------------------------------
# Sequences and logprobs.


def pad_prompts(prompts: Sequence[Prompt], length: int, pad_id: int):
  """(tokens [B, P] int32, mask [B, P] bool), left-padded to `length`."""
  too_long = [p.uid for p in prompts if len(p.tokens) > length]
  if too_long:
    raise ValueError(f'prompt uid {too_long[0]} is longer than rl.prompt_len={length}')
  return sampler_lib.pad_prompts(
    [p.tokens for p in prompts], side='left', pad_id=pad_id, length=length
  )


def build_batch(
  prompt_tokens: np.ndarray,
  prompt_mask: np.ndarray,
  completion: np.ndarray,
  lengths: np.ndarray,
) -> dict[str, np.ndarray]:
  """The training view of (prompt, completion) rows: inputs [B, P+N-1] with positions counting real
  tokens and segment 0 on padding (so left padding changes nothing), targets / mask [B, N]."""
  n = completion.shape[1]
  comp_mask = np.arange(n)[None, :] < lengths[:, None]
  seq = np.concatenate([prompt_tokens, completion], axis=1).astype(np.int32)
  real = np.concatenate([prompt_mask, comp_mask], axis=1)
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return {
    'inputs': seq[:, :-1],
    'positions': positions[:, :-1],
    'segment_ids': real[:, :-1].astype(np.int32),
    'targets': completion.astype(np.int32),
    'completion_mask': comp_mask.astype(np.float32),
  }


INPUT_KEYS = ('inputs', 'positions', 'segment_ids')  # [B, P+N-1]; every other [B, N, ...] array
# of a build_batch batch (targets, masks, log-probs, per-token advantages) is completion-aligned.


def trim_columns(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """`batch` (build_batch rows) without the prompt columns that are padding in every row and the
  completion columns past every row's end, each kept part rounded up to `multiple` columns.

  Why: rollouts pad prompts to a fixed width and completions to max_new_tokens, so an update
  over the whole [B, P+N-1] rectangle spends much of its forward and backward on padding
  (SmolLM2's chat prompts are 51-62 tokens padded to 96). Left padding is segment 0 with its own
  positions, so dropping columns that are padding in every row leaves each real token's inputs,
  position and attended set unchanged: the same log-probs and gradients up to float rounding
  (other matmul shapes). The rounding bounds how many shapes the update compiles for. multiple
  <= 0 returns the batch as is. Arrays [B, N, ...] are completion-aligned (targets, masks,
  log-probs, per-token advantages, a teacher's per-token distributions [B, N, V]); others
  (per-sequence advantages [B]) pass through.
  """
  if multiple <= 0:
    return dict(batch)
  b, width = batch['inputs'].shape
  n = batch['targets'].shape[1]
  p = width - n + 1
  real_prompt = batch['segment_ids'][:, :p] > 0
  # A row without a prompt token (none in practice) reads as starting at the last prompt column.
  first = int(np.where(real_prompt.any(1), np.argmax(real_prompt, axis=1), p - 1).min())
  keep_p = min(p, -(-(p - first) // multiple) * multiple)
  ends = (batch['completion_mask'] > 0) * np.arange(1, n + 1)[None, :]
  keep_n = min(n, max(-(-int(ends.max(initial=0)) // multiple), 1) * multiple)
  cols = slice(p - keep_p, p + keep_n - 1)
  out = {}
  for k, v in batch.items():
    if k in INPUT_KEYS:
      out[k] = v[:, cols]
    elif v.ndim >= 2 and v.shape[:2] == (b, n):
      out[k] = v[:, :keep_n]
    else:
      out[k] = v
  return out


def completion_logprobs(model, batch, *, with_entropy: bool = False, row_groups: int = 1):
  """log pi(completion token) [B, N] (and entropy [B, N]) from one forward over prompt+completion.

  row_groups > 1 (no entropy): the rows in that many equal groups, one after another, each group's
  forward recomputed in the backward pass (`lax.scan` over a `jax.checkpoint`ed body), so a
  gradient holds one group's activations instead of the batch's: a long-prefix update that does not
  fit in memory fits, for one more forward. The same values up to float rounding (other matmul
  shapes). Rematerialising per block instead would not do on CPU: XLA:CPU's scheduler keeps a
  Python loop of checkpointed blocks' activations alive anyway (measured: the same temp size);
  a scan's iterations cannot be reordered.
  """
  if row_groups > 1:
    if with_entropy:
      raise ValueError('completion_logprobs: row_groups > 1 does not return entropies')
    return _grouped_completion_logprobs(model, batch, row_groups)
  n = batch['targets'].shape[1]
  h = model.hidden_states(
    batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
  )
  logits = model.logits_from_hidden(h[:, -n:])  # positions P-1 .. P+N-2 predict the completion
  logp = losses.token_logprobs(logits, batch['targets'])
  if not with_entropy:
    return logp
  lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp, -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)


def _grouped_completion_logprobs(model, batch, groups: int):
  rows = batch['targets'].shape[0]
  if rows % groups:
    raise ValueError(f'completion_logprobs: {rows} rows do not split into {groups} equal groups')
  keys = ('inputs', 'positions', 'segment_ids', 'targets')
  xs = {k: batch[k].reshape(groups, rows // groups, *batch[k].shape[1:]) for k in keys}
  graphdef, state = nnx.split(model)

  @jax.checkpoint
  def group(state, x):
    return completion_logprobs(nnx.merge(graphdef, state), x)

  _, logp = jax.lax.scan(lambda carry, x: (carry, group(state, x)), None, xs)
  return logp.reshape(rows, logp.shape[-1])


@functools.partial(jax.jit, static_argnums=0)
def _score_train_state(graphdef, state, batch):
  return completion_logprobs(train_loop.model_of(graphdef, state), batch)


@functools.partial(jax.jit, static_argnums=0)
def _score_model(graphdef, state, batch):
  return completion_logprobs(nnx.merge(graphdef, state), batch)


def score(graphdef, state, batch, *, train_state: bool, mesh, rules) -> np.ndarray:
  """[B, N] completion logprobs of `batch` (host rows) under a TrainState's or a model's weights."""
  rows = sharding.global_rows(batch, mesh, rules)
  fn = _score_train_state if train_state else _score_model
  return sharding.gather_rows(fn(graphdef, state, rows))


# ---------------------------------------------------------------------------------------------------
# Rollout.


@dataclasses.dataclass
class Rollout:
  prompts: list[Prompt]
  batch: dict[str, np.ndarray]  # build_batch rows (prompt-major, G per prompt)
  completion: np.ndarray  # [M*G, N]
  lengths: np.ndarray  # [M*G]
  entropies: np.ndarray  # [M*G, N] model entropies at temperature 1
  rewards: np.ndarray  # [M, G] sequence rewards
  token_rewards: np.ndarray | None  # [M*G, N] when the reward source gives them
  seconds: float
  token_mask: np.ndarray | None = None  # [M*G, N] bool: tokens carrying a reward (None: all)
  cache: kv_cache.KVCache | None = None  # the sampler's final cache (`rollout(return_cache=True)`)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How responses are sampled: the rl config's sampling keys plus the tokenizer's ids."""

  prompt_len: int
  max_new_tokens: int
  temperature: float
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0


def rollout(
  model: nnx.Module,
  prompts: Sequence[Prompt],
  key: jax.Array,
  *,
  sampling: Sampling,
  rewards: RewardSource,
  num_samples: int,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  temperature: sampler_lib.Temperature | None = None,
  sample_logprobs: bool = False,
  return_cache: bool = False,
) -> Rollout:
  """`num_samples` responses for each prompt (forked from one prefill) and their rewards.

  Each row's sampling key is the step key folded with the prompt's uid, so a prompt's responses do
  not depend on which other prompts share the batch, nor on how rows are split over devices.
  `temperature` overrides `sampling.temperature` (a float, or a per-position schedule the sampler
  takes: EAD's annealing); with `sample_logprobs` the batch also holds 'sample_logp', each token's
  log-probability under the distribution it was sampled from (the temperature used at its
  position), the behaviour policy mu_tau of truncated importance sampling. With `return_cache` the
  rollout keeps the sampler's final KV cache (device arrays, rows as the batch's; slot j holds
  input column j of `batch['inputs']`), from which OmniOPD forks candidates without a new prefill.
  """
  g = num_samples
  tokens, mask = pad_prompts(prompts, sampling.prompt_len, sampling.pad_id)
  config = sampler_lib.SamplingConfig(
    max_new_tokens=sampling.max_new_tokens,
    temperature=sampling.temperature if temperature is None else temperature,
    stop_tokens=tuple(sampling.stop_tokens),
    pad_id=sampling.pad_id,
  )
  uids = np.asarray([p.uid for p in prompts], np.int64) % (2**31)
  keys = jax.random.key_data(sampler_lib.row_keys(key, uids))
  keys = jax.random.wrap_key_data(sharding.global_rows(np.asarray(keys), mesh, rules))
  t0 = time.perf_counter()
  gen = sampler_lib.generate(
    model,
    sharding.global_rows(tokens, mesh, rules),
    sharding.global_rows(mask, mesh, rules),
    config=config,
    key=keys,
    num_samples=g,
    prompt_bucket=sampling.prompt_len,
    return_cache=return_cache,
  )
  completion, lengths, ent, logp = sharding.gather_rows(
    (gen.tokens, gen.lengths, gen.model_entropies, gen.logprobs)
  )
  sample_logp = sharding.gather_rows(gen.sample_logprobs) if sample_logprobs else None
  seconds = time.perf_counter() - t0
  rep_tokens, rep_mask = np.repeat(tokens, g, axis=0), np.repeat(mask, g, axis=0)
  batch = build_batch(rep_tokens, rep_mask, completion, lengths)
  # The behaviour policy's logprobs as sampled (model at temperature 1, whatever the sampling
  # temperature): on-policy they stand in for a separate scoring forward (see common.rl.loop).
  batch['behaviour_logp'] = np.where(batch['completion_mask'] > 0, logp, 0.0).astype(np.float32)
  if sample_logprobs:
    batch['sample_logp'] = np.where(batch['completion_mask'] > 0, sample_logp, 0.0).astype(
      np.float32
    )
  r = rewards.score(prompts, completion, lengths, g)
  return Rollout(
    list(prompts),
    batch,
    completion,
    lengths,
    ent,
    r.sequence,
    r.token,
    seconds,
    r.token_mask,
    gen.cache,
  )


def concat(parts: Sequence[Rollout], groups: Sequence[tuple[int, int]], g: int) -> Rollout:
  """Rollout of the chosen (part, group) pairs, in order."""
  rows = lambda gi: slice(gi * g, gi * g + g)  # noqa: E731
  pick = lambda f: np.concatenate([f(parts[pi])[rows(gi)] for pi, gi in groups])  # noqa: E731
  batch = {k: pick(lambda r, k=k: r.batch[k]) for k in parts[0].batch}
  return Rollout(
    prompts=[parts[pi].prompts[gi] for pi, gi in groups],
    batch=batch,
    completion=pick(lambda r: r.completion),
    lengths=pick(lambda r: r.lengths),
    entropies=pick(lambda r: r.entropies),
    rewards=np.stack([parts[pi].rewards[gi] for pi, gi in groups]),
    token_rewards=None if parts[0].token_rewards is None else pick(lambda r: r.token_rewards),
    seconds=sum(p.seconds for p in parts),
    token_mask=None if parts[0].token_mask is None else pick(lambda r: r.token_mask),
  )
