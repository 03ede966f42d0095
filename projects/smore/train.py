"""Adapter fine-tuning of a frozen LM: LoRA, MixLoRA, HydraLoRA or S'MoRE at an equal budget.

`train_and_evaluate(config, workdir)`:
  1. the base model: the shared tiny LM (common.models.tiny_lm, smoke) or a pretrained GGUF model
     (common.models.loader, e.g. SmolLM2-135M-Instruct);
  2. the adapter plan: the layers matching config.adapter.pattern get the preset's adapter, with its
     rank chosen so the trainable count equals a LoRA of rank config.adapter.budget_rank on the same
     layers within config.adapter.tolerance (some layers may get rank k+1 and others k to land
     inside it); the plan, the budget and the real leaf count are logged and written to
     WORKDIR/adapter_plan.json; a budget that cannot be met is an AdapterError before anything runs;
  3. common.train_loop.fit (sharded state, jit step with donation, checkpoints of the whole state
     incl. the data iterator, resume, SIGTERM), started through its `initial_state` hook from the
     pretrained base with fresh adapters;
  4. loss: the reply tokens' cross-entropy plus the adapters' load-balance losses;
  5. optimizer: common.optim's clipped AdamW with warm-up + cosine decay, flattened (see _train);
  6. evaluation (projects/smore/evaluate.py): held-out exact-match accuracy (teacher-forced, see
     input_pipeline), overall and per task, and the held-out reply loss; at the end the adapters
     alone are saved to WORKDIR/adapters.
"""

from __future__ import annotations

import itertools

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import losses as common_losses
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_loop
from common.adapters import core
from common.models import decoder
from common.models import spec
from common.models import tiny_lm
from projects.smore import evaluate
from projects.smore import input_pipeline
from projects.smore import models

# Preset -> (method, fixed structure). The knob (the rank) is chosen by the budget plan.
PRESETS = {
  'lora': ('lora', {}),
  'mixlora': ('mixlora', {}),
  'hydralora': ('hydralora', {}),
  'smore22': ('smore', {'experts': (2, 2), 'fanouts': (2, 2)}),
  'smore44': ('smore', {'experts': (4, 4), 'fanouts': (2, 2)}),
}


# ---------------------------------------------------------------------------------------------------
# The adapter plan (equal trainable-parameter budget).


def _method_kwargs(a: ml_collections.ConfigDict, knob) -> tuple[str, dict]:
  """(method, kwargs) of the preset with rank knob `knob` (an int, or per-layer ranks for S'MoRE)."""
  if a.preset not in PRESETS:
    raise core.AdapterError(f'unknown adapter.preset {a.preset!r}; use one of {sorted(PRESETS)}')
  method, fixed = PRESETS[a.preset]
  if method == 'lora':
    return method, {'rank': knob}
  if method == 'mixlora':
    return method, {'experts': a.experts, 'rank': knob, 'top_k': a.top_k, 'gate': a.gate}
  if method == 'hydralora':
    return method, {'experts': a.experts, 'rank': knob}
  spec = models.SMoRESpec(
    experts=tuple(fixed['experts']),
    ranks=tuple(knob),
    fanouts=tuple(fixed['fanouts']),
    gate=a.gate,
    gate_dim=a.gate_dim,
    down_dim=a.down_dim,
    activation=a.activation,
    position=a.position,
    shared_pool=a.shared_pool,
    init=a.init,
    balance_weight=a.balance_weight,
  )
  return method, {'spec': spec}


def _knobs(a: ml_collections.ConfigDict, max_rank: int = 32) -> list:
  """Candidate rank settings: k for one-rank methods, (r_0, ..., r_{L-1}) for S'MoRE."""
  method, fixed = PRESETS.get(a.preset, (None, {}))
  if method != 'smore':
    return list(range(1, 8 * max_rank + 1))
  layers = len(fixed['experts'])
  if a.shared_pool:  # S'MoRE# shares one pool: one rank for every layer
    return [(r,) * layers for r in range(1, max_rank + 1)]
  # Near-equal ranks (the paper's presets use equal ones): r or r + 1 per layer.
  return sorted(
    {
      tuple(r + d for d in ds)
      for r in range(1, max_rank + 1)
      for ds in itertools.product((0, 1), repeat=layers)
    }
  )


def plan(a: ml_collections.ConfigDict, shapes: dict[str, tuple[int, int]]) -> dict:
  """{'method', 'layers': {path: knob}, 'budget', 'count', 'rel_diff'} for adapter config `a`.

  The budget is a LoRA of rank a.budget_rank on the same layers. The candidate rank settings are
  sorted by their total count when used on every layer; for each pair of neighbours (a, b) in that
  order, the first j layers take b and the rest a, and the plan closest to the budget wins.
  """
  paths = list(shapes)
  budget = sum(models.num_params('lora', i, o, rank=a.budget_rank) for i, o in shapes.values())

  unique = sorted(set(shapes.values()))

  def per_layer(knob) -> np.ndarray:
    method, kw = _method_kwargs(a, knob)
    by_shape = {sh: models.num_params(method, *sh, **kw) for sh in unique}
    return np.asarray([by_shape[shapes[p]] for p in paths], np.int64)

  counts = sorted(
    ((int(c.sum()), i, knob, c) for i, knob in enumerate(_knobs(a)) for c in [per_layer(knob)]),
    key=lambda t: (t[0], t[1]),
  )
  best = None  # (|diff|, total, low knob, high knob, j)
  for (_, _, ka, ca), (_, _, kb, cb) in itertools.pairwise(counts):
    # First j layers at kb, the rest at ka, for j = 0..n.
    totals = (
      np.concatenate([[0], np.cumsum(cb)]) + int(ca.sum()) - np.concatenate([[0], np.cumsum(ca)])
    )
    j = int(np.argmin(np.abs(totals - budget)))
    if best is None or abs(int(totals[j]) - budget) < best[0]:
      best = (abs(int(totals[j]) - budget), int(totals[j]), ka, kb, j)
  if best is None:
    best = (abs(counts[0][0] - budget), counts[0][0], counts[0][2], counts[0][2], 0)
  _, total, ka, kb, j = best
  rel = abs(total - budget) / budget
  method, _ = _method_kwargs(a, ka)
  if rel > a.tolerance:
    raise core.AdapterError(
      f'adapter preset {a.preset!r} cannot meet the budget of {budget} trainable parameters '
      f'(LoRA rank {a.budget_rank} on {len(paths)} layers) within {a.tolerance:.0%}: the closest '
      f'plan has {total} ({rel:.1%} off); change adapter.budget_rank or the preset structure'
    )
  knobs = {p: (kb if i < j else ka) for i, p in enumerate(paths)}
  return {'method': method, 'layers': knobs, 'budget': budget, 'count': total, 'rel_diff': rel}


def target_shapes(cfg: decoder.DecoderConfig, a: ml_collections.ConfigDict) -> dict:
  """{path: (d_in, d_out)} of the layers the adapter pattern selects (no memory allocated)."""
  with sharding.unsharded():
    abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0)))
  paths = core.select(abstract, a.pattern, a.exclude or None)
  out = {}
  for p in paths:
    lin = core.module_at(abstract, p)
    out[p] = (lin.in_features, lin.out_features)
  return out


def add_adapters(
  model: nnx.Module, a: ml_collections.ConfigDict, the_plan: dict, seed: int, dtype: str
) -> list[str]:
  # A KeyStream, not nnx.Rngs: the same keys, but a draw inside abstract_state's trace costs O(1)
  # instead of a walk over everything traced so far (models.KeyStream; tests/smore/init_test.py).
  rngs = models.KeyStream(jax.random.fold_in(jax.random.key(seed), 0xADA))

  def make(path, linear):
    method, kw = _method_kwargs(a, the_plan['layers'][path])
    return models.factory(method, rngs, dtype=dtype, **kw)(path, linear)

  return core.adapt(model, a.pattern, make, exclude=a.exclude or None)


# ---------------------------------------------------------------------------------------------------
# Model and loss.


def base_model(config: ml_collections.ConfigDict, *, abstract: bool = False):
  """(decoder config, a function building the base Decoder, tokenizer or None)."""
  m = config.model
  if m.source == 'tiny_lm':
    tcfg = tiny_lm.TinyLMConfig()
    dcfg = tiny_lm.decoder_config(tcfg)
    if abstract:
      return dcfg, lambda: decoder.Decoder(dcfg, rngs=nnx.Rngs(0)), None
    return dcfg, lambda: tiny_lm.tiny_lm(tcfg).model, None
  from common.models import loader  # noqa: PLC0415

  dcfg = loader.load_config(m.source, dtype=config.dtype)
  if abstract:
    return dcfg, lambda: decoder.Decoder(dcfg, rngs=nnx.Rngs(0)), None
  tok = loader.load_tokenizer(m.source)
  return dcfg, lambda: loader.load_pretrained(m.source, dtype=config.dtype)[0], tok


def loss_fn(model, batch, key):
  with core.context(token_mask=batch['segment_ids'] > 0, key=key, train=True):
    logits = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'])
  ce, count = common_losses.cross_entropy(logits, batch['targets'], batch['loss_mask'])
  bal = core.aux_loss(model)
  return ce + bal, {'ce': ce, 'balance': bal, 'reply_tokens': count}


# ---------------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  a = config.adapter
  dcfg, _, _ = base_model(config, abstract=True)
  shapes = target_shapes(dcfg, a)
  the_plan = plan(a, shapes)  # raises before anything heavy when the budget cannot be met
  with train_loop.Run(config, workdir) as run:
    method, layers = the_plan['method'], the_plan['layers']
    spec.write(  # model.json: LoRA merges into the base; the mixtures export beside it
      run.workdir,
      dcfg,
      tokenizer=None if config.model.source == 'tiny_lm' else config.model.source,
      adapters=spec.lora_adapters(layers)
      if method == 'lora'
      else spec.mixture_adapters(method, layers, preset=a.preset, adapter=a.to_dict()),
      context_length=config.data.seq_len,
    )
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    return _train(run, a, shapes, the_plan)


def _train(run: train_loop.Run, a, shapes, the_plan) -> train_loop.FitResult:
  config, workdir = run.config, run.workdir
  # Clipped AdamW, warm-up + cosine to 0.1 x lr, on the adapters raveled into one vector
  # (flatten): a mixture adapter has many small leaves (S'MoRE: 24 per layer), and per-leaf Adam
  # costs a few small ops and a Python (un)flatten per moment and leaf each step; one vector makes
  # it a handful (S'MoRE (2-2) step CPU time -19%, LoRA -1%; reports/smore/history.md). The update
  # is elementwise, so it is the same AdamW. The moments are one unsharded vector: fine for
  # adapter-sized states (SmolLM2's: 6.1M floats).
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps, flatten=True)

  def create(build_base):
    def fn():
      model = build_base()
      add_adapters(model, a, the_plan, config.seed, config.dtype)
      return train_loop.TrainState(model, tx)

    return fn

  _, abstract_base, _ = base_model(config, abstract=True)
  spec = train_loop.abstract_state(create(abstract_base), run.mesh, run.rules)
  real = core.count_trainable(spec.state['model'])
  if real != the_plan['count']:
    raise AssertionError(f'closed-form count {the_plan["count"]} != real leaf count {real}')
  info = {
    **the_plan,
    'real_count': real,
    'frozen': train_loop.count_params(spec.state['model']) - real,
    'preset': a.preset,
  }
  metrics_lib.log(
    'adapter %s (%s) on %d layers: %d trainable parameters, budget %d (LoRA rank %d), %.2f%% off; '
    'ranks %s',
    a.preset,
    the_plan['method'],
    len(shapes),
    real,
    the_plan['budget'],
    a.budget_rank,
    100 * the_plan['rel_diff'],
    sorted(set(map(str, the_plan['layers'].values()))),
  )
  if jax.process_index() == 0:
    metrics_lib.write_json(workdir / 'adapter_plan.json', info)

  _, real_base, tokenizer = base_model(config)
  d = input_pipeline.make_data(config, tokenizer)
  if hasattr(d.train, 'kept'):
    metrics_lib.log(
      'examples that fit data.seq_len, kept/total per task: train %s, test %s',
      d.train.kept,
      d.test.kept,
    )

  def pretrained_state(spec):
    """Adapters initialised as configured around the REAL base weights (fit's default would
    build the base from scratch)."""
    with sharding.unsharded():
      state = nnx.state(create(real_base)())
    return jax.tree.map(lambda v, s: jax.device_put(v, s), state, spec.shardings)

  def save_adapters(model, step):
    core.save_adapters(workdir / 'adapters', model, step=step)

  return train_loop.fit(
    run,
    create_state=create(abstract_base),
    loss_fn=loss_fn,
    train_iter=input_pipeline.train_iterator(config, d),
    eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules, d),
    initial_state=pretrained_state,
    on_end=save_adapters,
    learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
  )
