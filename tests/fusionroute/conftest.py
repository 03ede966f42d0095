"""Fixtures shared by the FusionRoute tests: small random routers and experts (no training)."""

from __future__ import annotations

from flax import nnx
import pytest

from common import sharding
from common.models import decoder
from projects.fusionroute import input_pipeline
from projects.fusionroute import models


def decoder_config(vocab_size: int = input_pipeline.VOCAB_SIZE) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(
    vocab_size=vocab_size,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=32,
  )


def make_model(n: int = 3, seed: int = 0, expert_seeds=None) -> models.FusionRoute:
  """A router and n experts with random weights (expert i seeded by expert_seeds[i])."""
  expert_seeds = expert_seeds if expert_seeds is not None else [seed + 1 + i for i in range(n)]
  with sharding.unsharded():
    lm = decoder.Decoder(decoder_config(), rngs=nnx.Rngs(seed))
    router = models.Router(lm, n, rngs=nnx.Rngs(seed + 100))
    experts = [decoder.Decoder(decoder_config(), rngs=nnx.Rngs(s)) for s in expert_seeds]
    return models.FusionRoute(router, experts)


@pytest.fixture
def model() -> models.FusionRoute:
  return make_model()
