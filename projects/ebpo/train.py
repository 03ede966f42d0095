"""EBPO / GRPO-family RLVR runs on reasoning-gym tasks: `train_and_evaluate(config, workdir)`.

Wires the paper's pieces into the shared loop (common.rl.loop): the policy (common.rl.policies via projects/ebpo/models.py:
the smoke's SFT-warmed tiny character LM or a pretrained model), the prompts and verifier
(projects/ebpo/input_pipeline.py: reasoning-gym tasks with their own scorers), the estimator
(projects/ebpo/losses.py's EBPO, or a GRPO-family baseline of common.rl.advantages, by rl.estimator)
and the optimizer (common.optim: clipped AdamW, constant learning rate). Group size, curriculum and
loss settings are config.rl keys (common.rl.loop.rl_config); evaluation is the loop's greedy
held-out pass@1 (common.rl.evaluate).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from common import cache as cache_lib
from common import optim
from common import sharding
from common import train_loop
from common.models import spec
from common.rl import loop
from common.rl import rollout
from projects.ebpo import input_pipeline
from projects.ebpo import losses
from projects.ebpo import models


def _subset(items: list, n: int) -> list:
  return items if n < 0 else items[:n]


def build_setup(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> loop.RLSetup:
  """The RLSetup of a config: policy factory, tokenizer-rendered prompts, verifier."""
  d = config.data
  train_ex = _subset(input_pipeline.load_examples(d.task_set, 'train', d.seed), d.max_train)
  test_ex = _subset(input_pipeline.load_examples(d.task_set, 'test', d.seed), d.max_eval)
  create_model = models.create_policy(config, mesh, rules)  # an unknown model.kind stops here
  text = input_pipeline.policy_text(config.model)
  return loop.RLSetup(
    create_model=create_model,
    tx=optim.make_optimizer(config.optimizer, config.train.num_steps),
    train_prompts=input_pipeline.prompts(train_ex, 'train', text.render),
    eval_prompts=input_pipeline.prompts(test_ex, 'test', text.render),
    rewards=rollout.VerifierRewards(input_pipeline.make_verifier(text.tok.decode)),
    estimator=make_estimator(config),
    stop_tokens=text.stop,
    pad_id=text.pad,
    decode=text.tok.decode,
    learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
  )


def make_estimator(config: ml_collections.ConfigDict):
  """EBPO (config.ebpo) or one of the shared GRPO-family baselines, by rl.estimator."""
  return loop.estimator_from_config(config.rl, ebpo=lambda: losses.EBPO.from_config(config.ebpo))


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
  """Runs (or resumes) one RL run; returns results.json ({'step', 'train', 'eval'})."""
  make_estimator(config)  # an unknown rl.estimator stops here, before the workdir exists
  with train_loop.Run(config, workdir, checks=[loop.check_config]) as run:
    spec.write(run.workdir, **models.description(config))  # model.json, for common.export
    if run.finished:
      return run.results
    setup = build_setup(config, run.mesh, run.rules)
    cache = None
    if config.rl.curriculum == 'difficulty':
      # Pass rates depend on the initial policy and the prompts only: shared by runs and seeds.
      cache = (
        cache_lib.cache_dir('ebpo_pass_rates') / f'{config.data.task_set}_{config.model.kind}.json'
      )
    return loop.train(run, setup, pass_rates_cache=cache)
