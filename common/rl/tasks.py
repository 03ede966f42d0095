"""Reasoning-gym tasks (common.datasets.reasoning_gym) as RL prompts with a verifier, shared by the
RL papers that train on them (EBPO, EAD, OmniOPD, Q-RM); `policy_text` gives each policy kind's
tokenizer, prompt rendering, stop and pad tokens.

Two renderings of the same examples:
  * 'expression' for the smoke's tiny character-level LM: the task's arithmetic expression without
    spaces and '=' ("36-38="), answered by the number and EOS. The reward still comes from the
    task's own reasoning-gym scorer on the stored example. The compact prompt is a stand-in for
    the English question the tiny model could not read (a deviation each paper's README states).
  * 'chat' for SmolLM2-135M-Instruct: the English question in the model's chat template, with an
    instruction to end with 'The answer is N.'; the scorer sees the extracted answer.

The smoke's task set is where a short SFT warm-up (common.rl.policies) leaves the tiny policy at a
10-60% pass rate, the window where GRPO groups carry signal. Clusters (per-cluster priors and
metrics, the clustered curriculum) are the task names.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import functools
import json
from typing import Any

import ml_collections
import numpy as np

from common import data
from common.datasets import reasoning_gym as rgd
from common.models import loader
from common.models import tokenizer as tokenizer_lib
from common.rl import curriculum

# Train prompt uids are example indices; test uids are offset so they never collide.
TEST_UID_OFFSET = 1_000_000

SMOKE_TASKS = (
  # a +/- b with 1-2 digit operands: the easier topic.
  rgd.TaskSpec.make('chain_sum', 2000, 200, min_terms=2, max_terms=2, min_digits=1, max_digits=2),
  # a +/- b +/- c with single digits: a harder topic (three terms, carries across two operations).
  rgd.TaskSpec.make(
    'basic_arithmetic',
    2000,
    200,
    min_terms=3,
    max_terms=3,
    min_digits=1,
    max_digits=1,
    operators=('+', '-'),
    allow_parentheses=False,
    allow_negation=False,
  ),
)

# SmolLM2's mix: short word problems and arithmetic with exact answers.
SMOLLM2_TASKS = (
  rgd.TaskSpec.make('chain_sum', 1000, 100, min_terms=2, max_terms=3, min_digits=1, max_digits=2),
  rgd.TaskSpec.make('leg_counting', 1000, 100, min_animals=2, max_animals=3, max_instances=4),
  rgd.TaskSpec.make(
    'basic_arithmetic',
    1000,
    100,
    min_terms=2,
    max_terms=3,
    min_digits=1,
    max_digits=2,
    operators=('+', '-', '*'),
    allow_parentheses=False,
    allow_negation=False,
  ),
)

# An easier SmolLM2 mix: 'smollm2' starts at pass@1 0.025 at T = 1 (EAD), below the 10-60% window
# where RL has a signal; one +/- operation on 1-2 digit operands (OmniOPD measured greedy 0.15,
# 0.10 at T = 0.6; projects/omniopd/README.md).
SMOLLM2_EASY_TASKS = (
  rgd.TaskSpec.make('chain_sum', 1000, 100, min_terms=2, max_terms=2, min_digits=1, max_digits=2),
  rgd.TaskSpec.make(
    'basic_arithmetic',
    1000,
    100,
    min_terms=2,
    max_terms=2,
    min_digits=1,
    max_digits=2,
    operators=('+', '-'),
    allow_parentheses=False,
    allow_negation=False,
  ),
)

TASK_SETS = {'smoke': SMOKE_TASKS, 'smollm2': SMOLLM2_TASKS, 'smollm2_easy': SMOLLM2_EASY_TASKS}


def _text(x: Any) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def load_examples(task_set: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
  """The split's examples (str fields), built once as a TFDS data set under common.data.data_dir()."""
  return [dict(r) for r in _load(task_set, split, seed)]


@functools.cache
def _load(task_set: str, split: str, seed: int) -> tuple[dict[str, Any], ...]:
  if task_set not in TASK_SETS:
    raise ValueError(f'unknown task set {task_set!r}; expected one of {sorted(TASK_SETS)}')
  specs = TASK_SETS[task_set]
  digest = rgd.make_config(specs, seed=seed).name[-6:]  # a new build whenever the specs change
  cfg = rgd.make_config(specs, seed=seed, name=f'rlvr_{task_set}_s{seed}_{digest}')
  builder = rgd.ReasoningGym(config=cfg, data_dir=str(data.data_dir()))
  source = data.tfds_source(builder, split)
  out = []
  for i in range(len(source)):
    row = source[i]
    out.append({k: (int(v) if k == 'index' else _text(v)) for k, v in row.items()})
  out.sort(key=lambda r: r['index'])
  return tuple(out)


# ---------------------------------------------------------------------------------------------------
# The tiny model's character tokenizer.


class CharTokenizer:
  """Characters of arithmetic expressions; ids 0 pad, 1 BOS, 2 EOS. The API common.sft needs."""

  CHARS = '0123456789+-*/=().'

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self._ids = {c: i + 3 for i, c in enumerate(self.CHARS)}
    self.stop_ids = (self.eos_id,)

  @property
  def vocab_size(self) -> int:
    return 3 + len(self.CHARS)

  def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
    bad = sorted({c for c in text if c not in self._ids})
    if bad:
      raise ValueError(f'characters {bad} are not in the arithmetic vocabulary')
    ids = [self._ids[c] for c in text]
    if add_bos is None or add_bos:
      ids = [self.bos_id, *ids]
    return [*ids, self.eos_id] if add_eos else ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i >= 3:
        out.append(self.CHARS[i - 3])
      elif not skip_special:
        out.append(f'<{i}>')
    return ''.join(out)


def expression_prompt(example: dict[str, Any]) -> str:
  """'36-38=' from the stored metadata's expression (spaces removed)."""
  expression = json.loads(example['metadata'])['expression']
  return expression.replace(' ', '') + '='


# ---------------------------------------------------------------------------------------------------
# Chat prompts (SmolLM2).

# Measured on 30 held-out questions, greedy, 48 new tokens (SmolLM2-135M-Instruct): no instruction
# 0/30, ' Answer with a single number.' 0/30, this one 2/30 (an earlier 'Reply ... as: The answer
# is N.' made it echo 'The answer is 1.' without computing: 1/50).
CHAT_INSTRUCTION = ' Think step by step, then give the final answer as a number.'


def _chat_question(example: dict[str, Any]) -> dict[str, str]:
  return {'role': 'user', 'content': example['question'].strip() + CHAT_INSTRUCTION}


def chat_prompt_tokens(tokenizer, example: dict[str, Any]) -> list[int]:
  text = tokenizer.apply_chat_template([_chat_question(example)], True)
  return tokenizer.encode(text, add_bos=False)


def worked_answer(example: dict[str, Any]) -> str:
  """The reply a pretrained policy's SFT warm-up learns: the task's expression worked to its answer,
  then the answer in the form the scorer extracts ('15 - 43 = -28. The answer is -28.'); only the
  final sentence for tasks without an expression (leg counting). One line, no reasoning chain: the
  warm-up teaches the format and the habit of writing the sum, not a method."""
  expression = json.loads(example['metadata']).get('expression')
  worked = f'{expression} = {example["answer"]}. ' if expression else ''
  return f'{worked}The answer is {example["answer"]}.'


def chat_sft_messages(example: dict[str, Any]) -> list[dict[str, str]]:
  """The chat (question as the RL prompt renders it, worked answer) of one train example."""
  return [_chat_question(example), {'role': 'assistant', 'content': worked_answer(example)}]


@dataclasses.dataclass(frozen=True)
class PolicyText:
  """A policy's tokenizer and how an example becomes its prompt; rollouts end at a stop token and
  are padded with pad."""

  tok: Any  # CharTokenizer or common.models.tokenizer's
  render: Callable[[dict[str, Any]], list[int]]
  stop: tuple[int, ...]
  pad: int


def policy_text(model: ml_collections.ConfigDict) -> PolicyText:
  """model.kind 'tiny': characters and the expression rendering; otherwise model.name's converted
  tokenizer and the chat rendering (pad: the tokenizer's own, else its first stop token)."""
  if model.kind == 'tiny':
    char = CharTokenizer()
    return PolicyText(
      char, lambda ex: char.encode(expression_prompt(ex)), tuple(char.stop_ids), char.pad_id
    )
  tok = tokenizer_lib.load(loader.converted_dir(model.name) / 'tokenizer')
  stop = tuple(tok.stop_ids)
  pad = tok.pad_id if getattr(tok, 'pad_id', None) is not None else stop[0]
  return PolicyText(tok, lambda ex: chat_prompt_tokens(tok, ex), stop, pad)


# ---------------------------------------------------------------------------------------------------
# Prompts and the verifier.


def prompts(
  examples: Sequence[dict[str, Any]],
  split: str,
  render,
) -> list[curriculum.Prompt]:
  """RL prompts: `render(example) -> token ids`, uid from the split index, cluster = task."""
  offset = 0 if split == 'train' else TEST_UID_OFFSET
  return [
    curriculum.Prompt(
      uid=offset + ex['index'], tokens=tuple(render(ex)), cluster=ex['task'], payload=ex
    )
    for ex in examples
  ]


def make_verifier(decode):
  """verifier(prompt, completion ids) -> 1.0 iff the task's scorer gives the answer full marks."""

  def verifier(prompt: curriculum.Prompt, completion: np.ndarray) -> float:
    text = decode([int(t) for t in completion])
    return rgd.score(prompt.cluster, text, prompt.payload, binary=True)

  return verifier
