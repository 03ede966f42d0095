"""GEM's data: the tokenizer, the corpus, the training examples and the fixed evaluation sets.

`Data(config)` is what a run reads: the tokenizer (a byte-level BPE trained on the train paragraphs
of `rdatasets_docs`, + pad, EOS and the k GEM specials; or a pretrained model's tokenizer with the
specials appended), the endless training stream (`TextStream`), the held-out perplexity rows, the
retrieval sets (`RetrievalSet`: rdatasets_titles title -> description, optionally chatterbot_qa
question -> answers, with MiniLM's scores when eval.minilm is on) and the QA rows (qa.py).

The training examples are built on the host from tokenized texts (numpy, deterministic).

One training example per text, carrying both halves of GEM's loss so the switch schedule needs no
second pipeline:

  NTP half ('inputs', 'targets', 'loss_mask', 'roles'): with probability p (0.8) the text is plain
  (all roles PREFIX: exactly the causal LM); otherwise the k specials are inserted at a uniformly
  random split m in [1, n-1], giving prefix | specials | suffix. Targets that are special tokens
  carry no loss ("hold out special tokens"); the last special's prediction of the first suffix
  token is kept, it is the compression signal.
  Contrastive half ('anchor', 'anchor_roles', 'positive', 'positive_roles', 'special_positions',
  'positive_special_positions'): the text with the specials end-appended, and the same text with each
  token dropped with probability `dropout` (at least one kept), specials end-appended.

Edge cases, each defined and counted in the example (the train loop logs their batch means):
  * empty text (0 tokens): 'valid' = 0, the example carries no NTP target and is excluded from
    InfoNCE (as anchor and as negative);
  * a text too short to split (1 token) that was drawn for insertion stays plain: 'too_short' = 1;
  * an over-long text is truncated to fit seq_len (+1 target) with its specials: 'truncated' = 1.

Randomness for example g comes from (seed, g) alone, so a resumed run rebuilds the same batches.
`TextStream` is an endless random-access source over the texts (epoch e reads a permutation drawn
from (seed, e)), so example g's randomness is keyed by its position in the stream, not by the text.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib

import ml_collections
import numpy as np

from common import cache
from common import data
from common import metrics as metrics_lib
from common.datasets import chatterbot_qa
from common.datasets import rdatasets_titles
from common.datasets import text_corpus
from common.models import bpe
from projects.gem import losses
from projects.gem import models
from projects.gem import qa

PAD, EOS = '<|pad|>', '<|endoftext|>'

_PURPOSE_NTP, _PURPOSE_CL = 1, 2


@dataclasses.dataclass(frozen=True)
class Layout:
  """Shapes and GEM knobs that decide how an example is built."""

  seq_len: int  # model input length T (targets are the next tokens)
  special_ids: tuple[int, ...]  # the k special token ids
  pad_id: int
  p_plain: float = 0.8  # the paper's p: probability that a text is left plain
  dropout: float = 0.1  # prefix token dropout of the contrastive positive

  def __post_init__(self):
    k = len(self.special_ids)
    if k < 1:
      raise ValueError('GEM needs at least one special token')
    if self.seq_len < k + 2:
      raise ValueError(f'seq_len {self.seq_len} leaves no room for text around {k} specials')
    if not 0.0 <= self.p_plain <= 1.0 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(
        f'p_plain {self.p_plain} must be in [0, 1], dropout {self.dropout} in [0, 1)'
      )

  @property
  def k(self) -> int:
    return len(self.special_ids)


def insert_specials(
  tokens: np.ndarray, split: int, special_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens with the specials inserted before index `split`, roles) for 0 <= split <= len."""
  tokens = np.asarray(tokens, np.int32)
  if not 0 <= split <= tokens.size:
    raise ValueError(f'split {split} outside [0, {tokens.size}]')
  k = len(special_ids)
  seq = np.concatenate([tokens[:split], np.asarray(special_ids, np.int32), tokens[split:]])
  roles = np.concatenate(
    [
      np.full(split, models.PREFIX, np.int32),
      np.full(k, models.SPECIAL, np.int32),
      np.full(tokens.size - split, models.SUFFIX, np.int32),
    ]
  )
  return seq, roles


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
  out = np.full(length, value, np.int32)
  out[: x.size] = x
  return out


def ntp_example(tokens: np.ndarray, rng: np.random.Generator, layout: Layout) -> dict:
  """The NTP half of one example (see the module docstring)."""
  tokens = np.asarray(tokens, np.int32)
  t, k = layout.seq_len, layout.k
  insert = bool(rng.random() >= layout.p_plain)
  n = tokens.size
  too_short = insert and n < 2
  insert = insert and n >= 2
  limit = t + 1 - (k if insert else 0)
  truncated = n > limit
  tokens = tokens[:limit]
  if insert:
    split = int(rng.integers(1, tokens.size))  # prefix and suffix both non-empty
    seq, roles = insert_specials(tokens, split, layout.special_ids)
  else:
    seq, roles = tokens, np.full(tokens.size, models.PREFIX, np.int32)
  full = _pad(seq, t + 1, layout.pad_id)
  full_roles = _pad(roles, t + 1, models.PAD)
  target_roles = full_roles[1:]
  # A target counts iff it is a real token that is not a special (GEM's held-out specials).
  loss_mask = (target_roles != models.PAD) & (target_roles != models.SPECIAL)
  return {
    'inputs': full[:-1],
    'targets': full[1:],
    'roles': full_roles[:-1],
    'loss_mask': loss_mask.astype(np.float32),
    'inserted': np.float32(insert),
    'too_short': np.float32(too_short),
    'truncated': np.float32(truncated),
    'valid': np.float32(n > 0),
  }


def end_appended(tokens: np.ndarray, layout: Layout) -> dict:
  """text (truncated to seq_len - k) | specials | padding: the embedding read-out row."""
  t, k = layout.seq_len, layout.k
  tokens = np.asarray(tokens, np.int32)[: t - k]
  seq, roles = insert_specials(tokens, tokens.size, layout.special_ids)
  return {
    'tokens': _pad(seq, t, layout.pad_id),
    'roles': _pad(roles, t, models.PAD),
    'special_positions': np.arange(tokens.size, tokens.size + k, dtype=np.int32),
  }


def token_dropout(tokens: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
  """Drops each token with probability `rate`, keeping at least one of a non-empty text."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.size == 0:
    return tokens
  keep = rng.random(tokens.size) >= rate
  if not keep.any():
    keep[int(rng.integers(tokens.size))] = True
  return tokens[keep]


def cl_example(tokens: np.ndarray, rng: np.random.Generator, layout: Layout) -> dict:
  """The contrastive half: the end-appended text and its dropped-out copy."""
  tokens = np.asarray(tokens, np.int32)[: layout.seq_len - layout.k]
  a = end_appended(tokens, layout)
  p = end_appended(token_dropout(tokens, layout.dropout, rng), layout)
  return {
    'anchor': a['tokens'],
    'anchor_roles': a['roles'],
    'special_positions': a['special_positions'],
    'positive': p['tokens'],
    'positive_roles': p['roles'],
    'positive_special_positions': p['special_positions'],
  }


def example_rng(seed: int, index: int, purpose: int) -> np.random.Generator:
  return np.random.default_rng([seed, index, purpose])


def build_example(tokens: np.ndarray, seed: int, index: int, layout: Layout) -> dict:
  """Example number `index` of the stream for a text: both halves, each with its own rng."""
  out = ntp_example(tokens, example_rng(seed, index, _PURPOSE_NTP), layout)
  out.update(cl_example(tokens, example_rng(seed, index, _PURPOSE_CL), layout))
  return out


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x6E4]).permutation(n)


class TextStream:
  """Endless random-access source: example g = build_example(texts[perm_e[g mod n]], seed, g).

  Examples before `plain_before` are always plain (a base-LM pretraining phase in the same stream).
  `alpha_of(g)` adds the loss weight of the step example g belongs to (the switch schedule), so the
  jit-ed loss reads alpha from the batch and one compiled step serves both phases.
  """

  def __init__(
    self,
    texts: Sequence[np.ndarray],
    layout: Layout,
    seed: int,
    alpha_of=None,
    plain_before: int = 0,
  ):
    if not texts:
      raise ValueError('no training texts')
    self.texts = [np.asarray(t, np.int32) for t in texts]
    self.layout, self.seed, self.alpha_of = layout, seed, alpha_of
    self.plain_before = plain_before
    self.plain_layout = dataclasses.replace(layout, p_plain=1.0)

  def __len__(self) -> int:
    return 2**40

  def __getitem__(self, g: int) -> dict:
    g = int(g)
    epoch, pos = divmod(g, len(self.texts))
    text = self.texts[int(_permutation(self.seed, epoch, len(self.texts))[pos])]
    layout = self.plain_layout if g < self.plain_before else self.layout
    ex = build_example(text, self.seed, g, layout)
    if self.alpha_of is not None:
      ex['alpha'] = np.float32(self.alpha_of(g))
    return ex


# ---------------------------------------------------------------------------------------------------
# Tokenizer and texts (memoised per process: the claims run several runs in one).


@functools.lru_cache(maxsize=4)
def _paragraph_tuple(split: str) -> tuple[str, ...]:
  src = data.tfds_source('rdatasets_docs', split)
  docs = [src[i]['text'].decode('utf-8') for i in range(len(src))]
  return tuple(p.strip() for d in docs for p in d.split('\n\n') if p.strip())


def _paragraphs(split: str) -> list[str]:
  """The corpus split's paragraphs (memoised per process: the claims run nine runs in one)."""
  return list(_paragraph_tuple(split))


def _tok_key(config: ml_collections.ConfigDict) -> tuple[str, int, int]:
  """What determines the tokenizer: (pretrained model name or '', BPE vocab size, k)."""
  return (config.model.get('pretrained', ''), config.data.vocab_size, config.gem.num_special)


def tokenizer(config: ml_collections.ConfigDict):
  """The pretrained model's tokenizer + the k specials (model.pretrained set), else a byte-level
  BPE trained on the train paragraphs, + pad, EOS, then the k specials (both cached)."""
  return _tokenizer(*_tok_key(config))


@functools.lru_cache(maxsize=4)
def _encoded_paragraphs(key: tuple[str, int, int], split: str) -> tuple[np.ndarray, ...]:
  """Token ids of every paragraph of `split` (memoised: encoding the train split costs ~2 s)."""
  return tuple(encode(_tokenizer(*key), _paragraphs(split)))


@functools.lru_cache(maxsize=4)
def _tokenizer(pretrained: str, vocab_size: int, num_special: int):
  if pretrained:
    from projects.gem import pretrained as pretrained_lib  # noqa: PLC0415

    return pretrained_lib.tokenizer(pretrained, num_special)
  import tokenizers  # noqa: PLC0415

  corpus = text_corpus.RdatasetsDocs.VERSION  # a rebuilt corpus retrains the tokenizer
  spec = f'v1|{corpus}|{vocab_size}|{num_special}'
  key = hashlib.sha256(spec.encode()).hexdigest()
  path = cache.cache_dir('gem', 'tokenizers') / f'{key[:16]}.json'
  if path.exists():
    tok = tokenizers.Tokenizer.from_file(str(path))
  else:
    tok = bpe.train_byte_level(_paragraphs('train'), vocab_size, special_tokens=[PAD, EOS])
    tok.add_special_tokens(models.special_token_names(num_special))
    with cache.atomic_path(path) as tmp:
      tok.save(str(tmp))
  tok.encode_special_tokens = True  # text never produces a special id
  return tok


def special_ids(tok, k: int) -> tuple[int, ...]:
  return tuple(tok.token_to_id(n) for n in models.special_token_names(k))


def encode(tok, texts: list[str]) -> list[np.ndarray]:
  return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts)]


# ---------------------------------------------------------------------------------------------------
# What a run reads.


@dataclasses.dataclass
class RetrievalSet:
  """One retrieval evaluation: queries against a candidate pool, metrics named prefix + name."""

  prefix: (
    str  # '' for rdatasets_titles (the names the claims read), 'chatterbot/' for chatterbot_qa
  )
  query_texts: list[str]
  doc_texts: list[str]
  queries: list[dict]  # end-appended rows
  docs: list[dict]
  relevant: np.ndarray  # [Q] target index per query, or [Q, N] bool (several relevant answers)
  minilm_scores: np.ndarray | None  # [Q, N] MiniLM cosines, None when eval.minilm is off


class Data:
  """Tokenizer, training stream and the fixed evaluation sets of a config."""

  def __init__(self, config: ml_collections.ConfigDict):
    c = config
    self.tok = tokenizer(c)
    self.vocab_size = self.tok.get_vocab_size()
    self.specials = special_ids(self.tok, c.gem.num_special)
    pad = self.tok.token_to_id(PAD)  # a pretrained vocabulary may have none: pad with EOS (the
    self.pad_id = pad if pad is not None else self.tok.token_to_id(EOS)  # roles mask it anyway)
    if self.pad_id is None:
      raise ValueError(f'tokenizer has neither {PAD} nor {EOS} to pad with')
    self.layout = Layout(
      seq_len=c.data.seq_len,
      special_ids=self.specials,
      pad_id=self.pad_id,
      p_plain=c.gem.p_plain,
      dropout=c.gem.dropout,
    )
    texts = list(_encoded_paragraphs(_tok_key(c), 'train'))
    pre, _, _ = losses.phases(c)
    batch = c.data.batch_size
    self.train = TextStream(
      texts,
      self.layout,
      c.data.seed,
      alpha_of=lambda g: losses.alpha_of_step(c, g // batch),
      plain_before=pre * batch,  # the base LM's phase: plain NTP only
    )
    ppl = _encoded_paragraphs(_tok_key(c), 'validation')
    ppl = ppl[: c.eval.ppl_texts]
    plain = Layout(
      seq_len=c.data.seq_len, special_ids=self.specials, pad_id=self.pad_id, p_plain=1.0
    )
    rng = np.random.default_rng(0)  # unused draws: plain examples
    self.ppl_rows = [ntp_example(t, rng, plain) for t in ppl]
    pairs = rdatasets_titles.load(c.eval.retrieval_split)
    self.retrieval = [
      self._retrieval_set(
        '', [p[1] for p in pairs], [p[2] for p in pairs], np.arange(len(pairs)), c.eval.minilm
      )
    ]
    if c.eval.get('chatterbot', False):
      rows = chatterbot_qa.load(c.eval.retrieval_split)
      answers, relevant = chatterbot_qa.pool(rows)
      questions = [r.question for r in rows]
      self.retrieval.append(
        self._retrieval_set('chatterbot/', questions, answers, relevant, c.eval.minilm)
      )
    titles = self.retrieval[0]  # the names older code reads
    self.query_texts, self.doc_texts = titles.query_texts, titles.doc_texts
    self.queries, self.docs, self.minilm_scores = titles.queries, titles.docs, titles.minilm_scores
    self.qa_rows, self.qa_continues = [], None
    if c.eval.qa_items:
      for prompt, answer in qa.prompts(c.eval.qa_items, seed=c.eval.qa_seed, shots=c.eval.qa_shots):
        ids = [int(i) for i in self.tok.encode(prompt).ids]
        self.qa_rows.append(qa.row(ids, self.tok.encode(answer).ids, c.data.seq_len, self.pad_id))
      self.qa_continues = _continuation_table(_tok_key(c))
    metrics_lib.log(
      'gem data: %d train paragraphs, vocab %d, specials %s, %d ppl texts, %d retrieval pairs (%s)',
      len(texts),
      self.vocab_size,
      self.specials,
      len(self.ppl_rows),
      len(pairs),
      c.eval.retrieval_split,
    )
    if len(self.retrieval) > 1:
      cb = self.retrieval[1]
      metrics_lib.log(
        'gem data: chatterbot_qa %s: %d questions, %d candidate answers (chance Recall@10 %.3f)',
        c.eval.retrieval_split,
        len(cb.queries),
        len(cb.docs),
        chatterbot_qa.chance_recall_at(10, len(cb.docs)),
      )

  def _retrieval_set(self, prefix, query_texts, doc_texts, relevant, minilm) -> RetrievalSet:
    rows = [
      [end_appended(t, self.layout) for t in encode(self.tok, texts)]
      for texts in (query_texts, doc_texts)
    ]
    # MiniLM's query x doc cosines (baseline row and silver label), or None when eval.minilm is off.
    scores = _minilm_scores(tuple(query_texts), tuple(doc_texts)) if minilm else None
    return RetrievalSet(prefix, query_texts, doc_texts, *rows, relevant, scores)


@functools.lru_cache(maxsize=2)
def _minilm_scores(queries: tuple[str, ...], docs: tuple[str, ...]) -> np.ndarray:
  """[Q, D] cosines of all-MiniLM-L6-v2 (computed once per process: it is the same every run)."""
  from common import minilm  # noqa: PLC0415

  m = minilm.MiniLM()
  return m.embed(queries) @ m.embed(docs).T


@functools.lru_cache(maxsize=4)
def _continuation_table(key: tuple[str, int, int]) -> np.ndarray:
  tok = _tokenizer(*key)
  return qa.number_continuation_table(lambda i: tok.decode([i]), tok.get_vocab_size())
