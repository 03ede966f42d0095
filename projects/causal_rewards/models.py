"""Causal Rewards' reward models: the shared decoder with a scalar reward head
(common.reward_models.heads.RewardModel), by config.model.kind:
  * 'tiny': a character-level decoder trained from scratch with its head (smoke scale);
  * 'pretrained': config.model.name through common.models.loader (SmolLM2-135M-Instruct), its
    weights loaded by fit's `initial_state`; `model.trainable` picks what trains: 'head' (a linear
    probe on the frozen LM), 'lora' (LoRA on the attention and MLP projections, plus the head) or
    'all'.
The tiny backbone starts from a short language-model warm-up on correct "expr=answer" strings of
the question pool (`warm_backbone`, cached outside the repo), as RLHF reward models start from the
SFT model (InstructGPT §3.5): a decoder from scratch learns the cue in a few steps but not the
sums in a smoke budget (measured: clean-pair accuracy 0.48 after 300 steps with no cue at all), so
without it there would be no content for an invariant model to fall back on. The warm-up never
sees a cue or a wrong answer.
CRM changes the objective (losses.py), not the model: phi, the representation the MMD penalty
regularises, is the head's input (the last response token's final-normed hidden state).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import hashlib
import json

from absl import logging
from flax import nnx
import ml_collections
import numpy as np
import optax

from common import cache
from common import config as config_lib
from common import losses as lm_losses
from common import sharding
from common.adapters import core as adapters
from common.adapters import lora
from common.models import decoder
from common.reward_models import heads
from projects.causal_rewards import input_pipeline

TRAINABLE = ('all', 'head', 'lora')
LORA_PATTERN = r'layers/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'


def decoder_config(config: ml_collections.ConfigDict) -> decoder.DecoderConfig:
  m = config.model
  if m.kind == 'tiny':
    return decoder.DecoderConfig(
      vocab_size=input_pipeline.CharTokenizer().vocab_size,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_heads,
      head_dim=m.d_model // m.num_heads,
      mlp_dim=m.mlp_dim,
      dtype=config.dtype,
    )
  from common.models import loader  # noqa: PLC0415

  return loader.load_config(m.name, dtype=config.dtype)


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.model.trainable not in TRAINABLE:
    raise config_lib.ConfigError(
      f'model.trainable={config.model.trainable!r}; expected one of {TRAINABLE}'
    )
  if config.model.pool not in heads.POOLS:
    raise config_lib.ConfigError(f'model.pool={config.model.pool!r}; expected {heads.POOLS}')


@dataclasses.dataclass(frozen=True)
class Warmup:
  """The tiny backbone's language-model warm-up (config.model.warmup_steps > 0)."""

  steps: int
  batch_size: int = 64
  lr: float = 3e-3
  seq_len: int = 12
  seed: int = 0


def _warm_rows(pool, rng, batch: int, seq_len: int) -> np.ndarray:
  tok = input_pipeline.CharTokenizer()
  rows = np.zeros((batch, seq_len), np.int32)
  for j, i in enumerate(rng.integers(len(pool), size=batch)):
    q = pool[int(i)]
    ids = [tok.bos_id, *tok.encode(f'{q["expression"]}={q["gold"]}'), tok.eos_id][:seq_len]
    rows[j, : len(ids)] = ids
  return rows


def _warm_train(dcfg: decoder.DecoderConfig, w: Warmup, pool) -> tuple[dict, list[float]]:
  with sharding.unsharded():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(w.seed))
    tx = optax.adamw(optax.cosine_decay_schedule(w.lr, w.steps, 0.1), b2=0.98)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @cache.fixture_step
  def step(model, opt, rows):
    def f(m):
      logits = m(rows[:, :-1])
      return lm_losses.cross_entropy(logits, rows[:, 1:], rows[:, 1:] > 0)[0]

    loss, grads = nnx.value_and_grad(f)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(w.seed)
  curve = []
  for _ in range(w.steps):
    curve.append(float(step(model, opt, _warm_rows(pool, rng, w.batch_size, w.seq_len))))
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def warm_backbone(config: ml_collections.ConfigDict) -> decoder.Decoder:
  """The tiny decoder after its warm-up (trained on first use, cached by config, pool and code)."""
  dcfg = decoder_config(config)
  w = Warmup(steps=config.model.warmup_steps)
  pool = input_pipeline.question_pool(config.data.seed)
  key = json.dumps([dataclasses.asdict(w), repr(dcfg), [q['question'] for q in pool]])
  key += cache.code_fingerprint(
    _warm_rows, _warm_train, input_pipeline.CharTokenizer, cache.fixture_step
  )
  key += cache.numerics_fingerprint()
  name = hashlib.sha256(key.encode()).hexdigest()[:20]
  path = cache.cache_dir('causal_rewards_warmup') / f'{name}.npz'
  with sharding.unsharded():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(w.seed))
  template = nnx.state(model, nnx.Param).to_pure_dict()

  def train():
    logging.info('warming up the tiny backbone: %d LM steps (once per machine; %s)', w.steps, path)
    params, curve = _warm_train(dcfg, w, pool)
    logging.info('warm-up LM loss %.3f -> %.3f', curve[0], curve[-1])
    return cache.tree_to_arrays(params)

  flat = cache.load_or_compute(path, train)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, cache.arrays_to_tree(flat, template))
  nnx.update(model, state)
  return model


def build(
  config: ml_collections.ConfigDict,
  backbone: Callable[[], decoder.Decoder] | None = None,
  *,
  abstract: bool = False,
) -> heads.RewardModel:
  """The reward model: `backbone()` + the head, with config.model.trainable applied. Default
  backbone: the warmed tiny decoder (model.warmup_steps > 0), else a fresh seeded decoder of
  decoder_config (also for `abstract` shapes). The head is seeded by config.seed."""
  m = config.model
  if backbone is None and m.kind == 'tiny' and m.warmup_steps > 0 and not abstract:
    backbone = functools.partial(warm_backbone, config)
  with sharding.unsharded():
    if backbone is not None:
      body = backbone()
    else:
      body = decoder.Decoder(decoder_config(config), rngs=nnx.Rngs(config.seed))
    model = heads.RewardModel(body, pool=m.pool, rngs=nnx.Rngs(config.seed + 1))
    if m.trainable == 'head':
      heads.freeze_backbone(model)
    elif m.trainable == 'lora':
      make = lora.factory(rank=m.lora_rank, rngs=nnx.Rngs(config.seed + 2))
      adapters.adapt(model.backbone, LORA_PATTERN, make)
  return model


def pretrained_backbone(config: ml_collections.ConfigDict) -> Callable[[], decoder.Decoder]:
  """A factory of the real pretrained decoder (config.model.name) on one device."""
  from common.models import loader  # noqa: PLC0415

  return lambda: loader.load_pretrained(config.model.name, dtype=config.dtype)[0]
