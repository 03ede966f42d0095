"""Training and full-catalogue evaluation of HSTU / SASRec / PerSRec next-item recommenders.

`train_and_evaluate(config, workdir)` wires the model (models.SeqRec from config.model), the data
(input_pipeline: MovieLens or the procedural long histories), the InfoNCE loss (losses) and the
standard loop (common.train_loop.fit: checkpoints, metrics, resume, SIGTERM, NaN stop).

Every evaluation ranks the whole catalogue for each held-out user of the validation and test sets
(metrics: Recall@{5,10,50}, NDCG@{10,50}, MRR; keys 'val/...' and 'test/...'); on the synthetic
source also on the users whose target is a long-term favourite ('.../longterm/...'). A user whose
window holds no known item gets the training-popularity ranking (the defined cold-start fallback).
For a cacheable PerSRec model, every evaluation also runs the serving path (compress, then serve)
on the first validation batch and reports the largest difference from the single pass
('serving_max_abs_diff', ~1e-7; spec §6(d).2). results.json adds the model's serving FLOPs.
"""

from __future__ import annotations

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import config as config_lib
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from projects.persrec import arms
from projects.persrec import input_pipeline
from projects.persrec import losses
from projects.persrec import metrics
from projects.persrec import models


def model_config(config: ml_collections.ConfigDict, d: input_pipeline.Data) -> models.ModelConfig:
  """The model's shapes: config.model plus the data's catalogue and user counts."""
  try:
    return models.ModelConfig.from_dict(
      {
        **config.model.to_dict(),
        'num_items': d.num_items,
        'num_users': d.num_users,
        'dtype': config.dtype,
      }
    )
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f'config.model: {e}') from e


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    o.lr,
    o.warmup_steps,
    max(config.train.num_steps, o.warmup_steps + 1),
    o.lr * o.final_lr_frac,
  )
  return optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
  )


def create_state_fn(config: ml_collections.ConfigDict, mcfg: models.ModelConfig):
  tx = make_optimizer(config)
  return lambda: train_loop.TrainState(models.SeqRec(mcfg, rngs=nnx.Rngs(config.seed)), tx)


def sequence_loss(model: models.SeqRec, batch, key, loss_cfg: ml_collections.ConfigDict):
  """InfoNCE over every item slot with a next item (token slots have no output here at all)."""
  cfg = model.cfg
  dropout_key = jax.random.fold_in(key, 0) if cfg.dropout > 0 else None
  out = model(batch['items'], batch['timestamps'], batch['user'], key=dropout_key)
  h = model.item_outputs(out)  # [B, P + R, d]
  targets = models.sanitize_ids(batch['targets'], cfg.num_items)
  items = models.sanitize_ids(batch['items'], cfg.num_items)
  w = batch['weights'] * (targets > 0) * (items > 0)
  negatives = losses.sample_negatives(
    jax.random.fold_in(key, 1), loss_cfg.negatives, loss_cfg.num_negatives, cfg.num_items, targets
  )
  loss, aux = losses.info_nce(
    h.reshape(-1, cfg.d_model),
    targets.reshape(-1),
    w.reshape(-1),
    model.item_table(),
    negatives,
    model.logit_scale(),
    threshold=loss_cfg.fn_threshold,
    valid_items=model.valid_items(),
  )
  return loss, {**aux, 'logit_scale': model.logit_scale()}


def make_loss_fn(config: ml_collections.ConfigDict):
  loss_cfg = config.loss
  return lambda model, batch, key: sequence_loss(model, batch, key, loss_cfg)


def fallback_scores(popularity: np.ndarray, vocab_size: int) -> np.ndarray:
  """log(1 + training count) per item id: the ranking for users with no known history item."""
  out = np.zeros(vocab_size, np.float32)
  out[: len(popularity)] = np.log1p(popularity)
  return out


def scores(model: models.SeqRec, vectors: jax.Array, items: jax.Array, fallback: jax.Array):
  """Cosine scores [B, vocab] of user vectors; users with no known item get `fallback`."""
  cos = losses.normalize(vectors) @ model.item_table().T
  known = jnp.any(models.sanitize_ids(items, model.cfg.num_items) > 0, axis=1)
  return jnp.where(known[:, None], cos, fallback[None, :])


def candidates(model: models.SeqRec, seen: jax.Array | None) -> jax.Array:
  """[B, vocab] (or [vocab]) items that may be recommended: real items not already seen."""
  valid = model.valid_items()
  if seen is None:
    return valid
  b = seen.shape[0]
  hit = jnp.zeros((b, model.cfg.vocab_size), bool).at[jnp.arange(b)[:, None], seen].set(True)
  return valid[None, :] & ~hit


def make_eval_fn(config, mesh, d: input_pipeline.Data, mcfg: models.ModelConfig):
  rules = tuple(tuple(r) for r in config.sharding.rules)
  batches = {
    split: input_pipeline.eval_batches(config, exs, jax.process_index(), jax.process_count())
    for split, exs in d.evals.items()
  }
  fallback = jnp.asarray(fallback_scores(d.popularity, mcfg.vocab_size))
  exclude = d.exclude_seen

  @nnx.jit
  def batch_sums(model, batch):
    vec = model.user_vectors(batch['items'], batch['timestamps'], batch['user'])
    s = scores(model, vec, batch['items'], fallback)
    cand = candidates(model, batch['seen'] if exclude else None)
    rank = metrics.ranks(s, batch['target'], cand)
    out = {'': metrics.rank_sums(rank, batch['weight'])}
    out['longterm/'] = metrics.rank_sums(rank, batch['weight'] * batch['longterm'])
    return out

  @nnx.jit
  def serving_gap(model, batch):
    old, recent = models.split_window(batch['items'], model.cfg)
    old_ts, recent_ts = models.split_window(batch['timestamps'], model.cfg)
    cache = model.compress(old, old_ts, batch['user'])
    cached = model.serve(cache, recent, recent_ts)
    single = model.user_vectors(batch['items'], batch['timestamps'], batch['user'])
    return jnp.max(jnp.abs(cached - single))

  def evaluate(model, step):
    del step
    out = {}
    for split, bs in batches.items():
      total: dict = {}
      for b in bs:
        sums = jax.device_get(batch_sums(model, sharding.to_global(b, mesh, rules)))
        for group, vals in sums.items():
          for k, v in vals.items():
            total.setdefault(group, {}).setdefault(k, 0.0)
            total[group][k] += float(v)
      for group, vals in total.items():
        if group and vals['users'] == 0:
          continue  # no long-term targets (MovieLens)
        for k, v in metrics.from_sums(vals).items():
          out[f'{split}/{group}{k}'] = v
    if mcfg.cacheable:
      first = sharding.to_global(batches['val'][0], mesh, rules)
      out['serving_max_abs_diff'] = float(serving_gap(model, first))
    return out

  return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  reason = arms.check(config.arm, config.model)
  if reason:
    raise config_lib.ConfigError(reason)
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.fit(run, create_state=None, loss_fn=None, train_iter=None)
    d = input_pipeline.make_data(config)
    mcfg = model_config(config, d)
    result = train_loop.fit(
      run,
      create_state=create_state_fn(config, mcfg),
      loss_fn=make_loss_fn(config),
      train_iter=input_pipeline.train_iterator(config, d),
      eval_fn=make_eval_fn(config, run.mesh, d, mcfg),
    )
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / 'results.json'
    res = json.loads(path.read_text())
    res['serving_flops'] = models.serving_flops(mcfg)
    res['model'] = {
      'length': mcfg.length,
      'num_tokens': mcfg.num_tokens,
      'num_items': mcfg.num_items,
      'num_params': train_loop.count_params(nnx.state(_abstract(mcfg), nnx.Param)),
    }
    metrics_lib.write_json(path, res)
  return result


def _abstract(mcfg: models.ModelConfig):
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.SeqRec(mcfg, rngs=nnx.Rngs(0)))
