"""GEM on a real pretrained LM (SmolLM2-135M first): tokenizer and initial state.

The paper's path: a pretrained decoder gets k new special tokens (`models.add_special_tokens`, rows
initialised at the mean embedding, so the old tokens' logits are unchanged) and is then fine-tuned
with mixed NTP and the contrastive loss. Here that means: weights from `common.models.loader` (the
GGUF asset converted once and cached), the model's own BPE tokenizer with the same k tokens added
(the ids agree with the model's new rows because both are extended from the same base in the same
order), and no pretraining phase (gem.pretrain_steps = 0: the base LM is the real model).

`TokenizerAdapter` gives common.models.tokenizer.Tokenizer the few `tokenizers.Tokenizer` calls
projects/gem/input_pipeline.py makes, so the data code is the same for both tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from flax import nnx
import jax

from common import sharding
from common.models import decoder
from common.models import loader
from projects.gem import models


@dataclasses.dataclass(frozen=True)
class _Encoding:
  ids: list[int]


class TokenizerAdapter:
  """common.models.tokenizer.Tokenizer behind the `tokenizers.Tokenizer` API input_pipeline uses."""

  def __init__(self, tok):
    self.tok = tok

  def encode(self, text: str) -> _Encoding:
    return _Encoding(self.tok.encode(text, add_bos=False))

  def encode_batch(self, texts: Sequence[str]) -> list[_Encoding]:
    return [self.encode(t) for t in texts]

  def token_to_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def get_vocab_size(self) -> int:
    return self.tok.vocab_size

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(ids, skip_special=False)


def tokenizer(name: str, num_special: int) -> TokenizerAdapter:
  """The pretrained model's tokenizer with GEM's k specials appended (as add_special_tokens does)."""
  tok = loader.load_tokenizer(name)
  tok.add_tokens(models.special_token_names(num_special), special=True)
  return TokenizerAdapter(tok)


def decoder_config(name: str, vocab_size: int, dtype: str) -> decoder.DecoderConfig:
  """The pretrained model's architecture with the vocabulary grown to `vocab_size` (the specials)."""
  base = loader.load_config(name, dtype=dtype)
  if vocab_size < base.vocab_size:
    raise ValueError(f'vocab_size {vocab_size} is below {name}\'s {base.vocab_size}')
  return dataclasses.replace(base, vocab_size=vocab_size)


def load_model(name: str, num_special: int, dtype: str = 'float32') -> models.GemModel:
  """GemModel around the real weights with the k special rows added (mean init); on one device."""
  lm, _, tok = loader.load_pretrained(name, dtype=dtype)
  models.add_special_tokens(lm, tok, num_special, init='mean')
  return models.GemModel(lm)


def initial_state_fn(name: str, num_special: int, dtype: str, make_state):
  """fit's `initial_state`: make_state(GemModel with the real weights), laid out as spec.shardings."""

  def initial_state(spec):
    with sharding.unsharded():
      state = nnx.state(make_state(load_model(name, num_special, dtype)))
    return jax.tree.map(lambda v, s: jax.device_put(v, s), state, spec.shardings)

  return initial_state
