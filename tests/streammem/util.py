"""Shared fixtures of the StreamMem tests: a tiny random decoder over the planted-fact language (the
streaming loop's invariants hold for any weights, so nothing is trained here)."""

from __future__ import annotations

import functools

from flax import nnx

from common import sharding
from common.models import decoder
from projects.streammem import input_pipeline
from projects.streammem import models

LANG = input_pipeline.FactLanguage()
CFG = decoder.DecoderConfig(
  vocab_size=LANG.vocab_size,
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
)


@functools.cache
def model() -> decoder.Decoder:
  with sharding.unsharded():
    return decoder.Decoder(CFG, rngs=nnx.Rngs(0))


@functools.cache
def streamer() -> models.Streamer:
  return models.Streamer(model())


def episodes(batch: int, length: int, seed: int = 0, facts_per_depth: int = 1):
  return LANG.episodes(seed, range(batch), stream_len=length, facts_per_depth=facts_per_depth)
