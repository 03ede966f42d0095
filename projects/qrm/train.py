"""Q-RM (arXiv 2505.23363): token-level reward models trained on preference pairs, then RL with
their token rewards. `train_and_evaluate(config, workdir)` runs one arm:

  1. reward.kind = 'qrm' or 'dpo': train the token-level reward model first (`train_reward_model`,
     its own resumable run in rm.workdir, default <workdir>/rm_<kind>): the starting policy's
     network trained on the pairs of projects/qrm/input_pipeline.py with the Q-RM loss (or DPO
     against the frozen starting policy), on the shared supervised loop (common.train_loop.fit);
     held-out pair metrics (projects/qrm/evaluate.py) at its end; the final parameters go to
     params.npz in that workdir;
  2. RL on the shared loop (common.rl.loop) from the same starting policy with
       'orm'  the outcome verifier (the task's scorer; the sequence path of the loop),
       'dpo'  the DPO-implicit token rewards beta log pi_dpo / pi_ref,
       'qrm'  Q-RM's token rewards beta log phi,
     and config.algo: 'reinforce' (one on-policy gradient step per rollout batch: the ratio is
     exactly 1, the clip never acts) or 'ppo' (ppo.epochs passes in ppo.minibatches minibatches
     per batch: the clipped surrogate). Critic-free: advantages come from the run's group
     estimator (rl.estimator, GRPO by default) for every arm, token rewards normalised over each
     group's tokens (common.rl.advantages.token_advantages) and credited by reward.credit.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from common import cache
from common import config as config_lib
from common import optim
from common import sharding
from common import train_loop
from common.models import decoder
from common.models import loader
from common.models import spec
from common.rl import advantages as adv_lib
from common.rl import loop
from common.rl import rollout
from projects.qrm import evaluate
from projects.qrm import input_pipeline
from projects.qrm import losses
from projects.qrm import models

ALGOS = ('reinforce', 'ppo')
CREDITS = {'immediate': adv_lib.immediate, 'returns_to_go': adv_lib.returns_to_go}


def check_config(config: ml_collections.ConfigDict, mesh=None, rules=None) -> None:
  """Q-RM's keys, before any workdir is written."""
  if config.reward.kind not in losses.REWARDS:
    raise config_lib.ConfigError(
      f'reward.kind={config.reward.kind!r}; expected one of {losses.REWARDS}'
    )
  if config.algo not in ALGOS:
    raise config_lib.ConfigError(f'algo={config.algo!r}; expected one of {ALGOS}')
  if config.reward.credit not in CREDITS:
    raise config_lib.ConfigError(
      f'reward.credit={config.reward.credit!r}; expected one of {sorted(CREDITS)}'
    )
  if config.ppo.epochs < 1 or config.ppo.minibatches < 1:
    raise config_lib.ConfigError('ppo.epochs and ppo.minibatches must be >= 1')
  losses.check_rm_config(config.rm)
  input_pipeline.check_config(config, mesh, rules)
  loop.estimator_from_config(config.rl)


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with rl.num_iterations / rl.num_minibatches set by config.algo."""
  c = copy.deepcopy(config)
  with c.unlocked():
    if c.algo == 'reinforce':
      c.rl.update(num_iterations=1, num_minibatches=1)
    else:
      c.rl.update(num_iterations=c.ppo.epochs, num_minibatches=c.ppo.minibatches)
  return c


# ---------------------------------------------------------------------------------------------------
# The reward model.


def rm_workdir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(config.rm.workdir or pathlib.Path(workdir) / f'rm_{config.reward.kind}')


def rm_run_config(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """The reward model's own run config: rm.steps steps, the RL run's data, pairs and model."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.reward.update(kind=kind, credit='immediate')
    c.train.update(num_steps=c.rm.steps, log_every=c.rm.log_every, eval_every=c.rm.steps)
    c.debug.update(
      kill_after_step=-1, sigterm_after_step=c.debug.rm_sigterm_after_step, sigint_after_step=-1
    )
    # RL-only keys at fixed values, so arms that differ only there share one reward-model run.
    rl = loop.rl_config()
    rl.update(prompt_len=c.rl.prompt_len, max_new_tokens=c.rl.max_new_tokens)
    c.rl = rl
    c.algo = 'ppo'
    c.ppo.update(epochs=1, minibatches=1)
  return c


def _abstract_model(config) -> nnx.Module:
  """A fresh decoder of the policy's shape (fit's abstract state; the weights come later)."""
  if config.model.kind == 'tiny':
    cfg = models.WarmupConfig(**config.warmup.to_dict())
    from common.rl import policies  # noqa: PLC0415

    return decoder.Decoder(policies.decoder_config(cfg, config.dtype), rngs=nnx.Rngs(0))
  return decoder.Decoder(
    loader.load_config(config.model.name, dtype=config.dtype), rngs=nnx.Rngs(0)
  )


def rm_score(model, batch: dict[str, np.ndarray], mesh, rules) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return rollout.score(graphdef, state, batch, train_state=False, mesh=mesh, rules=rules)


def pair_scores(kind: str, rm, ref, pairs: input_pipeline.Pairs, rm_cfg, mesh, rules):
  """(token rewards [2K, N] as the RL loop gives them, sequence scores [2K]) of `pairs`."""
  rows = pairs.rows
  mask = rows['completion_mask'] > 0
  logp = rm_score(rm, rows, mesh, rules)
  if kind == 'qrm':
    tok = np.where(mask, rm_cfg.beta * logp, 0.0)
    n = np.maximum(mask.sum(-1), 1)
    return tok, np.where(mask, logp, 0.0).sum(-1) / n
  ref_logp = rm_score(ref, rows, mesh, rules)
  tok = np.where(mask, rm_cfg.dpo_beta * (logp - ref_logp), 0.0)
  return tok, tok.sum(-1)


def train_reward_model(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, mesh=None
) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) config.reward.kind's reward model in `workdir`;
  returns its results.json (held-out pair metrics under 'eval'). Parameters: workdir/params.npz."""
  kind = config.reward.kind
  if kind not in losses.RM_LOSSES:
    raise config_lib.ConfigError(f'reward.kind={kind!r} has no reward model to train')
  cfg = rm_run_config(config, kind)
  checks = [check_config]
  with train_loop.Run(cfg, workdir, mesh=mesh, checks=checks) as run:
    if run.finished:
      return run.results
    text = input_pipeline.make_text(cfg)
    make_policy = models.create_policy(cfg, run.mesh, run.rules)
    start = make_policy()
    train_pairs = input_pipeline.make_pairs(
      cfg, 'train', text=text, policy=start, mesh=run.mesh, rules=run.rules
    )
    eval_pairs = input_pipeline.make_pairs(
      cfg, 'test', text=text, policy=start, mesh=run.mesh, rules=run.rules
    )
    ref_logp = None
    if kind == 'dpo':
      ref_logp = rm_score(start, train_pairs.rows, run.mesh, run.rules)
    o = copy.deepcopy(cfg.optimizer)
    with o.unlocked():
      o.lr = cfg.rm.lr
    tx = optim.make_optimizer(o, cfg.rm.steps)

    def initial_state(spec_):
      with sharding.unsharded():
        state = nnx.state(train_loop.TrainState(make_policy(), tx))
      return jax.tree.map(jax.device_put, state, spec_.shardings)

    def flat_metrics(tok, seq):
      out = evaluate.rm_metrics(tok, seq, eval_pairs.arrays)
      prof = out.pop('profile')
      for name in ('rejected', 'chosen'):
        for o_, v in zip(prof['offsets'], prof[name], strict=True):
          if np.isfinite(v):  # offsets no response reaches are left out
            out[f'profile/{name}/{o_:+d}'] = v
      return out

    # The control: the same reading (beta log pi, mean log pi) of the starting network, before any
    # preference training; positions that are hard for the policy (digits) already score low.
    base = flat_metrics(*pair_scores('qrm', start, None, eval_pairs, cfg.rm, run.mesh, run.rules))

    def eval_fn(model, step):
      del step
      out = flat_metrics(*pair_scores(kind, model, start, eval_pairs, cfg.rm, run.mesh, run.rules))
      out.update({f'start/{k}': v for k, v in base.items() if not k.startswith('num_')})
      counts = np.bincount(train_pairs.arrays['source'], minlength=2)
      out['train_pairs/corrupted'], out['train_pairs/policy'] = int(counts[0]), int(counts[1])
      return out

    def on_end(model, step):
      del step
      if jax.process_index() == 0:
        cache.savez(run.workdir / 'params.npz', **models.params_of(model))

    result = train_loop.fit(
      run,
      create_state=lambda: train_loop.TrainState(_abstract_model(cfg), tx),
      loss_fn=losses.make_rm_loss_fn(kind, cfg.rm),
      train_iter=input_pipeline.pair_iterator(cfg, train_pairs, ref_logp),
      eval_fn=eval_fn,
      initial_state=initial_state,
      on_end=on_end,
      learning_rate=cfg.rm.lr,
    )
    return {'step': result.step, 'train': result.train, 'eval': result.eval}


def starting_network(config) -> nnx.Module:
  """The starting policy's network on one device, its SFT warm-up included: the DPO reference (the
  network the DPO reward model was trained against) and the shape the trained reward model's
  parameters load into."""
  return models.create_policy(config, None, sharding.DEFAULT_RULES)()


def load_reward_model(config, workdir: str | pathlib.Path) -> nnx.Module:
  """The trained reward model of `workdir` (its params.npz) in the policy's network."""
  path = pathlib.Path(workdir) / 'params.npz'
  if not path.exists():
    raise FileNotFoundError(
      f'{path} is missing: the reward-model run in {workdir} has not finished'
    )
  model = starting_network(config)
  with np.load(path) as f:
    return models.load_params(model, {k: f[k] for k in f.files})


# ---------------------------------------------------------------------------------------------------
# RL.


def build_setup(config, mesh, rules, rm_dir: pathlib.Path | None) -> loop.RLSetup:
  """The RLSetup of an arm: policy, prompts, the reward source of reward.kind, estimator."""
  d = config.data
  train_ex = input_pipeline.load_examples(d.task_set, 'train', d.seed)
  test_ex = input_pipeline.load_examples(d.task_set, 'test', d.seed)
  train_ex = train_ex if d.max_train < 0 else train_ex[: d.max_train]
  test_ex = test_ex if d.max_eval < 0 else test_ex[: d.max_eval]
  text = input_pipeline.make_text(config)
  create_model = models.create_policy(config, mesh, rules)
  verifier = rollout.VerifierRewards(input_pipeline.make_verifier(text.tok.decode))
  kind = config.reward.kind
  if kind == 'orm':
    rewards = verifier
  else:
    rm = load_reward_model(config, rm_dir)
    scorers = [lambda b, m=rm: rm_score(m, b, mesh, rules)]
    scale = config.rm.beta
    if kind == 'dpo':
      ref = starting_network(config)
      scorers.append(lambda b, m=ref: rm_score(m, b, mesh, rules))
      scale = config.rm.dpo_beta
    rewards = losses.TokenRewards(
      verifier, scorers, scale, prompt_len=config.rl.prompt_len, pad_id=text.pad
    )
  return loop.RLSetup(
    create_model=create_model,
    tx=optim.make_optimizer(config.optimizer, config.train.num_steps),
    train_prompts=input_pipeline.prompts(train_ex, 'train', text.render),
    eval_prompts=input_pipeline.prompts(test_ex, 'test', text.render),
    rewards=rewards,
    estimator=loop.estimator_from_config(config.rl),
    stop_tokens=text.stop,
    pad_id=text.pad,
    decode=text.tok.decode,
    learning_rate=optim.learning_rate(config.optimizer, config.train.num_steps),
    token_credit=CREDITS[config.reward.credit],
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, mesh=None
) -> dict[str, Any]:
  """Runs (or resumes) one arm: its reward model when it has one, then RL; results.json of the RL
  run ({'step', 'train', 'eval'}) with the reward model's held-out metrics under 'rm'."""
  check_config(config)
  config = resolved(config)
  workdir = pathlib.Path(workdir)
  rm_dir, rm_results = None, None
  if config.reward.kind in losses.RM_LOSSES:
    rm_dir = rm_workdir(config, workdir)
    rm_results = train_reward_model(config, rm_dir, mesh=mesh)
  with train_loop.Run(
    config, workdir / 'rl', mesh=mesh, checks=[loop.check_config, check_config]
  ) as run:
    spec.write(run.workdir, **models.description(config))
    if run.finished:
      results = dict(run.results)
    else:
      results = loop.train(run, build_setup(config, run.mesh, run.rules, rm_dir))
  if rm_results is not None:
    results = {**results, 'rm': rm_results.get('eval', {})}
  return results
