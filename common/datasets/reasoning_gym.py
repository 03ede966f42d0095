"""`reasoning_gym`: verifiable reasoning tasks from the pinned `reasoning-gym` wheel, as a TFDS builder.

`reasoning-gym==0.1.25` generates procedural tasks (arithmetic, GSM8K-derived templates, logic, ...)
from a seed, each with an exact scorer `dataset.score_answer(answer, entry)`. A builder config names a
list of tasks (`TaskSpec`: reasoning-gym name, train / test sizes, generator kwargs) and a seed; the
builder writes, per split, examples

  {'example_id': 'chain_sum/train/000017',  # stable: task, split, index within the task's split
   'index': int64,                          # position in the split (global example index)
   'task': 'chain_sum',                     # topic label (the reasoning-gym task name)
   'question': str, 'answer': str,          # the gold answer as reasoning-gym states it
   'metadata': JSON str,                    # reasoning-gym's metadata (what score_answer may read)
   'task_config': JSON str}                 # the generator kwargs (the scorer is re-created with them)

(Text features come back as UTF-8 bytes when read without TensorFlow). Train and test come from
disjoint generator seeds (`split_seed`); a test question that also occurs verbatim in train (easy
tasks have small question spaces) is dropped, so held-out questions are never trained on. Tasks are
interleaved round-robin in each split, so any prefix of a split mixes topics.

`score(task, completion, example)` extracts the answer from a model's completion
(`extract_answer`: "#### 42", "\\boxed{42}", "<answer>42</answer>", "The answer is 42.", else the last
number, else the last line) and scores it with the task's own scorer; a malformed or empty answer or
a scorer exception scores 0.0 and is counted (`score_failures()`) with a warning, never raised, so
a bad sample cannot stop training. reasoning-gym gives partial credit on some tasks (e.g. 0.01 for a
wrong number on gsm_symbolic); `binary=True` maps a score to 1.0 only if it is exactly 1.0.

Bump `VERSION` when the example format, the split seeds or the deduplication change.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import json
import re
import threading
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from common.datasets import base

SPLITS = ('train', 'test')
# The test split's generator seed is derived from the config seed with this offset, so the two
# splits come from disjoint generator streams for any seed below it.
_TEST_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One reasoning-gym task: its registered name, examples per split and generator kwargs."""

  name: str
  train_size: int
  test_size: int
  kwargs: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; hashable

  @classmethod
  def make(cls, name: str, train_size: int, test_size: int, **kwargs) -> TaskSpec:
    return cls(name, int(train_size), int(test_size), tuple(sorted(kwargs.items())))

  @property
  def config_json(self) -> str:
    return json.dumps(dict(self.kwargs), sort_keys=True)


def split_seed(seed: int, split: str) -> int:
  """The generator seed of a split: `seed` for train, `seed + 1_000_003` for test."""
  if split == 'train':
    return seed
  if split == 'test':
    return seed + _TEST_SEED_OFFSET
  raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')


def _check_task(name: str) -> None:
  from reasoning_gym.factory import DATASETS  # noqa: PLC0415

  if name not in DATASETS:
    raise ValueError(f'unknown reasoning-gym task {name!r} (see reasoning_gym.factory.DATASETS)')


def generate(spec: TaskSpec, seed: int, split: str) -> list[dict[str, Any]]:
  """The raw reasoning-gym entries of one task's split (question, answer, metadata)."""
  import reasoning_gym as rg  # noqa: PLC0415

  _check_task(spec.name)
  size = spec.train_size if split == 'train' else spec.test_size
  if size <= 0:
    return []
  ds = rg.create_dataset(spec.name, size=size, seed=split_seed(seed, split), **dict(spec.kwargs))
  return [ds[i] for i in range(size)]


def examples(tasks: Sequence[TaskSpec], seed: int) -> dict[str, list[dict[str, Any]]]:
  """{split: [example dicts]}: tasks interleaved round-robin, test deduplicated against train."""
  out: dict[str, list[dict[str, Any]]] = {}
  train_questions: set[str] = set()
  for split in SPLITS:
    per_task = []
    for spec in tasks:
      rows = []
      for i, entry in enumerate(generate(spec, seed, split)):
        question = str(entry['question'])
        if split == 'train':
          train_questions.add(question)
        elif question in train_questions:
          continue  # held-out questions are never trained on
        rows.append(
          {
            'example_id': f'{spec.name}/{split}/{i:06d}',
            'task': spec.name,
            'question': question,
            'answer': str(entry['answer']),
            'metadata': json.dumps(entry.get('metadata', {}), sort_keys=True, default=str),
            'task_config': spec.config_json,
          }
        )
      per_task.append(rows)
    merged = []
    for k in range(max((len(r) for r in per_task), default=0)):
      merged.extend(rows[k] for rows in per_task if k < len(rows))
    for index, row in enumerate(merged):
      row['index'] = index
    out[split] = merged
  return out


# ---------------------------------------------------------------------------------------------------
# Answer extraction and scoring.

_NUMBER = r'[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?'
_NUMBER_RE = re.compile(_NUMBER)
_MARKERS = (
  re.compile(r'<answer>\s*(.*?)\s*</answer>', re.S | re.I),
  re.compile(r'\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}'),
  re.compile(r'####\s*([^\n]*)'),
  re.compile(
    r'(?:final answer|the answer|answer)\s*(?:is|=|:)?\s*[:=]?\s*\$?\s*([^\n]*)',
    re.I,
  ),
)


def normalize_number(text: str) -> str:
  """'1,234' -> '1234', '\u22124' -> '-4', '+7' -> '7', '42.0' -> '42', '3.50' -> '3.5'."""
  t = text.replace(',', '').replace('\u2212', '-').lstrip('+')
  if '/' in t:
    return t
  if '.' in t:
    t = t.rstrip('0').rstrip('.')
  if t in ('-0', ''):
    t = '0'
  return t


def _clean_span(span: str) -> str:
  span = span.strip().strip('$').strip()
  span = re.sub(r'\\text\{([^{}]*)\}', r'\1', span)
  span = span.rstrip('.').strip()
  number = _NUMBER_RE.fullmatch(span)
  if number:
    return normalize_number(span)
  # "42 apples" / "= 42." / "6. Final answer" -> the first number if the span starts with one.
  lead = re.match(rf'\s*=?\s*({_NUMBER})(?!\w|\.\d)', span)
  if lead:
    return normalize_number(lead.group(1))
  return span


def extract_answer(text: str | None) -> str | None:
  """The answer in a model completion, or None if it is empty.

  Order: the last <answer>..</answer>, \\boxed{..}, '#### ..', 'the answer is ..' span (numbers in
  it normalised), else the last number in the text, else the last non-empty line.
  """
  if text is None:
    return None
  text = text.strip()
  if not text:
    return None
  for pattern in _MARKERS:
    # A marker with nothing after it ('... This is the final answer.') is not an answer: fall
    # through to the next marker and finally to the last number.
    spans = [c for c in map(_clean_span, pattern.findall(text)) if c]
    if spans:
      return spans[-1]
  numbers = _NUMBER_RE.findall(text)
  if numbers:
    return normalize_number(numbers[-1])
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return lines[-1].rstrip('.').strip() if lines else None


_FAILURES: collections.Counter[str] = collections.Counter()
_FAILURES_LOCK = threading.Lock()


def score_failures() -> dict[str, int]:
  """Counts of scores forced to 0.0 so far: {'empty': n, 'exception': n, 'malformed': n}."""
  with _FAILURES_LOCK:
    return dict(_FAILURES)


def reset_score_failures() -> None:
  with _FAILURES_LOCK:
    _FAILURES.clear()


def _count(kind: str, message: str, *args) -> None:
  with _FAILURES_LOCK:
    _FAILURES[kind] += 1
    n = _FAILURES[kind]
  if n <= 10 or n % 1000 == 0:  # bounded log volume; the counter holds the exact number
    logging.warning('reasoning_gym.score: %s (%s #%d): ' + message, kind, kind, n, *args)


@functools.cache
def scorer(task: str, task_config: str = '{}'):
  """The bound `score_answer` of a reasoning-gym task built with the given generator kwargs."""
  from reasoning_gym.factory import DATASETS  # noqa: PLC0415

  _check_task(task)
  dataset_cls, config_cls = DATASETS[task]
  kwargs = json.loads(task_config or '{}')
  return dataset_cls(config=config_cls(size=1, seed=0, **kwargs)).score_answer


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if hasattr(value, 'item') and getattr(value, 'shape', None) == ():  # numpy scalar
    return _text(value.item())
  return str(value)


def entry_of(example: Mapping[str, Any]) -> dict[str, Any]:
  """The reasoning-gym entry (question, answer, metadata) of a stored example."""
  metadata = example.get('metadata', '{}')
  if not isinstance(metadata, Mapping):
    metadata = json.loads(_text(metadata) or '{}')
  return {
    'question': _text(example.get('question', '')),
    'answer': _text(example['answer']),
    'metadata': dict(metadata),
  }


def score(
  task: str | bytes,
  answer_text: str | None,
  example: Mapping[str, Any],
  *,
  extract: bool = True,
  binary: bool = False,
) -> float:
  """The task scorer's reward for a completion; 0.0 (counted, warned) if it cannot be scored.

  `answer_text` is the model's completion (its answer is found by `extract_answer`), or the bare
  answer with `extract=False`. `example` is a stored example (bytes or str fields) or a raw
  reasoning-gym entry.
  """
  task = _text(task)
  answer = extract_answer(answer_text) if extract else answer_text
  if answer is None or not str(answer).strip():
    _count('empty', 'no answer in completion %r', (answer_text or '')[:80])
    return 0.0
  try:
    config = _text(example.get('task_config', '{}')) or '{}'
    value = float(scorer(task, config)(str(answer), entry_of(example)))
  except Exception as e:  # noqa: BLE001  (a verifier failure must never stop training)
    _count('exception', '%s: %s', type(e).__name__, e)
    return 0.0
  if value != value or value < 0.0 or value > 1.0:  # NaN or out of range
    _count('malformed', 'scorer returned %r for answer %r', value, answer)
    return 0.0
  if binary:
    return 1.0 if value == 1.0 else 0.0
  return value


# ---------------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass(eq=False)
class ReasoningGymConfig(tfds.core.BuilderConfig):
  """A list of tasks and a seed; the config `name` keys the build directory."""

  tasks: tuple[TaskSpec, ...] = ()
  seed: int = 0


def make_config(
  tasks: Sequence[TaskSpec | tuple], seed: int = 0, name: str | None = None
) -> ReasoningGymConfig:
  """A builder config; without `name`, one derived from a hash of (tasks, seed), so it is stable.

  `tasks` items are TaskSpecs or tuples (name, train_size, test_size[, kwargs dict]).
  """
  specs = []
  for t in tasks:
    if isinstance(t, TaskSpec):
      specs.append(t)
    else:
      specs.append(TaskSpec.make(t[0], t[1], t[2], **(t[3] if len(t) > 3 else {})))
  if not specs:
    raise ValueError('reasoning_gym config needs at least one task')
  for s in specs:
    _check_task(s.name)
  key = json.dumps([[s.name, s.train_size, s.test_size, s.config_json] for s in specs] + [seed])
  if name is None:
    name = 'custom_' + hashlib.sha256(key.encode()).hexdigest()[:12]
  description = ', '.join(f'{s.name}({s.train_size}/{s.test_size})' for s in specs)
  return ReasoningGymConfig(
    name=name, description=f'{description}; seed {seed}', tasks=tuple(specs), seed=seed
  )


BUILDER_CONFIGS = [
  # Word problems and arithmetic (the EBPO smollm2 mix), 2,000 train / 200 test per task.
  make_config(
    [
      TaskSpec.make('gsm_symbolic', 2000, 200),
      TaskSpec.make('basic_arithmetic', 2000, 200),
      TaskSpec.make('chain_sum', 2000, 200),
      TaskSpec.make('leg_counting', 2000, 200),
    ],
    seed=0,
    name='math',
  ),
  # Two-term sums and differences of 1-2 digit numbers: learnable by a tiny LM (smoke RL).
  make_config(
    [
      TaskSpec.make('chain_sum', 2000, 200, min_terms=2, max_terms=2, min_digits=1, max_digits=2),
      TaskSpec.make(
        'basic_arithmetic',
        2000,
        200,
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=('+', '-'),
      ),
    ],
    seed=0,
    name='arith_tiny',
  ),
  # A handful per split, for tests.
  make_config(
    [TaskSpec.make('chain_sum', 12, 6), TaskSpec.make('leg_counting', 8, 4)], seed=0, name='tiny'
  ),
]


class ReasoningGym(base.ArrayRecordBuilder):
  """reasoning-gym tasks with their scoring metadata (see the module docstring).

  Named configs: 'math' (default), 'arith_tiny', 'tiny'; any other task list through
  `ReasoningGym(config=make_config(...), data_dir=...)` or `common.data.prepare(builder)`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'reasoning-gym 0.1.25; train seed s, test seed s+1000003, dedup.'}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = 'math'
  HOMEPAGE = 'https://pypi.org/project/reasoning-gym/0.1.25/'
  LICENSE = 'Apache-2.0 (reasoning-gym)'

  def _features(self) -> tfds.features.FeaturesDict:
    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
      {
        'example_id': text,
        'index': tfds.features.Scalar(dtype=np.int64),
        'task': text,
        'question': text,
        'answer': text,
        'metadata': text,
        'task_config': text,
      }
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated from seeds, nothing to download
    cfg = self.builder_config
    rows = examples(cfg.tasks, cfg.seed)
    return {split: self._generate_examples(rows[split]) for split in SPLITS}

  def _generate_examples(self, rows: list[dict[str, Any]]) -> Iterator[tuple[str, dict]]:
    for row in rows:
      yield row['example_id'], row
