"""FuseChat's models (arXiv 2408.07990): the pivot, the source LMs, and their per-token distributions.

A *member* is a decoder LM with its own tokenizer (`Member`): the pivot (the target whose copies are
fine-tuned and merged) or a source whose knowledge is fused into it.

  * Real setting: SmolLM2-135M-Instruct (pivot), Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M
    (sources), loaded through `common.models.loader` (asset names smollm2, qwen2_5_coder_0_5b,
    gemma3_270m): three different tokenizers (49k BPE, 151k BPE, 262k SentencePiece).
  * Smoke setting (`tiny:<name>`): small decoders pretrained here (no weights fetched) with
    genuinely different byte-level BPE vocabularies from `common.models.bpe`, each trained on its
    own corpus, so that the cross-tokenizer alignment is exercised:
      tiny:pivot    384 tokens, mixed code-ish string tasks + R documentation, short budget (weak
                    at both skills: the model that fusion should improve);
      tiny:coder    260 tokens (near character level), code-ish string tasks only (strong there);
      tiny:general  768 tokens, R documentation only (strong at general text).
    Each is trained once per machine and cached outside the repo (`common.cache`), keyed by its
    recipe, tokenizer, this code and the numerics.

`topk_distributions` runs a member over texts and returns, per token, its top-k log-probabilities
(what the paper's `get_data_representation.py` stores), plus the text's total NLL; the pipeline
caches them on disk once per (member, corpus, k).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import cache
from common import losses as common_losses
from common import sharding
from common.models import bpe
from common.models import decoder
from common.models import loader
from common.models import perplexity
from common.models import spec
from common.models import tokenizer as tokenizer_lib
from projects.fusechat import corpora as text_lib

EOS = '<|endoftext|>'
TINY_PREFIX = 'tiny:'


@dataclasses.dataclass(frozen=True)
class TinyRecipe:
  """How a smoke member is built: its vocabulary, its corpus and its budget."""

  vocab_size: int
  corpus: str  # 'code' | 'text' | 'mix'
  steps: int
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 192
  seq_len: int = 64
  batch_size: int = 16
  lr: float = 3e-3
  seed: int = 0

  def decoder_config(self, dtype: str = 'float32') -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
      vocab_size=self.vocab_size,
      d_model=self.d_model,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.d_model // self.num_heads,
      mlp_dim=self.mlp_dim,
      dtype=dtype,
    )


TINY = {
  'pivot': TinyRecipe(vocab_size=384, corpus='mix', steps=120),
  'coder': TinyRecipe(vocab_size=260, corpus='code', steps=400),
  'general': TinyRecipe(vocab_size=768, corpus='text', steps=400),
}


@dataclasses.dataclass
class Member:
  name: str
  model: decoder.Decoder
  tokenizer: tokenizer_lib.Tokenizer

  @property
  def start_id(self) -> int | None:
    return perplexity.start_id(self.tokenizer)

  def fingerprint(self) -> str:
    """Hash of the parameters and tokenizer: keys the cached distributions of this member."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(nnx.state(self.model, nnx.Param)):
      h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    h.update(repr(self.tokenizer.vocab_size).encode())
    for i in range(0, self.tokenizer.vocab_size, max(1, self.tokenizer.vocab_size // 512)):
      h.update(str(self.tokenizer.id_to_token(i)).encode())
    return h.hexdigest()[:20]


def _digest(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _corpus_fingerprint() -> str:
  # What the members' corpora depend on (edits elsewhere in corpora.py, e.g. the evaluation
  # items, do not retrain them).
  return cache.code_fingerprint(
    text_lib.code_documents,
    text_lib.code_example,
    text_lib.random_word,
    text_lib.train_docs,
    _corpus,
  ) + json.dumps({k: f(text_lib.LETTERS[:6]) for k, f in sorted(text_lib.OPS.items())})


def _corpus(kind: str) -> list[str]:
  """The pretraining documents of a smoke member (deterministic)."""
  code = text_lib.code_documents(600, seed=10_000)  # disjoint from fusion (seed) and eval seeds
  text = text_lib.train_docs()
  if kind == 'code':
    return code
  if kind == 'text':
    return text
  if kind == 'mix':
    return [d for pair in zip(code, text, strict=False) for d in pair]
  raise ValueError(f'unknown corpus {kind!r}')


def tiny_tokenizer(recipe: TinyRecipe) -> tokenizer_lib.Tokenizer:
  """The member's byte-level BPE (EOS = id 0), trained on its own corpus once and cached."""
  import tokenizers  # noqa: PLC0415

  key = _digest(recipe.vocab_size, recipe.corpus, tokenizers.__version__, _corpus_fingerprint())
  path = cache.cache_dir('fusechat', 'tokenizers') / f'{key}.json'
  if not path.is_file():
    tok = bpe.train_byte_level(
      _corpus(recipe.corpus), recipe.vocab_size, special_tokens=[EOS], min_frequency=2
    )
    cache.write_text(path, tok.to_str())
  return spec.file_tokenizer(path, eos=EOS)


def _train_tiny(recipe: TinyRecipe, tok: tokenizer_lib.Tokenizer) -> dict:
  ids = [tok.encode(t, add_bos=False) + [tok.eos_id] for t in _corpus(recipe.corpus)]
  stream = np.concatenate([np.asarray(i, np.int32) for i in ids])
  w = recipe.seq_len + 1
  chunks = stream[: len(stream) // w * w].reshape(-1, w)
  order = np.random.default_rng(recipe.seed).permutation(len(chunks))
  with sharding.unsharded():
    model = decoder.Decoder(recipe.decoder_config(), rngs=nnx.Rngs(recipe.seed))
  warmup = min(40, recipe.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, recipe.lr, warmup, max(recipe.steps, warmup + 1)
  )
  opt = nnx.Optimizer(
    model,
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95)),
    wrt=nnx.Param,
  )

  @cache.fixture_step
  def step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(lambda m: common_losses.next_token_loss(m, tokens)[0])(model)
    opt.update(model, grads)
    return loss

  for i in range(recipe.steps):
    rows = order[(np.arange(recipe.batch_size) + i * recipe.batch_size) % len(order)]
    step(model, opt, jnp.asarray(chunks[rows]))
  return nnx.state(model, nnx.Param).to_pure_dict()


def tiny_member(name: str, dtype: str = 'float32') -> Member:
  """A smoke member (see TINY), trained on first use and then read from the cache."""
  if name not in TINY:
    raise ValueError(f'unknown tiny member {name!r}; known: {sorted(TINY)}')
  recipe = TINY[name]
  tok = tiny_tokenizer(recipe)
  key = _digest(
    dataclasses.asdict(recipe),
    [tok.id_to_token(i) for i in range(tok.vocab_size)],
    cache.code_fingerprint(decoder, common_losses, _train_tiny, cache.fixture_step),
    _corpus_fingerprint(),
    cache.numerics_fingerprint(),
  )
  path = cache.cache_dir('fusechat', 'tiny_lm') / f'{name}-{key}.npz'

  def train():
    logging.info(
      'training the fusechat smoke member %s (%d steps, once; %s)', name, recipe.steps, path
    )
    params = _train_tiny(recipe, tok)
    return {
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }

  flat = cache.load_or_compute(path, train)
  params = {tuple(int(p) if p.isdigit() else p for p in k.split('/')): v for k, v in flat.items()}
  return Member(name, spec.build(recipe.decoder_config(dtype), params), tok)


def load_member(name: str, dtype: str = 'float32') -> Member:
  """`tiny:<name>` (smoke) or a pretrained asset name (real)."""
  if name.startswith(TINY_PREFIX):
    return tiny_member(name[len(TINY_PREFIX) :], dtype)
  model, _, tok = loader.load_pretrained(name, dtype=dtype)
  return Member(name, model, tok)


def place(member: Member, mesh: jax.sharding.Mesh) -> None:
  """Puts the member's model state, replicated, on `mesh` (in place)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = nnx.state(member.model)
  nnx.update(member.model, jax.device_put(state, replicated))


# ---------------------------------------------------------------------------------------------------
# Per-token distributions.


@dataclasses.dataclass(frozen=True)
class TopK:
  """A member's per-token top-k distributions over a list of texts (rows padded to one width).

  tokens int32 [N, T]: the text's tokens (0-padded), lengths int32 [N];
  ids int32 [N, T, k] / logp float32 [N, T, k]: the top-k next-token log-probabilities at the
  position that predicts tokens[:, t] (i.e. after the start token and tokens[:, :t]);
  nll float64 [N]: the NLL of all the text's tokens (full vocabulary), for MinCE selection.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  ids: np.ndarray
  logp: np.ndarray
  nll: np.ndarray

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


@nnx.jit(static_argnames=('k',))
def _topk_batch(model, tokens, mask, k):
  logits = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top_logp, top_ids = jax.lax.top_k(logp, k)
  gold = common_losses.token_logprobs(logits, tokens[:, 1:])
  nll = -jnp.sum(jnp.where(mask[:, 1:], gold, 0.0), axis=-1)
  return top_ids.astype(jnp.int32), top_logp, nll


def topk_distributions(
  member: Member, token_rows: Sequence[Sequence[int]], *, k: int, batch_size: int
) -> TopK:
  """Top-k next-token log-probabilities of `member` at every token of every row (see TopK)."""
  n = len(token_rows)
  width = max(1, max(len(r) for r in token_rows))
  start = member.start_id
  full = np.zeros((n, width + 1), np.int32)  # [start] + row; no start token: id 0 as context
  mask = np.zeros((n, width + 1), bool)
  lengths = np.zeros(n, np.int32)
  for i, r in enumerate(token_rows):
    full[i, 0] = 0 if start is None else start
    full[i, 1 : 1 + len(r)] = r
    mask[i, 1 : 1 + len(r)] = True
    lengths[i] = len(r)
  ids = np.zeros((n, width, k), np.int32)
  logp = np.zeros((n, width, k), np.float32)
  nll = np.zeros(n, np.float64)
  pad = -n % batch_size
  full_p = np.concatenate([full, np.zeros((pad, full.shape[1]), np.int32)])
  mask_p = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
  for s in range(0, n + pad, batch_size):
    i, lp, nl = _topk_batch(
      member.model,
      jnp.asarray(full_p[s : s + batch_size]),
      jnp.asarray(mask_p[s : s + batch_size]),
      k,
    )
    e = min(s + batch_size, n)
    ids[s:e], logp[s:e], nll[s:e] = (np.asarray(x)[: e - s] for x in (i, lp, nl))
  tokens = full[:, 1:]
  return TopK(tokens=tokens, lengths=lengths, ids=ids, logp=logp, nll=nll)
