"""Q-RM's data: RL prompts from the shared reasoning-gym task sets (common.rl.tasks) and the
preference pairs the token-level reward models learn from.

No human-preference data ships offline, so every pair comes from verifiable math (the paper trains
on human/GPT-labelled pairs; a deviation the README states). For a training prompt x:
  * corrupted pairs: chosen = a correct trace (the reference answer rendered as the policy answers,
    '-2<EOS>' for the tiny character policy, the worked answer '5 - 7 = -2. The answer is -2.' of
    common.rl.tasks.worked_answer, which the SFT-warmed chat policy writes), rejected = the
    same trace with ONE digit replaced by another digit at a known position (the corrupted step);
  * policy pairs: rejected = a real wrong sample of the starting policy (temperature 1), chosen = a
    correct sample of the same prompt when the policy has one, else the reference trace; its
    "error step" is the first position where the two differ.
Every pair records `error_pos`, the response position of its first error, which the credit
localisation metric (projects/qrm/evaluate.py) compares with where the reward model puts its
lowest token reward. Pairs are a fixed, seeded set (the same for every run of a config and seed),
laid out by `common.preference.scoring` (prompts left-padded, responses right-padded) and served
by a checkpointable `common.data.batch_iterator`, so a resumed reward-model run replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from common import config as config_lib
from common import data as data_lib
from common import sharding
from common import train_loop
from common.preference import scoring
from common.rl import rollout
from common.rl.tasks import CharTokenizer
from common.rl.tasks import expression_prompt
from common.rl.tasks import load_examples
from common.rl.tasks import make_verifier
from common.rl.tasks import policy_text
from common.rl.tasks import prompts
from common.rl.tasks import worked_answer

__all__ = [
  'CharTokenizer',
  'Pairs',
  'Text',
  'check_config',
  'corrupt',
  'expression_prompt',
  'first_difference',
  'load_examples',
  'make_pairs',
  'make_text',
  'make_verifier',
  'pair_iterator',
  'prompts',
]

SOURCES = ('corrupted', 'policy')


@dataclasses.dataclass
class Text:
  """How prompts and answers become tokens for config.model.kind, with the verifier's decoder."""

  tok: Any
  render: Any  # example -> prompt token ids
  answer: Any  # example -> the reference trace's token ids (ending in a stop token)
  stop: tuple[int, ...]
  pad: int
  digit_ids: tuple[int, ...]  # the ids of '0'..'9' (each one token)


def make_text(config: ml_collections.ConfigDict) -> Text:
  """The shared policy text of config.model (common.rl.tasks.policy_text), with the reference
  answers ('tiny': the bare number; 'pretrained': the worked answer, ending its chat turn) and
  the digit tokens that corrupted traces swap."""
  base = policy_text(config.model)
  tok = base.tok
  digits = [tok.encode(str(d), add_bos=False) for d in range(10)]
  if config.model.kind == 'tiny':
    answer = lambda ex: tok.encode(ex['answer'], add_bos=False, add_eos=True)  # noqa: E731
  else:
    if any(len(d) != 1 for d in digits):
      raise config_lib.ConfigError(f'{config.model.name}: digits are not single tokens')
    end = tok.end_of_turn_id()  # as the warmed policy's own replies end
    answer = lambda ex: [*tok.encode(worked_answer(ex), add_bos=False), end]  # noqa: E731
  return Text(tok, base.render, answer, base.stop, base.pad, tuple(d[0] for d in digits))


def corrupt(trace: Sequence[int], digit_ids: Sequence[int], rng: np.random.Generator):
  """(the trace with one digit token replaced by a different digit, its position), or None when
  the trace has no digit. The position is uniform over the trace's digit tokens."""
  trace = list(trace)
  digits = list(digit_ids)
  where = [i for i, t in enumerate(trace) if t in digits]
  if not where:
    return None
  pos = int(where[rng.integers(len(where))])
  others = [d for d in digits if d != trace[pos]]
  trace[pos] = int(others[rng.integers(len(others))])
  return trace, pos


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
  """The first position where two token lists differ (the shorter one's length if one is a prefix)."""
  for i, (x, y) in enumerate(zip(a, b, strict=False)):
    if x != y:
      return i
  return min(len(a), len(b))


@dataclasses.dataclass
class Pairs:
  """A fixed set of K preference pairs: `scoring.pad_pairs` arrays (PAIR_KEYS) plus error_pos [K]
  (the first error's response position) and source [K] (0 corrupted, 1 policy sample)."""

  arrays: dict[str, np.ndarray]

  def __len__(self) -> int:
    return int(self.arrays['chosen'].shape[0])

  @property
  def rows(self) -> dict[str, np.ndarray]:
    """The model inputs [2K, ...]: chosen rows [0, K), rejected rows [K, 2K) (scoring.pair_batch)."""
    return scoring.pair_batch({k: self.arrays[k] for k in scoring.PAIR_KEYS})


def _policy_samples(model, prompt_list, text: Text, config, mesh, rules, seed: int):
  """{uid: (correct samples, wrong samples)} from config.pairs.policy_samples samples per prompt
  at temperature 1 (key step_key(seed, 0, 'qrm/policy_pairs'): the same samples for every run of a
  seed)."""
  p = config.pairs
  sampling = rollout.Sampling(
    prompt_len=config.rl.prompt_len,
    max_new_tokens=config.rl.max_new_tokens,
    temperature=1.0,
    stop_tokens=text.stop,
    pad_id=text.pad,
  )
  verifier = rollout.VerifierRewards(make_verifier(text.tok.decode))
  out: dict[int, tuple[list, list]] = {}
  chunk = max(1, int(p.sample_batch))
  for start in range(0, len(prompt_list), chunk):
    part = list(prompt_list[start : start + chunk])
    real = len(part)
    part = part + [part[-1]] * (chunk - real)  # one compiled shape
    ro = rollout.rollout(
      model,
      part,
      train_loop.step_key(seed, 0, 'qrm/policy_pairs'),
      sampling=sampling,
      rewards=verifier,
      num_samples=p.policy_samples,
      mesh=mesh,
      rules=rules,
    )
    g = p.policy_samples
    for i, pr in enumerate(part[:real]):
      good, bad = out.setdefault(pr.uid, ([], []))
      for j in range(g):
        row = i * g + j
        n = int(ro.lengths[row])
        toks = [int(t) for t in ro.completion[row, :n]]
        if n == 0:
          continue
        (good if ro.rewards[i, j] >= 1.0 else bad).append(toks)
  return out


def make_pairs(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  text: Text,
  policy=None,
  mesh=None,
  rules=None,
) -> Pairs:
  """The split's pairs: config.pairs.corrupted corrupted pairs from the first examples, then the
  starting policy's wrong samples on the first config.pairs.policy_prompts prompts (when `policy`
  is given and that count is > 0). Deterministic in (config.data, config.pairs, config.seed)."""
  p, d = config.pairs, config.data
  examples = load_examples(d.task_set, split, d.seed)
  rng = np.random.default_rng([config.seed, 0 if split == 'train' else 1, 17])
  prompt_rows, chosen, rejected, error_pos, source = [], [], [], [], []
  n_corrupt = p.corrupted if split == 'train' else p.eval_corrupted
  for ex in examples[:n_corrupt]:
    trace = text.answer(ex)
    c = corrupt(trace, text.digit_ids, rng)
    if c is None:
      continue
    prompt_rows.append(text.render(ex))
    chosen.append(trace)
    rejected.append(c[0])
    error_pos.append(c[1])
    source.append(0)
  n_policy = p.policy_prompts if split == 'train' else p.eval_policy_prompts
  if policy is not None and n_policy > 0:
    ps = prompts(examples[:n_policy], split, text.render)
    samples = _policy_samples(policy, ps, text, config, mesh, rules, config.seed)
    for pr in ps:
      good, bad = samples[pr.uid]
      ref = text.answer(pr.payload)
      for k, wrong in enumerate(bad[: p.wrong_per_prompt]):
        right = good[k % len(good)] if good else ref
        prompt_rows.append(list(pr.tokens))
        chosen.append(right)
        rejected.append(wrong)
        error_pos.append(first_difference(right, wrong))
        source.append(1)
  n = config.rl.max_new_tokens
  keep = [i for i in range(len(chosen)) if len(chosen[i]) <= n and len(rejected[i]) <= n]
  if not keep:
    raise config_lib.ConfigError(f'no {split} pair fits rl.max_new_tokens={n}')
  arrays = scoring.pad_pairs(
    [prompt_rows[i] for i in keep],
    [chosen[i] for i in keep],
    [rejected[i] for i in keep],
    prompt_len=config.rl.prompt_len,
    response_len=n,
    pad_id=text.pad,
  )
  arrays['error_pos'] = np.asarray([error_pos[i] for i in keep], np.int32)
  arrays['source'] = np.asarray([source[i] for i in keep], np.int32)
  return Pairs(arrays)


class _PairSource:
  """Random access to pair i as model rows [2, ...] (chosen, rejected) and reference logps."""

  def __init__(self, rows: dict[str, np.ndarray], k: int):
    self.rows, self.k = rows, k

  def __len__(self) -> int:
    return self.k

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    return {key: np.stack([v[i], v[self.k + i]]) for key, v in self.rows.items()}


def pair_iterator(config, pairs: Pairs, ref_logp: np.ndarray | None):
  """A checkpointable iterator of global batches [B, 2, ...] of pairs (shuffled per epoch with the
  run's seed); `ref_logp` [2K, N] the frozen reference's token log-probs (DPO) or None."""
  rows = dict(pairs.rows)
  rows['ref_logp'] = (
    np.zeros_like(rows['completion_mask']) if ref_logp is None else np.asarray(ref_logp, np.float32)
  )
  return data_lib.batch_iterator(
    _PairSource(rows, len(pairs)), global_batch_size=config.rm.batch_size, shuffle_seed=config.seed
  )


def check_config(config: ml_collections.ConfigDict, mesh=None, rules=None) -> None:
  """The data and pair keys (before anything is written)."""
  p = config.pairs
  for name in ('corrupted', 'policy_prompts', 'eval_corrupted', 'eval_policy_prompts'):
    if p[name] < 0:
      raise config_lib.ConfigError(f'pairs.{name}={p[name]} must be >= 0')
  if p.policy_samples < 1 or p.wrong_per_prompt < 1 or p.sample_batch < 1:
    raise config_lib.ConfigError(
      'pairs.policy_samples, pairs.wrong_per_prompt and pairs.sample_batch must be >= 1'
    )
  if p.corrupted + p.policy_prompts < 1:
    raise config_lib.ConfigError('pairs.corrupted + pairs.policy_prompts must be >= 1')
  if mesh is not None and config.rm.batch_size % sharding.batch_divisor(mesh, rules):
    raise config_lib.ConfigError(
      f'rm.batch_size={config.rm.batch_size} is not divisible by the '
      f'{sharding.batch_divisor(mesh, rules)} ways the mesh splits a batch'
    )
