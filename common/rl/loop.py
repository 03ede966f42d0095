"""The RL-with-verifiable-rewards loop (GRPO family, EBPO): rollout -> rewards -> advantages -> update.

One step:
  1. prompts = curriculum.batch(step) (M prompts);
  2. rollout (jit-ed prefill/decode of common.sampling.sampler.generate, forking G samples per
     prompt from one prefill), then one jit-ed forward of the policy (behaviour logprobs) and of the
     frozen reference (k3 KL) on the finished sequences;
  3. rewards = verifier(prompt, completion) on the host; a verifier exception scores 0 and is
     counted (`verifier_failures`), never raised;
  4. advantages from `rl.estimator`: grpo | dr_grpo | rloo | dapo (dynamic sampling: groups with
     equal rewards are dropped and refilled from `curriculum.refill`, at most `dapo_max_refill`
     extra rollout rounds; slots still empty are masked out) | ebpo (host-side float64 Welford state,
     checkpointed as JSON in the checkpoint's `extra`); with rl.overlong_shaping the advantages see
     the verifier reward plus DAPO's soft overlong penalty (common.rl.rewards), while pass@1,
     reward_mean and DAPO's group filter keep the verifier's reward;
  5. update: `num_iterations` passes over the batch in `num_minibatches` minibatches, each one
     optimizer step of the clipped token-level surrogate (common.rl.loss) through
     common.train_loop.make_train_step (jit, donated state).

With num_iterations=1 and one minibatch the update is on-policy and the behaviour logprobs are the
training forward's own (stop-gradient), so the ratio is exactly 1; otherwise they come from one
jit-ed forward of the policy right after the rollout (equal to the sampler's logprobs, tested). Every key is
train_loop.step_key(seed, step, purpose) and per-row sampling keys come from the prompt uid, so a
killed-and-resumed run replays the uninterrupted one (tested, EBPO state included).

Metrics per step (metrics.jsonl, TensorBoard): reward_mean, pass_at_1 (fraction of samples with
reward 1), zero_signal_frac (groups whose advantages before batch standardisation are all
|A| <= 1e-8), entropy (policy entropy per response token at temperature 1), kl, clip_frac,
response_len, grad_norm, rollout_tok_s, update_tok_s, for EBPO its shrinkage and prior mean, and
with overlong shaping the mean penalty and the fraction of penalised responses.
Evaluation: greedy pass@1 on the held-out prompts (`eval/pass_at_1`, and per cluster).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from common import checkpoint as ckpt_lib
from common import config as config_lib
from common import losses
from common import metrics as metrics_lib
from common import sharding
from common import train_loop
from common.rl import advantages as adv_lib
from common.rl import curriculum as curriculum_lib
from common.rl import loss as loss_lib
from common.rl import rewards as rewards_lib
from common.sampling import sampler as sampler_lib

Verifier = Callable[[curriculum_lib.Prompt, np.ndarray], float]


def rl_config() -> ml_collections.ConfigDict:
  """The loop's knobs (config.rl); experiments embed and override them."""
  return ml_collections.ConfigDict(
    dict(
      estimator='ebpo',  # grpo | dr_grpo | rloo | dapo | ebpo
      group_size=4,  # G responses per prompt
      prompts_per_step=16,  # M prompts per step
      prompt_len=16,  # prompts are left-padded (or refused if longer) to this many tokens
      max_new_tokens=8,
      temperature=1.0,
      num_iterations=1,  # passes over each rollout batch (PPO epochs)
      num_minibatches=1,  # optimizer steps per pass
      clip_low=0.2,
      clip_high=0.2,  # > clip_low: DAPO's clip-higher (0.28)
      kl_coef=0.001,  # k3 KL to the frozen initial policy; 0 skips the reference forward
      loss_agg='token-mean',  # token-mean | sequence-mean | sequence-sum-norm
      dapo_max_refill=2,
      # DAPO's soft overlong punishment (common.rl.rewards.overlong_penalty) added to the verifier
      # reward for the advantages; L_max = overlong_max_len (0: rl.max_new_tokens).
      overlong_shaping=False,
      overlong_cache_len=4,
      overlong_max_len=0,
      ebpo_mode='cumulative',  # cumulative | cluster | ewm
      ebpo_half_life=50.0,
      ebpo_ddof=1,
      ebpo_standardize=True,
      curriculum='shuffled',  # shuffled | clustered | difficulty
      cluster_block_batches=0,  # clustered: 0 = whole clusters, k = runs of k batches per cluster
      difficulty_rollouts=8,  # K rollouts per prompt for the difficulty order's pass rates
      eval_batch=64,
    )
  )


@dataclasses.dataclass
class RLSetup:
  """What a paper supplies: the policy, optimizer, prompts, verifier and sampling details."""

  create_model: Callable[[], nnx.Module]  # the initial policy (also the frozen reference)
  tx: optax.GradientTransformation
  train_prompts: Sequence[curriculum_lib.Prompt]
  eval_prompts: Sequence[curriculum_lib.Prompt]
  verifier: Verifier
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0
  decode: Callable[[np.ndarray], str] | None = None  # for logged sample completions
  mesh: jax.sharding.Mesh | None = None


# ---------------------------------------------------------------------------------------------------
# Sequences and logprobs.


def pad_prompts(prompts: Sequence[curriculum_lib.Prompt], length: int, pad_id: int):
  """(tokens [B, P] int32, mask [B, P] bool), left-padded to `length`."""
  too_long = [p.uid for p in prompts if len(p.tokens) > length]
  if too_long:
    raise ValueError(f'prompt uid {too_long[0]} is longer than rl.prompt_len={length}')
  return sampler_lib.pad_prompts(
    [p.tokens for p in prompts], side='left', pad_id=pad_id, length=length
  )


def build_batch(
  prompt_tokens: np.ndarray,
  prompt_mask: np.ndarray,
  completion: np.ndarray,
  lengths: np.ndarray,
) -> dict[str, np.ndarray]:
  """The training view of (prompt, completion) rows: inputs [B, P+N-1] with positions counting real
  tokens and segment 0 on padding (so left padding changes nothing), targets / mask [B, N]."""
  n = completion.shape[1]
  comp_mask = np.arange(n)[None, :] < lengths[:, None]
  seq = np.concatenate([prompt_tokens, completion], axis=1).astype(np.int32)
  real = np.concatenate([prompt_mask, comp_mask], axis=1)
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return {
    'inputs': seq[:, :-1],
    'positions': positions[:, :-1],
    'segment_ids': real[:, :-1].astype(np.int32),
    'targets': completion.astype(np.int32),
    'completion_mask': comp_mask.astype(np.float32),
  }


def completion_logprobs(model, batch, *, with_entropy: bool = False):
  """log pi(completion token) [B, N] (and entropy [B, N]) from one forward over prompt+completion."""
  n = batch['targets'].shape[1]
  h = model.hidden_states(
    batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
  )
  logits = model.logits_from_hidden(h[:, -n:])  # positions P-1 .. P+N-2 predict the completion
  logp = losses.token_logprobs(logits, batch['targets'])
  if not with_entropy:
    return logp
  lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp, -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score_train_state(graphdef, state, batch):
  return completion_logprobs(train_loop.model_of(graphdef, state), batch)


@functools.partial(jax.jit, static_argnums=0)
def _score_model(graphdef, state, batch):
  return completion_logprobs(nnx.merge(graphdef, state), batch)


def make_loss_fn(rl: ml_collections.ConfigDict):
  """loss_fn(model, batch, key) for train_loop.make_train_step: the clipped surrogate + k3 KL."""

  on_policy = rl.num_iterations == 1 and rl.num_minibatches == 1

  def loss_fn(model, batch, key):
    del key
    logp = completion_logprobs(model, batch)
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
    )
    valid = batch['completion_mask'] > 0
    dev = jnp.where(valid, jnp.abs(jax.lax.stop_gradient(logp) - batch['old_logp']), 0.0)
    metrics['behaviour_logp_dev'] = jnp.max(dev)
    return loss, metrics

  return loss_fn


# ---------------------------------------------------------------------------------------------------
# Rewards.


@dataclasses.dataclass
class _Counter:
  failures: int = 0


def safe_rewards(
  verifier: Verifier,
  prompts: Sequence[curriculum_lib.Prompt],
  completions: np.ndarray,
  lengths: np.ndarray,
  group_size: int,
  counter: _Counter,
) -> np.ndarray:
  """[M, G] float32 rewards; an exception or a non-finite reward scores 0 and is counted."""
  out = np.zeros((len(prompts), group_size), np.float32)
  for i, p in enumerate(prompts):
    for j in range(group_size):
      row = i * group_size + j
      try:
        r = float(verifier(p, completions[row, : int(lengths[row])]))
        if not math.isfinite(r):
          raise ValueError(f'non-finite reward {r}')
      except Exception as e:  # noqa: BLE001  (a verifier failure never stops training)
        counter.failures += 1
        if counter.failures <= 10 or counter.failures % 1000 == 0:
          logging.warning('verifier failed on prompt %d (#%d): %s', p.uid, counter.failures, e)
        r = 0.0
      out[i, j] = r
  return out


# ---------------------------------------------------------------------------------------------------
# Rollout.


@dataclasses.dataclass
class Rollout:
  prompts: list[curriculum_lib.Prompt]
  batch: dict[str, np.ndarray]  # build_batch rows (prompt-major, G per prompt)
  completion: np.ndarray  # [M*G, N]
  lengths: np.ndarray  # [M*G]
  entropies: np.ndarray  # [M*G, N] model entropies at temperature 1
  rewards: np.ndarray  # [M, G]
  seconds: float


def rollout(
  model: nnx.Module,
  prompts: Sequence[curriculum_lib.Prompt],
  key: jax.Array,
  *,
  rl: ml_collections.ConfigDict,
  setup: RLSetup,
  counter: _Counter,
  num_samples: int | None = None,
  temperature: float | None = None,
) -> Rollout:
  """G samples for each prompt (forked from one prefill) and their rewards."""
  g = rl.group_size if num_samples is None else num_samples
  tokens, mask = pad_prompts(prompts, rl.prompt_len, setup.pad_id)
  config = sampler_lib.SamplingConfig(
    max_new_tokens=rl.max_new_tokens,
    temperature=rl.temperature if temperature is None else temperature,
    stop_tokens=tuple(setup.stop_tokens),
    pad_id=setup.pad_id,
  )
  keys = sampler_lib.row_keys(key, np.asarray([p.uid for p in prompts], np.int64) % (2**31))
  t0 = time.perf_counter()
  gen = sampler_lib.generate(
    model,
    tokens,
    mask,
    config=config,
    key=keys,
    num_samples=g,
    prompt_bucket=rl.prompt_len,
  )
  completion, lengths, ent, logp = jax.device_get(
    (gen.tokens, gen.lengths, gen.model_entropies, gen.logprobs)
  )
  seconds = time.perf_counter() - t0
  rep_tokens, rep_mask = np.repeat(tokens, g, axis=0), np.repeat(mask, g, axis=0)
  batch = build_batch(rep_tokens, rep_mask, completion, lengths)
  # The behaviour policy's logprobs as sampled (model at temperature 1, whatever the sampling
  # temperature): on-policy they stand in for a separate scoring forward (see _loop).
  batch['behaviour_logp'] = np.where(batch['completion_mask'] > 0, logp, 0.0).astype(np.float32)
  rewards = safe_rewards(setup.verifier, prompts, completion, lengths, g, counter)
  return Rollout(list(prompts), batch, completion, lengths, ent, rewards, seconds)


def _concat(parts: Sequence[Rollout], groups: Sequence[tuple[int, int]], g: int) -> Rollout:
  """Rollout of the chosen (part, group) pairs, in order."""
  rows = lambda pi, gi: slice(gi * g, gi * g + g)  # noqa: E731
  pick = lambda f: np.concatenate([f(parts[pi])[rows(pi, gi)] for pi, gi in groups])  # noqa: E731
  batch = {k: pick(lambda r, k=k: r.batch[k]) for k in parts[0].batch}
  return Rollout(
    prompts=[parts[pi].prompts[gi] for pi, gi in groups],
    batch=batch,
    completion=pick(lambda r: r.completion),
    lengths=pick(lambda r: r.lengths),
    entropies=pick(lambda r: r.entropies),
    rewards=np.stack([parts[pi].rewards[gi] for pi, gi in groups]),
    seconds=sum(p.seconds for p in parts),
  )


# ---------------------------------------------------------------------------------------------------
# Advantages.


def compute_advantages(
  estimator: str,
  rewards: np.ndarray,
  mask: np.ndarray,
  clusters: Sequence[str],
  ebpo: adv_lib.EBPOEstimator | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """(A [M, G], A before batch standardisation [M, G], metrics)."""
  r = jnp.asarray(rewards)
  m = jnp.asarray(mask)
  extra: dict[str, float] = {}
  if estimator == 'ebpo':
    a, raw, stats = ebpo.advantages(rewards, mask, clusters)
    extra = {
      'ebpo_shrinkage': float(np.mean(stats.shrinkage)),
      'ebpo_mu_glob': float(np.mean(stats.mu_glob)),
      'ebpo_sigma2': float(np.mean(stats.sigma2)),
      'ebpo_tau2': float(np.mean(stats.tau2)),
    }
    return np.asarray(a), np.asarray(raw), extra
  if estimator not in adv_lib.STATELESS:
    raise ValueError(f'unknown estimator {estimator!r}; expected one of {adv_lib.ESTIMATORS}')
  a = np.asarray(adv_lib.STATELESS[estimator](r, m))
  return a, a, extra


# ---------------------------------------------------------------------------------------------------
# Evaluation.


def greedy_pass_at_1(
  model: nnx.Module,
  prompts: Sequence[curriculum_lib.Prompt],
  *,
  rl: ml_collections.ConfigDict,
  setup: RLSetup,
  counter: _Counter,
) -> dict[str, float]:
  """Greedy pass@1 (reward >= 1) over `prompts`, overall and per cluster, in fixed-size chunks."""
  b = rl.eval_batch
  correct: list[float] = []
  for start in range(0, len(prompts), b):
    chunk = list(prompts[start : start + b])
    real = len(chunk)
    chunk += [chunk[-1]] * (b - real)  # one compiled shape
    ro = rollout(
      model,
      chunk,
      jax.random.key(0),
      rl=rl,
      setup=setup,
      counter=counter,
      num_samples=1,
      temperature=0.0,
    )
    correct.extend((ro.rewards[:real, 0] >= 1.0).astype(float).tolist())
  out = {'pass_at_1': float(np.mean(correct)) if correct else 0.0}
  by: dict[str, list[float]] = {}
  for p, c in zip(prompts, correct, strict=True):
    by.setdefault(p.cluster, []).append(c)
  if len(by) > 1:
    out.update({f'pass_at_1/{k}': float(np.mean(v)) for k, v in sorted(by.items())})
  return out


def pass_rates(
  model: nnx.Module,
  prompts: Sequence[curriculum_lib.Prompt],
  k: int,
  *,
  rl: ml_collections.ConfigDict,
  setup: RLSetup,
  seed: int,
) -> dict[int, float]:
  """{uid: mean reward >= 1 over k samples at rl.temperature}: the difficulty curriculum's order."""
  counter = _Counter()
  out: dict[int, float] = {}
  b = max(1, rl.eval_batch // max(k, 1))
  for start in range(0, len(prompts), b):
    chunk = list(prompts[start : start + b])
    real = len(chunk)
    chunk += [chunk[-1]] * (b - real)
    ro = rollout(
      model,
      chunk,
      train_loop.step_key(seed, 0, 'pass_rates'),
      rl=rl,
      setup=setup,
      counter=counter,
      num_samples=k,
    )
    for p, r in zip(chunk[:real], ro.rewards[:real], strict=True):
      out[p.uid] = float(np.mean(r >= 1.0))
  return out


# ---------------------------------------------------------------------------------------------------
# The loop.


def overlong_max_len(rl: ml_collections.ConfigDict) -> int:
  """DAPO's L_max: rl.overlong_max_len, or the generation limit when that is 0."""
  return int(rl.overlong_max_len or rl.max_new_tokens)


def shaped_rewards(rl: ml_collections.ConfigDict, rewards: np.ndarray, lengths: np.ndarray):
  """(rewards the advantages see [M, G], the shaping term [M, G]): the verifier's rewards plus
  DAPO's overlong penalty when rl.overlong_shaping is on, else unchanged."""
  if not rl.overlong_shaping:
    return rewards, np.zeros_like(rewards)
  pen = np.asarray(
    rewards_lib.overlong_penalty(
      np.asarray(lengths).reshape(rewards.shape), overlong_max_len(rl), rl.overlong_cache_len
    )
  )
  return (rewards + pen).astype(np.float32), pen


TIMING_KEYS = ('rollout_tok_s', 'update_tok_s', 'rollout_s', 'update_s', 'steps_per_sec')


def _ebpo_from(rl, extra) -> adv_lib.EBPOEstimator | None:
  if rl.estimator != 'ebpo':
    return None
  state = adv_lib.EBPOState.from_json(extra['ebpo']) if extra and 'ebpo' in extra else None
  return adv_lib.EBPOEstimator(
    rl.ebpo_mode,
    ddof=rl.ebpo_ddof,
    half_life=rl.ebpo_half_life,
    standardize=rl.ebpo_standardize,
    state=state,
  )


def train(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  setup: RLSetup,
  *,
  pass_rates_cache: str | pathlib.Path | None = None,
) -> dict[str, Any]:
  """Runs config.train.num_steps RL steps (resuming from the workdir) and returns results.json."""
  rl = config.rl
  if rl.estimator not in adv_lib.ESTIMATORS:
    raise config_lib.ConfigError(
      f'rl.estimator={rl.estimator!r}; expected one of {adv_lib.ESTIMATORS}'
    )
  if rl.loss_agg not in loss_lib.AGGREGATIONS:
    raise config_lib.ConfigError(f'rl.loss_agg={rl.loss_agg!r}; expected {loss_lib.AGGREGATIONS}')
  if rl.num_iterations < 1 or rl.num_minibatches < 1:
    raise config_lib.ConfigError('rl.num_iterations and rl.num_minibatches must be >= 1')
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
  workdir = train_loop.prepare_workdir(config, workdir)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  mesh = setup.mesh or sharding.make_mesh(config_lib.mesh_spec(config))
  num_steps = config.train.num_steps
  counter = _Counter()

  # The models are created before the mesh context: common.models.loader's nnx.eval_shape reads
  # logical axis names as mesh axes under jax.set_mesh and fails.
  policy = setup.create_model()
  ref_graphdef, ref_state = nnx.split(setup.create_model())
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    graphdef, state = nnx.split(train_loop.TrainState(policy, setup.tx))
    shardings = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    abstract = ckpt_lib.abstract_like(state, shardings)
    spec = train_loop.ShardedState(graphdef, abstract, shardings)

    sampler_kind = rl.curriculum
    rates = None
    if sampler_kind == 'difficulty':
      fp = curriculum_lib.fingerprint(
        'pass_rates',
        [p.uid for p in setup.train_prompts],
        rl.difficulty_rollouts,
        rl.max_new_tokens,
        rl.temperature,
        float(sum(float(jnp.sum(x)) for x in jax.tree.leaves(ref_state))),
      )
      cache = pass_rates_cache or (workdir / 'pass_rates.json')
      rates = curriculum_lib.cached_pass_rates(
        cache,
        fp,
        lambda: pass_rates(
          nnx.merge(ref_graphdef, ref_state),
          setup.train_prompts,
          rl.difficulty_rollouts,
          rl=rl,
          setup=setup,
          seed=0,  # one difficulty order per (policy, prompts, K), shared by every run seed
        ),
      )
    sampler = curriculum_lib.make_sampler(
      sampler_kind,
      setup.train_prompts,
      rl.prompts_per_step,
      config.seed,
      rates,
      block_batches=rl.cluster_block_batches,
    )

    ckpt = ckpt_lib.Checkpointer(
      workdir / 'checkpoints',
      every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save,
    )
    try:
      start, state, extra = train_loop.restore_or_init(config, ckpt, spec, lambda: state)
      ebpo = _ebpo_from(rl, extra)
      if extra:
        counter.failures = int(extra.get('verifier_failures', 0))
      results_path = workdir / 'results.json'
      if start >= num_steps and results_path.exists():
        metrics_lib.log('run already finished at step %d; nothing to do', start)
        return json.loads(results_path.read_text())
      writer = metrics_lib.MetricWriter(workdir, resume_step=start)
      try:
        return _loop(
          config,
          workdir,
          setup,
          spec,
          state,
          start,
          ref_graphdef,
          ref_state,
          sampler,
          ebpo,
          counter,
          ckpt,
          writer,
        )
      finally:
        writer.close()
    finally:
      ckpt.close()


def _loop(
  config,
  workdir,
  setup,
  spec,
  state,
  start,
  ref_graphdef,
  ref_state,
  sampler,
  ebpo,
  counter,
  ckpt,
  writer,
) -> dict[str, Any]:
  rl = config.rl
  g = rl.group_size
  num_steps = config.train.num_steps
  on_policy = rl.num_iterations == 1 and rl.num_minibatches == 1
  train_step = train_loop.make_train_step(spec.graphdef, make_loss_fn(rl), spec.shardings)
  sigterm = train_loop.SigtermFlag()
  progress = metrics_lib.Progress(start, num_steps)
  last_ckpt = ckpt.latest_step()
  last_train: dict = {}
  last_eval: dict = {}
  t_start = time.perf_counter()

  def extra_state():
    out = {'verifier_failures': counter.failures}
    if ebpo is not None:
      out['ebpo'] = ebpo.state.to_json()
    return out

  def save(step, wait=False):
    nonlocal last_ckpt
    if step != last_ckpt:
      ckpt.save(step, state, extra=extra_state(), meta={'train': last_train}, wait=wait)
      last_ckpt = step
    elif wait:
      ckpt.wait()

  def evaluate(step):
    model = train_loop.model_of(spec.graphdef, state)
    out = greedy_pass_at_1(model, setup.eval_prompts, rl=rl, setup=setup, counter=counter)
    writer.write(step, 'eval', out)
    metrics_lib.log('step %d eval %s', step, {k: round(v, 4) for k, v in out.items()})
    return out

  with sigterm.installed():
    if start == 0 and setup.eval_prompts and config.train.eval_every > 0:
      last_eval = evaluate(0)
    for step in range(start + 1, num_steps + 1):
      model = train_loop.model_of(spec.graphdef, state)
      prompts = sampler.batch(step)
      ro = rollout(
        model,
        prompts,
        train_loop.step_key(config.seed, step, 'rollout'),
        rl=rl,
        setup=setup,
        counter=counter,
      )
      group_mask = np.ones((len(prompts), g), bool)
      discarded = 0.0
      if rl.estimator == 'dapo':
        ro, group_mask, discarded = _dynamic_sampling(
          ro, model, sampler, step, config, setup, counter
        )
      clusters = [p.cluster for p in ro.prompts]
      shaped, penalty = shaped_rewards(rl, ro.rewards, ro.lengths)
      a, raw, extra = compute_advantages(rl.estimator, shaped, group_mask, clusters, ebpo)
      batch = dict(ro.batch)
      batch['completion_mask'] = batch['completion_mask'] * group_mask.reshape(-1)[:, None].astype(
        np.float32
      )
      batch['advantages'] = a.reshape(-1).astype(np.float32)
      behaviour = batch.pop('behaviour_logp')
      jbatch = jax.device_put(batch)
      if on_policy:
        # The loss takes the ratio's denominator from its own forward (exactly 1); old_logp only
        # feeds the behaviour_logp_dev metric, so the sampler's logprobs serve and save a forward.
        batch['old_logp'] = behaviour
      else:
        batch['old_logp'] = np.asarray(_score_train_state(spec.graphdef, state, jbatch))
      if rl.kl_coef:
        batch['ref_logp'] = np.asarray(_score_model(ref_graphdef, ref_state, jbatch))
      else:
        batch['ref_logp'] = batch['old_logp']

      t0 = time.perf_counter()
      step_metrics = []
      mb = (len(ro.prompts) * g) // rl.num_minibatches
      for it in range(rl.num_iterations):
        for k in range(rl.num_minibatches):
          sl = slice(k * mb, (k + 1) * mb)
          minibatch = {key: v[sl] for key, v in batch.items()}
          state, m = train_step(
            state, minibatch, train_loop.step_key(config.seed, step, f'update/{it}/{k}')
          )
          step_metrics.append(m)
      step_metrics = jax.device_get(step_metrics)
      update_s = time.perf_counter() - t0

      valid = batch['completion_mask'] > 0
      n_tok = float(valid.sum())
      flat_rewards = ro.rewards[group_mask]
      metrics = {
        'loss': float(np.mean([m['loss'] for m in step_metrics])),
        'reward_mean': float(flat_rewards.mean()) if flat_rewards.size else 0.0,
        'pass_at_1': float((flat_rewards >= 1.0).mean()) if flat_rewards.size else 0.0,
        'zero_signal_frac': float(adv_lib.zero_signal_fraction(jnp.asarray(raw), group_mask)),
        'entropy': float(ro.entropies[valid].mean()) if n_tok else 0.0,
        'kl': float(np.mean([m['kl'] for m in step_metrics])),
        'clip_frac': float(np.mean([m['clip_frac'] for m in step_metrics])),
        'ratio_max_dev': float(step_metrics[0]['ratio_max_dev']),
        'behaviour_logp_dev': float(step_metrics[0]['behaviour_logp_dev']),
        'response_len': float(ro.lengths.mean()),
        'grad_norm': float(np.mean([m['grad_norm'] for m in step_metrics])),
        'adv_abs_mean': float(np.abs(a[group_mask]).mean()) if group_mask.any() else 0.0,
        'verifier_failures': counter.failures,
        'rollout_s': ro.seconds,
        'update_s': update_s,
        'rollout_tok_s': float(ro.lengths.sum()) / max(ro.seconds, 1e-9),
        'update_tok_s': rl.num_iterations * float(batch['inputs'].size) / max(update_s, 1e-9),
        **extra,
      }
      if rl.estimator == 'dapo':
        metrics['dapo_discarded_frac'] = discarded
      if rl.overlong_shaping:
        metrics['overlong_penalty'] = float(penalty[group_mask].mean()) if group_mask.any() else 0.0
        metrics['overlong_frac'] = (
          float((penalty[group_mask] < 0).mean()) if group_mask.any() else 0.0
        )
      if not math.isfinite(metrics['loss']):
        raise train_loop.NonFiniteLoss(
          f'loss is {metrics["loss"]} at step {step}; stopped, last good checkpoint is step '
          f'{last_ckpt}'
        )
      last_train = metrics
      if step % config.train.log_every == 0 or step == num_steps:
        writer.write(step, 'train', metrics)
        shown = {k: v for k, v in metrics.items() if k not in ('rollout_s', 'update_s')}
        metrics_lib.log(
          '%s', metrics_lib.Progress.line(step, num_steps, shown, progress.update(step))
        )
      if (
        config.train.eval_every > 0
        and setup.eval_prompts
        and (step % config.train.eval_every == 0 or step == num_steps)
      ):
        last_eval = evaluate(step)
      if ckpt.should_save(step) or step == num_steps:
        save(step)
      train_loop._inject_faults(config, step, ckpt)  # noqa: SLF001  (the shared debug hooks)
      if sigterm.received:
        save(step, wait=True)
        writer.flush()
        raise train_loop.Preempted(f'SIGTERM: saved a checkpoint at step {step}')

  ckpt.wait()
  results = {
    'step': num_steps,
    'train': last_train,
    'eval': last_eval,
    'wall_time_sec': time.perf_counter() - t_start,
  }
  if jax.process_index() == 0:
    metrics_lib.write_json(pathlib.Path(workdir) / 'results.json', results)
  writer.flush()
  return results


def _dynamic_sampling(ro, model, sampler, step, config, setup, counter):
  """DAPO: keep groups whose rewards differ, refill from extra rollouts; mask what stays empty."""
  rl = config.rl
  g, m = rl.group_size, rl.prompts_per_step
  parts = [ro]
  keep = np.asarray(adv_lib.dapo_keep(jnp.asarray(ro.rewards)))
  chosen = [(0, i) for i in np.flatnonzero(keep)]
  total = m
  for k in range(1, rl.dapo_max_refill + 1):
    if len(chosen) >= m:
      break
    extra = rollout(
      model,
      sampler.refill(step, k),
      train_loop.step_key(config.seed, step, f'refill/{k}'),
      rl=rl,
      setup=setup,
      counter=counter,
    )
    parts.append(extra)
    total += m
    keep = np.asarray(adv_lib.dapo_keep(jnp.asarray(extra.rewards)))
    chosen += [(len(parts) - 1, i) for i in np.flatnonzero(keep)]
  discarded = 1.0 - len(chosen) / total
  chosen = chosen[:m]
  mask = np.ones((m, g), bool)
  if len(chosen) < m:  # not enough informative groups: pad with masked-out dropped groups
    dropped = [(0, i) for i in range(m) if (0, i) not in chosen]
    mask[len(chosen) :] = False
    chosen = chosen + dropped[: m - len(chosen)]
  return _concat(parts, chosen, g), mask, discarded
