"""Fine-tuning data for the adapter comparison: a multi-task mix where tasks need different skills.

Two sources, one batch format (common/sft.py's packed rows: inputs, targets, loss_mask,
segment_ids, positions, plus `task` [B] and `example` [B] for evaluation):

* `token_tasks` (smoke): a procedural mix for the shared tiny LM (vocabulary 64) with
  hierarchical structure, task family -> variant. Values are the tokens 1..47 read as v in
  Z_47; a task token t precedes every item, `t x y`, and y = f_t(x):
    family 'shift':  y = x + k (mod 47), k in {1, 5, 12, 30}  (task tokens 48..51)
    family 'scale':  y = a * x (mod 47), a in {2, 3, 7, 20}   (task tokens 52..55)
  A sequence holds `items` triples of one task; the loss is on the y tokens only. Example i of a
  split is drawn from (seed, split, i), so the pipeline is a random-access source with nothing on
  disk. The maps are finite (47 inputs per task), so held-out sequences test the learnt maps
  (routing each token to the right transformation), not extrapolation to unseen inputs.

* `reasoning_gym` (SmolLM2): common/datasets/reasoning_gym.py's TFDS builder over a list of
  task families (arithmetic, word problems, logic, string manipulation), each example rendered as
  a chat [user: question, assistant: answer] with the model's chat template and tokenized by
  common.sft (loss on the reply only). The reply is the gold answer string.

Held-out accuracy is exact match under teacher forcing: an example counts as correct iff the
argmax prediction is right at every reply token. Since every reply token is conditioned only on
earlier tokens, that is exactly the event that greedy decoding reproduces the gold reply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
import numpy as np

from common import data
from common import sft

MOD = 47  # values 1..47 stand for Z_47
SHIFTS = (1, 5, 12, 30)
SCALES = (2, 3, 7, 20)
TASKS = tuple([f'shift{k}' for k in SHIFTS] + [f'scale{a}' for a in SCALES])
FIRST_TASK_TOKEN = MOD + 1  # 48


def apply_task(task: int, x: np.ndarray) -> np.ndarray:
  """y tokens for value tokens x (1..47) under task index `task` (0..7)."""
  v = np.asarray(x) - 1
  if task < len(SHIFTS):
    y = (v + SHIFTS[task]) % MOD
  else:
    y = (v * SCALES[task - len(SHIFTS)]) % MOD
  return (y + 1).astype(np.int32)


class TokenTasks:
  """Random-access source of packed-format rows for the procedural token-map mix."""

  def __init__(self, *, seed: int, split: str, items: int, size: int = 1 << 30):
    self.seed, self.items, self.size = seed, items, size
    self.split_id = {'train': 0, 'test': 1}[split]

  @property
  def seq_len(self) -> int:
    return 3 * self.items - 1

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.split_id, int(index)])
    task = int(rng.integers(len(TASKS)))
    x = rng.integers(1, MOD + 1, self.items).astype(np.int32)
    y = apply_task(task, x)
    seq = np.stack([np.full(self.items, FIRST_TASK_TOKEN + task, np.int32), x, y], 1).reshape(-1)
    mask = np.tile(np.array([0, 0, 1], np.float32), self.items)
    n = self.seq_len
    return {
      'inputs': seq[:-1],
      'targets': seq[1:],
      'loss_mask': mask[1:],
      'segment_ids': np.ones(n, np.int32),
      'positions': np.arange(n, dtype=np.int32),
      'task': np.int32(task),
      'example': np.int32(index),
    }


# ---------------------------------------------------------------------------------------------------
# reasoning-gym chat data.


def rg_tasks(config: ml_collections.ConfigDict) -> list[tuple]:
  """(name, train, test, sorted kwargs items) per task: hashable, so the build is cached."""
  out = []
  for t in config.data.rg_tasks:
    kwargs = t[3] if len(t) > 3 else {}
    kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
    out.append((t[0], int(t[1]), int(t[2]), tuple(sorted(kwargs.items()))))
  return out


@functools.lru_cache(maxsize=4)
def _rg_builder(tasks: tuple, seed: int):
  from common.datasets import reasoning_gym  # noqa: PLC0415

  cfg = reasoning_gym.make_config(
    [(t[0], t[1], t[2], dict(t[3]) if len(t) > 3 else {}) for t in tasks], seed=seed
  )
  return data.prepare(reasoning_gym.ReasoningGym(config=cfg, data_dir=str(data.data_dir())))


def _text(v: Any) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def rg_answers(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  """(task, gold answer) of each reasoning-gym example of a split, in order (no tokenizer needed;
  the test split is cut to data.eval_examples as `make_data` cuts it)."""
  source = _rg_builder(tuple(rg_tasks(config)), config.data.seed).as_data_source(split=split)
  n = len(source) if split == 'train' else min(config.data.eval_examples, len(source))
  return [(_text(source[i]['task']), _text(source[i]['answer'])) for i in range(n)]


class ChatTasks:
  """reasoning-gym examples as tokenized single-example rows of `seq_len`.

  An example longer than `seq_len` is dropped, but a task that loses more than `max_dropped` of
  its examples is an error, and so is a task without gold answers (reasoning-gym states None for
  tasks it scores by a verifier, e.g. propositional_logic): otherwise a task can silently vanish
  from the mix, or be trained to answer 'None'. `kept` holds (kept, total) per task.
  """

  def __init__(
    self,
    tokenizer,
    tasks: tuple,
    seed: int,
    split: str,
    seq_len: int,
    limit: int = -1,
    max_dropped: float = 0.2,
  ):
    source = _rg_builder(tasks, seed).as_data_source(split=split)
    self.task_names = tuple(t[0] for t in tasks)
    self.seq_len = seq_len
    self.rows = []
    total = dict.fromkeys(self.task_names, 0)
    kept = dict.fromkeys(self.task_names, 0)
    for i in range(len(source) if limit < 0 else min(limit, len(source))):
      ex = source[i]
      task, answer = _text(ex['task']), _text(ex['answer'])
      if answer in ('None', ''):
        raise ValueError(
          f'reasoning-gym task {task!r} has no gold answer ({answer!r}; it is scored by a '
          'verifier): exact-match fine-tuning needs one, remove it from data.rg_tasks'
        )
      total[task] += 1
      chat = [
        {'role': 'user', 'content': _text(ex['question'])},
        {'role': 'assistant', 'content': answer},
      ]
      tok = sft.tokenize(tokenizer, {'messages': chat})
      if len(tok.tokens) - 1 > seq_len:
        continue
      kept[task] += 1
      row = sft.pack([tok], seq_len, num_rows=1, pad_id=0)
      row = {k: v[0] for k, v in row.items()}
      row['task'] = np.int32(self.task_names.index(_text(ex['task'])))
      row['example'] = np.int32(i)
      self.rows.append(row)
    self.kept = {t: (kept[t], total[t]) for t in self.task_names}
    for t, (k, n) in self.kept.items():
      if n and k < (1 - max_dropped) * n:
        raise ValueError(
          f'reasoning-gym task {t!r} ({split}): only {k} of {n} examples fit data.seq_len='
          f'{seq_len} tokens; raise data.seq_len or choose another task'
        )

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.rows[index]


@dataclasses.dataclass
class Data:
  train: Any
  test: Any
  task_names: tuple[str, ...]


def make_data(config: ml_collections.ConfigDict, tokenizer=None) -> Data:
  d = config.data
  if d.source == 'token_tasks':
    return Data(
      TokenTasks(seed=d.seed, split='train', items=d.triples),
      TokenTasks(seed=d.seed, split='test', items=d.triples, size=d.eval_examples),
      TASKS,
    )
  if d.source == 'reasoning_gym':
    if tokenizer is None:
      raise ValueError('reasoning_gym data needs the model tokenizer')
    tasks = tuple(rg_tasks(config))
    train = ChatTasks(tokenizer, tasks, d.seed, 'train', d.seq_len)
    test = ChatTasks(tokenizer, tasks, d.seed, 'test', d.seq_len, limit=d.eval_examples)
    return Data(train, test, tuple(t[0] for t in tasks))
  raise ValueError(f'unknown data.source {d.source!r}; use token_tasks or reasoning_gym')


def train_iterator(config: ml_collections.ConfigDict, d: Data):
  return data.batch_iterator(
    d.train, global_batch_size=config.data.batch_size, shuffle_seed=config.data.seed + 1
  )


def eval_batches(config: ml_collections.ConfigDict, d: Data) -> list[dict[str, np.ndarray]]:
  """The whole test split in fixed global batches (the last one padded with empty rows)."""
  b = config.data.eval_batch_size
  n = len(d.test)
  rows = [d.test[i] for i in range(n)]
  pad = (-n) % b
  if pad:
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    empty['task'] = np.int32(-1)
    rows += [empty] * pad
  return [
    {k: np.stack([r[k] for r in rows[i : i + b]]) for k in rows[0]} for i in range(0, len(rows), b)
  ]
