"""The RL-with-verifiable-rewards loop: rollout -> rewards -> advantages -> update, on the shared run.

One step:
  1. prompts = curriculum.batch(step) (M prompts);
  2. rollout (common.rl.rollout: the sampler's jit-ed prefill/decode forking G samples per prompt
     from one prefill), rows sharded over the mesh's batch axes and gathered back whole on every
     host; then, when needed, one jit-ed forward of the policy (behaviour logprobs, off-policy) and
     of the frozen reference (k3 KL) on the finished sequences;
  3. rewards from the setup's `RewardSource` (a verifier; a reward model, per sequence or per token);
  4. advantages from the setup's `Estimator` (common.rl.advantages: GRPO, Dr.GRPO, RLOO, DAPO; a
     paper's own, e.g. projects/ebpo): one per response from sequence rewards, or, when the source
     gives token rewards, one per token (`advantages.token_advantages`: the same estimator
     normalises every reward a group carries, and the setup's `token_credit` turns them into
     per-token advantages, by default returns-to-go); an estimator with a `group_filter` (DAPO) gets dynamic
     sampling: dropped groups are refilled from `curriculum.refill`, at most `dapo_max_refill`
     extra rollout rounds, and slots still empty are masked out. With rl.overlong_shaping the
     advantages see the reward plus DAPO's soft overlong penalty (common.rl.rewards), while pass@1,
     reward_mean and the group filter keep the source's reward;
  5. update: `num_iterations` passes over the batch in `num_minibatches` minibatches, each one
     optimizer step of the clipped token-level surrogate (common.rl.loss) through
     common.train_loop.make_train_step (jit, donated state), its rows sharded like `fit`'s batches;
     the update and the scoring forwards of step 2 run over the batch without the columns that
     are padding in every row (rollout.trim_columns, rl.trim_multiple; 0: the whole padded
     rectangle, as runs saved before the key existed, which resume only with it at 0).

The run skeleton (common.train_loop.Run) owns the workdir, mesh, checkpoints, metrics, signals and
results; the estimator's and the reward source's state ride in the checkpoint's `extra` as JSON.
With num_iterations=1 and one minibatch the update is on-policy and the behaviour logprobs are the
training forward's own (stop-gradient), so the ratio is exactly 1; otherwise they come from a
jit-ed forward of the policy right after the rollout. Every key is train_loop.step_key(seed, step,
purpose) and per-row sampling keys come from the prompt uid, so a killed-and-resumed run replays the
uninterrupted one, and the result does not depend on the number of processes.

Metrics per step (metrics.jsonl, TensorBoard): reward_mean, pass_at_1 (fraction of samples with
reward >= 1), zero_signal_frac (groups whose advantages before batch standardisation are all
|A| <= 1e-8), entropy (policy entropy per response token at temperature 1), kl, clip_frac,
response_len, grad_norm, rollout_tok_s, update_tok_s (the input positions trained, after the
trim, per second; a step that meets a new trimmed width also compiles), the estimator's and the reward source's own
metrics, and with overlong shaping the mean penalty and the fraction of penalised responses.
Evaluation: greedy pass@1 on the held-out prompts (`eval/pass_at_1`, and per cluster).

Off by default (a run without them is today's loop, bitwise): `RLSetup.temperature_schedule`, a
per-step rollout temperature (a within-sequence schedule, EAD's annealing), and
`RLSetup.tis_cap`, truncated importance sampling in the surrogate against the temperature actually
sampled at (common.rl.loss.tis_weights; logs tis_weight_mean and tis_capped_frac), and
`RLSetup.extra_eval`, more held-out metrics at each evaluation (e.g. sampled pass@k).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import copy
import dataclasses
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import cache as cache_lib
from common import config as config_lib
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from common.rl import advantages as adv_lib
from common.rl import curriculum as curriculum_lib
from common.rl import evaluate as evaluate_lib
from common.rl import loss as loss_lib
from common.rl import rewards as rewards_lib
from common.rl import rollout as rollout_lib

TIMING_KEYS = ('rollout_tok_s', 'update_tok_s', 'rollout_s', 'update_s', 'steps_per_sec')


def rl_config() -> ml_collections.ConfigDict:
  """The loop's knobs (config.rl); experiments embed and override them."""
  return ml_collections.ConfigDict(
    dict(
      # Which estimator the paper's train.py builds (common.rl.advantages.ESTIMATORS, or its own).
      estimator='grpo',
      group_size=4,  # G responses per prompt
      prompts_per_step=16,  # M prompts per step
      prompt_len=16,  # prompts are left-padded (or refused if longer) to this many tokens
      max_new_tokens=8,
      temperature=1.0,
      num_iterations=1,  # passes over each rollout batch (PPO epochs)
      num_minibatches=1,  # optimizer steps per pass
      # A minibatch's forward in this many sequential row groups, each recomputed in the
      # backward pass (rollout.completion_logprobs(row_groups=)): memory, not maths.
      update_groups=1,
      # The update (and its scoring forwards) over the batch without the columns that are
      # padding in every row, kept widths rounded up to this many columns (rollout.trim_columns;
      # the same maths, fewer shapes to compile the coarser it is); 0 trains the whole rectangle.
      trim_multiple=32,
      clip_low=0.2,
      clip_high=0.2,  # > clip_low: DAPO's clip-higher (0.28)
      kl_coef=0.001,  # k3 KL to the frozen initial policy; 0 skips the reference forward
      loss_agg='token-mean',  # token-mean | sequence-mean | sequence-sum-norm
      dapo_max_refill=2,  # extra rollout rounds for an estimator with a group filter
      # DAPO's soft overlong punishment (common.rl.rewards.overlong_penalty) added to the reward
      # for the advantages; L_max = overlong_max_len (0: rl.max_new_tokens).
      overlong_shaping=False,
      overlong_cache_len=4,
      overlong_max_len=0,
      curriculum='shuffled',  # shuffled | clustered | difficulty
      cluster_block_batches=0,  # clustered: 0 = whole clusters, k = runs of k batches per cluster
      difficulty_rollouts=8,  # K rollouts per prompt for the difficulty order's pass rates
      eval_batch=64,
    )
  )


@dataclasses.dataclass
class RLSetup:
  """What a paper supplies: the policy, optimizer, prompts, reward source and estimator."""

  create_model: Callable[[], nnx.Module]  # the initial policy (also the frozen reference)
  tx: optax.GradientTransformation
  train_prompts: Sequence[curriculum_lib.Prompt]
  eval_prompts: Sequence[curriculum_lib.Prompt]
  rewards: rollout_lib.RewardSource
  estimator: adv_lib.Estimator
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0
  decode: Callable[[np.ndarray], str] | None = None  # for logged sample completions
  # The optimizer's rate or schedule (common.optim.learning_rate), logged as `lr`.
  learning_rate: float | Callable[[int], Any] | None = None
  # How normalised token rewards become per-token advantages (token-level reward sources only):
  # common.rl.advantages.returns_to_go or .immediate.
  token_credit: Callable[[np.ndarray, np.ndarray], np.ndarray] = adv_lib.returns_to_go
  # The rollout temperature of a step (off when None: rl.temperature): step -> a float, an [N]
  # array or a schedule t -> temperature over the generated position (common.sampling.schedules;
  # EAD's annealing with its step-dependent decay d_s). A function of the step only, so a resumed
  # run samples as the uninterrupted one.
  temperature_schedule: Callable[[int], Any] | None = None
  # Truncated importance sampling (common.rl.loss.tis_weights), off when None: the surrogate's
  # per-token terms are weighted by min(pi(y_t) / mu_tau(y_t), C) with both log-probs from the
  # sampler (the model at temperature 1; the distribution it sampled from). C = tis_cap.
  tis_cap: float | None = None
  # More held-out metrics at each evaluation (off when None): model -> {name: value}, merged into
  # the greedy pass@1's (e.g. sampled pass@k); deterministic, so a resumed run logs the same.
  extra_eval: Callable[[nnx.Module], Any] | None = None


def estimator_from_config(rl: ml_collections.ConfigDict, **extra: Callable[[], Any]):
  """The estimator named by rl.estimator: one of common.rl.advantages.ESTIMATORS or a paper's own
  (`extra`: name -> factory). The name is resolved here, at set-up, never inside the loop."""
  factories = {**{k: v for k, v in adv_lib.ESTIMATORS.items()}, **extra}
  if rl.estimator not in factories:
    raise config_lib.ConfigError(
      f'rl.estimator={rl.estimator!r}; expected one of {", ".join(sorted(factories))}'
    )
  return factories[rl.estimator]()


def sampling_of(rl: ml_collections.ConfigDict, setup: RLSetup) -> rollout_lib.Sampling:
  """How the loop samples: config.rl's sampling keys with the setup's stop and pad tokens."""
  return rollout_lib.Sampling(
    prompt_len=rl.prompt_len,
    max_new_tokens=rl.max_new_tokens,
    temperature=rl.temperature,
    stop_tokens=tuple(setup.stop_tokens),
    pad_id=setup.pad_id,
  )


# ---------------------------------------------------------------------------------------------------
# Checks and pieces of a step.


def overlong_max_len(rl: ml_collections.ConfigDict) -> int:
  """DAPO's L_max: rl.overlong_max_len, or the generation limit when that is 0."""
  return int(rl.overlong_max_len or rl.max_new_tokens)


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> None:
  """The rl keys; pass it to train_loop.Run(checks=...) so they are checked before the workdir."""
  rl = config.rl
  if rl.loss_agg not in loss_lib.AGGREGATIONS:
    raise config_lib.ConfigError(f'rl.loss_agg={rl.loss_agg!r}; expected {loss_lib.AGGREGATIONS}')
  if rl.num_iterations < 1 or rl.num_minibatches < 1:
    raise config_lib.ConfigError('rl.num_iterations and rl.num_minibatches must be >= 1')
  if rl.group_size < 1 or rl.prompts_per_step < 1 or rl.max_new_tokens < 1:
    raise config_lib.ConfigError(
      'rl.group_size, rl.prompts_per_step and rl.max_new_tokens must be >= 1'
    )
  if rl.overlong_shaping:
    l_max = overlong_max_len(rl)
    if l_max <= 0 or not 0 <= rl.overlong_cache_len <= l_max:
      raise config_lib.ConfigError(
        f'rl.overlong_cache_len={rl.overlong_cache_len} must be in [0, L_max={l_max}] '
        '(rl.overlong_max_len, or rl.max_new_tokens when it is 0)'
      )
  rows = rl.prompts_per_step * rl.group_size
  if rows % rl.num_minibatches:
    raise config_lib.ConfigError(
      f'rl.prompts_per_step * rl.group_size = {rows} is not divisible by rl.num_minibatches'
    )
  if rl.trim_multiple < 0:
    raise config_lib.ConfigError(f'rl.trim_multiple={rl.trim_multiple} must be >= 0 (0: no trim)')
  if rl.update_groups < 1 or (rows // rl.num_minibatches) % rl.update_groups:
    raise config_lib.ConfigError(
      f'rl.update_groups={rl.update_groups} must be >= 1 and divide a minibatch '
      f'({rows // rl.num_minibatches} rows)'
    )
  ways = sharding.batch_divisor(mesh, rules)
  for name, n in (
    ('rl.prompts_per_step', rl.prompts_per_step),
    ('rl.prompts_per_step * rl.group_size / rl.num_minibatches', rows // rl.num_minibatches),
    ('rl.eval_batch', rl.eval_batch),
  ):
    if n % ways:
      raise config_lib.ConfigError(
        f'{name} = {n} is not divisible by the {ways} ways the mesh splits a batch'
      )


def shaped_rewards(rl: ml_collections.ConfigDict, rewards: np.ndarray, lengths: np.ndarray):
  """(rewards the advantages see [M, G], the shaping term [M, G]): the source's rewards plus
  DAPO's overlong penalty when rl.overlong_shaping is on, else unchanged."""
  if not rl.overlong_shaping:
    return rewards, np.zeros_like(rewards)
  pen = np.asarray(
    rewards_lib.overlong_penalty(
      np.asarray(lengths).reshape(rewards.shape), overlong_max_len(rl), rl.overlong_cache_len
    )
  )
  return (rewards + pen).astype(np.float32), pen


def make_loss_fn(rl: ml_collections.ConfigDict):
  """loss_fn(model, batch, key) for train_loop.make_train_step: the clipped surrogate + k3 KL."""

  on_policy = rl.num_iterations == 1 and rl.num_minibatches == 1

  def loss_fn(model, batch, key):
    del key
    logp = rollout_lib.completion_logprobs(model, batch, row_groups=rl.update_groups)
    # One gradient step per rollout: the behaviour policy is the current one, so its logprobs are
    # the forward's own (ratio exactly 1); batch['old_logp'] (the sampler's logprobs when on-policy,
    # else a scoring forward) agrees only up to the float rounding of a differently fused program
    # (3e-5 measured on SmolLM2-135M), which the behaviour_logp_dev metric reports.
    old = jax.lax.stop_gradient(logp) if on_policy else batch['old_logp']
    loss, metrics = loss_lib.policy_loss(
      logp,
      old,
      batch['advantages'],
      batch['completion_mask'],
      ref_logp=batch.get('ref_logp'),
      clip_low=rl.clip_low,
      clip_high=rl.clip_high,
      kl_coef=rl.kl_coef,
      agg=rl.loss_agg,
      tis_weights=batch.get('tis_weight'),
      max_len=rl.max_new_tokens,
    )
    valid = batch['completion_mask'] > 0
    dev = jnp.where(valid, jnp.abs(jax.lax.stop_gradient(logp) - batch['old_logp']), 0.0)
    metrics['behaviour_logp_dev'] = jnp.max(dev)
    return loss, metrics

  return loss_fn


# ---------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Context:
  """What every step reads: the run, the setup and the compiled pieces."""

  run: train_loop.Run
  setup: RLSetup
  spec: train_loop.ShardedState
  ref_graphdef: Any
  ref_state: Any
  sampler: curriculum_lib.Sampler
  sampling: rollout_lib.Sampling
  train_step: Callable

  @property
  def rl(self) -> ml_collections.ConfigDict:
    return self.run.config.rl

  def rollout(self, model, prompts, key, step: int) -> rollout_lib.Rollout:
    schedule = self.setup.temperature_schedule
    return rollout_lib.rollout(
      model,
      prompts,
      key,
      sampling=self.sampling,
      rewards=self.setup.rewards,
      num_samples=self.rl.group_size,
      mesh=self.run.mesh,
      rules=self.run.rules,
      temperature=None if schedule is None else schedule(step),
      sample_logprobs=self.setup.tis_cap is not None,
    )


def train(
  run: train_loop.Run,
  setup: RLSetup,
  *,
  pass_rates_cache: str | pathlib.Path | None = None,
) -> dict[str, Any]:
  """Runs config.train.num_steps RL steps on `run` (resuming it) and returns results.json."""
  if run.finished:
    return run.results
  config, mesh, rules = run.config, run.mesh, run.rules
  rl = config.rl
  check_config(config, mesh, rules)

  # The models are created before the mesh context: common.models.loader's nnx.eval_shape reads
  # logical axis names as mesh axes under jax.set_mesh and fails.
  policy = setup.create_model()
  ref_graphdef, ref_state = nnx.split(setup.create_model())
  sampling = sampling_of(rl, setup)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    graphdef, state = nnx.split(train_loop.TrainState(policy, setup.tx))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    spec = train_loop.ShardedState(graphdef, abstract, shardings)
    rates = None
    if rl.curriculum == 'difficulty':
      rates = _difficulty_rates(run, setup, sampling, ref_graphdef, ref_state, pass_rates_cache)
    sampler = curriculum_lib.make_sampler(
      rl.curriculum,
      setup.train_prompts,
      rl.prompts_per_step,
      config.seed,
      rates,
      block_batches=rl.cluster_block_batches,
    )
  start, state, extra, meta = run.restore_or_init(spec, lambda: state)
  for part in (setup.estimator, setup.rewards):
    part.load_state_dict(extra or {})
  ctx = _Context(
    run,
    setup,
    spec,
    ref_graphdef,
    ref_state,
    sampler,
    sampling,
    train_loop.make_train_step(spec.graphdef, make_loss_fn(rl), spec.shardings),
  )
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    return _loop(ctx, state, start, meta)


def _difficulty_rates(run, setup, sampling, ref_graphdef, ref_state, cache):
  rl = run.config.rl
  fp = curriculum_lib.fingerprint(
    'pass_rates',
    [p.uid for p in setup.train_prompts],
    rl.difficulty_rollouts,
    rl.max_new_tokens,
    rl.temperature,
    float(sum(float(jnp.sum(x)) for x in jax.tree.leaves(ref_state))),
    cache_lib.numerics_fingerprint(devices=False),  # sampled under this process's XLA flags
  )
  return curriculum_lib.cached_pass_rates(
    cache or (run.workdir / 'pass_rates.json'),
    fp,
    lambda: evaluate_lib.pass_rates(
      nnx.merge(ref_graphdef, ref_state),
      setup.train_prompts,
      rl.difficulty_rollouts,
      batch=rl.eval_batch,
      sampling=sampling,
      rewards=copy.copy(setup.rewards),  # its failure counts are not the run's
      mesh=run.mesh,
      rules=run.rules,
      seed=0,  # one difficulty order per (policy, prompts, K), shared by every run seed
    ),
  )


def _loop(ctx: _Context, state, start: int, meta: dict) -> dict[str, Any]:
  run, setup, rl = ctx.run, ctx.setup, ctx.rl
  progress = metrics_lib.Progress(start, run.num_steps)
  last_train: dict = dict(meta.get('train', {}))
  last_eval: dict = dict(meta.get('eval', {}))

  def extra_state():
    return {**setup.rewards.state_dict(), **setup.estimator.state_dict()}

  def save(step):
    run.save(step, state, extra=extra_state(), meta={'train': last_train, 'eval': last_eval})

  def evaluate(step):
    def fn():
      model = train_loop.model_of(ctx.spec.graphdef, state)
      out = evaluate_lib.greedy_pass_at_1(
        model,
        setup.eval_prompts,
        batch=rl.eval_batch,
        sampling=ctx.sampling,
        rewards=setup.rewards,
        mesh=run.mesh,
        rules=run.rules,
      )
      if setup.extra_eval is not None:
        out = {**out, **setup.extra_eval(model)}
      return out

    return run.evaluate(step, fn)

  if start == 0 and setup.eval_prompts and run.config.train.eval_every > 0:
    last_eval = evaluate(0)
  metrics_lib.log(
    'steps %d-%d: the first one compiles the sampler and the update', start + 1, run.num_steps
  )
  for step in range(start + 1, run.num_steps + 1):
    state, metrics = _step(ctx, state, step)
    if step == start + 1:
      progress.compiled(step)  # rates from the second step on (steps here are synchronous)
    run.check_finite(step, metrics['loss'])
    last_train = metrics
    if run.should_log(step):
      run.write(step, 'train', metrics)
      shown = {k: v for k, v in metrics.items() if k not in ('rollout_s', 'update_s')}
      run.log_progress(progress, step, shown)
    if setup.eval_prompts and run.should_eval(step):
      last_eval = evaluate(step)
    if run.should_save(step):
      save(step)
    run.end_step(step, lambda step=step: save(step))
  # Speeds stay in metrics.jsonl: results.json holds only what a replay reproduces exactly.
  return run.finish({k: v for k, v in last_train.items() if k not in TIMING_KEYS}, last_eval)


def _step(ctx: _Context, state, step: int):
  """One rollout -> rewards -> advantages -> update step; (new state, the step's metrics)."""
  run, setup, rl = ctx.run, ctx.setup, ctx.rl
  g = rl.group_size
  seed = run.config.seed
  model = train_loop.model_of(ctx.spec.graphdef, state)
  prompts = ctx.sampler.batch(step)
  ro = ctx.rollout(model, prompts, train_loop.step_key(seed, step, 'rollout'), step)
  group_mask = np.ones((len(prompts), g), bool)
  discarded = None
  keep = setup.estimator.group_filter(ro.rewards)
  if keep is not None:
    ro, group_mask, discarded = _dynamic_sampling(ctx, ro, keep, model, step)
  shaped, penalty = shaped_rewards(rl, ro.rewards, ro.lengths)
  if ro.token_rewards is None:
    adv = setup.estimator.advantages(shaped, group_mask, ro.prompts)
    adv_mask, advantages = group_mask, adv.values.reshape(-1)
  else:
    if rl.overlong_shaping:
      raise config_lib.ConfigError('rl.overlong_shaping shapes sequence rewards, not token rewards')
    tok = adv_lib.token_advantages(
      setup.estimator,
      ro.token_rewards,
      ro.token_mask,
      ro.batch['completion_mask'],
      group_mask,
      ro.prompts,
      credit=setup.token_credit,
    )
    adv, adv_mask, advantages = tok.advantages, tok.mask, tok.per_token
  batch = dict(ro.batch)
  batch['completion_mask'] = batch['completion_mask'] * group_mask.reshape(-1)[:, None].astype(
    np.float32
  )
  batch['advantages'] = advantages.astype(np.float32)
  behaviour = batch.pop('behaviour_logp')
  tis_capped = None
  if setup.tis_cap is not None:
    # TIS: the sampler's log-probs of each token at temperature 1 over those under the temperature
    # it was sampled at (exactly 1 where they agree); host-side, so the update sees fixed weights.
    sample_logp = batch.pop('sample_logp')
    valid_tok = batch['completion_mask'] > 0
    batch['tis_weight'] = np.asarray(
      loss_lib.tis_weights(behaviour, sample_logp, setup.tis_cap, valid_tok)
    )
    raw = np.exp(np.where(valid_tok, behaviour - sample_logp, 0.0))
    tis_capped = float((raw[valid_tok] > setup.tis_cap).mean()) if valid_tok.any() else 0.0
  valid = batch['completion_mask'] > 0
  on_policy = rl.num_iterations == 1 and rl.num_minibatches == 1
  if on_policy:
    # The loss takes the ratio's denominator from its own forward (exactly 1); old_logp only
    # feeds the behaviour_logp_dev metric, so the sampler's logprobs serve and save a forward.
    batch['old_logp'] = behaviour
  batch = rollout_lib.trim_columns(batch, rl.trim_multiple)
  if not on_policy:
    batch['old_logp'] = rollout_lib.score(
      ctx.spec.graphdef, state, batch, train_state=True, mesh=run.mesh, rules=run.rules
    )
  if rl.kl_coef:
    batch['ref_logp'] = rollout_lib.score(
      ctx.ref_graphdef, ctx.ref_state, batch, train_state=False, mesh=run.mesh, rules=run.rules
    )
  else:
    batch['ref_logp'] = batch['old_logp']

  t0 = time.perf_counter()
  step_metrics = []
  mb = (len(ro.prompts) * g) // rl.num_minibatches
  for it in range(rl.num_iterations):
    for k in range(rl.num_minibatches):
      minibatch = {key: v[k * mb : (k + 1) * mb] for key, v in batch.items()}
      state, m = ctx.train_step(
        state,
        sharding.global_rows(minibatch, run.mesh, run.rules),
        train_loop.step_key(seed, step, f'update/{it}/{k}'),
      )
      step_metrics.append(m)
  step_metrics = jax.device_get(step_metrics)
  update_s = time.perf_counter() - t0

  n_tok = float(valid.sum())
  flat_rewards = ro.rewards[group_mask]
  mean = lambda key: float(np.mean([m[key] for m in step_metrics]))  # noqa: E731
  metrics = {
    'loss': mean('loss'),
    'reward_mean': float(flat_rewards.mean()) if flat_rewards.size else 0.0,
    'pass_at_1': float((flat_rewards >= 1.0).mean()) if flat_rewards.size else 0.0,
    'zero_signal_frac': float(adv_lib.zero_signal_fraction(jnp.asarray(adv.raw), adv_mask)),
    'entropy': float(ro.entropies[valid].mean()) if n_tok else 0.0,
    'kl': mean('kl'),
    'clip_frac': mean('clip_frac'),
    'ratio_max_dev': float(step_metrics[0]['ratio_max_dev']),
    'behaviour_logp_dev': float(step_metrics[0]['behaviour_logp_dev']),
    'response_len': float(ro.lengths.mean()),
    'grad_norm': mean('grad_norm'),
    'adv_abs_mean': float(np.abs(adv.values[adv_mask]).mean()) if adv_mask.any() else 0.0,
    **setup.rewards.metrics(),
    'rollout_s': ro.seconds,
    'update_s': update_s,
    'rollout_tok_s': float(ro.lengths.sum()) / max(ro.seconds, 1e-9),
    'update_tok_s': rl.num_iterations * float(batch['inputs'].size) / max(update_s, 1e-9),
    **adv.metrics,
  }
  if discarded is not None:
    metrics['dapo_discarded_frac'] = discarded
  if tis_capped is not None:
    metrics['tis_weight_mean'] = mean('tis_weight_mean')
    metrics['tis_capped_frac'] = tis_capped
  if setup.learning_rate is not None:  # the rate of this step's last optimizer update
    updates = step * rl.num_iterations * rl.num_minibatches
    metrics['lr'] = train_loop.lr_at(setup.learning_rate, updates)
  if rl.overlong_shaping:
    metrics['overlong_penalty'] = float(penalty[group_mask].mean()) if group_mask.any() else 0.0
    metrics['overlong_frac'] = float((penalty[group_mask] < 0).mean()) if group_mask.any() else 0.0
  return state, metrics


def _dynamic_sampling(ctx: _Context, ro: rollout_lib.Rollout, keep: np.ndarray, model, step: int):
  """DAPO: keep the groups the estimator's filter keeps (`keep` [M] for `ro`), refill from extra
  rollouts; mask what stays empty. Returns (rollout, group mask [M, G], fraction discarded)."""
  rl = ctx.rl
  g, m = rl.group_size, rl.prompts_per_step
  parts = [ro]
  chosen = [(0, i) for i in np.flatnonzero(keep)]
  total = m
  for k in range(1, rl.dapo_max_refill + 1):
    if len(chosen) >= m:
      break
    extra = ctx.rollout(
      model,
      ctx.sampler.refill(step, k),
      train_loop.step_key(ctx.run.config.seed, step, f'refill/{k}'),
      step,
    )
    parts.append(extra)
    total += m
    keep = ctx.setup.estimator.group_filter(extra.rewards)
    chosen += [(len(parts) - 1, i) for i in np.flatnonzero(keep)]
  discarded = 1.0 - len(chosen) / total
  chosen = chosen[:m]
  mask = np.ones((m, g), bool)
  if len(chosen) < m:  # not enough informative groups: pad with masked-out dropped groups
    dropped = [(0, i) for i in range(m) if (0, i) not in chosen]
    mask[len(chosen) :] = False
    chosen = chosen + dropped[: m - len(chosen)]
  return rollout_lib.concat(parts, chosen, g), mask, discarded
