"""EAD (arXiv 2510.05251) and fixed-temperature GRPO-family runs: `train_and_evaluate(config, workdir)`.

Wires the paper's pieces into the shared loop (common.rl.loop): the policy (projects/ead/models.py:
the smoke's SFT-warmed tiny character LM or a pretrained model), the prompts and verifier
(projects/ead/input_pipeline.py: reasoning-gym tasks with their own scorers), the rollout
temperature per step and the TIS cap (projects/ead/losses.py: EAD's annealed schedule or a fixed
temperature; `RLSetup.temperature_schedule`, `RLSetup.tis_cap`), the estimator by rl.estimator
(common.rl.advantages: GRPO, Dr.GRPO, RLOO, DAPO) and the optimizer (common.optim). Evaluation: the
loop's greedy held-out pass@1 plus sampled pass@1 / pass@k at temperature 1
(projects/ead/evaluate.py).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

from common import config as config_lib
from common import optim
from common import sharding
from common import train_loop
from common.models import spec
from common.rl import loop
from common.rl import rollout
from projects.ead import evaluate
from projects.ead import input_pipeline
from projects.ead import losses
from projects.ead import models


def _subset(items: list, n: int) -> list:
  return items if n < 0 else items[:n]


def build_setup(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> loop.RLSetup:
  """The RLSetup of a config: policy, prompts, verifier, temperature schedule, TIS, pass@k eval."""
  d = config.data
  train_ex = _subset(input_pipeline.load_examples(d.task_set, 'train', d.seed), d.max_train)
  test_ex = _subset(input_pipeline.load_examples(d.task_set, 'test', d.seed), d.max_eval)
  create_model = models.create_policy(config, mesh, rules)  # an unknown model.kind stops here
  text = input_pipeline.policy_text(config.model)
  rewards = rollout.VerifierRewards(input_pipeline.make_verifier(text.tok.decode))
  eval_prompts = input_pipeline.prompts(test_ex, 'test', text.render)
  sampling = rollout.Sampling(
    prompt_len=config.rl.prompt_len,
    max_new_tokens=config.rl.max_new_tokens,
    temperature=1.0,
    stop_tokens=text.stop,
    pad_id=text.pad,
  )

  def extra_eval(model):
    if config.eval.samples < 1:
      return {}
    return evaluate.sampled_pass_at_k(
      model,
      eval_prompts,
      config.eval.samples,
      sampling=sampling,
      rewards=rewards,
      mesh=mesh,
      rules=rules,
      batch=config.rl.eval_batch,
    )

  return loop.RLSetup(
    create_model=create_model,
    tx=optim.make_optimizer(config.optimizer, config.train.num_steps),
    train_prompts=input_pipeline.prompts(train_ex, 'train', text.render),
    eval_prompts=eval_prompts,
    rewards=rewards,
    estimator=loop.estimator_from_config(config.rl),
    stop_tokens=text.stop,
    pad_id=text.pad,
    decode=text.tok.decode,
    learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    temperature_schedule=losses.temperature_schedule(config.ead),
    tis_cap=losses.tis_cap(config.ead),
    extra_eval=extra_eval,
  )


def check_config(config: ml_collections.ConfigDict, mesh=None, rules=None) -> None:
  """EAD's keys (before the workdir exists): the schedule, the TIS cap, the estimator."""
  del mesh, rules
  losses.check_config(config.ead)
  loop.estimator_from_config(config.rl)
  if config.eval.samples < 0:
    raise config_lib.ConfigError(f'eval.samples={config.eval.samples} must be >= 0')


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
  """Runs (or resumes) one RL run; returns results.json ({'step', 'train', 'eval'})."""
  check_config(config)
  with train_loop.Run(config, workdir, checks=[loop.check_config, check_config]) as run:
    spec.write(run.workdir, **models.description(config))  # model.json, for common.export
    if run.finished:
      return run.results
    return loop.train(run, build_setup(config, run.mesh, run.rules))
