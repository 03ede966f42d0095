"""GEM training and evaluation on real text (smoke scale: a tiny decoder pretrained here).

One run is three phases over one data stream and one optimizer (the boundaries are config keys, so a
run can stop after any phase and another can resume from it with `checkpoint.resume_from`):

  [0, pretrain_steps)                     plain NTP: this is the base LM (nothing GEM about it)
  [pretrain_steps, + mixed_steps)         GEM's mixed NTP: p plain texts, 1-p with specials inserted
  [..., + cl_steps)                       contrastive (alpha = alpha_after, 1 in the paper's recipe)

each with its own learning rate (cosine within the phase), GEM's LR switch at the alpha boundary.
`gem.mode`: 'gem' (as above) or 'contrastive_only' (mixed_steps folded into cl_steps: the same number
of post-base steps with the InfoNCE loss alone, the baseline that has no LM term).

Data: paragraphs of the `rdatasets_docs` train split (English R documentation) with a byte-level
BPE tokenizer trained on them (+ pad, EOS and the k GEM specials). Evaluation, every eval_every
steps and at the end, on data the training never saw:
  * held-out perplexity: the first `eval.ppl_texts` paragraphs of the corpus's validation split,
    plain causal LM, no specials (the "keeps its language ability" half);
  * retrieval: `rdatasets_titles` (title -> description) on `eval.retrieval_split`, all pairs of the
    split as the candidate pool, with the model's embeddings read three ways: 'special' (GEM's
    end-appended special tokens), 'mean' and 'last' (the vanilla baselines' pooling of the text);
    metric names '<pooling>/<metric>' (and 'minilm/<metric>', '<pooling>/spearman_minilm');
  * with `eval.chatterbot`: `chatterbot_qa` (question -> answers, 78 validation questions, every
    distinct answer of the split a candidate, any of a question's answers relevant; chance
    Recall@10 = 10/91 = 0.110 on validation), the same read-outs and MiniLM rows under the prefix
    'chatterbot/' ('chatterbot/special/recall_at_10', ...). Absent from a config = off (configs
    written before the key existed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache
from common import config as config_lib
from common import data
from common import embeddings
from common import losses as common_losses
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from common.datasets import chatterbot_qa
from common.datasets import rdatasets_titles
from common.datasets import text_corpus
from common.models import bpe
from common.models import decoder
from projects.gem import input_pipeline
from projects.gem import losses
from projects.gem import models
from projects.gem import qa

PAD, EOS = '<|pad|>', '<|endoftext|>'
POOLINGS = ('special', 'mean', 'last')


# ---------------------------------------------------------------------------------------------------
# Tokenizer and texts.


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
# Model, optimizer, schedule.


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> decoder.DecoderConfig:
  """config.model's decoder, or the pretrained model's with its vocabulary grown to vocab_size."""
  if config.model.get('pretrained'):
    from projects.gem import pretrained as pretrained_lib  # noqa: PLC0415

    return pretrained_lib.decoder_config(config.model.pretrained, vocab_size, config.dtype)
  return decoder.DecoderConfig.from_dict(
    {**config.model.to_dict(), 'vocab_size': vocab_size, 'dtype': config.dtype}
  )


def phases(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(pretrain, mixed, contrastive) step counts for the run's mode."""
  g = config.gem
  if g.mode == 'gem':
    return g.pretrain_steps, g.mixed_steps, g.cl_steps
  if g.mode == 'contrastive_only':
    return g.pretrain_steps, 0, g.mixed_steps + g.cl_steps
  raise config_lib.ConfigError(f"gem.mode must be 'gem' or 'contrastive_only', got {g.mode!r}")


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optimizer
  pre, mixed, cl = phases(config)
  warmup = min(o.warmup_steps, pre // 2)
  pieces = [optax.warmup_cosine_decay_schedule(0.0, o.lr_pretrain, warmup, max(pre, warmup + 1))]
  bounds = [pre]
  if mixed:
    pieces.append(optax.cosine_decay_schedule(o.lr_ntp, mixed))
    bounds.append(pre + mixed)
  pieces.append(optax.cosine_decay_schedule(o.lr_cl, max(cl, 1)))
  return optax.join_schedules(pieces, bounds)


def alpha_of_step(config: ml_collections.ConfigDict, index: int) -> float:
  pre, mixed, _ = phases(config)
  return losses.alpha_at(index, pre + mixed, config.gem.alpha_after)


_IS_LOG_SCALE = embeddings.path_endswith('log_scale')


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda p, x: not _IS_LOG_SCALE(p, x), params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    # No weight decay on the log-temperature (CLIP): it would pull lambda towards 0 during the NTP
    # phases, where InfoNCE gives it no gradient.
    optax.adamw(schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=_decay_mask),
    embeddings.clamp_transform(_IS_LOG_SCALE),  # CLIP's clamp
  )


def create_state_fn(config: ml_collections.ConfigDict, vocab_size: int):
  mcfg = model_config(config, vocab_size)
  tx = make_optimizer(config)
  return lambda: train_loop.TrainState(
    models.GemModel(decoder.Decoder(mcfg, rngs=nnx.Rngs(config.seed))), tx
  )


def initial_state_fn(config: ml_collections.ConfigDict):
  """fit's initial_state: the real pretrained weights + k special rows, or None (from scratch)."""
  if not config.model.get('pretrained'):
    return None
  from projects.gem import pretrained as pretrained_lib  # noqa: PLC0415

  tx = make_optimizer(config)
  return pretrained_lib.initial_state_fn(
    config.model.pretrained,
    config.gem.num_special,
    config.dtype,
    lambda model: train_loop.TrainState(model, tx),
  )


def schedule_alphas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """Every alpha the run's schedule produces (the loss traces only their branches)."""
  pre, mixed, cl = phases(config)
  return tuple(sorted({alpha_of_step(config, i) for i in (0, pre + mixed) if i < pre + mixed + cl}))


def make_loss_fn(config: ml_collections.ConfigDict):
  alphas = schedule_alphas(config)

  def loss_fn(model, batch, key):
    del key  # deterministic: the data carry all randomness
    return losses.total_loss(
      model,
      batch,
      pooling=config.gem.pooling,
      block_specials=config.gem.block_specials,
      alphas=alphas,
    )

  return loss_fn


# ---------------------------------------------------------------------------------------------------
# Data.


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
    self.layout = input_pipeline.Layout(
      seq_len=c.data.seq_len,
      special_ids=self.specials,
      pad_id=self.pad_id,
      p_plain=c.gem.p_plain,
      dropout=c.gem.dropout,
    )
    texts = list(_encoded_paragraphs(_tok_key(c), 'train'))
    pre, _, _ = phases(c)
    batch = c.data.batch_size
    self.train = input_pipeline.TextStream(
      texts,
      self.layout,
      c.data.seed,
      alpha_of=lambda g: alpha_of_step(c, g // batch),
      plain_before=pre * batch,  # the base LM's phase: plain NTP only
    )
    ppl = _encoded_paragraphs(_tok_key(c), 'validation')
    ppl = ppl[: c.eval.ppl_texts]
    plain = input_pipeline.Layout(
      seq_len=c.data.seq_len, special_ids=self.specials, pad_id=self.pad_id, p_plain=1.0
    )
    rng = np.random.default_rng(0)  # unused draws: plain examples
    self.ppl_rows = [input_pipeline.ntp_example(t, rng, plain) for t in ppl]
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
      [input_pipeline.end_appended(t, self.layout) for t in encode(self.tok, texts)]
      for texts in (query_texts, doc_texts)
    ]
    # MiniLM's query x doc cosines (baseline row and silver label), or None when eval.minilm is off.
    scores = _minilm_scores(tuple(query_texts), tuple(doc_texts)) if minilm else None
    return RetrievalSet(prefix, query_texts, doc_texts, *rows, relevant, scores)


@functools.lru_cache(maxsize=2)
def _minilm_scores(queries: tuple[str, ...], docs: tuple[str, ...]) -> np.ndarray:
  """[Q, D] cosines of all-MiniLM-L6-v2 (computed once per process: it is the same every run)."""
  from projects.gem import minilm  # noqa: PLC0415

  m = minilm.MiniLM()
  return m.embed(queries) @ m.embed(docs).T


@functools.lru_cache(maxsize=4)
def _continuation_table(key: tuple[str, int, int]) -> np.ndarray:
  tok = _tokenizer(*key)
  return qa.number_continuation_table(lambda i: tok.decode([i]), tok.get_vocab_size())


@nnx.jit
def _nll(model, b):
  logits = model.logits(b['inputs'], b['roles'])
  lp = -jnp.sum(
    jnp.where(b['loss_mask'] > 0, common_losses.token_logprobs(logits, b['targets']), 0.0)
  )
  return lp, jnp.sum(b['loss_mask'])


@nnx.jit
def _embed_all(model, b):
  h = model.hidden(b['tokens'], b['roles'])
  return {p: models.pool(h, b['roles'], b['special_positions'], p) for p in POOLINGS}


def _chunks(rows: list[dict], size: int, empty: dict):
  """Stacked batches of `size` rows, the last padded with `empty` rows; yields (batch, n_real)."""
  for start in range(0, len(rows), size):
    part = rows[start : start + size]
    n = len(part)
    part = part + [empty] * (size - n)
    yield {k: np.stack([r[k] for r in part]) for k in part[0]}, n


def make_eval_fn(config: ml_collections.ConfigDict, mesh, d: Data):
  rules = tuple(tuple(r) for r in config.sharding.rules)
  size = config.eval.batch_size
  empty_ppl = dict(d.ppl_rows[0], loss_mask=np.zeros_like(d.ppl_rows[0]['loss_mask']))
  empty_row = input_pipeline.end_appended(np.zeros(0, np.int32), d.layout)

  # Module-level jits (_nll, _embed_all, qa.score): the runs of one process share their traces.
  nll, embed_all = _nll, _embed_all

  def embed_rows(model, rows):
    out = {p: [] for p in POOLINGS}
    for b, n in _chunks(rows, size, empty_row):
      e = jax.device_get(embed_all(model, sharding.to_global(b, mesh, rules)))
      for p in POOLINGS:
        out[p].append(np.asarray(e[p])[:n])
    return {p: np.concatenate(v) for p, v in out.items()}

  def evaluate(model, step):
    del step
    total, count = 0.0, 0.0
    for b, _ in _chunks(d.ppl_rows, size, empty_ppl):
      s, c = nll(model, sharding.to_global(b, mesh, rules))
      total, count = total + float(s), count + float(c)
    out = {'loss': total / count, 'perplexity': math.exp(total / count)}
    for rs in d.retrieval:
      out.update(retrieval_eval(rs, embed_rows(model, rs.queries), embed_rows(model, rs.docs)))
    if d.qa_rows:
      empty_qa = dict(d.qa_rows[0], loss_mask=np.zeros_like(d.qa_rows[0]['loss_mask']))
      nll_sum, tokens, exact = 0.0, 0.0, 0.0
      cont = jnp.asarray(d.qa_continues)
      for b, n in _chunks(d.qa_rows, size, empty_qa):
        s, c, e = jax.device_get(qa.score(model, sharding.to_global(b, mesh, rules), cont))
        nll_sum += float(np.sum(s[:n]))
        tokens += float(np.sum(c[:n]))
        exact += float(np.sum(e[:n]))
      out['qa/exact_match'] = exact / len(d.qa_rows)
      out['qa/answer_nll'] = nll_sum / tokens
    return out

  return evaluate


def retrieval_eval(rs: RetrievalSet, q: dict, r: dict) -> dict[str, float]:
  """Recall@1/10, MRR, nDCG@10 per read-out (+ Spearman vs MiniLM and MiniLM's own row), named
  rs.prefix + '<pooling>/<metric>'; q, r: {pooling: [Q, d] / [N, d] embeddings}."""
  out = {}
  for p in POOLINGS:
    scores = np.asarray(embeddings.cosine_matrix(jnp.asarray(q[p]), jnp.asarray(r[p])))
    for name, v in embeddings.retrieval_metrics(scores, rs.relevant, ks=(1, 10)).items():
      out[f'{rs.prefix}{p}/{name.replace("@", "_at_")}'] = v
    if rs.minilm_scores is not None:  # silver label: MiniLM's judgement, not human ratings
      out[f'{rs.prefix}{p}/spearman_minilm'] = embeddings.spearman(scores, rs.minilm_scores)
  if rs.minilm_scores is not None:  # the baseline row (the same in every run and step)
    for name, v in embeddings.retrieval_metrics(rs.minilm_scores, rs.relevant, ks=(1, 10)).items():
      out[f'{rs.prefix}minilm/{name.replace("@", "_at_")}'] = v
  return out


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> train_loop.FitResult:
  """Trains and evaluates `config` in `workdir` (resuming it); `mesh` overrides config.mesh."""
  with train_loop.Run(config, workdir, mesh=mesh) as run:
    if run.finished:
      return train_loop.fit(run, create_state=None, loss_fn=None, train_iter=None)
    d = Data(config)
    logging.info('phases (pretrain, mixed, contrastive) = %s', phases(config))
    train_iter = data.batch_iterator(d.train, global_batch_size=config.data.batch_size)
    return train_loop.fit(
      run,
      create_state=create_state_fn(config, d.vocab_size),
      loss_fn=make_loss_fn(config),
      train_iter=train_iter,
      eval_fn=make_eval_fn(config, run.mesh, d),
      initial_state=initial_state_fn(config),
    )
