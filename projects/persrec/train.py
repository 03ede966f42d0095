"""Training of HSTU / SASRec / PerSRec next-item recommenders.

`train_and_evaluate(config, workdir)` wires the model (models.SeqRec from config.model and the
data's catalogue), the data (input_pipeline: MovieLens or the procedural long histories), the
InfoNCE loss (losses), the optimizer (common.optim: clipped AdamW, warm-up + cosine to
optimizer.final_lr_frac), the full-catalogue evaluation (evaluate) and the standard loop
(common.train_loop.fit: checkpoints, metrics, resume, SIGTERM, NaN stop). results.json adds the
model's serving FLOPs, its slot counts and its parameter count.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import pathlib

from flax import nnx
import jax
import ml_collections

from common import config as config_lib
from common import metrics as metrics_lib
from common import optim
from common import sharding
from common import train_loop
from projects.persrec import arms
from projects.persrec import evaluate
from projects.persrec import input_pipeline
from projects.persrec import losses
from projects.persrec import models


def create_state_fn(
  config: ml_collections.ConfigDict, mcfg: models.ModelConfig
) -> Callable[[], train_loop.TrainState]:
  """fit's create_state: the model seeded by config.seed and the run's optimizer."""
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  return lambda: train_loop.TrainState(models.SeqRec(mcfg, rngs=nnx.Rngs(config.seed)), tx)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  reason = arms.check(config.arm, config.model)
  if reason:
    raise config_lib.ConfigError(reason)
  input_pipeline.check_config(config)  # before the run creates the workdir
  with train_loop.Run(config, workdir) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    d = input_pipeline.make_data(config)
    mcfg = models.model_config(config, d)
    result = train_loop.fit(
      run,
      create_state=create_state_fn(config, mcfg),
      loss_fn=losses.make_loss_fn(config),
      train_iter=input_pipeline.train_iterator(config, d),
      eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules, d, mcfg),
      learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
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
  with sharding.unsharded():
    return nnx.eval_shape(lambda: models.SeqRec(mcfg, rngs=nnx.Rngs(0)))
