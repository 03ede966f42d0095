"""GEM's losses and schedule: L = (1 - alpha) L_ntp + alpha L_cl (paper Sec. 3).

L_ntp is next-token cross-entropy (common.losses) on the mixed data under the GEM mask, with special
targets held out. L_cl is InfoNCE (common.embeddings) between the special-token embeddings of a text
and of its prefix-dropped copy, the other texts of the batch being the negatives, with CLIP's
learnable clamped logit scale. The recipe switches alpha from 0 to 1 after `switch_steps` steps and
the learning rate from the NTP phase's to the contrastive phase's at the same boundary (each phase a
cosine decay).

A run's schedule: `phases(config)` gives the (pretrain, mixed NTP, contrastive) step counts for
gem.mode; `alpha_of_step` the alpha of each step (0 until the contrastive phase, then
gem.alpha_after); `make_loss_fn` the training loss common.train_loop.fit calls, tracing only the
loss branches the schedule can select (`schedule_alphas`).
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
import jax.numpy as jnp
import ml_collections
import optax

from common import config as config_lib
from common import embeddings
from common import losses
from projects.gem import models


def alpha_at(index: int, switch_steps: int, alpha_after: float = 1.0) -> float:
  """alpha for 0-based step `index` (the number of updates already made): 0, then alpha_after."""
  return 0.0 if index < switch_steps else float(alpha_after)


def learning_rate(
  total_steps: int, switch_steps: int, lr_ntp: float, lr_cl: float, warmup: int = 0
) -> optax.Schedule:
  """Cosine decay from lr_ntp over the NTP phase, then from lr_cl over the rest (optax counts
  updates from 0, so count `switch_steps` is the first contrastive update, like `alpha_at`)."""
  cl_steps = max(total_steps - switch_steps, 1)
  if switch_steps <= 0:
    return optax.warmup_cosine_decay_schedule(0.0, lr_cl, warmup, max(cl_steps, warmup + 1))
  ntp = optax.warmup_cosine_decay_schedule(0.0, lr_ntp, warmup, max(switch_steps, warmup + 1))
  return optax.join_schedules([ntp, optax.cosine_decay_schedule(lr_cl, cl_steps)], [switch_steps])


def ntp_loss(model: models.GemModel, batch, *, block_specials: bool = True):
  """(mean NLL over loss-masked targets, their count)."""
  logits = model.logits(batch['inputs'], batch['roles'], block_specials=block_specials)
  mask = batch['loss_mask'] * batch['valid'][:, None]
  return losses.cross_entropy(logits, batch['targets'], mask)


def contrastive_loss(
  model: models.GemModel, batch, *, pooling: str = 'special', block_specials: bool = True
):
  """InfoNCE of anchors vs their dropped-out positives (valid rows only); returns (loss, scale)."""
  kw = dict(pooling=pooling, block_specials=block_specials)
  q = models.embed(model, batch['anchor'], batch['anchor_roles'], batch['special_positions'], **kw)
  d = models.embed(
    model, batch['positive'], batch['positive_roles'], batch['positive_special_positions'], **kw
  )
  scale = model.logit_scale()
  return embeddings.info_nce(q, d, scale, batch['valid'] > 0), scale


def branches_for(alphas) -> tuple[str, ...]:
  """The loss branches ('ntp' alpha = 0, 'cl' alpha = 1, 'both' otherwise) alphas can select."""
  out = {'ntp' if a <= 0.0 else 'cl' if a >= 1.0 else 'both' for a in alphas}
  return tuple(b for b in ('ntp', 'cl', 'both') if b in out)


def total_loss(
  model: models.GemModel,
  batch,
  *,
  pooling: str = 'special',
  block_specials: bool = True,
  alphas: tuple[float, ...] | None = None,
):
  """(L, metrics) with alpha = the batch's 'alpha' (one value per batch, set by the schedule).

  alpha 0 or 1 evaluates only the active term (lax.switch); anything between evaluates both.
  `alphas` (static): the values the batches can carry (a run's schedule has two, 0 and
  alpha_after); only their branches are traced, which halves the train step's trace time for the
  paper's 0 -> 1 recipe. None = all three branches. An alpha whose branch was not traced would run
  the first traced branch instead; metrics['alpha_untraced'] is 1 for such a batch (train.py
  declares every value its schedule produces, and its test checks the metric stays 0).
  """
  alpha = jnp.mean(batch['alpha'])

  def ntp_only(m):
    loss, _ = ntp_loss(m, batch, block_specials=block_specials)
    return loss, jnp.zeros(()), loss

  def cl_only(m):
    loss, _ = contrastive_loss(m, batch, pooling=pooling, block_specials=block_specials)
    return jnp.zeros(()), loss, loss

  def both(m):
    ln, _ = ntp_loss(m, batch, block_specials=block_specials)
    lc, _ = contrastive_loss(m, batch, pooling=pooling, block_specials=block_specials)
    return ln, lc, (1.0 - alpha) * ln + alpha * lc

  names = ('ntp', 'cl', 'both') if alphas is None else branches_for(alphas)
  if not names:
    raise ValueError('total_loss: alphas is empty')
  fns = {'ntp': ntp_only, 'cl': cl_only, 'both': both}
  full = jnp.where(alpha <= 0.0, 0, jnp.where(alpha >= 1.0, 1, 2))  # index into (ntp, cl, both)
  every = ('ntp', 'cl', 'both')
  lookup = jnp.asarray([names.index(n) if n in names else 0 for n in every])
  traced = jnp.asarray([n in names for n in every])[full]
  ln, lc, loss = nnx.switch(lookup[full], [fns[n] for n in names], model)
  metrics = {
    'ntp_loss': ln,
    'cl_loss': lc,
    'alpha': alpha,
    'alpha_untraced': 1.0 - traced.astype(jnp.float32),
    'logit_scale': model.logit_scale(),
    'inserted_frac': jnp.mean(batch['inserted']),
    'too_short_frac': jnp.mean(batch['too_short']),
    'truncated_frac': jnp.mean(batch['truncated']),
    'empty_frac': 1.0 - jnp.mean(batch['valid']),
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------------
# The run's schedule and training loss.


def phases(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(pretrain, mixed, contrastive) step counts for the run's mode."""
  g = config.gem
  if g.mode == 'gem':
    return g.pretrain_steps, g.mixed_steps, g.cl_steps
  if g.mode == 'contrastive_only':
    return g.pretrain_steps, 0, g.mixed_steps + g.cl_steps
  raise config_lib.ConfigError(f"gem.mode must be 'gem' or 'contrastive_only', got {g.mode!r}")


def alpha_of_step(config: ml_collections.ConfigDict, index: int) -> float:
  """alpha of 0-based step `index`: 0 in the pretraining and mixed-NTP phases, then alpha_after."""
  pre, mixed, _ = phases(config)
  return alpha_at(index, pre + mixed, config.gem.alpha_after)


def schedule_alphas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """Every alpha the run's schedule produces (the loss traces only their branches)."""
  pre, mixed, cl = phases(config)
  return tuple(sorted({alpha_of_step(config, i) for i in (0, pre + mixed) if i < pre + mixed + cl}))


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable:
  """fit's loss_fn(model, batch, key): `total_loss` with the run's pooling, mask and alphas."""
  alphas = schedule_alphas(config)

  def loss_fn(model, batch, key):
    del key  # deterministic: the data carry all randomness
    return total_loss(
      model,
      batch,
      pooling=config.gem.pooling,
      block_specials=config.gem.block_specials,
      alphas=alphas,
    )

  return loss_fn
