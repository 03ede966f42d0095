"""The smoke's experts: tiny decoders trained from scratch on the procedural domains, cached.

FusionRoute takes its experts as given (the paper: MergeBench's Llama-3.1-8B math and coding
fine-tunes plus Llama-3.1-8B-Instruct). The smoke stand-ins follow the same recipe at toy scale
(core.md §2(e) steps 1-2), so that merging baselines have a common base to take task vectors from:

  1. a base decoder (`ExpertsConfig`: 4 layers, d_model 64, about 270k parameters; a 2-layer one
     did not learn two-digit addition in a 600-step budget) trained on the balanced mixture of the
     three domains for `base_steps`;
  2. one expert per domain fine-tuned from the base for `steps[i]` steps on its own domain, with a
     `replay` fraction of mixture rows ("each on one domain plus a little general text"); the math
     expert's rows carry the planted flaw (input_pipeline: 'carry9').

The router LM is initialised from one of these (config.router.init: the smoke uses the math
expert, the best single expert on the mixed set, as the paper starts from its best single expert,
Llama-3.1-8B-Instruct; 'base' is the ablation). Everything here runs once per machine and configuration: the parameters are cached
outside the repo under a fingerprint of the config, this training code, the data generators and
the parameter tree (as common.models.tiny_lm and EBPO's warm-up do), so every seed and run of the
smoke starts from the same experts. `pairs` caches the experts' greedy answers to the preference
prompts the same way (they depend on nothing else).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import inspect
import json
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache
from common import data
from common import losses as lm_losses
from common import sharding
from common.models import decoder
from common.sampling import sampler
from projects.fusionroute import input_pipeline as ip


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  base_steps: int = 600
  steps: tuple[int, ...] = (1000, 300, 300)  # per domain: math, code, instruct
  batch_size: int = 64
  lr: float = 3e-3
  replay: float = 0.1
  seed: int = 0
  flaw: str = 'carry9'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ExpertsConfig:
    e = config.experts
    return cls(
      d_model=e.d_model,
      num_layers=e.num_layers,
      num_heads=e.num_heads,
      mlp_dim=e.mlp_dim,
      base_steps=e.base_steps,
      steps=tuple(int(s) for s in e.steps),
      batch_size=e.batch_size,
      lr=e.lr,
      replay=e.replay,
      seed=e.seed,
      flaw=config.data.flaw,
    )


def decoder_config(cfg: ExpertsConfig, dtype: str = 'float32') -> decoder.DecoderConfig:
  """Every smoke model's shapes (base, experts and router LM share them)."""
  return decoder.DecoderConfig(
    vocab_size=ip.VOCAB_SIZE,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_heads,
    head_dim=cfg.d_model // cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    dtype=dtype,
  )


def new_decoder(cfg: ExpertsConfig, dtype: str = 'float32', seed: int = 0) -> decoder.Decoder:
  with sharding.unsharded():
    return decoder.Decoder(decoder_config(cfg, dtype), rngs=nnx.Rngs(seed))


def row_loss(model, batch) -> jax.Array:
  """Mean next-token NLL over the answer tokens of a batch of input_pipeline.sft_row rows."""
  logits = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  return lm_losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])[0]


def _train(model: decoder.Decoder, source, steps: int, cfg: ExpertsConfig) -> list[float]:
  """Single-device AdamW (warm-up + cosine) on `source`'s rows; updates `model` in place."""
  warmup = min(50, steps // 5)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, steps, 0.1 * cfg.lr)
  with sharding.unsharded():
    opt = nnx.Optimizer(model, optax.adamw(schedule, b2=0.98), wrt=nnx.Param)

  @cache.fixture_step
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(row_loss)(model, batch)
    opt.update(model, grads)
    return loss

  it = data.batch_iterator(
    source, global_batch_size=cfg.batch_size, process_index=0, process_count=1, prefetch=0
  )
  curve = []
  for _ in range(steps):
    batch = {k: v for k, v in next(it).items() if k != 'domain'}
    curve.append(step(model, opt, batch))
  return [float(x) for x in jax.device_get(curve)]


def _params(model: nnx.Module) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _train_all(cfg: ExpertsConfig) -> dict:
  """{'base': params, 'experts': [params] * 3, 'curves': {...}} trained from scratch."""
  base = new_decoder(cfg, seed=cfg.seed)
  t0 = time.perf_counter()
  mixture = ip.SFTSource(cfg.seed, cfg.flaw)
  curves = {'base': _train(base, mixture, cfg.base_steps, cfg)}
  logging.info(
    'fusionroute base trained: %d steps, %.0f s', cfg.base_steps, time.perf_counter() - t0
  )
  base_params = _params(base)
  experts = []
  for dom, steps in enumerate(cfg.steps):
    model = new_decoder(cfg, seed=cfg.seed)
    load_params(model, base_params)
    flawed = dom == ip.MATH and cfg.flaw != 'none'
    source = ip.SFTSource(
      cfg.seed + 1 + dom, cfg.flaw, domain=dom, replay=cfg.replay, flawed=flawed
    )
    curves[ip.DOMAINS[dom]] = _train(model, source, steps, cfg)
    experts.append(_params(model))
    logging.info(
      'fusionroute %s expert trained: %d steps (final loss %.3f), %.0f s so far',
      ip.DOMAINS[dom],
      steps,
      curves[ip.DOMAINS[dom]][-1],
      time.perf_counter() - t0,
    )
  return {'base': base_params, 'experts': experts, 'curves': curves}


def load_params(model: nnx.Module, params: dict) -> nnx.Module:
  """Copies a pure parameter dict into `model` (nnx.Param or Frozen leaves alike)."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


def decoder_with(cfg: ExpertsConfig, params: dict, dtype: str = 'float32') -> decoder.Decoder:
  """A decoder holding `params`, built from abstract shapes: no random initial weights are drawn
  only to be overwritten (eager random init of every model was a large share of a smoke run's
  time). Equal to load_params(new_decoder(cfg, dtype), params)."""
  return decoder_from(decoder_config(cfg, dtype), params)


def decoder_from(dcfg: decoder.DecoderConfig, params: dict) -> decoder.Decoder:
  """`decoder_with` for any decoder shapes (the SmolLM2 arm's experts too)."""
  captured = {}

  def split():  # jax.eval_shape: nnx.eval_shape would read the annotations as a mesh's axes
    with sharding.unsharded():
      captured['graphdef'], state = nnx.split(decoder.Decoder(dcfg, rngs=nnx.Rngs(0)))
    return state

  state = jax.eval_shape(split)
  graphdef = captured['graphdef']
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  leaves = jax.tree.leaves(state)
  if not all(isinstance(v, jax.Array) for v in leaves):
    raise ValueError('params do not cover every variable of the decoder')
  return nnx.merge(graphdef, state)


def fingerprint(cfg: ExpertsConfig) -> str:
  """What the trained experts depend on: this training code, the data generators, the config, the
  parameter tree (paths and shapes) and the numerics (common.cache.numerics_fingerprint). The
  decoder's source is left out on purpose (speed work there must not retrain); a change of its
  parameter layout still does."""
  parts = [
    cache.fixture_step,
    _train,
    _train_all,
    row_loss,
    ip.problem,
    ip._draw,  # noqa: SLF001 - the generator is what the experts learnt
    ip.sft_row,
    ip.reply_row,
    ip.SFTSource,
    ip.carry9,
    ip.split_of,
  ]
  src = ''.join(inspect.getsource(p) for p in parts) + ip.CHARS + repr(ip.DOMAINS)
  src += json.dumps(dataclasses.asdict(cfg), sort_keys=True)
  leaves = jax.tree_util.tree_flatten_with_path(_params_shapes(cfg))[0]
  src += repr([(jax.tree_util.keystr(p), tuple(v.shape)) for p, v in leaves])
  src += cache.numerics_fingerprint(devices=False)  # a sharded run shares it
  return hashlib.sha256(src.encode()).hexdigest()[:20]


def _params_shapes(cfg: ExpertsConfig) -> dict:
  with sharding.unsharded():
    abstract = nnx.eval_shape(lambda: decoder.Decoder(decoder_config(cfg), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


@dataclasses.dataclass
class Experts:
  """Host copies (pure dicts of numpy arrays) of the base and the n experts, and loss curves."""

  config: ExpertsConfig
  base: dict
  experts: list[dict]
  curves: dict[str, list[float]]
  key: str

  def decoders(self, dtype: str = 'float32') -> list[decoder.Decoder]:
    return [decoder_with(self.config, p, dtype) for p in self.experts]

  def base_decoder(self, dtype: str = 'float32') -> decoder.Decoder:
    return decoder_with(self.config, self.base, dtype)


def load(cfg: ExpertsConfig) -> Experts:
  """The base and experts of `cfg`, trained on first use (about a minute on 2 busy cores) and
  cached outside the repo."""
  key = fingerprint(cfg)
  path = cache.cache_dir('fusionroute', 'experts') / f'{key}.npz'
  template = _params_shapes(cfg)

  def train():
    logging.info(
      'training the FusionRoute smoke experts: base %d steps, experts %s steps (once per machine '
      'and config; cached in %s)',
      cfg.base_steps,
      cfg.steps,
      path.parent,
    )
    out = _train_all(cfg)
    flat = cache.tree_to_arrays(out['base'], 'base')
    for i, p in enumerate(out['experts']):
      flat.update(cache.tree_to_arrays(p, f'expert{i}'))
    for name, curve in out['curves'].items():
      flat[f'curve/{name}'] = np.asarray(curve, np.float32)
    return flat

  flat = cache.load_or_compute(path, train)
  curves = {k[len('curve/') :]: [float(x) for x in v] for k, v in flat.items() if k[:6] == 'curve/'}
  return Experts(
    config=cfg,
    base=cache.arrays_to_tree(flat, template, 'base'),
    experts=[cache.arrays_to_tree(flat, template, f'expert{i}') for i in range(len(cfg.steps))],
    curves=curves,
    key=key,
  )


# ---------------------------------------------------------------------------------------------------
# The experts' answers (preference pairs).


def greedy_answers(
  model: decoder.Decoder, problems: Sequence[ip.Problem], batch_size: int = 256
) -> list[str]:
  """A model's greedy answers (common.sampling's decoder, stopping at EOS) as strings."""
  out = []
  cfg = sampler.SamplingConfig(
    max_new_tokens=ip.ANSWER_LEN, temperature=0.0, stop_tokens=(ip.EOS,), pad_id=ip.PAD
  )
  for start in range(0, len(problems), batch_size):
    chunk = list(problems[start : start + batch_size])
    prompts = [ip.prompt_ids(p) for p in chunk]
    prompts += [prompts[0]] * (batch_size - len(prompts))  # one shape, one compile
    with sharding.unsharded():
      gen = sampler.generate(model, prompts, config=cfg, prompt_bucket=ip.PROMPT_LEN)
    out += [ip.decode(row) for row in np.asarray(gen.tokens)[: len(chunk)]]
  return out


def pairs(config: ml_collections.ConfigDict, experts: Experts) -> dict[str, np.ndarray]:
  """input_pipeline.make_pairs over the pair prompts, from the experts' greedy answers (cached
  with the experts: they depend only on the experts and data.seed / data.pair_prompts)."""
  problems = ip.pair_problems(config)
  src = inspect.getsource(greedy_answers) + inspect.getsource(ip.make_pairs)
  key = hashlib.sha256(
    f'{experts.key}|{config.data.seed}|{config.data.pair_prompts}|{src}'.encode()
  ).hexdigest()[:20]
  path = cache.cache_dir('fusionroute', 'pairs') / f'{key}.npz'
  return cache.load_or_compute(
    path, lambda: ip.make_pairs(problems, [greedy_answers(m, problems) for m in experts.decoders()])
  )
