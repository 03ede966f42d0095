"""Causal Rewards (arXiv 2501.09620) reward-model training: `train_and_evaluate(config, workdir)`.

Wires the paper's pieces into the standard loop (common.train_loop.fit): the reward model
(models.py: common.reward_models.heads.RewardModel on the shared decoder), the pairs with a
spurious cue (input_pipeline.py), the objective (losses.py: Bradley-Terry + lambda * the CRM MMD
penalty; lambda = 0 is the vanilla reward model; data.balance reweights pairs so the cue is
independent of the label, the data-balancing baseline) and the evaluation on the decorrelated test
quads (evaluate.py, with the length-penalty baseline computed on the same model). Checkpoints,
resume, sharding and metrics are the run skeleton's.
"""

from __future__ import annotations

from flax import nnx
import jax
import ml_collections

from common import config as config_lib
from common import optim
from common import sharding
from common import train_loop
from projects.causal_rewards import evaluate
from projects.causal_rewards import input_pipeline
from projects.causal_rewards import losses
from projects.causal_rewards import models


def check_config(config: ml_collections.ConfigDict) -> None:
  """The paper's keys, before the run touches the workdir."""
  input_pipeline.check_config(config)
  models.check_config(config)
  losses.check_config(config.crm)
  crm = config.crm
  if crm.lam > 0 and crm.representation == 'features' and config.model.trainable == 'head':
    raise config_lib.ConfigError(
      'crm.representation=features with model.trainable=head: the penalty on a frozen '
      "backbone's features has no gradient; use crm.representation=reward or train the backbone"
    )


def _check_batches(config, mesh, rules) -> None:
  ways = sharding.batch_divisor(mesh, rules)
  for name in ('batch_size', 'eval_batch'):
    if config.data[name] % ways:
      raise config_lib.ConfigError(
        f'data.{name}={config.data[name]} is not divisible by the {ways} ways the mesh splits a batch'
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_loop.FitResult:
  check_config(config)
  with train_loop.Run(config, workdir, checks=[_check_batches]) as run:
    if run.finished:
      return train_loop.FitResult.of_finished(run)
    d = input_pipeline.make_data(config)
    tx = optim.make_optimizer(config.optimizer, config.train.num_steps)

    def create_state():  # shapes only (fit's abstract state): no warm-up, no weights read
      return train_loop.TrainState(models.build(config, abstract=True), tx)

    def initial_state(spec):
      """The real start: the warmed tiny backbone or the pretrained weights, with the head (and
      adapters) as configured, laid out as spec.shardings."""
      real = models.pretrained_backbone(config) if config.model.kind == 'pretrained' else None
      model = models.build(config, real)
      with sharding.unsharded():
        state = nnx.state(train_loop.TrainState(model, tx))
      return jax.tree.map(jax.device_put, state, spec.shardings)

    return train_loop.fit(
      run,
      create_state=create_state,
      loss_fn=losses.make_loss_fn(config, d.num_bins),
      train_iter=input_pipeline.train_iterator(config, d),
      eval_fn=evaluate.make_eval_fn(config, run.mesh, run.rules, d),
      initial_state=initial_state,
      learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    )
