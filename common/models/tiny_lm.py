"""`tiny_lm()`: a small decoder that has learnt, trained once and cached outside the repo.

It trains a small decoder on the procedural MarkovLanguage deterministically (well under a minute on
2 CPU cores) and caches the parameters under a key hashed from its config, the source of the code
that produced it and the numerics of this process (common.cache), so tests and smoke runs that need a
model with real structure (samplers, RL, adapters, distillation) get one in milliseconds after the
first call.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import json
from typing import Any

from absl import logging
from flax import nnx
import jax
import numpy as np
import optax

from common import cache
from common import data
from common import losses
from common import sharding
from common.models import decoder


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
  vocab_size: int = 64
  seq_len: int = 64
  language_seed: int = 0
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 128
  steps: int = 300
  batch_size: int = 32
  lr: float = 3e-3
  seed: int = 0


def _code_fingerprint() -> str:
  # The language, the loss and the model: edits elsewhere in these modules do not retrain.
  return cache.code_fingerprint(
    data.MarkovLanguage, losses, decoder, _train_tiny_lm, cache.fixture_step
  )


def decoder_config(cfg: TinyLMConfig) -> decoder.DecoderConfig:
  """The DecoderConfig of the tiny LM `cfg` describes: what an abstract (eval_shape) or fresh copy
  of the shared tiny LM needs without loading or training it (e.g. adapter shape planning)."""
  return decoder.DecoderConfig(
    vocab_size=cfg.vocab_size,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.d_model // cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
  )


def _train_tiny_lm(cfg: TinyLMConfig) -> tuple[dict, list[float]]:
  """Trains on one device (no mesh) and returns (pure parameter dict, loss curve)."""
  lang = data.MarkovLanguage(cfg.vocab_size, cfg.seq_len, seed=cfg.language_seed)
  dcfg = decoder_config(cfg)
  with sharding.unsharded():
    model = decoder.Decoder(dcfg, rngs=nnx.Rngs(cfg.seed))
    warmup = min(30, cfg.steps // 10)
    tx = optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1)), b2=0.98
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @cache.fixture_step
  def step(model, opt, tokens):
    def loss_fn(m):
      return losses.next_token_loss(m, tokens)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  curve = []
  for i in range(cfg.steps):
    first = i * cfg.batch_size
    tokens = np.stack([lang[j]['tokens'] for j in range(first, first + cfg.batch_size)])
    curve.append(float(step(model, opt, tokens)))
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def _flatten(d: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + '/'))
    else:
      out[key] = np.asarray(v)
  return out


@dataclasses.dataclass
class TinyLM:
  model: nnx.Module
  language: data.MarkovLanguage
  config: TinyLMConfig
  loss_curve: list[float]


def tiny_lm(cfg: TinyLMConfig | None = None, **overrides) -> TinyLM:
  """A small decoder trained on the procedural language; cached outside the repo after first use."""
  cfg = dataclasses.replace(cfg or TinyLMConfig(), **overrides)
  key = hashlib.sha256(
    (
      json.dumps(dataclasses.asdict(cfg), sort_keys=True)
      + _code_fingerprint()
      + cache.numerics_fingerprint()
    ).encode()
  ).hexdigest()[:20]
  path = cache.cache_dir('tiny_lm') / f'{key}.npz'
  with sharding.unsharded():
    model = decoder.Decoder(decoder_config(cfg), rngs=nnx.Rngs(cfg.seed))
  template = nnx.state(model, nnx.Param).to_pure_dict()

  def train():
    logging.info(
      'training the shared tiny LM (%d steps; once per machine and config, cached in %s)',
      cfg.steps,
      path.parent,
    )
    params, curve = _train_tiny_lm(cfg)
    return {'__loss_curve__': np.asarray(curve), **_flatten(params)}

  flat = cache.load_or_compute(path, train)
  curve = [float(x) for x in flat.pop('__loss_curve__')]
  restored = jax.tree_util.tree_map_with_path(
    lambda p, _: flat['/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p)], template
  )
  nnx.update(model, _as_state(model, restored))
  lang = data.MarkovLanguage(cfg.vocab_size, cfg.seq_len, seed=cfg.language_seed)
  return TinyLM(model, lang, cfg, curve)


def _as_state(model: nnx.Module, pure: dict) -> Any:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  return state
