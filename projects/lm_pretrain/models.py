"""lm_pretrain's model: the shared decoder (common.models.decoder) with the data's vocabulary.

The template run trains `common.models.decoder.Decoder` unchanged (llama family: RMSNorm, RoPE,
grouped-query attention, SwiGLU); only its shapes come from the config.
"""

from __future__ import annotations

from flax import nnx
import ml_collections

from common.models import decoder


def model_config(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
  """The decoder's shapes; its vocabulary is the data's (data.vocab_size)."""
  return decoder.DecoderConfig.from_dict(
    {**config.model.to_dict(), 'vocab_size': config.data.vocab_size, 'dtype': config.dtype}
  )


def create_model(config: ml_collections.ConfigDict) -> decoder.Decoder:
  """A freshly initialised decoder, seeded by config.seed."""
  return decoder.Decoder(model_config(config), rngs=nnx.Rngs(config.seed))
