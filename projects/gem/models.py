"""GEM (arXiv 2506.04344): one causal decoder for embeddings and generation, via special tokens.

A sequence is laid out as prefix | k special tokens | suffix. Every position carries a role
(`PAD`, `PREFIX`, `SPECIAL`, `SUFFIX`); the attention mask is built from the roles and and-ed with
the decoder's causal mask (`common.models.decoder.Decoder`'s `attention_mask` input):

  * suffix rows never see prefix columns, so everything the suffix learns about the prefix flows
    through the special tokens' hidden states, at every layer (the information bottleneck);
  * special rows never see other specials (special_i x special_j, i != j), so each special
    summarises the prefix on its own; `block_specials=False` gives gist tokens (the paper's ablation);
  * prefix rows are plain causal; a row with no special is exactly the causal LM;
  * padding columns are never read.

Position ids stay contiguous 0..T-1 and the specials take positions (the spec's reading). The
embedding of a text is the last-layer hidden state at its special tokens (mean over the k specials,
or their concatenation); the baselines pool the same model's last layer over the text instead (mean
or last token). Apart from the k new embedding rows and the InfoNCE log-temperature, GEM adds no
parameters.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from common import embeddings
from common.models import decoder
from common.models import vocab

PAD, PREFIX, SPECIAL, SUFFIX = 0, 1, 2, 3
POOLINGS = ('special', 'special_concat', 'mean', 'last')


def gem_mask(roles: jax.Array, *, block_specials: bool = True) -> jax.Array:
  """[B, T, T] bool (True = may attend), before the causal mask; roles [B, T] int."""
  roles = jnp.asarray(roles)
  r_row, r_col = roles[:, :, None], roles[:, None, :]
  allowed = (r_col != PAD) & ~((r_row == SUFFIX) & (r_col == PREFIX))
  if block_specials:
    eye = jnp.eye(roles.shape[1], dtype=bool)[None]
    allowed = allowed & ~((r_row == SPECIAL) & (r_col == SPECIAL) & ~eye)
  return allowed


def full_mask(roles: jax.Array, *, block_specials: bool = True) -> jax.Array:
  """The mask the decoder actually uses: gem_mask & causal (for tests and inspection)."""
  t = roles.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  return gem_mask(roles, block_specials=block_specials) & causal


class GemModel(nnx.Module):
  """The decoder plus InfoNCE's learnable log logit-scale (the only parameter GEM adds)."""

  def __init__(self, lm: decoder.Decoder, log_scale_init: float = embeddings.LOG_SCALE_INIT):
    self.lm = lm
    self.logit_scale = embeddings.LogitScale(log_scale_init)

  def hidden(self, tokens: jax.Array, roles: jax.Array, *, block_specials: bool = True):
    return self.lm.hidden_states(
      tokens, attention_mask=gem_mask(roles, block_specials=block_specials)
    )

  def logits(self, tokens: jax.Array, roles: jax.Array, *, block_specials: bool = True):
    h = self.hidden(tokens, roles, block_specials=block_specials)
    return self.lm.logits_from_hidden(h)


def pool(
  hidden: jax.Array, roles: jax.Array, special_positions: jax.Array | None, pooling: str
) -> jax.Array:
  """One vector per row from last-layer hidden [B, T, D].

  'special': mean of the outputs at special_positions [B, k]; 'special_concat': their
  concatenation [B, k*D]; 'mean' / 'last': over the text (prefix) tokens, ignoring the specials.
  """
  if pooling in ('special', 'special_concat'):
    if special_positions is None:
      raise ValueError(f'pooling {pooling!r} needs special_positions')
    at = embeddings.gather_positions(hidden, special_positions).astype(jnp.float32)
    if pooling == 'special':
      return at.mean(axis=1)
    return at.reshape(at.shape[0], -1)
  text = roles == PREFIX
  if pooling == 'mean':
    return embeddings.mean_pool(hidden, text)
  if pooling == 'last':
    return embeddings.last_token_pool(hidden, text)
  raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')


def embed(
  model: GemModel,
  tokens: jax.Array,
  roles: jax.Array,
  special_positions: jax.Array | None,
  pooling: str = 'special',
  *,
  block_specials: bool = True,
) -> jax.Array:
  """Embeddings [B, D] of end-appended rows (text | specials | padding) under the GEM mask."""
  h = model.hidden(tokens, roles, block_specials=block_specials)
  return pool(h, roles, special_positions, pooling)


def special_token_names(k: int) -> list[str]:
  return [f'<|gem_summary_{i}|>' for i in range(k)]


def add_special_tokens(
  model: decoder.Decoder, tokenizer, k: int, init: str = 'mean', seed: int = 0
) -> list[int]:
  """Adds GEM's k summary tokens to a pretrained model and its tokenizer (in place); their ids.

  Rows come from `common.models.vocab.extend_vocab` ('mean': every special starts at the mean
  embedding, so the old tokens' logits are unchanged; 'normal': distinct draws).
  """
  return vocab.extend_vocab(model, tokenizer, special_token_names(k), init=init, seed=seed)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> decoder.DecoderConfig:
  """config.model's decoder, or the pretrained model's with its vocabulary grown to vocab_size."""
  if config.model.get('pretrained'):
    from projects.gem import pretrained  # noqa: PLC0415 (imports this module)

    return pretrained.decoder_config(config.model.pretrained, vocab_size, config.dtype)
  return decoder.DecoderConfig.from_dict(
    {**config.model.to_dict(), 'vocab_size': vocab_size, 'dtype': config.dtype}
  )


def create_model(mcfg: decoder.DecoderConfig, seed: int) -> GemModel:
  """A GemModel around a decoder of shapes `mcfg` (`model_config`) initialised from `seed`."""
  return GemModel(decoder.Decoder(mcfg, rngs=nnx.Rngs(seed)))
