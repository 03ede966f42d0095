"""OmniOPD's data: the shared RL task sets (common.rl.tasks) seen as text by the teacher.

The student reads token ids (the smoke's character rendering '36-38=', or SmolLM2's chat template);
the teacher reads the prompt's *text* (the same '36-38=' at smoke scale, the English question for
SmolLM2) and the student's prefix decoded to text. `Task` holds both views, the verifier, the
answers a scripted teacher derives its targets from, and how a teacher's text becomes student
tokens (SFT on teacher traces).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from common.rl import curriculum
from common.rl import rollout
from common.rl import tasks

Prompt = curriculum.Prompt


@dataclasses.dataclass
class Task:
  train: list[Prompt]
  test: list[Prompt]
  text: Callable[[Prompt], str]  # what the teacher reads
  decode: Callable[[Any], str]  # student ids -> text (stops at EOS)
  encode_text: Callable[[str], list[int]]  # text -> student ids (no BOS, no EOS)
  eos_id: int
  stop: tuple[int, ...]
  pad: int
  vocab_size: int
  tokenizer: Any

  def answers(self) -> dict[str, str]:
    """{prompt text: correct answer} over train and test prompts (a scripted teacher's source)."""
    return {self.text(p): str(p.payload['answer']) for p in [*self.train, *self.test]}

  def trace_tokens(self, text: str, max_new_tokens: int) -> tuple[np.ndarray, int]:
    """(ids [max_new_tokens], length) of a teacher trace as a student completion (EOS appended,
    truncated to max_new_tokens; characters the student cannot encode are dropped)."""
    if isinstance(self.tokenizer, tasks.CharTokenizer):
      ids = [i for ch in text if ch in tasks.CharTokenizer.CHARS for i in self.encode_text(ch)]
    else:
      ids = list(self.encode_text(text))
    ids = [*ids, self.eos_id][:max_new_tokens]
    out = np.full((max_new_tokens,), self.pad, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)

  def verifier(self) -> rollout.VerifierRewards:
    return rollout.VerifierRewards(tasks.make_verifier(self.decode))


def _subset(items: list, n: int) -> list:
  return items if n < 0 else items[:n]


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task of config.data and config.model.kind ('tiny': characters; else the model's chat)."""
  d = config.data
  train_ex = _subset(tasks.load_examples(d.task_set, 'train', d.seed), d.max_train)
  test_ex = _subset(tasks.load_examples(d.task_set, 'test', d.seed), d.max_eval)
  policy = tasks.policy_text(config.model)
  tok = policy.tok
  if config.model.kind == 'tiny':
    text = lambda p: tasks.expression_prompt(p.payload)  # noqa: E731
    eos = tok.eos_id
  else:
    text = lambda p: p.payload['question'].strip() + tasks.CHAT_INSTRUCTION  # noqa: E731
    eos = tok.end_of_turn_id()  # a teacher trace ends as a chat turn
  return Task(
    train=tasks.prompts(train_ex, 'train', policy.render),
    test=tasks.prompts(test_ex, 'test', policy.render),
    text=text,
    decode=tok.decode,
    encode_text=lambda s: tok.encode(s, add_bos=False),
    eos_id=eos,
    stop=policy.stop,
    pad=policy.pad,
    vocab_size=tok.vocab_size,
    tokenizer=tok,
  )
