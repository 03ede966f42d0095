"""OmniOPD's models: the student policy (the shared RL policies) and the teachers.

The student is the shared decoder (common.rl.policies): at smoke scale the warmed-up tiny character
LM every RL paper here starts from, or a pretrained model (SmolLM2-135M-Instruct).

A teacher gives text only (`Teacher.continue_text(prompt, prefix) -> str | None`: its own
continuation of the prompt followed by the student's prefix); OmniOPD never sees its logits or its
tokenizer. Two teachers:
  * `ScriptedTeacher` (smoke): derived from the task's verifiable solution. For each prompt it holds
    a target answer, correct for a fraction `accuracy` of the prompts (by a hash of the prompt text)
    and off by a small amount otherwise, and continues any prefix with the target's characters
    after the prefix's length (what follows a wrong prefix is the rest of the target, a crude
    correction). It also has a white-box face for the white-box OPD baseline (`logprobs`: at each
    position, 1 - eps on the target's next character or EOS, eps spread over the vocabulary), so
    every arm is distilled from the same teacher.
  * `LMTeacher`: any decoder with its own tokenizer, greedy, behind text (the real setting:
    Qwen2.5-Coder-0.5B-Instruct for a SmolLM2 student; tokenizers differ, only strings pass).
  * `WhiteBoxLMTeacher`: an LMTeacher with the student's vocabulary (the student's model after an
    SFT warm-up on the task's worked answers, common.rl.policies.PretrainedWarmup), which also
    gives its next-token log-probabilities on the student's rollouts: the white-box OPD baseline's
    teacher at SmolLM2 scale, one forward per rollout batch.

The student's update (`forked_logprobs`) scores the audited chunks without re-reading their
prefixes: a candidate forked at (row b, token t) continues row b of the rollout, so its prefix's
keys and values are that row's. One forward over the rollout rows (which the anchor term needs
anyway) fills a KV cache; each candidate then runs only its L chunk tokens against its row's cache
with the slots from t on masked out. Gradients flow through the cache into the prefix, so the loss
and its gradient are the full-sequence ones (to float rounding) at a fraction of the work: at the
SmolLM2 config 96 candidate rows of ~200 positions became 8 rollout rows plus 96 rows of 8.

`TeacherClient` is what the training loop calls: it counts every call, and a call that raises, runs
past the timeout or returns nothing is counted (`teacher_timeouts`, `teacher_empty`,
`teacher_errors`) and answered None, so the audit is skipped and the run goes on.

Batching. A step's audits are independent requests, and a teacher served as a model answers them
faster together: an LM teacher decoding one request at a time reads all its weights for every
token of every request (Qwen2.5-Coder-0.5B on 2 CPU cores: ~2.4 s per 24-token continuation, 24
requests per step). A teacher may therefore also offer `continue_texts(requests) -> list`, which
`TeacherClient.ask_many` calls once for the whole list, within the per-request timeout times the
number of requests; a teacher without it is asked request by request, each within its own. The answers are the same text either way (greedy
decoding of left-padded rows; tested on a real decoder); only the failure accounting is coarser:
a batch that times out or raises counts every request in it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import concurrent.futures
import dataclasses
import functools
import hashlib
from typing import Any
from typing import Protocol

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import losses as common_losses
from common.rl.policies import WarmupConfig
from common.rl.policies import create_policy
from common.rl.policies import description
from common.rl.policies import warm_policy
from common.sampling import kv_cache
from common.sampling import sampler as sampler_lib

__all__ = [
  'LMTeacher',
  'ScriptedTeacher',
  'Teacher',
  'TeacherClient',
  'WarmupConfig',
  'WhiteBoxLMTeacher',
  'create_policy',
  'description',
  'fork_batch',
  'forked_logprobs',
  'warm_policy',
]


class Teacher(Protocol):
  def continue_text(self, prompt: str, prefix: str) -> str | None: ...


def _unit(text: str, salt: str) -> float:
  """A deterministic number in [0, 1) from a text (stable across processes and runs)."""
  h = hashlib.sha256(f'{salt}\x00{text}'.encode()).digest()
  return int.from_bytes(h[:8], 'big') / 2.0**64


class ScriptedTeacher:
  """A text teacher from the verifiable answers (see the module docstring).

  answers: {prompt text: correct answer text}; accuracy: the fraction of prompts whose target is
  the correct answer; eps: the white-box face's spread.
  """

  def __init__(self, answers: Mapping[str, str], accuracy: float = 0.9, eps: float = 0.1, seed=0):
    if not 0.0 <= accuracy <= 1.0:
      raise ValueError(f'teacher accuracy must be in [0, 1], got {accuracy}')
    self.answers = dict(answers)
    self.accuracy, self.eps, self.seed = float(accuracy), float(eps), int(seed)

  def target(self, prompt: str) -> str:
    """The teacher's full answer to `prompt` (the correct one for a fraction `accuracy`)."""
    if prompt not in self.answers:
      raise KeyError(f'the scripted teacher has no answer for prompt {prompt!r}')
    answer = self.answers[prompt]
    if _unit(prompt, f'ok{self.seed}') < self.accuracy:
      return answer
    try:
      delta = (1, -1, 10, -10)[int(_unit(prompt, f'delta{self.seed}') * 4)]
      return str(int(answer) + delta)
    except ValueError:
      return answer[::-1] if len(answer) > 1 else answer + answer

  def continue_text(self, prompt: str, prefix: str) -> str | None:
    return self.target(prompt)[len(prefix) :]

  def logprobs(self, prompt: str, prefix: str, token_id: Callable[[str], int], eos_id: int, vocab):
    """[vocab] log-probs of the next token after `prefix` (white-box face, same vocabulary)."""
    target = self.target(prompt)
    nxt = token_id(target[len(prefix)]) if len(prefix) < len(target) else eos_id
    p = np.full((vocab,), self.eps / vocab, np.float64)
    p[nxt] += 1.0 - self.eps
    return np.log(p).astype(np.float32)


class LMTeacher:
  """A decoder behind text: `render(prompt, prefix) -> its own token ids`, greedy decoding of up to
  `max_new_tokens`, `decode(ids) -> text`. Its tokenizer need not be the student's.

  Requests that share a prompt share their prefill (`share_prefixes`, the default): OmniOPD audits
  a rollout at several positions, so a step's requests come in groups of one prompt with nested
  prefixes. The longest request of each group is prefilled once; every request of the group then
  reads that cache up to the tokens it shares with it (at least all but its last token are fed
  again) and continues from there, as the student's forks continue the rollout's cache
  (`fork_cache`). The answers are each request's own greedy continuation (to float rounding: the
  shared keys and values come from another row's prefill)."""

  def __init__(
    self,
    model,
    render: Callable[[str, str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    batch_bucket: int = 8,
    share_prefixes: bool = True,
  ):
    self.model, self.render, self.decode = model, render, decode
    self.batch_bucket, self.share_prefixes = int(batch_bucket), bool(share_prefixes)
    self.config = sampler_lib.SamplingConfig(
      max_new_tokens=max_new_tokens,
      temperature=0.0,
      stop_tokens=tuple(stop_tokens),
      pad_id=pad_id,
    )

  def continue_text(self, prompt: str, prefix: str) -> str | None:
    return self.continue_texts([(prompt, prefix)])[0]

  def continue_texts(self, requests: Sequence[tuple[str, str]]) -> list[str | None]:
    """Greedy continuations of (prompt, prefix) requests, decoded together as one batch of
    left-padded rows; more than one request is padded to a multiple of `batch_bucket` rows
    (repeats of the last one) so that steps with different audit counts share compiled code."""
    if not requests:
      return []
    gen = self.generate(requests)
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    stop = set(self.config.stop_tokens)
    return [
      self.decode([int(t) for t in tokens[i, : lengths[i]] if int(t) not in stop])
      for i in range(len(requests))
    ]

  def generate(self, requests: Sequence[tuple[str, str]]) -> sampler_lib.Generation:
    """The greedy generation of the requests' rows (request order, then the bucket's padding)."""
    ids = [list(self.render(prompt, prefix)) for prompt, prefix in requests]
    hosts, host_of, shared = shared_prefixes(ids, [prompt for prompt, _ in requests])
    if self.share_prefixes and len(hosts) < len(ids):
      return self._continue_shared(ids, hosts, host_of, shared)
    return sampler_lib.generate(self.model, self._rows(ids), config=self.config)

  def _rows(self, rows: list) -> list:
    n = len(rows) if len(rows) == 1 else _round_up(len(rows), self.batch_bucket)
    return rows + [rows[-1]] * (n - len(rows))

  def _continue_shared(self, ids, hosts, host_of, shared) -> sampler_lib.Generation:
    """Every request continued from its host's prefilled cache."""
    host_ids = self._rows([ids[h] for h in hosts])
    host_len = _round_up(max(len(x) for x in host_ids), 16)
    toks, mask = sampler_lib.pad_prompts(
      host_ids, side='left', pad_id=self.config.pad_id, length=host_len
    )
    cache = _prefill_cache(self.model, toks, mask, host_len)
    rest = [ids[i][shared[i] :] for i in range(len(ids))]
    rest_len = _round_up(max(len(x) for x in rest), 8)
    rows = np.asarray(self._rows(list(range(len(ids)))))
    row_of = {h: r for r, h in enumerate(hosts)}
    host_row = np.asarray([row_of[host_of[i]] for i in rows], np.int32)
    start = host_len - np.asarray([len(ids[host_of[i]]) for i in rows])  # left padding
    cut = (start + np.asarray([shared[i] for i in rows])).astype(np.int32)
    position = np.asarray([shared[i] for i in rows], np.int32)
    n = self.config.max_new_tokens
    forked = fork_cache(cache, host_row, cut, position, extra=rest_len + n)
    rtoks, rmask = sampler_lib.pad_prompts(
      [rest[i] for i in rows], side='left', pad_id=self.config.pad_id, length=rest_len
    )
    return sampler_lib.generate(
      self.model, rtoks, rmask, config=self.config, cache=forked, prompt_bucket=rest_len
    )


def shared_prefixes(
  ids: Sequence[Sequence[int]], prompts: Sequence[str]
) -> tuple[list[int], list[int], list[int]]:
  """(hosts, host_of, shared) for requests' token ids grouped by prompt: the longest request of
  each prompt hosts the group (hosts: their indices in order of first appearance); request i reads
  its host's first shared[i] tokens (their common prefix, less one so that at least one token of
  the request is fed again: its last, whose output starts the continuation)."""
  longest: dict[str, int] = {}
  for i, prompt in enumerate(prompts):
    j = longest.get(prompt)
    if j is None or len(ids[i]) > len(ids[j]):
      longest[prompt] = i
  hosts = list(dict.fromkeys(longest[prompt] for prompt in prompts))
  host_of, shared = [], []
  for i, prompt in enumerate(prompts):
    h = longest[prompt]
    common = 0
    for a, b in zip(ids[i], ids[h], strict=False):
      if a != b:
        break
      common += 1
    host_of.append(h)
    shared.append(min(common, len(ids[i]) - 1))
  return hosts, host_of, shared


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(nnx.jit, static_argnames=('cache_len',))
def _prefill_cache(model, tokens, mask, cache_len: int) -> kv_cache.KVCache:
  """The KV cache of left-padded rows (padding written unreadable), no logits."""
  cache = kv_cache.KVCache.init(model.cfg, tokens.shape[0], cache_len)
  _, cache = model.hidden_states(tokens, cache=cache, input_mask=mask)
  return cache


@nnx.jit
def _completion_logprobs(model, inputs, positions, segment_ids, targets):
  """log softmax of the model's next-token logits at the last targets.shape[1] positions (the
  completion's, as the OPD loss reads the student's), float32 [B, n, V]."""
  h = model.hidden_states(inputs, positions=positions, segment_ids=segment_ids)
  logits = model.logits_from_hidden(h[:, -targets.shape[1] :])
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


class WhiteBoxLMTeacher(LMTeacher):
  """An LMTeacher that shares the student's tokenizer, so it also has a white-box face."""

  def rollout_logprobs(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """[B, n, V] next-token log-probabilities on a rollout batch (inputs, positions, segment_ids,
    targets of completion length n), from one forward of the teacher."""
    out = _completion_logprobs(
      self.model, batch['inputs'], batch['positions'], batch['segment_ids'], batch['targets']
    )
    return np.asarray(out)


class TeacherClient:
  """Calls a teacher with a timeout and counts (see the module docstring); state is JSON."""

  def __init__(self, teacher: Teacher, timeout_s: float):
    self.teacher, self.timeout_s = teacher, float(timeout_s)
    self.calls = self.timeouts = self.empty = self.errors = 0

  def ask(self, prompt: str, prefix: str) -> str | None:
    return self._call(self.teacher.continue_text, prompt, prefix)

  def ask_many(self, requests: Sequence[tuple[str, str]]) -> list[str | None]:
    """Answers to every (prompt, prefix), None where skipped: one call when the teacher batches
    (`continue_texts`), bounded by the per-request timeout times the number of requests (a batch
    of n is n requests' worth of work; a fixed bound would skip a whole step's audits whenever the
    batch grew), else one bounded call per request."""
    batched = getattr(self.teacher, 'continue_texts', None)
    if batched is None or not requests:
      return [self.ask(prompt, prefix) for prompt, prefix in requests]
    return self._call(batched, list(requests), n=len(requests))

  def _call(self, fn, *args, n: int | None = None):
    """fn(*args) within the timeout (n times it for `n` requests in one batched call, a list
    answer), or one request."""
    count = 1 if n is None else n
    self.calls += count
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
      out = pool.submit(fn, *args).result(self.timeout_s * count)
      if n is not None and (not isinstance(out, list) or len(out) != n):
        raise ValueError(f'a batched teacher answered {n} requests with {out!r:.80}')
    except concurrent.futures.TimeoutError:
      self.timeouts += count
      return None if n is None else [None] * n
    except Exception:  # noqa: BLE001  (a failing teacher never stops the run)
      self.errors += count
      return None if n is None else [None] * n
    finally:
      pool.shutdown(wait=False)
    texts = [out] if n is None else list(out)
    for i, text in enumerate(texts):
      if not isinstance(text, str) or not text:
        self.empty += 1
        texts[i] = None
    return texts[0] if n is None else texts

  @property
  def failures(self) -> int:
    return self.timeouts + self.empty + self.errors

  def state_dict(self) -> dict[str, Any]:
    return {
      'teacher_calls': self.calls,
      'teacher_timeouts': self.timeouts,
      'teacher_empty': self.empty,
      'teacher_errors': self.errors,
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    self.calls = int(state.get('teacher_calls', 0))
    self.timeouts = int(state.get('teacher_timeouts', 0))
    self.empty = int(state.get('teacher_empty', 0))
    self.errors = int(state.get('teacher_errors', 0))

  def metrics(self) -> dict[str, float]:
    return {**self.state_dict(), 'teacher_failures': self.failures}


# ---------------------------------------------------------------------------------------------------
# The student's log-probabilities of its forked chunks, through the rollout's KV cache.


def fork_points(
  roll: Mapping[str, np.ndarray], pairs: Sequence[tuple[int, int]], prompt_len: int, slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Where each of `slots` fork slots continues the rollout whose training view is `roll`
  (`rollout.build_batch` rows, prompts left-padded to `prompt_len`): (row, cut, token, position),
  each [slots].

  A fork at (row b, completion index t) continues row b after its prompt and first t completion
  tokens. `cut` = prompt_len + t - 1 is the input column (and the rollout cache's slot) of that
  prefix's last token: a fork reads the row's cache before `cut` and feeds `token` (the prefix's
  last token) again at its own `position`, so that its output predicts the fork's first token.
  Slots past the pairs fork row 0 after its prompt (unused: for the caller to mask).
  """
  if len(pairs) > slots:
    raise ValueError(f'fork_points: {len(pairs)} forks for {slots} slots')
  rows, cut = np.zeros(slots, np.int32), np.full(slots, prompt_len - 1, np.int32)
  for i, (b, t) in enumerate(pairs):
    rows[i], cut[i] = b, prompt_len + t - 1
  token = np.asarray(roll['inputs'])[rows, cut].astype(np.int32)
  position = np.asarray(roll['positions'])[rows, cut].astype(np.int32)
  return rows, cut, token, position


@functools.partial(jax.jit, static_argnames=('extra',))
def fork_cache(
  cache: kv_cache.KVCache, rows: jax.Array, cut: jax.Array, position: jax.Array, extra: int
) -> kv_cache.KVCache:
  """The rollout cache's `rows` (one per fork), unreadable from slot `cut` on, with `extra` free
  slots after the last and each row's next token at `position`: what `sampler.generate(cache=)`
  continues from when it is fed the prefix's last token (`fork_points`). No prefix is prefilled
  again: the keys and values before the cut are the rollout's own."""
  forked = cache.take_rows(rows)
  forked = forked.evict(jnp.arange(forked.max_len)[None, :] >= cut[:, None]).grow(extra)
  return dataclasses.replace(forked, next_position=jnp.asarray(position, jnp.int32))


def fork_batch(
  roll: Mapping[str, np.ndarray],
  pairs: Sequence[tuple[int, int]],
  prompt_len: int,
  candidates: np.ndarray,
  lengths: np.ndarray,
  num_candidates: int,
) -> dict[str, np.ndarray]:
  """Host rows of the chunks forked at `pairs` [(row b, completion index t)] of a rollout whose
  training view is `roll` (`rollout.build_batch` rows, prompts left-padded to `prompt_len`), for
  `forked_logprobs`. candidates [S*K, L] (lengths [S*K]) holds K = num_candidates chunks per fork
  slot, S >= len(pairs); slots past the pairs (unused fork slots) point at row 0 and are for the
  caller to mask.

  A chunk's inputs are its prefix's last token then its own first L-1 tokens, at the positions that
  continue row b (`fork_points`); `rows` names the rollout row whose cache it reads and `cut` the
  first cache slot it may not read (slot j holds input column j: the prefix's last token,
  recomputed with the chunk, and everything after it).
  """
  slots, chunk = len(candidates) // num_candidates, candidates.shape[1]
  rows, cut, first, start = (
    np.repeat(x, num_candidates) for x in fork_points(roll, pairs, prompt_len, slots)
  )
  return {
    'rows': rows,
    'cut': cut,
    'inputs': np.concatenate([first[:, None], candidates[:, :-1]], axis=1).astype(np.int32),
    'positions': (start[:, None] + np.arange(chunk)[None, :]).astype(np.int32),
    'targets': candidates.astype(np.int32),
    'completion_mask': (np.arange(chunk)[None, :] < lengths[:, None]).astype(np.float32),
  }


def forked_logprobs(model, roll: Mapping[str, jax.Array], forks: Mapping[str, jax.Array]):
  """(log pi of the rollout's completion tokens [R, N], of the forked chunks' tokens [C, L]).

  One forward over the rollout rows fills a KV cache (slot j = input column j; padding written
  invalid); each chunk reads its row's cache (`forks['rows']`) up to slot `forks['cut']` and runs
  its L inputs after it. Equal, to float rounding, to `rollout.completion_logprobs` over the rollout
  and over the full prefix + chunk rows (`rollout.build_batch`), gradient included: the cached keys
  and values are differentiated through.
  """
  n = roll['targets'].shape[1]
  r, s = roll['inputs'].shape
  chunk = forks['inputs'].shape[1]
  cache = kv_cache.KVCache.init(model.cfg, r, s + chunk)
  h, cache = model.hidden_states(
    roll['inputs'], positions=roll['positions'], cache=cache, input_mask=roll['segment_ids'] > 0
  )
  roll_logp = common_losses.token_logprobs(model.logits_from_hidden(h[:, -n:]), roll['targets'])
  late = jnp.arange(cache.max_len)[None, :] >= forks['cut'][:, None]
  forked = cache.take_rows(forks['rows']).evict(late)
  hc, _ = model.hidden_states(forks['inputs'], positions=forks['positions'], cache=forked)
  fork_logp = common_losses.token_logprobs(model.logits_from_hidden(hc), forks['targets'])
  return roll_logp, fork_logp
