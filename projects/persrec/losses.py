"""Next-item InfoNCE with sampled, in-batch or full-catalogue negatives (HSTU/HLLM/PerSRec loss).

For each position with a target item t and output o (spec §6(a), public code `_compute_loss`):

  logits = s * [cos(o, e_t), cos(o, e_n1), ..., cos(o, e_nM)],   loss = -log softmax(logits)[0]

with s = exp(log_scale) a learnable logit scale clamped to [0, log 100] or a fixed 1/temperature
(the model owns it: `SeqRec.logit_scale`). A negative n with cos(e_t, e_n) > threshold (0.99) is a
false negative, i.e. (almost) the target itself, and is dropped; this is what removes an in-batch
or sampled copy of the target. Negatives are one pool of M ids per batch shared by all positions
(the public code draws M per position; a shared pool costs N*M instead of N*M*d gathers and is the
standard in-batch formulation):

  'sampled'   M ids uniform over the catalogue 1..num_items;
  'in_batch'  M ids drawn from the batch's own targets (popularity-weighted; padding is dropped);
  'full'      every item (exact softmax over the catalogue; cheap for MovieLens-size catalogues).

`sequence_loss` applies it to a SeqRec's outputs at every item slot with a next item (token slots
have no output at all); `make_loss_fn` is the training loss common.train_loop.fit calls.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from projects.persrec import models

NEGATIVES = ('sampled', 'in_batch', 'full')
MASKED_LOGIT = -1e30


def sample_negatives(
  key: jax.Array, kind: str, num_negatives: int, num_items: int, targets: jax.Array
) -> jax.Array:
  """The batch's negative pool: int32 ids [M] (0 = no negative, dropped by `info_nce`)."""
  if kind == 'sampled':
    return jax.random.randint(key, (num_negatives,), 1, num_items + 1, dtype=jnp.int32)
  if kind == 'in_batch':
    flat = targets.reshape(-1)
    idx = jax.random.randint(key, (num_negatives,), 0, flat.shape[0])
    return flat[idx].astype(jnp.int32)
  if kind == 'full':
    return jnp.arange(1, num_items + 1, dtype=jnp.int32)
  raise ValueError(f'unknown negatives {kind!r}; use one of {NEGATIVES}')


def normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce(
  outputs: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  item_table: jax.Array,
  negatives: jax.Array,
  logit_scale: jax.Array,
  *,
  threshold: float = 0.99,
  valid_items: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean InfoNCE over N positions.

  outputs [N, d] (any scale; normalised here); targets [N] item ids; weights [N] (0 = no loss, e.g.
  padding or token slots); item_table [V, d] L2-normalised; negatives [M] ids; valid_items [V] bool
  (ids that may serve as negatives). Returns (loss, metrics) with the number of negatives kept per
  position and the in-sample top-1 accuracy.
  """
  o = normalize(outputs)
  e_t = item_table[targets]
  e_n = item_table[negatives]
  pos = jnp.sum(o * e_t, axis=-1, keepdims=True)
  neg = o @ e_n.T
  # False-negative masking: cos(target, negative) > threshold drops the negative for that position.
  same = (e_t @ e_n.T) > threshold
  usable = negatives > 0
  if valid_items is not None:
    usable &= valid_items[negatives]
  drop = same | ~usable[None, :]
  logits = jnp.concatenate([pos, neg], axis=-1) * logit_scale
  logits = jnp.where(
    jnp.concatenate([jnp.zeros_like(pos, bool), drop], axis=-1), MASKED_LOGIT, logits
  )
  per_position = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
  w = weights.astype(jnp.float32)
  total = jnp.maximum(w.sum(), 1e-9)
  loss = jnp.sum(per_position * w) / total
  kept = jnp.sum((~drop).astype(jnp.float32), axis=-1)
  top1 = jnp.all(logits[:, 1:] < logits[:, :1], axis=-1).astype(jnp.float32)
  return loss, {
    'negatives_kept': jnp.sum(kept * w) / total,
    'in_sample_top1': jnp.sum(top1 * w) / total,
    'loss_positions': w.sum(),
  }


def sequence_loss(model: models.SeqRec, batch, key, loss_cfg: ml_collections.ConfigDict):
  """InfoNCE over every item slot with a next item (token slots have no output here at all)."""
  cfg = model.cfg
  dropout_key = jax.random.fold_in(key, 0) if cfg.dropout > 0 else None
  out = model(batch['items'], batch['timestamps'], batch['user'], key=dropout_key)
  h = model.item_outputs(out)  # [B, P + R, d]
  targets = models.sanitize_ids(batch['targets'], cfg.num_items)
  items = models.sanitize_ids(batch['items'], cfg.num_items)
  w = batch['weights'] * (targets > 0) * (items > 0)
  negatives = sample_negatives(
    jax.random.fold_in(key, 1), loss_cfg.negatives, loss_cfg.num_negatives, cfg.num_items, targets
  )
  loss, aux = info_nce(
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


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable:
  """fit's loss_fn(model, batch, key): `sequence_loss` with the run's config.loss."""
  loss_cfg = config.loss
  return lambda model, batch, key: sequence_loss(model, batch, key, loss_cfg)
