"""The RL papers' policies (EBPO, EAD): the smoke's warmed-up tiny character LM, or a pretrained
decoder.

The policy is the shared decoder (common.models.decoder) in one of two forms, by config.model.kind:
  * 'tiny': a character-level decoder made partly competent by a short SFT warm-up (common.sft).
    RLVR needs a policy that already solves some prompts (else every group fails and no estimator
    learns anything) and not all of them. The warm-up trains on `sft_examples` train examples
    (common.rl.tasks' smoke set) rendered '36-38=' -> '-2<EOS>' for `steps` steps; its parameters
    are cached outside the repo keyed by the config and the warm-up code (`_fingerprint`, like
    common.models.tiny_lm), so every run, seed and paper starts from the same policy and only the
    first run pays for it (about 10-30 s on 2 cores when idle).
  * 'pretrained': config.model.name through common.models.loader (e.g. SmolLM2-135M-Instruct),
    its parameters placed on the run's mesh; with config.warmup.steps > 0 (`PretrainedWarmup`)
    first fine-tuned on worked answers of the run's task set, which is how a released model that
    starts below the 10-60% window is brought into it. Cached the same way (key: the model file's
    sha256, the config, the code), so the arms and seeds of a comparison share one start.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import hashlib
import inspect
import json
import time

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import optax

from common import cache
from common import config as config_lib
from common import sft
from common import sharding
from common.models import decoder
from common.models import loader
from common.models import spec
from common.rl import tasks


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  sft_examples: int = 4000  # the first N train examples (both tasks, interleaved)
  steps: int = 1000
  batch_size: int = 32
  seq_len: int = 64  # packed rows
  lr: float = 3e-3
  seed: int = 0
  data_seed: int = 0


def decoder_config(cfg: WarmupConfig, dtype: str = 'float32') -> decoder.DecoderConfig:
  return decoder.DecoderConfig(
    vocab_size=tasks.CharTokenizer().vocab_size,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    num_kv_heads=cfg.num_heads,
    head_dim=cfg.d_model // cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    dtype=dtype,
  )


def sft_examples(cfg: WarmupConfig) -> list[sft.Example]:
  tok = tasks.CharTokenizer()
  rows = tasks.load_examples('smoke', 'train', cfg.data_seed)[: cfg.sft_examples]
  return [
    sft.tokenize(tok, {'prompt': tasks.expression_prompt(r), 'response': r['answer']}) for r in rows
  ]


def _sft(
  model: nnx.Module,
  examples: list[sft.Example],
  *,
  steps: int,
  batch_size: int,
  seq_len: int,
  lr: float,
  seed: int,
) -> list[float]:
  """Trains `model` in place for `steps` packed SFT steps over reshuffled epochs of `examples`
  (AdamW, cosine decay to 10%); returns the loss curve. One device: a warm-up runs once per
  machine and is cached, so it is never on a run's critical path."""
  with sharding.unsharded():
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.1), b2=0.98)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @cache.fixture_step
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lambda m: sft.sft_loss(m, batch)[0])(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  curve = []
  batches: list = []
  t0 = time.perf_counter()
  while len(curve) < steps:
    if not batches:
      order = rng.permutation(len(examples))
      batches = list(sft.packed_batches([examples[i] for i in order], seq_len, batch_size))[::-1]
    curve.append(float(step(model, opt, batches.pop())))
    if len(curve) % max(1, steps // 10) == 0 and len(curve) < steps:
      rate = len(curve) / (time.perf_counter() - t0)
      logging.info(
        'SFT warm-up step %d/%d: loss %.4f (%.2f steps/s, ETA %.0f s)',
        len(curve),
        steps,
        curve[-1],
        rate,
        (steps - len(curve)) / rate,
      )
  return curve


def _train(cfg: WarmupConfig) -> tuple[dict, list[float]]:
  examples = sft_examples(cfg)
  with sharding.unsharded():
    model = decoder.Decoder(decoder_config(cfg), rngs=nnx.Rngs(cfg.seed))
  curve = _sft(
    model,
    examples,
    steps=cfg.steps,
    batch_size=cfg.batch_size,
    seq_len=cfg.seq_len,
    lr=cfg.lr,
    seed=cfg.seed,
  )
  return nnx.state(model, nnx.Param).to_pure_dict(), curve


def _fingerprint(cfg: WarmupConfig) -> str:
  # What the trained parameters depend on: this training code, the SFT code, the data (task specs,
  # rendering, tokenizer), the config, the model's parameter tree (paths and shapes) and the
  # numerics (common.cache.numerics_fingerprint: the test suite's XLA flags train other bits than
  # a run's). The decoder's source is left out on purpose: edits there that keep the parameters'
  # meaning (speed work) would otherwise retrain for minutes; a change of parameter layout still
  # retrains.
  parts = [
    cache.fixture_step,
    _sft,
    _train,
    sft_examples,
    sft,
    tasks.CharTokenizer,
    tasks.expression_prompt,
  ]
  src = ''.join(inspect.getsource(p) for p in parts) + repr(tasks.SMOKE_TASKS)
  src += json.dumps(dataclasses.asdict(cfg), sort_keys=True)
  with sharding.unsharded():  # a real (tiny) model: nnx.eval_shape under a mesh fails
    model = decoder.Decoder(decoder_config(cfg), rngs=nnx.Rngs(0))
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
  src += repr([(jax.tree_util.keystr(p), tuple(v.shape)) for p, v in leaves])
  src += cache.numerics_fingerprint(devices=False)  # a sharded run shares it
  return hashlib.sha256(src.encode()).hexdigest()[:20]


def warm_policy(cfg: WarmupConfig | None = None, dtype: str = 'float32') -> tuple[nnx.Module, list]:
  """(the warmed-up decoder, its SFT loss curve), trained on first use and cached."""
  cfg = cfg or WarmupConfig()
  path = cache.cache_dir('rl_warmup') / f'{_fingerprint(cfg)}.npz'
  with sharding.unsharded():
    model = decoder.Decoder(decoder_config(cfg, dtype), rngs=nnx.Rngs(cfg.seed))

  def train():
    logging.info(
      'training the RL warm-up policy: %d SFT steps of %d sequences (once per machine and '
      'config; cached in %s); about half a minute to a few minutes on 2 CPU cores',
      cfg.steps,
      cfg.batch_size,
      path.parent,
    )
    t0 = time.perf_counter()
    params, curve = _train(cfg)
    logging.info(
      'warm-up policy trained in %.0f s (final SFT loss %.3f)', time.perf_counter() - t0, curve[-1]
    )
    flat = cache.tree_to_arrays(params)
    flat['__loss_curve__'] = np.asarray(curve)
    return flat

  flat = cache.load_or_compute(path, train)
  curve = [float(x) for x in flat.pop('__loss_curve__')]
  # numpy leaves, uncommitted: the tiny policy goes wherever the run's jit places it.
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, cache.arrays_to_tree(flat, state.to_pure_dict()))
  nnx.update(model, state)
  return model, curve


@dataclasses.dataclass(frozen=True)
class PretrainedWarmup:
  """An SFT warm-up of a pretrained policy on worked answers (tasks.worked_answer) to the first
  `sft_examples` questions of its task set's train split, in the chat template the RL prompts use.

  What sets a pretrained policy's starting pass rate when the released model starts below the
  10-60% window (SmolLM2-135M-Instruct: pass@1 0.013 at T = 1 on 'smollm2_easy'). steps = 0 is the
  released model, unchanged. Cached like the tiny warm-up: once per machine and config.
  """

  steps: int = 0
  sft_examples: int = 2000
  batch_size: int = 4  # packed rows of seq_len tokens (about 3 chats per row)
  seq_len: int = 256
  lr: float = 1e-5
  seed: int = 0
  data_seed: int = 0


def pretrained_sft_examples(tokenizer, task_set: str, cfg: PretrainedWarmup) -> list[sft.Example]:
  rows = tasks.load_examples(task_set, 'train', cfg.data_seed)[: cfg.sft_examples]
  return [sft.tokenize(tokenizer, {'messages': tasks.chat_sft_messages(r)}) for r in rows]


def _pretrained_fingerprint(name: str, task_set: str, cfg: PretrainedWarmup) -> str:
  # The trained parameters depend on the model file (its sha256 names the released weights and
  # tokenizer), the loader's conversion, this code, the SFT code, the chat rendering and the task
  # set's specs, the config, and the numerics (common.cache.numerics_fingerprint).
  parts = [
    cache.fixture_step,
    _sft,
    warm_pretrained,
    pretrained_sft_examples,
    sft,
    tasks._chat_question,  # noqa: SLF001
    tasks.worked_answer,
    tasks.chat_sft_messages,
  ]
  src = ''.join(inspect.getsource(p) for p in parts) + tasks.CHAT_INSTRUCTION
  src += repr(tasks.TASK_SETS[task_set]) + json.dumps(dataclasses.asdict(cfg), sort_keys=True)
  src += f'{loader.resolve(name).sha256} v{loader.CONVERTER_VERSION}'
  src += cache.numerics_fingerprint(devices=False)  # a sharded run shares it
  return hashlib.sha256(src.encode()).hexdigest()[:20]


# The name stays: warm_pretrained's source (which calls it) is part of its cache key.
_flatten = cache.tree_to_arrays


def _restore(model: nnx.Module, flat: dict[str, np.ndarray]) -> None:
  """Writes cached parameters into a loaded pretrained `model`, each placed with the sharding its
  leaf already has (the loader's placement on the run's mesh)."""
  state = nnx.state(model, nnx.Param)
  restored = cache.arrays_to_tree(
    flat, state.to_pure_dict(), leaf_fn=lambda a, v: jax.device_put(a, v.sharding)
  )
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)


def warm_pretrained(
  name: str,
  cfg: PretrainedWarmup,
  task_set: str,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  dtype: str = 'float32',
) -> tuple[nnx.Module, list[float]]:
  """(pretrained `name` after cfg's SFT warm-up on `task_set`, placed on `mesh`; its SFT loss
  curve). steps = 0: the released model as common.models.loader loads it, and no curve."""
  model = loader.load_pretrained(name, mesh=mesh, rules=rules, dtype=dtype)[0]
  if cfg.steps == 0:
    return model, []
  path = (
    cache.cache_dir('rl_warmup') / f'pretrained-{_pretrained_fingerprint(name, task_set, cfg)}.npz'
  )

  def train():
    logging.info(
      'SFT warm-up of %s on %s: %d steps of %d packed rows (once per machine and config; cached '
      'in %s); about %d minutes on 2 CPU cores',
      name,
      task_set,
      cfg.steps,
      cfg.batch_size,
      path.parent,
      max(1, cfg.steps * cfg.batch_size // 20),
    )
    t0 = time.perf_counter()
    student, _, tok = loader.load_pretrained(name)  # float32 on one device, whatever the run
    examples = pretrained_sft_examples(tok, task_set, cfg)
    curve = _sft(
      student,
      examples,
      steps=cfg.steps,
      batch_size=cfg.batch_size,
      seq_len=cfg.seq_len,
      lr=cfg.lr,
      seed=cfg.seed,
    )
    logging.info(
      'SFT warm-up trained in %.0f s: loss %.3f -> %.3f',
      time.perf_counter() - t0,
      curve[0],
      curve[-1],
    )
    flat = _flatten(nnx.state(student, nnx.Param).to_pure_dict())
    flat['__loss_curve__'] = np.asarray(curve)
    return flat

  flat = cache.load_or_compute(path, train)
  curve = [float(x) for x in flat.pop('__loss_curve__')]
  _restore(model, flat)
  return model, curve


def create_policy(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> Callable[[], nnx.Module]:
  """A factory of the initial policy of config.model.kind ('tiny' | 'pretrained')."""
  if config.model.kind == 'tiny':
    wcfg = WarmupConfig(**config.warmup.to_dict())
    return lambda: warm_policy(wcfg, config.dtype)[0]
  if config.model.kind == 'pretrained':
    pcfg = PretrainedWarmup(**config.warmup.to_dict())
    return lambda: warm_pretrained(
      config.model.name, pcfg, config.data.task_set, mesh=mesh, rules=rules, dtype=config.dtype
    )[0]
  raise config_lib.ConfigError(f"model.kind={config.model.kind!r}; expected 'tiny' or 'pretrained'")


def description(config: ml_collections.ConfigDict) -> dict:
  """`common.models.spec.write`'s arguments for the initial policy of config.model.kind: its decoder
  config, tokenizer and context (the RL loop trains the Decoder itself, at the model's root).

  The tiny LM's CharTokenizer becomes a no-merge byte-level BPE with the same ids (pad 0, BOS 1,
  EOS 2, then the characters), so it leaves the repo with the model.
  """
  if config.model.kind == 'tiny':
    wcfg = WarmupConfig(**config.warmup.to_dict())
    specials = ['<pad>', '<s>', '</s>']
    tok = spec.tokenizer_from_vocab(
      [*specials, *tasks.CharTokenizer.CHARS],
      specials=specials,
      pad='<pad>',
      bos='<s>',
      eos='</s>',
      add_bos=True,
    )
    return {'config': decoder_config(wcfg, config.dtype), 'tokenizer': tok, 'context_length': None}
  if config.model.kind == 'pretrained':
    name = config.model.name
    return {
      'config': loader.load_config(name, dtype=config.dtype),
      'tokenizer': name,
      'context_length': loader.context_length(name),
    }
  raise config_lib.ConfigError(f"model.kind={config.model.kind!r}; expected 'tiny' or 'pretrained'")
