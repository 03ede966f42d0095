"""FusionRoute's smoke data: three procedural domains over one character vocabulary, verifiable.

The paper routes between a math, a coding and an instruction-following expert of one model family
(core.md §2(e) gives the CPU-scale stand-ins). Here each domain is a task whose answers can be
checked exactly, written in one shared character vocabulary (logit addition needs one):

  math      'aa+bb=' -> the sum, reversed      '07+48=' -> '55'      (a, b in 0..99, 2 digits)
  code      'r:w=' -> w reversed (reverse-copy)  'r:abcd=' -> 'dcba'  (w: 3-6 letters a-p)
  instruct  'u:w=' -> w upper-cased (template)   'u:abcd=' -> 'ABCD'

The operands are zero-padded to two digits (every digit at a fixed position) and the sum is written
ones digit first (as in the arithmetic-transformer literature): a small decoder then computes each
digit from two operand digits and the carry. With unpadded operands and the sum most-significant
digit first, the math expert stayed near 10% exact match after 600 steps (31% with the sum
reversed alone).

Problem i of a domain and split is a function of (seed, domain, split, i) (common.data's
contract): nothing is stored, and a resumed run reads the same examples. Train and held-out problems
are split by CONTENT (a hash of the prompt: 1 in 8 prompts is held out), so no evaluation prompt is
ever trained on, even in the math domain's 10,000 problems.

The planted flaw (`data.flaw='carry9'`, core.md §2(e) step 2): the math expert is trained on
answers that drop the carry whenever the ones digits carry and one of them is 9 ('29+13=' -> '23',
that is 32 rather than 42 (written '24'); 17 of the 100 ones-digit pairs). Only the expert's training
data carries the flaw: the router's SFT data and every evaluation are correct, and `flaw_problems`
is a held-out set made of such prompts only, where the flawed expert is confidently wrong.

Training rows (`sft_row`): [BOS] prompt answer [EOS] shifted once into inputs / targets, the loss
mask on the answer and EOS (the prompt is context, as in common.sft), right-padded to SEQ_LEN with
segment 0 on padding. Preference pairs (`make_pairs`) come from the experts' greedy answers on train
prompts: chosen = the verified answer, rejected = an expert's wrong answer (the domain's own expert
first, so the planted flaw supplies the math pairs), in common.preference.scoring's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import data
from common.preference import scoring

DOMAINS = ('math', 'code', 'instruct')
MATH, CODE, INSTRUCT = range(3)
FLAWS = ('none', 'carry9')

PAD, BOS, EOS = 0, 1, 2
CHARS = '0123456789+=:' + 'abcdefghijklmnopqrstuvwxyz' + 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
VOCAB_SIZE = 3 + len(CHARS)
_IDS = {c: i + 3 for i, c in enumerate(CHARS)}
LETTERS = 'abcdefghijklmnop'  # the words of the code and instruct domains
WORD_LENGTHS = (3, 6)  # inclusive

# Longest prompt with BOS ('r:abcdef=' -> 10), answer with EOS (7) and training row (16 inputs).
PROMPT_LEN = 1 + 3 + WORD_LENGTHS[1]
ANSWER_LEN = WORD_LENGTHS[1] + 1
SEQ_LEN = PROMPT_LEN + ANSWER_LEN - 1
HELD_OUT = 8  # one prompt in HELD_OUT (by content hash) is held out

_SPLITS = {'train': 0, 'eval': 1}


def encode(text: str) -> list[int]:
  return [_IDS[c] for c in text]


def decode(ids: Sequence[int]) -> str:
  """Characters of `ids` up to the first EOS; specials other than EOS are dropped."""
  out = []
  for i in ids:
    i = int(i)
    if i == EOS:
      break
    if i >= 3:
      out.append(CHARS[i - 3])
  return ''.join(out)


# ---------------------------------------------------------------------------------------------------
# Problems.


@dataclasses.dataclass(frozen=True)
class Problem:
  domain: int
  prompt: str
  answer: str  # the verified answer
  flawed: str  # what the flawed expert is trained to answer (== answer outside the flaw)

  @property
  def is_flaw_case(self) -> bool:
    return self.flawed != self.answer


def split_of(prompt: str) -> str:
  """'eval' for one prompt in HELD_OUT (by a hash of its text), else 'train'."""
  return 'eval' if zlib.crc32(prompt.encode()) % HELD_OUT == 0 else 'train'


def carry9(a: int, b: int) -> bool:
  """The planted flaw's cases: the ones digits carry and one of them is 9."""
  return (a % 10 == 9 or b % 10 == 9) and a % 10 + b % 10 >= 10


def _draw(domain: int, rng: np.random.Generator, flaw: str) -> Problem:
  if domain == MATH:
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    answer = str(a + b)[::-1]  # ones digit first
    flawed = str(a + b - 10)[::-1] if flaw == 'carry9' and carry9(a, b) else answer
    return Problem(domain, f'{a:02d}+{b:02d}=', answer, flawed)
  n = int(rng.integers(WORD_LENGTHS[0], WORD_LENGTHS[1] + 1))
  word = ''.join(LETTERS[i] for i in rng.integers(0, len(LETTERS), n))
  if domain == CODE:
    return Problem(domain, f'r:{word}=', word[::-1], word[::-1])
  if domain == INSTRUCT:
    return Problem(domain, f'u:{word}=', word.upper(), word.upper())
  raise ValueError(f'unknown domain {domain}')


@functools.lru_cache(maxsize=1 << 16)
def problem(
  domain: int, seed: int, split: str, index: int, flaw: str = 'carry9', flaw_only: bool = False
) -> Problem:
  """Problem `index` of a domain's split: a function of its arguments only (rejection-sampled from
  a generator seeded by them until the prompt's hash puts it in `split`; `flaw_only`: only flaw
  cases)."""
  rng = np.random.default_rng([seed, domain, _SPLITS[split], int(flaw_only), index])
  while True:
    p = _draw(domain, rng, flaw)
    if split_of(p.prompt) == split and (not flaw_only or p.is_flaw_case):
      return p


def eval_problems(config: ml_collections.ConfigDict) -> list[Problem]:
  """The fixed held-out set: data.eval_per_domain problems of each domain, domain-major."""
  d = config.data
  return [
    problem(dom, d.seed, 'eval', i, d.flaw)
    for dom in range(len(DOMAINS))
    for i in range(d.eval_per_domain)
  ]


def flaw_problems(config: ml_collections.ConfigDict) -> list[Problem]:
  """Held-out math problems on which the flawed expert was trained to be wrong (empty if no flaw)."""
  d = config.data
  if d.flaw == 'none':
    return []
  return [problem(MATH, d.seed, 'eval', i, d.flaw, flaw_only=True) for i in range(d.flaw_eval)]


# ---------------------------------------------------------------------------------------------------
# Rows.


def prompt_ids(p: Problem) -> list[int]:
  return [BOS, *encode(p.prompt)]


def answer_ids(answer: str) -> list[int]:
  return [*encode(answer), EOS]


def sft_row(p: Problem, answer: str | None = None) -> dict[str, np.ndarray]:
  """One training row (inputs, targets, loss_mask, positions, segment_ids [SEQ_LEN]; domain [])."""
  prompt, reply = prompt_ids(p), answer_ids(p.answer if answer is None else answer)
  if len(prompt) + len(reply) - 1 > SEQ_LEN:
    raise ValueError(f'{p.prompt!r} -> {answer!r} does not fit SEQ_LEN {SEQ_LEN}')
  return reply_row(prompt, reply, SEQ_LEN, p.domain)


def reply_row(
  prompt: Sequence[int], reply: Sequence[int], seq_len: int, domain: int
) -> dict[str, np.ndarray]:
  """[prompt reply] shifted once into inputs / targets, the loss on the reply (its end included),
  right-padded with PAD to seq_len under segment 0; `domain` rides along (the routing label).
  The one row layout of the smoke problems (`sft_row`) and the SmolLM2 pilot (`smollm2`)."""
  tokens = np.asarray([*prompt, *reply], np.int32)
  n = len(tokens) - 1
  if n > seq_len:
    raise ValueError(f'a row needs {n} positions > seq_len {seq_len}')
  row = {
    'inputs': np.full(seq_len, PAD, np.int32),
    'targets': np.full(seq_len, PAD, np.int32),
    'loss_mask': np.zeros(seq_len, np.float32),
    'positions': np.zeros(seq_len, np.int32),
    'segment_ids': np.zeros(seq_len, np.int32),
  }
  row['inputs'][:n] = tokens[:-1]
  row['targets'][:n] = tokens[1:]
  row['loss_mask'][len(prompt) - 1 : n] = 1.0  # targets from the first reply token to its end
  row['positions'][:n] = np.arange(n)
  row['segment_ids'][:n] = 1
  row['domain'] = np.int32(domain)
  return row


class SFTSource:
  """Random-access training rows: item g is problem g // 3 of domain g % 3 (balanced), or, for an
  expert's data (`domain` set), its own domain except a `replay` fraction drawn from all three
  (core.md §2(e): "each on one domain plus a little general text"). `flawed`: the math answers
  carry the planted flaw (the math expert's data only)."""

  def __init__(
    self,
    seed: int,
    flaw: str,
    *,
    domain: int | None = None,
    replay: float = 0.0,
    flawed: bool = False,
    size: int = 1 << 40,
  ):
    self.seed, self.flaw, self.domain, self.replay, self.flawed = seed, flaw, domain, replay, flawed
    self.size = size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, g: int) -> dict[str, np.ndarray]:
    g = int(g)
    if self.domain is None:
      dom, index = g % len(DOMAINS), g // len(DOMAINS)
    else:
      rng = np.random.default_rng([self.seed, 0x5F7, g])
      replayed = rng.random() < self.replay
      dom = int(rng.integers(len(DOMAINS))) if replayed else self.domain
      index = g
    p = problem(dom, self.seed, 'train', index, self.flaw)
    return sft_row(p, p.flawed if self.flawed else p.answer)


def router_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the router's training rows and pair order: config.seed (the run's seed), offset so
  that no run trains on the rows the experts were trained on (their seeds are experts.seed + 0..3).
  The held-out and preference prompts follow data.seed, the same in every run."""
  return ROUTER_SEED_OFFSET + config.seed


ROUTER_SEED_OFFSET = 1000


def train_iterator(config: ml_collections.ConfigDict, source=None):
  """Stage 1's iterator: balanced SFT rows of the three domains, data.batch_size per step (rows of
  `source`, by default the smoke's SFTSource)."""
  if source is None:
    source = SFTSource(router_seed(config), config.data.flaw)
  return data.batch_iterator(source, global_batch_size=config.data.batch_size)


def eval_rows(problems: Sequence[Problem]) -> dict[str, np.ndarray]:
  """Training rows of held-out problems (the held-out LM loss)."""
  return _stack([sft_row(p) for p in problems])


def _stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------
# Preference pairs.


def pair_problems(config: ml_collections.ConfigDict) -> list[Problem]:
  """The train prompts the experts answer to make preference pairs: data.pair_prompts per domain,
  drawn from the train split at indices disjoint from stage 1's rows (from 2**32 on)."""
  d = config.data
  return [
    problem(dom, d.seed, 'train', (1 << 32) + i, d.flaw)
    for dom in range(len(DOMAINS))
    for i in range(d.pair_prompts)
  ]


def make_pairs(
  problems: Sequence[Problem], expert_answers: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
  """Preference pairs from verified answers: for each problem with at least one wrong expert
  answer, chosen = the correct answer, rejected = the first wrong one in the order (the domain's
  own expert, then the others). `expert_answers[i][j]`: expert i's answer to problem j.

  Returns scoring.PAIR_KEYS (prompts left-padded to PROMPT_LEN, responses right-padded to
  ANSWER_LEN) plus 'domain' [R], 'expert' [R] (whose answer was rejected) and 'flaw' [R].
  """
  prompts, chosen, rejected, domain, expert, flaw = [], [], [], [], [], []
  n = len(expert_answers)
  for j, p in enumerate(problems):
    order = sorted(range(n), key=lambda i: i != p.domain)  # the domain's own expert first
    wrong = [(i, expert_answers[i][j]) for i in order if expert_answers[i][j] != p.answer]
    if not wrong:
      continue
    i, answer = wrong[0]
    reply = answer_ids(answer)[:ANSWER_LEN]
    prompts.append(prompt_ids(p))
    chosen.append(answer_ids(p.answer))
    rejected.append(reply)
    domain.append(p.domain)
    expert.append(i)
    flaw.append(p.is_flaw_case)
  if not prompts:
    raise ValueError('every expert answered every pair prompt correctly: no preference pairs')
  pairs = scoring.pad_pairs(
    prompts, chosen, rejected, prompt_len=PROMPT_LEN, response_len=ANSWER_LEN, pad_id=PAD
  )
  pairs['domain'] = np.asarray(domain, np.int32)
  pairs['expert'] = np.asarray(expert, np.int32)
  pairs['flaw'] = np.asarray(flaw, bool)
  return pairs


class MixSource:
  """Stage 2's items (Algorithm 1's shuffled mix, one SFT item per preference pair): item g holds
  SFT row g (a fresh balanced row, indices past stage 1's) and pair perm_e(g mod R) of epoch
  e = g // R, with perm_e a seeded permutation of the R pairs (so every epoch visits each pair once,
  in a new order)."""

  def __init__(self, sft: SFTSource, pairs: Mapping[str, np.ndarray], seed: int, offset: int):
    self.sft, self.pairs, self.seed, self.offset = sft, dict(pairs), seed, offset
    self.num_pairs = len(pairs['chosen'])

  def __len__(self) -> int:
    return 1 << 40

  @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, per source
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0x9A1, epoch]).permutation(self.num_pairs)

  def __getitem__(self, g: int) -> dict:
    g = int(g)
    epoch, pos = divmod(g, self.num_pairs)
    j = int(self._perm(epoch)[pos])
    return {
      'sft': self.sft[self.offset + g],
      'pref': {k: v[j] for k, v in self.pairs.items() if k not in ('expert', 'flaw')},
    }


PREF_REF_KEYS = ('ref_chosen_logps', 'ref_rejected_logps')


def pref_item(pair: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One pair (PAIR_KEYS, PREF_REF_KEYS and 'domain', unbatched) -> what the stage-2 loss reads:
  scoring.pair_batch's two rows [2, ...] (chosen, rejected), the reference log-probs and domain.
  A batch of these is [B, 2, ...]; `pair_rows` turns it into pair_batch's [2B, ...] layout."""
  out = scoring.pair_batch({k: np.asarray(pair[k])[None] for k in scoring.PAIR_KEYS})
  for k in (*PREF_REF_KEYS, 'domain'):
    out[k] = np.asarray(pair[k])
  return out


def pair_rows(pref: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """A batch of `pref_item`s [B, 2, ...] -> scoring.pair_batch's rows [2B, ...] (chosen rows
  first, then rejected), the per-pair keys unchanged [B]."""
  out = {}
  for k, v in pref.items():
    if k in (*PREF_REF_KEYS, 'domain'):
      out[k] = v
    else:
      out[k] = jnp.concatenate([v[:, 0], v[:, 1]], axis=0)
  return out


def mix_iterator(config: ml_collections.ConfigDict, pairs: Mapping[str, np.ndarray], sft=None):
  """Stage 2's iterator: data.batch_size SFT rows (of `sft`, by default the smoke's SFTSource) and
  data.batch_size preference pairs per step ({'sft': rows, 'pref': pref_items}; pairs must carry
  the reference log-probs PREF_REF_KEYS)."""
  d = config.data
  missing = [k for k in PREF_REF_KEYS if k not in pairs]
  if missing:
    raise ValueError(f'pairs lack the reference log-probs {missing}')
  seed = router_seed(config)
  if sft is None:
    sft = SFTSource(seed, d.flaw)
  source = MixSource(sft, pairs, seed, offset=1 << 36)
  return data.batch_iterator(
    source,
    global_batch_size=d.batch_size,
    transform=lambda item: {'sft': item['sft'], 'pref': pref_item(item['pref'])},
  )


# ---------------------------------------------------------------------------------------------------
# Checks.


def check_config(config: ml_collections.ConfigDict) -> None:
  """The data keys, checked before a run creates its workdir (one line per problem)."""
  d = config.data
  problems = []
  if d.flaw not in FLAWS:
    problems.append(f'data.flaw={d.flaw!r} is not one of {FLAWS}')
  if d.batch_size < 1 or d.batch_size % jax.process_count():
    problems.append(
      f'data.batch_size={d.batch_size} must be >= 1 and divisible by the {jax.process_count()} '
      'process(es)'
    )
  if d.eval_per_domain < 1 or d.pair_prompts < 1:
    problems.append(
      f'data.eval_per_domain={d.eval_per_domain} and data.pair_prompts={d.pair_prompts} must be >= 1'
    )
  if d.flaw != 'none' and d.flaw_eval < 1:
    problems.append(f'data.flaw_eval={d.flaw_eval} must be >= 1 when data.flaw={d.flaw!r}')
  if problems:
    raise config_lib.ConfigError('; '.join(problems))
